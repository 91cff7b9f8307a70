"""minipeft.data: the Alpaca template, token ids and label masks (checked against sentencepiece called
directly on the template's pieces), truncation, malformed records, batching, splits, the loss, and
tools/prepare_data.py."""

import json
import math
import sys
from pathlib import Path

import pytest
import sentencepiece as spm
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from helpers_tokenizer import train_tiny_sentencepiece  # noqa: E402

from minipeft.data import (IGNORE_INDEX, AlpacaEncoder, DataError, EncodeStats, Example, Record,  # noqa: E402
                           causal_lm_loss, collate, epoch_order, format_prompt, load_tokenized, read_records,
                           train_val_split)
from minipeft.tokenizer import Tokenizer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

# The template typed out by hand, piece by piece (not imported from the module under test).
HEAD_NO_INPUT = ("Below is an instruction that describes a task. Write a response that appropriately "
                 "completes the request.\n\n### Instruction:\n")
HEAD_WITH_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further "
                   "context. Write a response that appropriately completes the request.\n\n### Instruction:\n")
INPUT_HEADER = "\n\n### Input:\n"
RESPONSE_HEADER = "\n\n### Response:\n"


@pytest.fixture(scope="module")
def sp_path(tmp_path_factory):
    return train_tiny_sentencepiece(tmp_path_factory.mktemp("sp"))


@pytest.fixture(scope="module")
def sp(sp_path):
    return spm.SentencePieceProcessor(model_file=sp_path)


@pytest.fixture(scope="module")
def tok(sp_path):
    return Tokenizer(sp_path)


def test_template_with_and_without_input():
    assert format_prompt("Name a colour.") == HEAD_NO_INPUT + "Name a colour." + RESPONSE_HEADER
    assert format_prompt("Translate.", "你好") == HEAD_WITH_INPUT + "Translate." + INPUT_HEADER + "你好" + RESPONSE_HEADER
    assert format_prompt("Translate.", "") == format_prompt("Translate.")


@pytest.mark.parametrize("record", [
    {"instruction": "write a short answer in one line.", "output": "the cat sat on the mat."},
    {"instruction": "answer the question.", "input": "What is 7 plus 8?", "output": "It is 15."},
    {"instruction": "翻译成英文", "input": "你好，世界！", "output": "Hello, world!"},
    {"instruction": "我的名字是什么？", "output": "我的名字是小猫。"},
])
def test_ids_and_labels_match_sentencepiece(tok, sp, record):
    prompt_text = ((HEAD_WITH_INPUT if record.get("input") else HEAD_NO_INPUT) + record["instruction"]
                   + (INPUT_HEADER + record["input"] if record.get("input") else "") + RESPONSE_HEADER)
    prompt_ids = [sp.bos_id()] + sp.encode(prompt_text)
    response_ids = sp.encode(record["output"]) + [sp.eos_id()]

    records, problems = read_records_from(record)
    assert problems == []
    example = AlpacaEncoder(tok, 4096).encode(records[0])
    assert example.input_ids == prompt_ids + response_ids
    assert example.labels == [IGNORE_INDEX] * len(prompt_ids) + response_ids
    assert example.prompt_len == len(prompt_ids)
    assert sp.decode(response_ids[:-1]) == record["output"]

    with_prompt = AlpacaEncoder(tok, 4096, train_on_prompt=True).encode(records[0])
    assert with_prompt.labels == prompt_ids + response_ids


def read_records_from(*objects):
    from minipeft.data import parse_records
    return parse_records(list(objects))


def test_truncation_cuts_the_prompt_start_first(tok, sp):
    record = Record(instruction="the cat sat on the mat " * 20, output="the answer is 42.")
    full_prompt = [sp.bos_id()] + sp.encode(format_prompt(record.instruction, record.input))
    response = sp.encode(record.output) + [sp.eos_id()]
    limit = len(response) + 30
    assert len(full_prompt) + len(response) > limit
    stats = EncodeStats()
    example = AlpacaEncoder(tok, limit).encode(record, stats)
    assert len(example.input_ids) == limit
    # BOS, then the last 29 prompt ids (ending with "### Response:\n"), then the whole response with EOS
    assert example.input_ids == [sp.bos_id()] + full_prompt[-29:] + response
    assert example.labels == [IGNORE_INDEX] * 30 + response
    assert sp.decode(example.input_ids[1:30]).endswith("### Response:\n")
    assert (stats.truncated_prompt, stats.truncated_response, stats.dropped, stats.kept) == (1, 0, 0, 1)


def test_truncation_keeps_marker_then_cuts_response_end(tok, sp):
    encoder = AlpacaEncoder(tok, 40)
    marker = sp.encode(format_prompt("x"))[-encoder.marker_len:]
    assert sp.decode(marker) == "### Response:\n"          # the minimal prompt is BOS + this marker
    record = Record(instruction="say it", output="the tree near the house is tall " * 10)
    response = sp.encode(record.output) + [sp.eos_id()]
    stats = EncodeStats()
    example = encoder.encode(record, stats)
    keep = 40 - 1 - encoder.marker_len
    assert example.input_ids == [sp.bos_id()] + marker + response[:keep]
    assert example.labels == [IGNORE_INDEX] * (1 + encoder.marker_len) + response[:keep]
    assert sp.eos_id() not in example.input_ids
    assert (stats.truncated_prompt, stats.truncated_response) == (0, 1)


