"""Tokenizer: ids equal sentencepiece's own, round trips, BOS/EOS/pad handling, clear errors for bad files."""

import pytest
import sentencepiece as spm
import torch

from minipeft.tokenizer import Tokenizer, TokenizerError
from helpers_tokenizer import train_tiny_sentencepiece

TEXTS = {
    "english": "The cat sat on the mat, and the answer is simple.",
    "chinese": "你好，我是一个小模型。今天天气很好！",
    "mixed": "Hello 世界: the answer is 答案.",
    "digits": "12 plus 30 is 42, and 2024-01-05 is a date.",
    "emoji": "ok 🙂👍 done",
    "spaces": "  two  leading spaces,\ttab and newline\n",
    "empty": "",
}


@pytest.fixture(scope="module")
def model_paths(tmp_path_factory):
    return {
        "no_pad": train_tiny_sentencepiece(tmp_path_factory.mktemp("sp_no_pad")),
        "pad": train_tiny_sentencepiece(tmp_path_factory.mktemp("sp_pad"), with_pad=True),
    }


@pytest.fixture(scope="module")
def tok(model_paths):
    return Tokenizer(model_paths["no_pad"])


@pytest.fixture(scope="module")
def sp(model_paths):
    return spm.SentencePieceProcessor(model_file=model_paths["no_pad"])


@pytest.mark.parametrize("name", sorted(TEXTS))
def test_ids_equal_sentencepiece(tok, sp, name):
    text = TEXTS[name]
    reference = sp.encode(text)
    assert tok.encode(text, bos=False) == reference
    assert tok.encode(text) == [1] + reference                         # bos=True by default
    assert tok.encode(text, bos=True, eos=True) == [1] + reference + [2]
    assert tok.encode(text, bos=False, eos=True) == reference + [2]


@pytest.mark.parametrize("name", sorted(TEXTS))
def test_decode_inverts_encode(tok, name):
    text = TEXTS[name]
    assert tok.decode(tok.encode(text, bos=True, eos=True)) == text
    assert tok.decode(tok.encode(text, bos=False)) == text


def test_encode_batch_matches_encode(tok):
    texts = list(TEXTS.values())
    assert tok.encode_batch(texts, bos=True, eos=True) == [tok.encode(t, bos=True, eos=True) for t in texts]


def test_emoji_falls_back_to_its_utf8_bytes(tok):
    # The tiny model has no piece for this emoji, so byte fallback must give exactly its UTF-8 bytes.
    emoji = "🙂"
    pieces = [tok.id_to_piece(i) for i in tok.encode(emoji, bos=False)]
    assert pieces[0] == "▁"                                             # SentencePiece's dummy prefix space
    assert pieces[1:] == [f"<0x{b:02X}>" for b in emoji.encode("utf-8")]
    assert tok.unk_id not in tok.encode(TEXTS["emoji"] + TEXTS["chinese"])


def test_digits_are_split_one_per_piece(tok):
    pieces = [tok.id_to_piece(i) for i in tok.encode("9876543210", bos=False)]
    digit_pieces = [p for p in pieces if p != "▁"]
    assert len(digit_pieces) == 10                                      # one piece (or byte) per digit


def test_special_ids_and_vocabulary(tok, sp, model_paths):
    assert (tok.unk_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
    assert tok.vocab_size == sp.vocab_size()
    assert tok.pad_id == 0                                              # no pad piece: falls back to 0
    assert Tokenizer(model_paths["pad"]).pad_id == 3
    for i in (0, 1, 2, 3, 100, tok.vocab_size - 1):
        assert tok.id_to_piece(i) == sp.id_to_piece(i)
        assert tok.piece_to_id(sp.id_to_piece(i)) == i
    assert tok.piece_to_id("no such piece") == tok.unk_id


def test_decode_skips_bos_eos_and_pad(model_paths):
    tok = Tokenizer(model_paths["pad"])
    ids = tok.encode("the cat", bos=False)
    padded = [tok.pad_id, tok.pad_id, tok.bos_id] + ids + [tok.eos_id, tok.pad_id]
    assert tok.decode(padded) == "the cat"
    assert tok.decode([]) == ""


def test_decode_accepts_a_tensor(tok):
    ids = tok.encode(TEXTS["mixed"])
    assert tok.decode(torch.tensor(ids)) == TEXTS["mixed"]


def test_bad_ids_and_text_give_clear_errors(tok):
    with pytest.raises(TokenizerError, match="outside the vocabulary"):
        tok.decode([5, tok.vocab_size])
    with pytest.raises(TokenizerError, match="outside the vocabulary"):
        tok.decode([-1])
    with pytest.raises(TokenizerError, match="expects a str"):
        tok.encode(b"bytes are not text")


def test_bad_files_give_clear_errors(tmp_path):
    missing = tmp_path / "missing.model"
    with pytest.raises(TokenizerError, match="missing.model.*does not exist"):
        Tokenizer(missing)
    with pytest.raises(TokenizerError, match="is a directory"):
        Tokenizer(tmp_path)
    for name, content in (("empty.model", b""), ("text.model", b"this is not a model\n"),
                          ("junk.model", bytes(range(256)) * 3)):
        path = tmp_path / name
        path.write_bytes(content)
        with pytest.raises(TokenizerError, match=f"{name} is not a SentencePiece model"):
            Tokenizer(path)
