"""Alpaca-format records -> prompt template -> token ids + labels (prompt masked), batching, splits.

A record is a JSON object with `instruction`, an optional `input` and `output` (the Alpaca format). The
file is either one JSON list of records or JSON Lines (one record per line).

Each family renders records into its own prompt format (prompts.py: Alpaca for LLaMA and BLOOM, ChatGLM's
"[Round 0]\n问：...答：" forms), chosen by `tokenizer.family` through the family's record.

One example (T = P + R tokens; for LLaMA, the ChatGLMs put their marks where the tokenizer says):

    prompt_ids   = [BOS] + sp(prompt text)                       P tokens
    response_ids = sp(output) + [EOS]                            R tokens
    input_ids    = prompt_ids + response_ids                     (T,)
    labels       = [-100] * P + response_ids                     (T,)   (= input_ids with train_on_prompt)

The prompt and the response are encoded separately, so the ids the model sees after the prompt in
training are exactly the ids `generate` produces after the same prompt. Labels are aligned with
input_ids; the loss shifts them: logits[:, t] predicts labels[:, t + 1] (see minipeft/loss.py).

Truncation to max_seq_len (T > max_seq_len) never silently drops the whole response:
  1. the prompt is cut first, keeping its leading marks (BOS; ChatGLM2's [gMASK] sop) and the prompt's *end*
     (the "### Response:" / "答：" marker, any trailing marks such as ChatGLM-6B's [gMASK] <sop>, and the
     instruction/input text nearest to them), down to a minimum of the marks + the marker's tokens;
  2. only if the response still does not fit is the response cut, keeping its *beginning* (its EOS
     is then lost);
  3. if not even one response token fits beside the minimal prompt, the record is dropped.
Truncated and dropped records are counted in `EncodeStats`.

Malformed records (not an object, missing or non-string fields, empty instruction and output) are
reported with their index and skipped, or refused with a `DataError` when strict=True.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from .loss import IGNORE_INDEX, causal_lm_loss  # noqa: F401  (causal_lm_loss: its old home, kept importable)
from .prompts import PromptFormat, format_prompt, prompt_format_of  # noqa: F401  (the formats: prompts.py)

class DataError(ValueError):
    """A data file or record that cannot be used; the message names the file, record index and field."""


# ---- reading records ----------------------------------------------------------------------------
@dataclass
class Record:
    instruction: str
    output: str
    input: str = ""      # (the prompt text depends on the family: prompt_format.render(instruction, input))


@dataclass
class Problem:
    index: int        # position of the record in the file (0-based; the line number - 1 for JSON Lines)
    reason: str

    def __str__(self) -> str:
        return f"record {self.index}: {self.reason}"


def record_problem(obj) -> Optional[str]:
    """What is wrong with one decoded JSON value as an Alpaca record, or None if it is usable."""
    if not isinstance(obj, dict):
        return f"expected a JSON object with instruction/input/output, got {type(obj).__name__}"
    for key in ("instruction", "output"):
        if key not in obj:
            return f"missing field {key!r}"
    for key in ("instruction", "input", "output"):
        if obj.get(key) is not None and not isinstance(obj[key], str):
            return f"field {key!r} must be a string, got {type(obj[key]).__name__}"
    if not (obj["output"] or "").strip():
        return "output is empty (nothing to learn)" if (obj["instruction"] or "").strip() else "instruction and output are both empty"
    return None


def parse_records(values: Sequence, *, strict: bool = False, source: str = "records",
                  indices: Optional[Sequence[int]] = None) -> Tuple[List[Record], List[Problem]]:
    """Decoded JSON values -> (good records, problems). strict=True raises on the first problem."""
    records, problems = [], []
    for position, obj in enumerate(values):
        index = indices[position] if indices is not None else position
        reason = record_problem(obj)
        if reason is None:
            records.append(Record(instruction=obj["instruction"] or "", output=obj["output"],
                                  input=obj.get("input") or ""))
        elif strict:
            raise DataError(f"{source}: record {index}: {reason}")
        else:
            problems.append(Problem(index, reason))
    return records, problems


def read_text_file(path) -> str:
    """The text of a UTF-8 file (BOM dropped); DataError naming the file and the line of the first non-UTF-8 byte."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file {path} does not exist" + (" (it is a folder)" if path.is_dir() else ""))
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = raw[:err.start].count(b"\n") + 1
        raise DataError(f"{path}: line {line}: not UTF-8 text (byte {raw[err.start]:#04x} at offset "
                        f"{err.start}); save the file as UTF-8") from None


