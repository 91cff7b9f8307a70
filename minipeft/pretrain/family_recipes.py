"""What pretraining does differently per model family, in one table keyed by the family's name
(PRETRAIN_FAMILIES): its title, its tokenizer (the file and the trainer), how a window of text becomes a sample
(samples.py: "causal" or GLM's prefix LM "glm"), and the config of its tiny model. Nothing else in
minipeft/pretrain tests a family's name; a new family for pretraining is one entry here.

The tiny model's shape when no shape flag is given: the tiny LLaMA's dim, layers and heads (SHAPE_DEFAULTS);
each family's own MLP rule (LLaMA's SwiGLU hidden size from multiple_of, BLOOM's and GLM's 4 * dim), and only
LLaMA has fewer key/value heads than query heads.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from ..config import ModelConfig
from .corpus import PretrainError
from .tokenizer_training import (TokenizerTrainingError, train_bloom_bpe, train_glm_sentencepiece,
                                 train_llama_sentencepiece, training_lines)

SHAPE_DEFAULTS = {"dim": 192, "n_layers": 4, "n_heads": 6, "n_kv_heads": 3, "multiple_of": 32}
SHAPE_FLAGS = tuple(SHAPE_DEFAULTS) + ("vocab_size",)


@dataclass(frozen=True)
class PretrainFamily:
    title: str                      # "LLaMA", in the plot title
    tokenizer_file: str             # the file its tokenizer is saved as
    train_tokenizer: Callable       # (lines, path, vocab_size, seed, threads) -> path (tokenizer_training.py)
    sample_layout: str              # "causal" or "glm" (samples.py)
    model_config: Callable          # (common ModelConfig fields, shape, tokenizer) -> ModelConfig
    grouped_kv: bool = False        # takes --n-kv-heads < --n-heads and --multiple-of (LLaMA's)


def _llama(common: dict, shape: dict, tok) -> ModelConfig:
    return ModelConfig(**common, n_kv_heads=shape["n_kv_heads"], multiple_of=shape["multiple_of"])


def _bloom(common: dict, shape: dict, tok) -> ModelConfig:
    return ModelConfig(**common, family="bloom", n_kv_heads=shape["n_heads"])


def _chatglm(common: dict, shape: dict, tok) -> ModelConfig:
    return ModelConfig(**common, family="chatglm", n_kv_heads=shape["n_heads"], ffn_hidden_dim=4 * shape["dim"],
                       qkv_bias=True, mask_id=tok.mask_id, gmask_id=tok.gmask_id, sop_id=tok.sop_id)


PRETRAIN_FAMILIES = {
    "llama": PretrainFamily("LLaMA", "tokenizer.model", train_llama_sentencepiece, "causal", _llama, grouped_kv=True),
    "bloom": PretrainFamily("BLOOM", "tokenizer.json", train_bloom_bpe, "causal", _bloom),
    "chatglm": PretrainFamily("ChatGLM-6B", "tokenizer.model", train_glm_sentencepiece, "glm", _chatglm),
}


def pretrain_family(family: str) -> PretrainFamily:
    if family not in PRETRAIN_FAMILIES:
        raise PretrainError(f"--family {family!r}: pretraining knows {', '.join(PRETRAIN_FAMILIES)}")
    return PRETRAIN_FAMILIES[family]


def train_family_tokenizer(family: str, train_texts: Sequence[str], out_dir: Path, vocab_size: int,
                           min_share: float, seed: int, threads: int) -> Path:
    """Train the tokenizer of `family` on the texts (tokenizer_training.training_lines of them); returns the file
    written in out_dir. TokenizerTrainingError naming --vocab-size when these settings cannot work."""
    recipe = PRETRAIN_FAMILIES.get(family)
    if recipe is None:
        raise TokenizerTrainingError(f"--family {family!r}: expected one of {', '.join(PRETRAIN_FAMILIES)}")
    lines = training_lines(train_texts, min_share)
    return recipe.train_tokenizer(lines, Path(out_dir) / recipe.tokenizer_file, vocab_size, seed, threads)


def model_config(family: str, args, tok) -> ModelConfig:
    """The tiny model of `family` from the shape flags (SHAPE_DEFAULTS where not given) and the tokenizer."""
    recipe = pretrain_family(family)
    shape = {k: getattr(args, k) if getattr(args, k) is not None else v for k, v in SHAPE_DEFAULTS.items()}
    common = dict(dim=shape["dim"], n_layers=shape["n_layers"], n_heads=shape["n_heads"], vocab_size=tok.vocab_size,
                  norm_eps=1e-5, max_seq_len=args.max_seq_len)
    if not recipe.grouped_kv and (args.n_kv_heads not in (None, shape["n_heads"]) or args.multiple_of is not None):
        raise PretrainError(f"--family {family}: --n-kv-heads and --multiple-of are LLaMA's; {family} has one key/value "
                            "head per query head and an MLP of 4 * dim")
    return recipe.model_config(common, shape, tok)
