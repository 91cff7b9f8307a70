"""Pretrain the tiny bases the package ships: a tokenizer of the family's own kind, then a small decoder.

    python tools/pretrain_tiny.py --corpus ../shared/data/shakespeare.txt \\
        --corpus ../shared/data/kjv.txt --corpus ../shared/data/tang_song_poems_zh.txt:0.15 --out runs/tiny
    ... --family bloom     (or chatglm): the same run for a BLOOM- or ChatGLM-6B-style model
    ... --init-from FOLDER --corpus zh.txt --out runs/x: further pretraining of a checkpoint (Chinese-LLaMA's way)

What it does, step by step, and what it writes: minipeft/pretrain/run.py (the code is the package's,
minipeft/pretrain/; what differs per family: its family_recipes.py).
"""

import sys

from minipeft.cli_errors import run_main
from minipeft.pretrain import build_arg_parser as build_parser, run_command_line  # noqa: F401 (the flags)

if __name__ == "__main__":
    sys.exit(run_main(run_command_line, "pretrain_tiny.py"))