def read_records(path, *, strict: bool = False) -> Tuple[List[Record], List[Problem]]:
    """Read an Alpaca JSON list or JSON Lines file -> (records, problems). Lines that are not valid JSON
    are problems too (with their 0-based line index); a file that is neither format is a DataError."""
    text = read_text_file(path)
    path = Path(path)
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            values = json.loads(text)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}: not valid JSON ({err})") from None
        if not isinstance(values, list):
            raise DataError(f"{path}: expected a JSON list of records, got {type(values).__name__}")
        return parse_records(values, strict=strict, source=str(path))

    if stripped.startswith("{") and "\n" in stripped.strip():
        try:
            json.loads(text)
            raise DataError(f"{path}: one JSON object; expected a JSON list of records or JSON Lines (one per line)")
        except json.JSONDecodeError:
            pass                                            # JSON Lines: each line is checked below
    values, indices, problems = [], [], []
    for index, line in enumerate(text.splitlines()):
        if not line.strip():
            continue
        try:
            values.append(json.loads(line))
            indices.append(index)
        except json.JSONDecodeError as err:
            if strict:
                raise DataError(f"{path}: record {index}: line is not valid JSON ({err.msg})") from None
            problems.append(Problem(index, f"line is not valid JSON ({err.msg})"))
    records, more_problems = parse_records(values, strict=strict, source=str(path), indices=indices)
    problems = sorted(problems + more_problems, key=lambda p: p.index)
    if not records and not problems:
        raise DataError(f"{path}: no records (expected a JSON list or JSON Lines of Alpaca records)")
    return records, problems


def record_fields(path) -> List[List[str]]:
    """Per valid record of an Alpaca file its non-empty fields as written (instruction data read as plain text)."""
    records, problems = read_records(path)
    if not records:
        raise DataError(f"{path}: no usable Alpaca records ({problems[0]})")
    return [[text for text in (r.instruction, r.input, r.output) if text] for r in records]


# ---- tokenising ---------------------------------------------------------------------------------
@dataclass
class Example:
    input_ids: List[int]     # (T,) prompt + response
    labels: List[int]        # (T,) IGNORE_INDEX on the prompt unless train_on_prompt
    prompt_len: int          # P, tokens of the (possibly cut) prompt, BOS included


@dataclass
class EncodeStats:
    records: int = 0             # records given
    kept: int = 0                # examples produced
    truncated_prompt: int = 0    # prompt cut (response complete)
    truncated_response: int = 0  # response cut too (its end and EOS lost)
    dropped: int = 0             # not even one response token fitted
    dropped_indices: List[int] = field(default_factory=list)
    prompt_tokens: int = 0
    response_tokens: int = 0

    def summary(self) -> str:
        return (f"{self.kept} examples from {self.records} records; {self.truncated_prompt} with the prompt cut, "
                f"{self.truncated_response} with the response cut, {self.dropped} dropped (too long); "
                f"{self.prompt_tokens} prompt + {self.response_tokens} response tokens")


