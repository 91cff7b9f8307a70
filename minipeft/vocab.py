"""Vocabulary extension: merge a second SentencePiece model into a base one, and resize a model to match.

Why: LLaMA's tokenizer knows only a few hundred Chinese characters as pieces; every other character is
spelled by byte fallback as its 3 UTF-8 bytes (<0xE4> <0xBD> <0xA0> for 你), so Chinese text takes 2-3 times
more tokens than characters. Chinese-LLaMA appended the pieces of a Chinese SentencePiece model
(32000 -> 49953) and trained the new embedding rows.

1. Merging tokenizers (`merge_sentencepiece_models`). A SentencePiece .model file is a ModelProto protobuf:
   `pieces` (piece, score, type) in id order, plus trainer/normalizer settings. The merged model is the
   base model with the extra model's NORMAL pieces that the base lacks appended at the end, so every
   base piece keeps its id (base ids 0..V-1, new ids V..V+n-1). Scores: SentencePiece's BPE encoder
   repeatedly merges the adjacent pair whose concatenation is the highest-scoring piece. Appended pieces
   get scores below the base's lowest (keeping the extra model's own order among themselves), so
   whenever a base merge and a new merge compete, the base merge goes first: new pieces only join what
   the base tokenizer left unmerged, and the base's segmentation is disturbed as little as possible.
   By default only pieces containing at least one CJK character are appended (`require_cjk=True`).
   Then a text without CJK characters encodes to exactly the base ids: a piece can only be produced from
   a substring of the text, and no new piece is a substring of such a text, so the encoder sees exactly
   the base vocabulary. (A Latin piece from the Chinese corpus, e.g. "▁GPT", would otherwise change how
   English is split, whatever its score, since the lowest-priority merge still applies at the end.)
   Byte pieces (<0xNN>), control pieces (<s>, </s>), <unk>, user-defined and unused pieces are never
   appended, nor pieces the base already has.

2. Resizing a model (`resize_vocab`, `resize_checkpoint`). tok_embeddings (V, d) and output (V, d) grow to
   (V', d). Old rows are copied unchanged, so for inputs made of old tokens the hidden states are the same
   and logits[..., :V] are bit-identical. New rows start at the mean of the old rows:
       E_new[i] = (1/V) sum_j E[j]            W_new[i] = (1/V) sum_j W[j]       (i = V .. V'-1)
   Why the mean: a new output row w_bar = mean_j w_j gives the new token the logit w_bar.h = mean_j(w_j.h),
   and by Jensen exp(mean_j l_j) <= mean_j exp(l_j) = Z/V, where Z = sum_j exp(l_j) is the old partition
   function. So each new token takes at most a 1/V share of the old mass, and all n new tokens together
   rescale the old distribution by at least 1/(1 + n/V): the model's predictions over old tokens hardly
   change before training (random rows can give some new token a large logit; zero rows give logit 0,
   which may beat most real logits). For the input side the mean row is an embedding of typical norm and
   direction, so a new token is a sensible "average word" to the frozen layers rather than an
   out-of-distribution vector. The rows are then learned by fine-tuning with trainable tok_embeddings
   and output (`extra_trainable` on the PEFT configs).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Dict, Iterable, List, Union

import torch
import torch.nn as nn

from .fileio import write_atomic
from .reservation import refuse_existing, refuse_inputs_inside

PathLike = Union[str, os.PathLike]

__all__ = ["VocabError", "merge_sentencepiece_models", "check_extends", "tokens_per_char", "resize_vocab",
           "resize_checkpoint", "load_model_proto", "has_cjk", "is_cjk_char", "train_sentencepiece"]


class VocabError(ValueError):
    """A file or model that cannot be merged or resized; the message names the file and what was expected."""


# ================================================================================================
# Reading SentencePiece model files
# ================================================================================================

def _model_proto_class():
    try:
        from sentencepiece import sentencepiece_model_pb2
    except ImportError as e:   # protobuf missing
        raise VocabError(f"reading SentencePiece model files needs the protobuf package ({e})") from None
    return sentencepiece_model_pb2.ModelProto


def load_model_proto(path: PathLike, what: str = "SentencePiece model"):
    """Parse a SentencePiece .model file into its ModelProto; a clear VocabError if it is not one."""
    path = Path(path)
    if not path.is_file():
        state = "is a directory" if path.is_dir() else "does not exist"
        raise VocabError(f"{what} {path} {state}; expected a SentencePiece .model file")
    from google.protobuf.message import DecodeError
    proto = _model_proto_class()()
    try:
        proto.ParseFromString(path.read_bytes())
    except (DecodeError, ValueError) as e:
        raise VocabError(f"{what} {path} is not a SentencePiece model (protobuf parse failed: {e})") from None
    if len(proto.pieces) == 0:
        raise VocabError(f"{what} {path} is not a SentencePiece model (it holds no pieces)")
    import sentencepiece as spm
    try:   # the library must accept it too (a protobuf that happens to parse is not enough)
        spm.SentencePieceProcessor(model_proto=proto.SerializeToString())
    except (RuntimeError, OSError) as e:
        raise VocabError(f"{what} {path} is not a usable SentencePiece model ({e})") from None
    return proto


# ================================================================================================
# Which pieces count as Chinese
# ================================================================================================

# Unicode blocks of CJK text: ideographs (all extensions), radicals, CJK punctuation, kana, bopomofo,
# fullwidth forms (，！？：（）), CJK compatibility forms.
CJK_RANGES = (
    (0x2E80, 0x2FDF),    # CJK radicals supplement, Kangxi radicals
    (0x3000, 0x303F),    # CJK symbols and punctuation (、。「」)
    (0x3040, 0x30FF),    # hiragana, katakana
    (0x3100, 0x312F),    # bopomofo
    (0x3190, 0x31FF),    # kanbun, bopomofo extended, CJK strokes, katakana extension
    (0x3200, 0x4DBF),    # enclosed CJK, CJK compatibility, ideographs extension A
    (0x4E00, 0x9FFF),    # CJK unified ideographs
    (0xF900, 0xFAFF),    # CJK compatibility ideographs
    (0xFE30, 0xFE4F),    # CJK compatibility forms
    (0xFF00, 0xFFEF),    # halfwidth and fullwidth forms
    (0x20000, 0x3134F),  # ideographs extensions B .. G
)


def is_cjk_char(char: str) -> bool:
    code = ord(char)
    return any(low <= code <= high for low, high in CJK_RANGES)


def has_cjk(text: str) -> bool:
    return any(is_cjk_char(c) for c in text)


# ================================================================================================
# Merging
# ================================================================================================

def merge_sentencepiece_models(base_model_path: PathLike, extra_model_path: PathLike, out_path: PathLike,
                               *, require_cjk: bool = True, overwrite: bool = False) -> Dict[str, int]:
    """Write `out_path`: the base model with the extra model's new NORMAL pieces appended (see the module
    docstring for the scores and the CJK rule). Returns counts: base_size, extra_size, added, new_size,
    skipped_present, skipped_special (byte / control / unknown / user-defined / unused), skipped_non_cjk.
    `out_path` may not be one of the inputs; an existing file is replaced only when `overwrite`."""
    out_path = Path(out_path)
    for name, given in (("base", base_model_path), ("extra", extra_model_path)):
        if out_path.resolve() == Path(given).resolve():
            raise VocabError(f"{out_path}: the extended tokenizer must go to a new file, not over the {name} "
                             f"tokenizer it is made from")
    refuse_existing(out_path, overwrite, VocabError)
    base = load_model_proto(base_model_path, "base tokenizer")
    extra = load_model_proto(extra_model_path, "extra tokenizer")
    Piece = type(base.pieces[0])
    NORMAL = Piece.Type.Value("NORMAL")

    present = {p.piece for p in base.pieces}
    lowest_base_score = min(p.score for p in base.pieces)
    stats = {"base_size": len(base.pieces), "extra_size": len(extra.pieces), "added": 0,
             "skipped_present": 0, "skipped_special": 0, "skipped_non_cjk": 0}
    candidates = []
    for piece in extra.pieces:
        if piece.type != NORMAL:
            stats["skipped_special"] += 1
        elif piece.piece in present:
            stats["skipped_present"] += 1
        elif require_cjk and not has_cjk(piece.piece):
            stats["skipped_non_cjk"] += 1
        else:
            candidates.append(piece)
            present.add(piece.piece)

    if candidates:
        # Appended scores: below every base score, in the extra model's own order (higher extra score first).
        highest_extra_score = max(p.score for p in candidates)
        for piece in candidates:
            new = base.pieces.add()
            new.piece = piece.piece
            new.type = NORMAL
            new.score = lowest_base_score - 1.0 - (highest_extra_score - piece.score)
    stats["added"] = len(candidates)
    stats["new_size"] = len(base.pieces)
    base.trainer_spec.vocab_size = len(base.pieces)

    out_path.parent.mkdir(parents=True, exist_ok=True)
    data = base.SerializeToString()
    write_atomic(out_path, lambda tmp: tmp.write_bytes(data), overwrite=overwrite, error=VocabError)
    return stats


def check_extends(base_model_path: PathLike, extended_model_path: PathLike) -> None:
    """VocabError unless every piece of the base model has the same id (and text and type) in the extended one."""
    base = load_model_proto(base_model_path, "base tokenizer")
    extended = load_model_proto(extended_model_path, "extended tokenizer")
    if len(extended.pieces) < len(base.pieces):
        raise VocabError(f"{extended_model_path} has {len(extended.pieces)} pieces, fewer than the "
                         f"{len(base.pieces)} of {base_model_path}; it cannot extend it")
    for i, (old, new) in enumerate(zip(base.pieces, extended.pieces)):
        if old.piece != new.piece or old.type != new.type:
            raise VocabError(f"{extended_model_path}: id {i} is {new.piece!r} but in {base_model_path} it is "
                             f"{old.piece!r}; an extended tokenizer must keep every base id (append only)")


def tokens_per_char(tokenizer, texts: Iterable[str]) -> float:
    """Tokens (no BOS/EOS) per character over `texts` (a minipeft Tokenizer or a SentencePieceProcessor).
    Characters are counted with len(), spaces included."""
    texts = [t for t in texts if t]
    sp = getattr(tokenizer, "sp", tokenizer)
    n_tokens = sum(len(ids) for ids in sp.encode(texts))
    n_chars = sum(len(t) for t in texts)
    if n_chars == 0:
        raise VocabError("tokens_per_char needs some non-empty text")
    return n_tokens / n_chars


# ================================================================================================
# Resizing a model
# ================================================================================================

def resize_vocab(model, new_vocab_size: int, init: str = "mean"):
    """Grow `model`'s tok_embeddings and output to new_vocab_size rows, in place, and return it (its config
    carries the new vocab_size). Old rows are untouched; new rows are the mean of the old rows (init="mean",
    see the module docstring). Works on the meta device (shapes only)."""
    from .model import Transformer
    if not isinstance(model, Transformer):
        raise VocabError(f"resize_vocab takes a plain minipeft Transformer (resize before apply_peft), got "
                         f"{type(model).__name__}")
    if init != "mean":
        raise VocabError(f"resize_vocab init={init!r}: expected 'mean'")
    old_vocab_size, dim = model.tok_embeddings.weight.shape
    if new_vocab_size < old_vocab_size:
        raise VocabError(f"new vocabulary size {new_vocab_size} is smaller than the model's {old_vocab_size}; "
                         f"resize_vocab only grows a vocabulary")
    n_new = new_vocab_size - old_vocab_size

    def grown(old_weight: torch.Tensor) -> torch.Tensor:                         # (V, d) -> (V', d)
        mean_row = old_weight.double().mean(dim=0, keepdim=True).to(old_weight.dtype)   # (1, d)
        return torch.cat([old_weight, mean_row.expand(n_new, dim)], dim=0)       # (V + n, d)

    with torch.no_grad():
        embedding = nn.Embedding(new_vocab_size, dim, device="meta")
        embedding.weight = nn.Parameter(grown(model.tok_embeddings.weight.detach()),
                                        requires_grad=model.tok_embeddings.weight.requires_grad)
        output = nn.Linear(dim, new_vocab_size, bias=False, device="meta")
        output.weight = nn.Parameter(grown(model.output.weight.detach()),
                                     requires_grad=model.output.weight.requires_grad)
    model.tok_embeddings = embedding
    model.output = output
    model.config = dataclasses.replace(model.config, vocab_size=new_vocab_size)
    return model


def resize_checkpoint(src_folder: PathLike, dst_folder: PathLike, tokenizer_path: PathLike,
                      init: str = "mean", overwrite: bool = False) -> Dict[str, object]:
    """Load the checkpoint in src_folder, grow its vocabulary to the pieces of `tokenizer_path`, and save
    it with that tokenizer as a new checkpoint folder dst_folder. If src_folder has a tokenizer.model, the
    new tokenizer must extend it (every old piece at its old id). Returns old/new vocab sizes and paths."""
    from .checkpoint import TOKENIZER_NAME, load_model, save_model, tokenizer_vocab_size
    src_folder, dst_folder, tokenizer_path = Path(src_folder), Path(dst_folder), Path(tokenizer_path)
    if dst_folder.resolve() == src_folder.resolve():
        raise VocabError(f"{dst_folder}: the resized checkpoint must go to a new folder, not over its source")
    refuse_existing(dst_folder, overwrite, VocabError)
    if overwrite:
        refuse_inputs_inside([dst_folder], [src_folder, tokenizer_path], VocabError)
    load_model_proto(tokenizer_path, "new tokenizer")
    new_vocab_size = tokenizer_vocab_size(tokenizer_path)
    src_tokenizer = src_folder / TOKENIZER_NAME
    if src_tokenizer.is_file():
        check_extends(src_tokenizer, tokenizer_path)
    model = load_model(src_folder)   # CheckpointError if its config and its own tokenizer.model disagree
    old_vocab_size = model.config.vocab_size
    if new_vocab_size < old_vocab_size:
        raise VocabError(f"{tokenizer_path} has {new_vocab_size} pieces but the checkpoint {src_folder} has a "
                         f"vocabulary of {old_vocab_size}; the tokenizer must have at least as many pieces")
    resize_vocab(model, new_vocab_size, init=init)
    save_model(model, model.config, dst_folder, tokenizer_path=tokenizer_path, overwrite=overwrite, inputs=[src_folder])
    return {"old_vocab_size": old_vocab_size, "new_vocab_size": new_vocab_size, "added_rows": new_vocab_size -
            old_vocab_size, "src": str(src_folder), "out": str(dst_folder)}


# ================================================================================================
# Training a Chinese SentencePiece model (what tools/extend_vocab.py --corpus uses)
# ================================================================================================

def train_sentencepiece(lines: List[str], out_path: PathLike, vocab_size: int,
                        character_coverage: float = 0.9995) -> Path:
    """Train a BPE SentencePiece model on `lines` with LLaMA's settings (identity normalisation, spaces kept,
    digits split, byte fallback) and write it to out_path. If the text cannot support vocab_size pieces the
    model comes out smaller (hard_vocab_limit=False)."""
    import sentencepiece as spm
    lines = [line for line in lines if line.strip()]
    if not lines:
        raise VocabError("the corpus for the Chinese SentencePiece model has no non-empty lines")
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    prefix = out_path.with_name(f".{out_path.stem}.tmp-{os.getpid()}")
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines), model_prefix=str(prefix), model_type="bpe", vocab_size=vocab_size,
            hard_vocab_limit=False, character_coverage=character_coverage, byte_fallback=True,
            split_digits=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, normalization_rule_name="identity",
            remove_extra_whitespaces=False, allow_whitespace_only_pieces=True, num_threads=1, minloglevel=2)
        os.replace(f"{prefix}.model", out_path)
    except RuntimeError as e:
        raise VocabError(f"training the SentencePiece model failed: {e}") from None
    finally:
        for suffix in (".model", ".vocab"):
            Path(f"{prefix}{suffix}").unlink(missing_ok=True)
    return out_path
