"""minipeft: a readable LLaMA decoder with hand-written PEFT methods."""

import pathlib

from .checkpoint import load_model, save_model
from .config import ModelConfig
from .families import build_model
from .model import Transformer
from .tokenizer import Tokenizer

__version__ = "0.1.0"
__all__ = ["ModelConfig", "Transformer", "Tokenizer", "build_model", "load_model", "save_model", "assets_dir"]


def assets_dir() -> pathlib.Path:
    """The folder of files the package ships: tiny-llama/ (pretrained tiny model + tokenizer), demo_data/."""
    return pathlib.Path(__file__).resolve().parent / "assets"