class AlpacaEncoder:
    """Record -> Example with the template, masking and truncation rule of this module's docstring."""

    def __init__(self, tokenizer, max_seq_len: int, *, train_on_prompt: bool = False,
                 prompt_format: Optional[PromptFormat] = None):
        if max_seq_len < 2:
            raise DataError(f"max_seq_len must be at least 2, got {max_seq_len}")
        self.tokenizer = tokenizer
        self.max_seq_len = max_seq_len
        self.train_on_prompt = train_on_prompt
        if prompt_format is None:
            try:
                prompt_format = prompt_format_of(tokenizer)
            except ValueError as err:                                 # FamilyError: no such family
                raise DataError(f"no prompt format: {err}") from None
        self.format = prompt_format
        # Where the tokenizer puts a prompt's marks: `lead` ids in front (LLaMA's BOS), `trail` behind
        # (ChatGLM-6B's [gMASK] <sop>).
        plain, marked = tokenizer.encode("x", bos=False), tokenizer.encode("x", bos=True)
        self.lead = next(i for i in range(len(marked) - len(plain) + 1) if marked[i:i + len(plain)] == plain)
        self.trail = len(marked) - len(plain) - self.lead
        # Tokens the response marker takes at the end of a prompt, measured in context: the smallest
        # prompt truncation may leave is the marks + these.
        example = self.format.render("x")
        full = tokenizer.encode(example, bos=False)
        without = tokenizer.encode(example[: -len(self.format.response_marker)], bos=False)
        self.marker_len = max(1, len(full) - len(without))

    def encode_prompt(self, record_or_prompt) -> List[int]:
        """The prompt ids generation starts from: the family's marks around sp(prompt text) ([BOS] + ... for LLaMA)."""
        if isinstance(record_or_prompt, Record):
            text = self.format.render(record_or_prompt.instruction, record_or_prompt.input)
        else:
            text = record_or_prompt
        return self.tokenizer.encode(text, bos=True, eos=False)

    def encode(self, record: Record, stats: Optional[EncodeStats] = None, index: int = 0) -> Optional[Example]:
        """One record -> Example, or None when it cannot keep a single response token (counted as dropped)."""
        stats = stats if stats is not None else EncodeStats()
        stats.records += 1
        prompt_ids = self.encode_prompt(record)                                       # (P,)
        response_ids = self.tokenizer.encode(record.output, bos=False, eos=True)      # (R,)
        limit = self.max_seq_len
        if len(prompt_ids) + len(response_ids) > limit:
            min_prompt = min(len(prompt_ids), self.lead + self.marker_len + self.trail)
            prompt_keep = max(limit - len(response_ids), min_prompt)
            response_keep = limit - prompt_keep
            if response_keep < 1:
                stats.dropped += 1
                stats.dropped_indices.append(index)
                return None
            if prompt_keep < len(prompt_ids):
                tail_len = prompt_keep - self.lead
                tail = prompt_ids[len(prompt_ids) - tail_len:] if tail_len > 0 else []
                prompt_ids = prompt_ids[:self.lead] + tail                            # marks + the prompt's end
            if response_keep < len(response_ids):
                response_ids = response_ids[:response_keep]                            # the response's start
                stats.truncated_response += 1
            else:
                stats.truncated_prompt += 1
        input_ids = prompt_ids + response_ids
        labels = list(input_ids) if self.train_on_prompt else [IGNORE_INDEX] * len(prompt_ids) + response_ids
        stats.kept += 1
        stats.prompt_tokens += len(prompt_ids)
        stats.response_tokens += len(response_ids)
        return Example(input_ids=input_ids, labels=labels, prompt_len=len(prompt_ids))

    def encode_all(self, records: Sequence[Record]) -> Tuple[List[Example], EncodeStats]:
        stats = EncodeStats()
        examples = [self.encode(r, stats, i) for i, r in enumerate(records)]
        return [e for e in examples if e is not None], stats


# ---- batching, splitting, data order -------------------------------------------------------------
def collate(examples: Sequence[Example], pad_id: int) -> Dict[str, torch.Tensor]:
    """Right-pad a batch. Returns input_ids (B, T) int64 (pad_id after the end), labels (B, T) with
    IGNORE_INDEX on padding, attention_mask (B, T) with 1 for real tokens, 0 for padding."""
    if not examples:
        raise DataError("collate got an empty batch")
    T = max(len(e.input_ids) for e in examples)
    B = len(examples)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)                          # (B, T)
    labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)                       # (B, T)
    attention_mask = torch.zeros((B, T), dtype=torch.long)                            # (B, T)
    for row, e in enumerate(examples):
        n = len(e.input_ids)
        input_ids[row, :n] = torch.tensor(e.input_ids, dtype=torch.long)
        labels[row, :n] = torch.tensor(e.labels, dtype=torch.long)
        attention_mask[row, :n] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


