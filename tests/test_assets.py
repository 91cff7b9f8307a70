"""The shipped assets: the pretrained tiny LLaMA (+ tokenizer) and the demo instruction data.

The model is loaded through minipeft.checkpoint.load_model, the code path of a converted 7B checkpoint, and
its perplexity on the held-out text it ships with (val_text.txt, never trained on) is measured here from
scratch: the ids are cut into consecutive chunks of at most 256 tokens, each chunk c scored as
[bos] + c[:-1] -> c, perplexity = exp(total NLL / number of scored tokens), accumulated in float64.
It must match the number recorded at pretraining time and be far below a random model's.

The demo data answers are recomputed with code written independently of minipeft/demo_data.py.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import sentencepiece as spm
import torch

import minipeft
from minipeft.checkpoint import load_model
from minipeft.config import ModelConfig
from minipeft.model import Transformer
from minipeft.tokenizer import Tokenizer

ASSETS = minipeft.assets_dir()
MODEL_DIR = ASSETS / "tiny-llama"
DATA_DIR = ASSETS / "demo_data"
CHUNK = 256   # the pretraining sequence length


# ---------------------------------------------------------------------------------------------------
# the model
# ---------------------------------------------------------------------------------------------------
def perplexity(model, ids, bos_id) -> float:
    """exp(mean NLL) of ids, scored in chunks of CHUNK tokens, each read as [bos] + chunk[:-1]."""
    total_nll, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(ids), CHUNK):
            chunk = ids[start:start + CHUNK]
            inputs = torch.tensor([[bos_id] + chunk[:-1]])                              # (1, T)
            log_probs = model(inputs).double().log_softmax(-1)[0]                        # (T, V)
            total_nll -= log_probs[torch.arange(len(chunk)), torch.tensor(chunk)].sum().item()
            count += len(chunk)
    return math.exp(total_nll / count)


@pytest.fixture(scope="module")
def shipped():
    model = load_model(MODEL_DIR, dtype=torch.float32)
    tok = Tokenizer(MODEL_DIR / "tokenizer.model")
    text = (MODEL_DIR / "val_text.txt").read_text(encoding="utf-8")
    metrics = json.loads((MODEL_DIR / "pretrain_metrics.json").read_text(encoding="utf-8"))
    return model, tok, text, metrics


def test_assets_dir_is_the_package_folder():
    assert ASSETS == Path(minipeft.__file__).resolve().parent / "assets"
    for name in ("config.json", "model.safetensors", "tokenizer.model", "val_text.txt"):
        assert (MODEL_DIR / name).is_file(), name


def test_shipped_model_shape_and_storage(shipped):
    model, tok, _, _ = shipped
    # the "tiny" preset describes the shipped model
    assert model.config.to_dict() == ModelConfig.from_name("tiny").to_dict()
    assert tok.vocab_size == model.config.vocab_size == 4096
    assert (tok.bos_id, tok.eos_id, tok.unk_id) == (1, 2, 0)
    assert spm.SentencePieceProcessor(model_file=str(MODEL_DIR / "tokenizer.model")).pad_id() == -1  # no pad piece
    # stored in fp16: 2 bytes per parameter plus a small safetensors header
    n_params = model.num_parameters()
    size = (MODEL_DIR / "model.safetensors").stat().st_size
    assert 2 * n_params < size < 2 * n_params + 64 * 1024
    stored = load_model(MODEL_DIR)
    assert {p.dtype for p in stored.parameters()} == {torch.float16}


def test_tokenizer_is_llama_style(shipped):
    _, tok, _, _ = shipped
    pieces = [tok.id_to_piece(i) for i in range(tok.vocab_size)]
    assert pieces[3:259] == [f"<0x{b:02X}>" for b in range(256)]     # byte fallback pieces
    assert [tok.id_to_piece(i) for i in tok.encode("2024", bos=False)] == ["▁", "2", "0", "2", "4"]  # digits split
    for text in ("Hello, world!\n  two spaces", "三百零五 积极", "emoji 🙂 and 𠀀"):
        assert tok.decode(tok.encode(text)) == text


def test_validation_perplexity_far_below_random(shipped):
    model, tok, text, metrics = shipped
    ids = tok.encode(text, bos=False)
    assert 1000 < len(ids) < 4000
    assert any("\u4e00" <= ch <= "\u9fff" for ch in text) and "the" in text      # English and Chinese
    trained = perplexity(model, ids, tok.bos_id)

    torch.manual_seed(0)
    random_model = Transformer(model.config).eval()                  # same shape, random init
    random_ppl = perplexity(random_model, ids, tok.bos_id)

    # a random model is about as unsure as a uniform guess over the 4096 pieces
    assert random_ppl > 0.5 * tok.vocab_size
    assert trained < random_ppl / 20
    # the number recorded when the model was trained (and quoted in the assets README)
    recorded = metrics["val_text_perplexity"]
    assert trained == pytest.approx(recorded, rel=0.01)
    assert trained < 2 * recorded
    readme = (ASSETS / "README.md").read_text(encoding="utf-8")
    assert f"{recorded:.1f}" in readme


def test_shipped_model_is_a_language_model(shipped):
    """Greedy continuation of an English prompt ends up in English words (a sanity check, loose on purpose)."""
    model, tok, _, _ = shipped
    ids = tok.encode("And God said unto Moses,")
    with torch.no_grad():
        for _ in range(12):
            next_id = model(torch.tensor([ids]))[0, -1].argmax().item()
            ids.append(next_id)
    continuation = tok.decode(ids[len(tok.encode("And God said unto Moses,")):])
    assert re.search(r"[a-zA-Z]{2,}", continuation), continuation


# ---------------------------------------------------------------------------------------------------
# the demo data
# ---------------------------------------------------------------------------------------------------
def load_records(name):
    return json.loads((DATA_DIR / name).read_text(encoding="utf-8"))


def import_generator():
    from minipeft import demo_data       # tools/make_demo_data.py's generator
    return demo_data


# Independent conversion: read the number in groups of place values from a table.
DIGIT_CHARS = dict(zip("0123456789", "零一二三四五六七八九"))


def chinese_numeral(n: int) -> str:
    if n == 0:
        return "零"
    s = str(n)
    parts = []
    for digit, unit in zip(s, ["千", "百", "十", ""][4 - len(s):]):
        parts.append("零" if digit == "0" else DIGIT_CHARS[digit] + unit)
    text = "".join(parts)
    text = re.sub("零+", "零", text).rstrip("零")        # one 零 per run of zeros, none at the end
    if text.startswith("一十"):                          # 10..19 read 十, 十一, ...
        text = text[1:]
    return text


def parse_chinese_numeral(text: str) -> int:
    values = {ch: i for i, ch in enumerate("零一二三四五六七八九")}
    units = {"千": 1000, "百": 100, "十": 10}
    if text.startswith("十"):
        text = "一" + text
    n, i = 0, 0
    while i < len(text):
        if text[i] == "零":
            i += 1
            continue
        digit = values[text[i]]
        unit = units.get(text[i + 1], 1) if i + 1 < len(text) else 1
        n += digit * unit
        i += 2 if unit > 1 else 1
    return n


@pytest.mark.parametrize("n, expected", [
    (0, "零"), (7, "七"), (10, "十"), (15, "十五"), (20, "二十"), (100, "一百"), (101, "一百零一"),
    (110, "一百一十"), (305, "三百零五"), (1000, "一千"), (1005, "一千零五"), (1010, "一千零一十"),
    (1050, "一千零五十"), (2300, "二千三百"), (9999, "九千九百九十九"),
])
def test_chinese_numerals_by_hand(n, expected):
    generator = import_generator()
    assert chinese_numeral(n) == expected
    assert generator.number_to_chinese(n) == expected
    assert generator.chinese_to_number(expected) == n
    assert parse_chinese_numeral(expected) == n


def test_chinese_numerals_all_agree_with_independent_code():
    generator = import_generator()
    for n in range(10000):
        assert generator.number_to_chinese(n) == chinese_numeral(n), n


POSITIVE_EN = {"great", "excellent", "wonderful", "delicious", "friendly", "amazing", "perfect", "lovely"}
NEGATIVE_EN = {"terrible", "awful", "broken", "boring", "rude", "disappointing", "dirty", "slow"}
NEUTRAL_EN = {"average", "ordinary", "acceptable", "typical", "standard", "so-so"}
POSITIVE_ZH = ["很好", "非常棒", "很精彩", "让人满意", "很舒服", "值得推荐", "太好了", "很喜欢"]
NEGATIVE_ZH = ["很差", "太糟糕了", "令人失望", "很难用", "不值得", "很失望", "太贵了", "不喜欢"]
NEUTRAL_ZH = ["一般", "还行", "马马虎虎", "中规中矩", "普普通通", "不好不坏"]


def expected_answer(instruction: str, task_input: str) -> str:
    """The correct output, computed here from the instruction's wording and the input alone."""
    if instruction.startswith("Classify the sentiment"):
        words = set(re.findall(r"[a-z-]+", task_input.lower()))
        labels = {label for label, lexicon in (("positive", POSITIVE_EN), ("negative", NEGATIVE_EN),
                                               ("neutral", NEUTRAL_EN)) if words & lexicon}
        assert len(labels) == 1, task_input
        return labels.pop()
    if instruction.startswith("判断这条评论的情感"):
        # strip the subject: the predicates follow it, separated by '，' and ended by '。'
        labels = set()
        for predicate in task_input.rstrip("。").split("，"):
            for label, lexicon in (("积极", POSITIVE_ZH), ("消极", NEGATIVE_ZH), ("中立", NEUTRAL_ZH)):
                if any(predicate.endswith(p) for p in lexicon):
                    labels.add(label)
        assert len(labels) == 1, task_input
        return labels.pop()
    if instruction == "把阿拉伯数字写成中文数字。":
        return chinese_numeral(int(task_input))
    if instruction == "Write the Chinese numeral as an Arabic number.":
        return str(parse_chinese_numeral(task_input))
    if instruction == "Reverse the order of the words.":
        return ", ".join(task_input.split(", ")[::-1])
    if instruction == "把这些词语倒过来排列。":
        return "，".join(task_input.split("，")[::-1])
    if instruction == "Sort the words in alphabetical order.":
        return ", ".join(sorted(task_input.split(", ")))
    if instruction == "Write the word in capital letters.":
        return task_input.upper()
    raise AssertionError(f"unknown instruction {instruction!r}")


