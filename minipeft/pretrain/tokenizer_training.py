"""Train the small tokenizers of pretraining (tools/pretrain_tiny.py), one trainer per kind; which family uses
which trainer and file is family_recipes.py's table:

    llama    SentencePiece BPE as LLaMA's: byte fallback (the 256 pieces <0x00>..<0xFF>, so any text encodes),
             digits split, unk 0 / bos 1 / eos 2, no pad piece, identity normalisation, dummy-prefix space
             -> tokenizer.model
    chatglm  SentencePiece BPE set up as ChatGLM-6B's ice_text.model: the same, plus GLM's special tokens as
             pieces of the model itself ([MASK] [gMASK] [sMASK] <unused_0> <sop> <eop> <ENC> <dBLOCK> <pad>
             right after unk/bos/eos) and the text rewrites the ChatGLM tokenizer applies before SentencePiece
             sees a text (<n> for a newline, <|tab|>, <|blank_k|> for a run of k spaces, k = 2..80), which are
             pieces too                                                          -> tokenizer.model
    bloom    byte-level BPE as BLOOM's tokenizer.json: every UTF-8 byte is one of 256 base symbols, merges
             are learned on top; special tokens <unk> 0, <s> 1, </s> 2, <pad> 3; no prefix space
             -> tokenizer.json

Every trainer sees the same text: the training part of each corpus file, split into lines, where a file whose
share of all characters is below min_share is repeated until it reaches about min_share (so a small Chinese
file still gets its characters as pieces).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import List, Sequence

GLM_SPECIAL_PIECES = ["[MASK]", "[gMASK]", "[sMASK]", "<unused_0>", "<sop>", "<eop>", "<ENC>", "<dBLOCK>", "<pad>"]
GLM_TEXT_PIECES = ["<n>", "<|tab|>"] + [f"<|blank_{k}|>" for k in range(2, 81)]
BLOOM_SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>"]


class TokenizerTrainingError(ValueError):
    """The tokenizer could not be trained with these settings (the message names the flag)."""


def training_lines(train_texts: Sequence[str], min_share: float) -> List[str]:
    """The non-empty lines of every text, a small text repeated up to about min_share of all characters."""
    total = sum(len(t) for t in train_texts)
    lines: List[str] = []
    for text in train_texts:
        repeats = max(1, round(min_share * total / max(1, len(text))))
        lines.extend([line for line in text.splitlines() if line.strip()] * repeats)
    return lines


def _train_sentencepiece(lines: List[str], model_path: Path, vocab_size: int, seed: int, threads: int,
                         user_defined_symbols: List[str]) -> Path:
    import sentencepiece as spm

    with tempfile.NamedTemporaryFile("w", encoding="utf-8", suffix=".txt", delete=False) as f:
        f.write("\n".join(lines) + "\n")
        input_path = f.name
    prefix = model_path.with_suffix("")
    spm.set_random_generator_seed(seed)           # sentence sampling and shuffling
    try:
        spm.SentencePieceTrainer.train(
            input=input_path, model_prefix=str(prefix), model_type="bpe", vocab_size=vocab_size,
            character_coverage=0.9995, byte_fallback=True, split_digits=True,
            unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
            normalization_rule_name="identity", remove_extra_whitespaces=False,
            add_dummy_prefix=True, allow_whitespace_only_pieces=True,
            input_sentence_size=400_000, shuffle_input_sentence=True, seed_sentencepiece_size=1_000_000,
            max_sentence_length=8192, num_threads=threads, minloglevel=2,
            **({"user_defined_symbols": user_defined_symbols} if user_defined_symbols else {}),
        )
    except RuntimeError as e:     # e.g. more distinct characters than --vocab-size can hold
        raise TokenizerTrainingError(f"training the tokenizer (--vocab-size {vocab_size}) failed: {e}") from None
    finally:
        os.unlink(input_path)
    Path(f"{prefix}.vocab").unlink(missing_ok=True)
    return model_path


def _train_bloom_bpe(lines: List[str], path: Path, vocab_size: int) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=BLOOM_SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    if vocab_size <= 256 + len(BLOOM_SPECIAL_TOKENS):
        raise TokenizerTrainingError(f"--vocab-size {vocab_size}: a byte-level BPE needs more than "
                                     f"{256 + len(BLOOM_SPECIAL_TOKENS)} (256 bytes + the special tokens)")
    tokenizer.train_from_iterator((line + "\n" for line in lines), trainer)    # newlines are bytes too
    tmp = path.with_name(path.name + ".tmp")
    tokenizer.save(str(tmp))
    os.replace(tmp, path)
    return path


def train_llama_sentencepiece(lines: List[str], path: Path, vocab_size: int, seed: int, threads: int) -> Path:
    """LLaMA's kind: SentencePiece BPE with byte fallback and no special pieces of its own."""
    return _train_sentencepiece(lines, path, vocab_size, seed, threads, [])


def train_glm_sentencepiece(lines: List[str], path: Path, vocab_size: int, seed: int, threads: int) -> Path:
    """ChatGLM-6B's kind: the lines rewritten as the ChatGLM tokenizer rewrites a text before SentencePiece sees it,
    GLM's special and text pieces part of the model."""
    from ..tokenizer_chatglm import glm_text_rewrite     # what the tokenizer does at encode time
    return _train_sentencepiece([glm_text_rewrite(line) for line in lines], path, vocab_size, seed, threads,
                                GLM_SPECIAL_PIECES + GLM_TEXT_PIECES)


def train_bloom_bpe(lines: List[str], path: Path, vocab_size: int, seed: int, threads: int) -> Path:
    """BLOOM's kind: byte-level BPE (deterministic; the seed is not used)."""
    os.environ.setdefault("RAYON_NUM_THREADS", str(threads))    # the trainer's thread pool
    return _train_bloom_bpe(lines, path, vocab_size)
