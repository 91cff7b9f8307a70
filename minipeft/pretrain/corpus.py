"""The corpus of pretraining (tools/pretrain_tiny.py): its files, and each file's train / held-out split.

A corpus file is plain text, or an Alpaca .json / .jsonl file read as the text of its records (instruction,
input and output, one record after another). Each file is cut at a line boundary; its last val_fraction of the
text is held out for validation and never trained on. How a window of its tokens becomes a sample: samples.py.
"""

from __future__ import annotations

from pathlib import Path


class PretrainError(ValueError):
    """Bad arguments or corpus files for pretraining."""


class PretrainFailed(PretrainError):
    """A run that started and could not finish (a non-finite loss, a stop on request): exit 1, not bad input's 2."""


def parse_corpus_arg(arg: str):
    """'path' or 'path:weight' -> (Path, weight or None)."""
    path, weight = arg, None
    head, sep, tail = arg.rpartition(":")
    if sep and head:
        try:
            weight = float(tail)
            path = head
        except ValueError:
            pass
    p = Path(path)
    if not p.is_file():
        raise PretrainError(f"--corpus {arg!r}: no such file {p}")
    if weight is not None and weight <= 0:
        raise PretrainError(f"--corpus {arg!r}: the sampling weight after ':' must be positive")
    return p, weight


def read_corpus_text(path: Path) -> str:
    """A plain-text file as it is; an Alpaca .json / .jsonl file as its records' texts (data.record_fields: each
    record's fields stripped, a line each, one record after another)."""
    from ..data import DataError, record_fields
    if path.suffix in (".json", ".jsonl"):
        try:
            return "".join("\n".join(text.strip() for text in fields) + "\n" for fields in record_fields(path))
        except DataError as err:
            raise PretrainError(f"--corpus {err}") from None
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise PretrainError(f"--corpus {path}: not UTF-8 text (byte offset {e.start})") from None


def split_train_val(text: str, val_fraction: float):
    """Cut at the first line boundary after (1 - val_fraction) of the characters: (train_text, val_text)."""
    cut = int(len(text) * (1.0 - val_fraction))
    newline = text.find("\n", cut)
    cut = len(text) if newline < 0 else newline + 1
    return text[:cut], text[cut:]


def first_lines(text: str, max_chars: int) -> str:
    """The leading whole lines of text, at most max_chars characters (at least one line)."""
    out, size = [], 0
    for line in text.splitlines(keepends=True):
        if out and size + len(line) > max_chars:
            break
        out.append(line)
        size += len(line)
    return "".join(out)
