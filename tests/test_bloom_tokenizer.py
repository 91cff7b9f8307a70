"""The byte-level BPE tokenizer (BLOOM's tokenizer.json): ids equal the `tokenizers` library's own, round
trips of English, Chinese and emoji, special ids, dispatch from Tokenizer(path), clear errors."""

import pytest
from tokenizers import Tokenizer as LibraryTokenizer

from minipeft.tokenizer import ByteLevelBPETokenizer
from minipeft.tokenizer import Tokenizer, TokenizerError
from helpers_bloom import train_tiny_bpe

TEXTS = {"english": "The cat sat on the mat, and the answer is simple.",
         "chinese": "你好，我是一个小模型。今天天气很好！",
         "emoji": "ok 🙂👍 done 🚀", "mixed": "Hello 世界: 答案 is 42.\n\ttabs  and spaces ",
         "rare": "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ǅ ﬁ", "empty": ""}


@pytest.fixture(scope="module")
def path(tmp_path_factory):
    return train_tiny_bpe(tmp_path_factory.mktemp("bpe"))


@pytest.fixture(scope="module")
def tok(path):
    return Tokenizer(path)


def test_dispatch_on_the_file(tok, path):
    assert isinstance(tok, ByteLevelBPETokenizer) and isinstance(tok, Tokenizer)
    assert isinstance(Tokenizer(path.parent), ByteLevelBPETokenizer)        # a folder with a tokenizer.json


@pytest.mark.parametrize("name", sorted(TEXTS))
def test_ids_equal_the_library_and_round_trip(tok, path, name):
    text = TEXTS[name]
    library = LibraryTokenizer.from_file(str(path))
    ids = tok.encode(text, bos=False)
    assert ids == library.encode(text, add_special_tokens=False).ids
    assert tok.decode(ids) == text
    assert tok.decode(tok.encode(text, bos=True, eos=True)) == text
    assert all(0 <= i < tok.vocab_size for i in ids)


def test_special_ids_and_batch(tok):
    assert (tok.unk_id, tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2, 3)
    assert tok.vocab_size == 300
    ids = tok.encode("the cat", bos=True, eos=True)
    assert ids[0] == 1 and ids[-1] == 2
    assert tok.encode_batch(list(TEXTS.values()), bos=False) == [tok.encode(t, bos=False) for t in TEXTS.values()]
    assert tok.decode([3, 3] + tok.encode("hi", bos=False)) == "hi"           # padding is left out
    assert tok.piece_to_id(tok.id_to_piece(10)) == 10


def test_bad_input_gives_clear_errors(tok, tmp_path):
    with pytest.raises(TokenizerError, match="outside the vocabulary"):
        tok.decode([tok.vocab_size])
    with pytest.raises(TokenizerError, match="expects a str"):
        tok.encode(b"bytes")
    bad = tmp_path / "tokenizer.json"
    bad.write_text('{"not": "a tokenizer"}')
    with pytest.raises(TokenizerError, match="tokenizer.json is not a tokenizers JSON file"):
        Tokenizer(bad)
    with pytest.raises(TokenizerError, match="missing.json does not exist"):
        Tokenizer(tmp_path / "missing.json")