def train_val_split(items: Sequence, val_fraction: float, seed: int) -> Tuple[list, list]:
    """Seeded shuffle, then the first round(val_fraction * n) items (at least 1 when val_fraction > 0 and
    n > 1) are the validation split; both splits keep the file's order otherwise."""
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"val_fraction must be in [0, 1), got {val_fraction}")
    n = len(items)
    n_val = round(val_fraction * n)
    if val_fraction > 0 and n > 1:
        n_val = max(1, min(n_val, n - 1))
    order = list(range(n))
    random.Random(seed).shuffle(order)
    val_idx = set(order[:n_val])
    train = [items[i] for i in range(n) if i not in val_idx]
    val = [items[i] for i in range(n) if i in val_idx]
    return train, val


def epoch_order(n: int, seed: int, epoch: int) -> List[int]:
    """The order of the n training examples in `epoch`: a pure function of (seed, epoch), so a resumed
    run replays exactly the batches an uninterrupted run would see."""
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(n, generator=generator).tolist()


# ---- tokenized dataset files (tools/prepare_data.py) --------------------------------------------
def save_tokenized(examples: Sequence[Example], path, meta: Optional[dict] = None, overwrite: bool = False) -> None:
    """Write examples as JSON Lines of {"input_ids", "labels", "prompt_len"}; the first line is a header
    {"minipeft_tokenized": 1, ...meta}. Written atomically (fileio.write_atomic); an existing file is
    replaced only when `overwrite` (DataError otherwise)."""
    from .fileio import refuse_existing, write_atomic
    path = Path(path)
    refuse_existing(path, overwrite, DataError)
    path.parent.mkdir(parents=True, exist_ok=True)

    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(json.dumps({"minipeft_tokenized": 1, **(meta or {})}) + "\n")
            for e in examples:
                f.write(json.dumps({"input_ids": e.input_ids, "labels": e.labels, "prompt_len": e.prompt_len}) + "\n")
    write_atomic(path, write, overwrite=overwrite, error=DataError)   # never over a file that appeared meanwhile


def load_tokenized(path) -> Tuple[List[Example], dict]:
    """Read a file written by save_tokenized -> (examples, header). DataError naming the file and line for
    anything else."""
    path = Path(path)
    lines = read_text_file(path).splitlines()
    try:
        header = json.loads(lines[0]) if lines else {}
    except json.JSONDecodeError:
        header = {}
    if not isinstance(header, dict) or header.get("minipeft_tokenized") != 1:
        raise DataError(f"{path} is not a tokenized dataset written by tools/prepare_data.py (no header line)")
    examples = []
    for line_no, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            input_ids, labels, prompt_len = row["input_ids"], row["labels"], row["prompt_len"]
        except json.JSONDecodeError as err:
            raise DataError(f"{path}: line {line_no}: not valid JSON ({err.msg})") from None
        except (KeyError, TypeError):
            raise DataError(f"{path}: line {line_no}: expected an object with input_ids, labels, prompt_len") from None
        if not (isinstance(input_ids, list) and isinstance(labels, list) and all(type(i) is int for i in input_ids)
                and all(type(i) is int for i in labels) and type(prompt_len) is int):
            raise DataError(f"{path}: line {line_no}: input_ids and labels must be lists of integers, prompt_len "
                            f"an integer")
        if len(input_ids) != len(labels):
            raise DataError(f"{path}: line {line_no}: input_ids and labels differ in length")
        if not input_ids:
            raise DataError(f"{path}: line {line_no}: empty example")
        examples.append(Example(input_ids, labels, prompt_len))
    return examples, header
