"""Test helper: train a tiny SentencePiece model (BPE, byte fallback) in well under a second.

`train_tiny_sentencepiece(out_dir, vocab_size=300)` writes `tiny_sp.model` into `out_dir` and returns its path.
The model is set up like LLaMA's tokenizer: unk 0, bos 1, eos 2, no pad piece (pad_id -1, unless
`with_pad=True`, which adds `<pad>` at id 3), byte fallback (256 `<0xNN>` pieces, so every string can be
encoded), digits split one per piece, identity normalisation and spaces kept as they are, so
decode(encode(text)) == text.

With byte fallback 256 + 3 ids are taken before any character, so vocab_size=300 leaves about 40 pieces for
the most frequent characters and a few BPE merges; rarer characters (most Chinese ones, capitals, digits)
are encoded as their UTF-8 bytes. If the text cannot support `vocab_size` pieces the model comes out
smaller: read the real size from the tokenizer.
"""

from __future__ import annotations

import os
from pathlib import Path

import sentencepiece as spm

# A small English + Chinese text written for these tests. The repeated sentences give BPE frequent pairs to
# merge, and make a few Chinese characters (你 好 我 的 是) frequent enough to become pieces of their own.
_ENGLISH = [
    "the cat sat on the mat and the dog sat on the log.",
    "there is a tree near the house, and the tree is tall.",
    "she reads a note in the morning and then she goes to sleep.",
    "write a short answer in one line.",
    "the answer is the sum that the teacher wants.",
    "we are learning how a model splits a line into pieces.",
]
_CHINESE = [
    "你好，我是一个小模型。",
    "我的名字是小猫，你好吗？",
    "今天的天气很好，我们去公园散步。",
    "我喜欢学习机器学习和自然语言处理。",
]
_MIXED = [
    "The answer is 42. 答案是 42。",
    "What is 7 plus 8? It is 15.",
    "Hello, world! 你好，世界！",
]
TRAINING_LINES = _ENGLISH * 12 + _CHINESE * 2 + _MIXED


def train_tiny_sentencepiece(out_dir, vocab_size: int = 300, *, with_pad: bool = False) -> str:
    """Train the tiny BPE model into out_dir/tiny_sp.model (written under a temp name, then renamed)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "tiny_sp.model"
    tmp_prefix = out_dir / f".tiny_sp.tmp{os.getpid()}"
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(TRAINING_LINES),
        model_prefix=str(tmp_prefix),
        model_type="bpe",
        vocab_size=vocab_size,
        hard_vocab_limit=False,               # a smaller model instead of an error if the text runs out
        character_coverage=0.98,              # rare characters fall back to bytes
        byte_fallback=True,
        split_digits=True,
        unk_id=0, bos_id=1, eos_id=2, pad_id=3 if with_pad else -1,
        normalization_rule_name="identity",   # like LLaMA: no NFKC, spaces kept as they are
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        num_threads=1,
        minloglevel=2,                        # quiet
    )
    os.replace(f"{tmp_prefix}.model", path)
    os.remove(f"{tmp_prefix}.vocab")
    return str(path)
