"""The validated argument types every tool's command line uses (argparse `type=`), and its parser class.

    p = ArgumentParser(prog="finetune.py")
    p.add_argument("--lr", type=positive_float)          # finite and > 0
    p.add_argument("--seed", type=seed, default=0)       # an integer in [0, 2**32 - 1]
    p.add_argument("--top-p", type=probability_mass)     # in (0, 1]

Each type is an ArgType: called with the flag's text it returns the value, or raises
argparse.ArgumentTypeError saying what was expected and what was given, so a bad value ends as one line

    finetune.py: error: argument --lr: expected a finite number > 0, got 'nan'

and exit status 2, before any model is built. ArgType.kind ("int", "float", "names", "size") lets
tests/test_numeric_flags.py find every numeric flag of every tool by walking the parsers; a plain `type=int`
or `type=float` there fails that test (int accepts -1 and 10**12; float accepts nan and inf).

The upper bounds (MAX_*) exist only where a larger value would allocate absurdly or hang before any other
check could speak (a model dimension, a sequence length, a thread count); they are far above any real use.
This module imports nothing from the package, so any part of it (minipeft/peft/registry.py too) may use it.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from typing import Callable, Optional

MAX_SEED = 2**32 - 1            # what every seeded library (torch, numpy, random) takes
MAX_THREADS = 1024              # torch.set_num_threads(10**5) starts them all (and crashes at exit)
MAX_SEQ_LEN = 1 << 20           # positions of a RoPE table / a KV cache, allocated up front
MAX_DIM = 1 << 16               # a hidden or feed-forward width (LLaMA-65B: 8192 / 22016)
MAX_LAYERS = 1024               # decoder blocks
MAX_VOCAB = 1 << 20             # tokenizer pieces / embedding rows (BLOOM: 250880)
MAX_BATCH = 1 << 16             # examples in one batch, micro-batches in one step
MAX_LOCAL_RANK = 1023           # processes (devices) on one machine


class ArgType:
    """An argparse type: text -> value, or ArgumentTypeError("expected <what>, got <text>")."""

    def __init__(self, kind: str, expected: str, convert: Callable[[str], object], hint: str = ""):
        self.kind = kind            # "int", "float" (the numeric ones), "names", "size"
        self.expected = expected    # "an integer >= 1"
        self.convert = convert      # raises ValueError for a value outside the type
        self.hint = hint            # said after the value: "for no checkpoints at all, use --save-every 0"
        self.__name__ = expected    # argparse names a type by __name__ in some messages

    def __call__(self, text: str):
        try:
            return self.convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {self.expected}, got {text!r}"
                                             + (f" ({self.hint})" if self.hint else "")) from None

    def with_hint(self, hint: str) -> "ArgType":
        """The same type, its message ending with `hint` (what to give instead)."""
        return ArgType(self.kind, self.expected, self.convert, hint)

    def __repr__(self) -> str:
        return f"ArgType({self.expected})"


def _bounds(low, high, low_open: bool, high_open: bool, what: str) -> str:
    def show(v):
        return f"{v:g}" if isinstance(v, float) else str(v)
    if high is None:
        return f"{what} {'>' if low_open else '>='} {show(low)}"
    return f"{what} in {'(' if low_open else '['}{show(low)}, {show(high)}{')' if high_open else ']'}"


def int_range(low: int, high: Optional[int] = None, then: Callable = None) -> ArgType:
    """An integer in [low, high] (no upper bound when high is None); `then` maps the value afterwards."""
    def convert(text):
        value = int(text)
        if value < low or (high is not None and value > high):
            raise ValueError(text)
        return then(value) if then else value
    return ArgType("int", _bounds(low, high, False, False, "an integer"), convert)


def float_range(low: float, high: Optional[float] = None, low_open: bool = False,
                high_open: bool = False) -> ArgType:
    """A finite number in the interval (nan and inf are never one)."""
    def convert(text):
        value = float(text)
        if not math.isfinite(value) or value < low or (low_open and value == low):
            raise ValueError(text)
        if high is not None and (value > high or (high_open and value == high)):
            raise ValueError(text)
        return value
    what = "a finite number" if high is None else "a number"
    return ArgType("float", _bounds(low, high, low_open, high_open, what), convert)


positive_int = int_range(1)                                 # sizes, counts, steps
non_negative_int = int_range(0)                             # "0: never / all / skip" counts
local_rank = int_range(0, MAX_LOCAL_RANK)                   # set by the deepspeed launcher
seed = int_range(0, MAX_SEED)
threads = int_range(1, MAX_THREADS)
seq_len = int_range(1, MAX_SEQ_LEN)
dim = int_range(1, MAX_DIM)
layers = int_range(1, MAX_LAYERS)
vocab_size = int_range(1, MAX_VOCAB)
batch_size = int_range(1, MAX_BATCH)
positive_float = float_range(0.0, low_open=True)            # learning rates, epochs, norms, minutes
non_negative_float = float_range(0.0)                       # weight decay, temperature (0: greedy)
fraction = float_range(0.0, 1.0, high_open=True)            # [0, 1): warm-up share, dropout, held-out share
closed_fraction = float_range(0.0, 1.0)                     # [0, 1]: lr floor ratio, masked share
probability_mass = float_range(0.0, 1.0, low_open=True)     # (0, 1]: nucleus (top-p) mass
open_fraction = float_range(0.0, 1.0, low_open=True, high_open=True)   # (0, 1): a split that needs both sides


def _names(text):
    items = tuple(t.strip() for t in text.split(","))
    if not text.strip() or not all(items) or not all(re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.]*", t) for t in items):
        raise ValueError(text)
    return items


names = ArgType("names", "comma-separated names (wq,wv)", _names)

def _size(text):
    """5000000, "5GB", "200MB", "64KiB" -> bytes (powers of 1024, as minipeft.checkpoint.writer.parse_size)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)I?B?\s*", text.upper())
    if not match:
        raise ValueError(text)
    value = int(float(match.group(1)) * 1024 ** " KMGT".index(match.group(2) or " "))
    if value < 1:
        raise ValueError(text)
    return value


byte_size = ArgType("size", "a size in bytes > 0, e.g. 5GB, 200MB, 1000000", _size)


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser, with a bad command line answered in one line (no usage block above it):
    `prog: error: argument --x: expected ..., got '...'`, exit status 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")

    def exit(self, status: int = 0, message: Optional[str] = None):
        if message:
            sys.stderr.write(message)
        sys.exit(status)