@pytest.mark.parametrize("name, size", [("train.json", 1600), ("heldout.json", 160)])
def test_demo_records_are_well_formed_and_correct(name, size):
    records = load_records(name)
    assert isinstance(records, list) and len(records) == size
    for r in records:
        assert set(r) == {"instruction", "input", "output"}, r
        assert all(isinstance(v, str) and v.strip() == v and v for v in r.values()), r
        assert r["output"] == expected_answer(r["instruction"], r["input"]), r
    assert len({(r["instruction"], r["input"]) for r in records}) == len(records)   # no duplicates
    # both languages, every task
    assert len({r["instruction"] for r in records}) == 8
    assert any("\u4e00" <= ch <= "\u9fff" for r in records for ch in r["output"])


def test_demo_answers_are_short():
    tok = Tokenizer(MODEL_DIR / "tokenizer.model")
    lengths = [len(tok.encode(r["output"], bos=False)) for r in load_records("train.json")]
    assert max(lengths) <= 12
    assert sum(lengths) / len(lengths) <= 8


def test_train_and_heldout_are_disjoint():
    train = {(r["instruction"], r["input"]) for r in load_records("train.json")}
    heldout = {(r["instruction"], r["input"]) for r in load_records("heldout.json")}
    assert not train & heldout


def test_generator_is_deterministic_and_made_the_shipped_files(tmp_path):
    generator = import_generator()
    generator.write_demo_data(tmp_path / "seed0", seed=0)
    for name in ("train.json", "heldout.json"):
        assert (tmp_path / "seed0" / name).read_bytes() == (DATA_DIR / name).read_bytes(), name
    other = tmp_path / "seed1"
    generator.write_demo_data(other, seed=1)
    assert (other / "train.json").read_bytes() != (DATA_DIR / "train.json").read_bytes()