def test_record_dropped_when_no_response_token_fits(tok):
    encoder = AlpacaEncoder(tok, 1 + 14)                    # room for BOS + the 14 marker tokens only
    assert encoder.marker_len == 14
    examples, stats = encoder.encode_all([Record("a", "b"), Record("say it", "the cat sat on the mat")])
    assert examples == [] and stats.dropped == 2 and stats.dropped_indices == [0, 1]
    examples, stats = AlpacaEncoder(tok, 16).encode_all([Record("say it", "the cat sat on the mat")])
    assert len(examples) == 1 and examples[0].labels.count(IGNORE_INDEX) == 15 and stats.truncated_response == 1


def test_malformed_records_reported_with_index_or_refused(tmp_path):
    good = {"instruction": "say hi", "output": "hi"}
    values = [good, "just a string", {"instruction": "no output"}, {"instruction": 3, "output": "x"},
              {"instruction": "", "input": "", "output": "  "}, {"instruction": "ok", "input": None, "output": "fine"},
              {"instruction": "x", "input": ["list"], "output": "y"}]
    path = tmp_path / "data.json"
    path.write_text(json.dumps(values))
    records, problems = read_records(path)
    assert [r.output for r in records] == ["hi", "fine"]
    assert [p.index for p in problems] == [1, 2, 3, 4, 6]
    reasons = [p.reason for p in problems]
    assert "str" in reasons[0] and "'output'" in reasons[1] and "'instruction'" in reasons[2]
    assert "empty" in reasons[3] and "'input'" in reasons[4]
    with pytest.raises(DataError, match=r"data.json: record 1: expected a JSON object"):
        read_records(path, strict=True)

    lines = tmp_path / "data.jsonl"
    lines.write_text(json.dumps(good) + "\n{not json\n\n" + json.dumps({"output": "x"}) + "\n" + json.dumps(good) + "\n")
    records, problems = read_records(lines)
    assert len(records) == 2 and [p.index for p in problems] == [1, 3]
    with pytest.raises(DataError, match=r"record 1: line is not valid JSON"):
        read_records(lines, strict=True)
    (tmp_path / "obj.json").write_text(json.dumps({"a": 1}, indent=1))
    with pytest.raises(DataError, match="one JSON object"):
        read_records(tmp_path / "obj.json")
    with pytest.raises(DataError, match="does not exist"):
        read_records(tmp_path / "missing.json")


def test_collate_pads_right():
    a = Example([1, 5, 6, 7], [IGNORE_INDEX, IGNORE_INDEX, 6, 7], 2)
    b = Example([1, 8], [IGNORE_INDEX, 8], 1)
    batch = collate([a, b], pad_id=0)
    assert batch["input_ids"].tolist() == [[1, 5, 6, 7], [1, 8, 0, 0]]
    assert batch["labels"].tolist() == [[-100, -100, 6, 7], [-100, 8, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert batch["input_ids"].dtype == torch.long


def test_split_and_order_are_seeded():
    items = list(range(50))
    train, val = train_val_split(items, 0.2, seed=3)
    assert len(val) == 10 and sorted(train + val) == items and not set(train) & set(val)
    assert train_val_split(items, 0.2, seed=3) == (train, val)
    assert train_val_split(items, 0.2, seed=4)[1] != val
    assert len(train_val_split(items[:3], 0.01, seed=0)[1]) == 1            # never an empty validation split
    assert epoch_order(20, 1, 0) == epoch_order(20, 1, 0)
    assert epoch_order(20, 1, 0) != epoch_order(20, 1, 1) and sorted(epoch_order(20, 1, 1)) == list(range(20))


def test_loss_matches_float64_reference():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7)
    labels = torch.tensor([[-100, -100, 3, 4, 1], [-100, 2, 6, -100, -100]])
    expected, count = 0.0, 0
    for b in range(2):
        for t in range(4):
            target = int(labels[b, t + 1])
            if target == -100:
                continue
            row = logits[b, t].double()
            expected += -(row[target] - torch.logsumexp(row, 0)).item()
            count += 1
    assert math.isclose(causal_lm_loss(logits, labels).item(), expected / count, rel_tol=1e-6)
    assert math.isclose(causal_lm_loss(logits, labels, reduction="sum").item(), expected, rel_tol=1e-6)


def test_prepare_data_tool(tmp_path, tok, sp_path, capsys):
    sys.path.insert(0, str(ROOT / "tools"))
    import prepare_data
    values = [{"instruction": f"say {w}", "output": f"the {w}"} for w in ("cat", "dog", "mat", "log", "tree")]
    values.insert(2, {"instruction": "broken"})
    src = tmp_path / "d.json"
    src.write_text(json.dumps(values))
    out = tmp_path / "tok.jsonl"
    assert prepare_data.main([str(src), "--tokenizer", sp_path, "--max-seq-len", "300", "--out", str(out),
                              "--val-fraction", "0.2"]) == 0
    printed = capsys.readouterr().out
    assert "skipped record 2: missing field 'output'" in printed and "1 malformed records skipped" in printed
    train, header = load_tokenized(out)
    val, _ = load_tokenized(tmp_path / "tok.val.jsonl")
    assert header["max_seq_len"] == 300 and len(train) == 4 and len(val) == 1
    records, _ = read_records(src)
    expected = {tuple(e.input_ids) for e in AlpacaEncoder(tok, 300).encode_all(records)[0]}
    assert {tuple(e.input_ids) for e in train + val} == expected
    assert prepare_data.main([str(tmp_path / "nope.json"), "--tokenizer", sp_path]) == 2
    assert "does not exist" in capsys.readouterr().err
