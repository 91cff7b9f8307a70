"""minipeft: a readable LLaMA decoder with hand-written PEFT methods."""

import pathlib


def assets_dir() -> pathlib.Path:
    """The folder of files the package ships: tiny-llama/ (pretrained tiny model + tokenizer), demo_data/."""
    return pathlib.Path(__file__).resolve().parent / "assets"
