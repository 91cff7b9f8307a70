"""ChatGLM-6B / ChatGLM2-6B tokenizers on tiny SentencePiece models built like theirs (tests/helpers_chatglm.py)."""

import pytest
import sentencepiece as spm

from helpers_chatglm import train_chatglm_sentencepiece
from minipeft.families import tokenizer_for
from minipeft.tokenizer import TokenizerError
from minipeft.tokenizer_chatglm import ChatGLM2Tokenizer, ChatGLMTokenizer

TEXT = "def f(x):\n\treturn x    + 1\n你好，世界！  end"


@pytest.fixture(scope="module")
def v1_path(tmp_path_factory):
    return train_chatglm_sentencepiece(tmp_path_factory.mktemp("sp1"), version=1)


def test_chatglm_text_rules_and_special_tokens(v1_path):
    tok = tokenizer_for("chatglm", v1_path)
    assert isinstance(tok, ChatGLMTokenizer) and tok.family == "chatglm"
    sp = spm.SentencePieceProcessor(model_file=v1_path)
    ids = tok.encode(TEXT, bos=False)
    # what SentencePiece itself gives on the text rewritten by the original's rules (written out by hand here)
    rewritten = "def f(x):<n><|tab|>return x<|blank_4|>+ 1<n>你好，世界！<|blank_2|>end"
    assert ids == sp.encode(rewritten)
    for piece in ("<n>", "<|tab|>", "<|blank_4|>", "<|blank_2|>"):
        assert sp.piece_to_id(piece) in ids
    assert tok.decode(ids) == TEXT
    prompt = tok.encode("问：你好\n答：", bos=True)
    assert prompt[-2:] == [sp.piece_to_id("[gMASK]"), sp.piece_to_id("<sop>")]
    response = tok.encode("我很好", bos=False, eos=True)
    assert response[-1] == sp.piece_to_id("<eop>") == tok.eos_id
    assert tok.bos_id == sp.piece_to_id("<sop>") and tok.pad_id == sp.piece_to_id("<pad>")
    assert tok.decode(prompt) == "问：你好\n答：" and tok.decode(response) == "我很好"   # specials dropped


def test_chatglm_tokenizer_without_special_pieces_is_refused(tmp_path):
    path = train_chatglm_sentencepiece(tmp_path, version=1, with_specials=False)
    with pytest.raises(TokenizerError, match=r"lacks the ChatGLM-6B special pieces \['\[MASK\]', '\[gMASK\]'") as err:
        ChatGLMTokenizer(path)
    assert path in str(err.value)


def test_chatglm2_special_ids_follow_the_pieces(tmp_path):
    path = train_chatglm_sentencepiece(tmp_path, version=2)
    tok = tokenizer_for("chatglm2", path)
    sp = spm.SentencePieceProcessor(model_file=path)
    n = sp.vocab_size()
    assert isinstance(tok, ChatGLM2Tokenizer) and tok.vocab_size == n + 5
    assert (tok.piece_to_id("[gMASK]"), tok.piece_to_id("sop"), tok.piece_to_id("eop")) == (n + 1, n + 3, n + 4)
    prompt = tok.encode("[Round 1]\n\n问：你好\n\n答：", bos=True)
    assert prompt[:2] == [n + 1, n + 3] and prompt[2:] == sp.encode("[Round 1]\n\n问：你好\n\n答：")
    response = tok.encode("我很好", bos=False, eos=True)
    assert response[-1] == sp.eos_id() == tok.eos_id and tok.pad_id == 0
    assert tok.decode(prompt) == "[Round 1]\n\n问：你好\n\n答：" and tok.decode(response) == "我很好"
    assert tok.id_to_piece(n + 1) == "[gMASK]"


def test_unknown_family():
    with pytest.raises(TokenizerError, match="family 'gpt'"):
        tokenizer_for("gpt", "x.model")


# ---- the data pipeline renders records into each family's format -----------------------------------------------
from minipeft.data import IGNORE_INDEX, AlpacaEncoder, Record  # noqa: E402

RECORD = Record(instruction="the cat sat on the mat and the dog sat on the log.", input="你好", output="答案是 42。")


def test_chatglm_records_render_round_0_with_gmask_sop_and_eop(v1_path):
    tok = tokenizer_for("chatglm", v1_path)
    example = AlpacaEncoder(tok, max_seq_len=512).encode(RECORD)
    prompt = tok.encode(f"[Round 0]\n问：{RECORD.instruction}\n你好\n答：", bos=False) + [tok.gmask_id, tok.sop_id]
    response = tok.encode(RECORD.output, bos=False) + [tok.eop_id]
    assert example.input_ids == prompt + response
    assert example.labels == [IGNORE_INDEX] * len(prompt) + response
    # truncation cuts the prompt's start and keeps its end: the marker "答：" and [gMASK] <sop>
    short = AlpacaEncoder(tok, max_seq_len=len(response) + 6).encode(RECORD)
    assert len(short.input_ids) == len(response) + 6
    assert short.input_ids[short.prompt_len - 2:short.prompt_len] == [tok.gmask_id, tok.sop_id]
    assert short.input_ids[short.prompt_len:] == response


def test_chatglm2_records_render_round_1_with_marks_in_front(tmp_path):
    tok = tokenizer_for("chatglm2", train_chatglm_sentencepiece(tmp_path, version=2))
    record = Record(instruction="write a short answer in one line.", output="the answer is the sum.")
    example = AlpacaEncoder(tok, max_seq_len=512).encode(record)
    prompt = [tok.gmask_id, tok.sop_id] + tok.encode(f"[Round 1]\n\n问：{record.instruction}\n\n答：", bos=False)
    response = tok.encode(record.output, bos=False) + [tok.eos_id]
    assert example.input_ids == prompt + response and example.prompt_len == len(prompt)
    assert example.labels == [IGNORE_INDEX] * len(prompt) + response
    short = AlpacaEncoder(tok, max_seq_len=len(response) + 6).encode(record)
    assert short.input_ids[:2] == [tok.gmask_id, tok.sop_id] and short.input_ids[short.prompt_len:] == response
