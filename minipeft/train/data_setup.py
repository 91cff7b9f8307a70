"""The data of a run: the training and validation files read, encoded and reported.

A data file is Alpaca records (JSON list or JSON Lines, rendered by data.AlpacaEncoder, the prompt masked) or
a tokenized file written by tools/prepare_data.py (used as written). Without --val-data the validation
records are a seeded split of the training file. The report says what was read, cut and skipped.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List

from ..data import (AlpacaEncoder, DataError, Example, Record, load_tokenized, read_records, read_text_file,
                    train_val_split)
from ..fileio import file_sha256


@dataclass
class RunData:
    train: List[Example]
    val: List[Example]
    val_records: List[Record] = field(default_factory=list)   # empty for tokenized files (no exact match)
    report: List[str] = field(default_factory=list)           # lines saying what was read, cut, skipped


def _read_examples(path, encoder: AlpacaEncoder, strict: bool, report: List[str]):
    """A data file -> (examples, records or None). Tokenized files (prepare_data.py) are used as written."""
    first = read_text_file(path)[:4096].split("\n", 1)[0]
    if '"minipeft_tokenized"' in first:
        examples, header = load_tokenized(path)
        check_tokenized_tokenizer(path, header, examples, encoder.tokenizer)
        if header.get("max_seq_len", 0) > encoder.max_seq_len:
            examples = [e for e in examples if len(e.input_ids) <= encoder.max_seq_len]
        report.append(f"{path}: {len(examples)} tokenized examples")
        return examples, None
    records, problems = read_records(path, strict=strict)
    for problem in problems:
        report.append(f"{path}: skipped {problem}")
    return records, problems


def check_tokenized_tokenizer(path, header: dict, examples: List[Example], tokenizer) -> None:
    """A tokenized file must have been made with the run's tokenizer: the same file (its SHA-256, written by
    prepare_data.py) and, for older files without it, ids inside the vocabulary."""
    saved = header.get("tokenizer_sha256")
    tokenizer_path = getattr(tokenizer, "path", None)
    if saved is not None and tokenizer_path is not None and saved != file_sha256(tokenizer_path):
        raise DataError(f"{path}: made with another tokenizer ({header.get('tokenizer')}) than this run's "
                        f"{tokenizer_path}; tokenize it again with tools/prepare_data.py --tokenizer {tokenizer_path}")
    vocab = tokenizer.vocab_size
    for line_no, example in enumerate(examples, start=2):
        if max(example.input_ids) >= vocab or min(example.input_ids) < 0:
            raise DataError(f"{path}: line {line_no}: token id {max(example.input_ids)} is outside the vocabulary "
                            f"({vocab}) of {tokenizer_path}; made with another tokenizer?")


def load_run_data(cfg, tokenizer) -> RunData:
    """The RunData of a TrainConfig: its train_data / val_data (or split) encoded with `tokenizer`."""
    encoder = AlpacaEncoder(tokenizer, cfg.max_seq_len, train_on_prompt=cfg.train_on_prompt)
    report: List[str] = []

    def encode(records, name):
        examples, stats = encoder.encode_all(records)
        report.append(f"{name}: {stats.summary()}")
        if stats.dropped_indices:
            report.append(f"{name}: dropped records (too long for --max-seq-len {cfg.max_seq_len}): "
                          f"{stats.dropped_indices[:20]}")
        return examples

    train_items, train_problems = _read_examples(cfg.train_data, encoder, cfg.strict_data, report)
    train_is_records = train_problems is not None
    if cfg.val_data is not None:
        val_items, val_problems = _read_examples(cfg.val_data, encoder, cfg.strict_data, report)
        val_is_records = val_problems is not None
    else:
        train_items, val_items = train_val_split(train_items, cfg.val_fraction, cfg.seed)
        val_is_records = train_is_records
    train = encode(train_items, "train") if train_is_records else train_items
    val = encode(val_items, "validation") if val_is_records else val_items
    if not train:
        reasons = [line.split(": ", 1)[1] for line in report if line.startswith(f"{cfg.train_data}: skipped")]
        reasons += [line.split(": ", 1)[1] for line in report if line.startswith("train: ")]
        shown = "; ".join(reasons[:5]) + (f"; ... ({len(reasons) - 5} more)" if len(reasons) > 5 else "")
        raise DataError(f"{cfg.train_data}: no usable training examples ({shown or 'the file holds none'})")
    return RunData(train=train, val=val, val_records=list(val_items) if val_is_records else [], report=report)
