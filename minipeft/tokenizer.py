"""SentencePiece tokenizer: text <-> token ids, exactly as `sentencepiece` itself computes them.

LLaMA's tokenizer is a SentencePiece BPE model. A few words:

- BOS / EOS: the "beginning of sequence" (id 1 in LLaMA) and "end of sequence" (id 2) control tokens. A
  prompt starts with BOS; a training target ends with EOS, so the model learns to emit EOS when its answer
  is finished, and generation stops there. They are not text: `decode` drops them.
- Byte fallback: the vocabulary also holds the 256 byte pieces `<0x00>` .. `<0xFF>`. A character with no
  piece of its own (a rare Chinese character, an emoji) is encoded as the pieces of its UTF-8 bytes
  instead of the unknown token, so every string survives encode -> decode.
- Padding: LLaMA's model has no pad piece (its pad id is -1). For batching we then use id 0 (the unknown
  token) as `pad_id`; padded positions are masked out everywhere, so the choice of id does not matter.

Ids are those of `SentencePieceProcessor.encode(text)`, with `bos_id` put in front and `eos_id` behind
when asked.

`Tokenizer(path)` picks the kind from the file: a `.json` file is a byte-level BPE `tokenizer.json` (BLOOM;
ByteLevelBPETokenizer below, same methods), anything else a SentencePiece model. A checkpoint folder works too: its
`tokenizer.model`, else its `tokenizer.json`.

ChatGLM's tokenizers (tokenizer_chatglm.py) keep this interface: `encode(text, bos=True)` marks a *prompt* the
way the family does and `eos=True` ends a *response*; `families.tokenizer_for(family, path)` picks the class.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, List, Sequence

import sentencepiece as spm


class TokenizerError(ValueError):
    """A tokenizer file that cannot be used, or ids / text it cannot handle; the message names the file."""


TOKENIZER_FILE_NAMES = ("tokenizer.model", "tokenizer.json")   # what a checkpoint folder may carry


def tokenizer_file(path) -> Path:
    """A tokenizer file itself, or the tokenizer file inside a checkpoint folder (tokenizer.model first)."""
    path = Path(path)
    if path.is_dir():
        for name in TOKENIZER_FILE_NAMES:
            if (path / name).is_file():
                return path / name
        raise TokenizerError(f"{path} is a directory with no {' or '.join(TOKENIZER_FILE_NAMES)}")
    return path


class Tokenizer:
    family = "llama"      # the prompt format data.py renders records into

    def __new__(cls, model_path, *args, **kwargs):
        if cls is Tokenizer and tokenizer_file(model_path).suffix == ".json":
            return super().__new__(ByteLevelBPETokenizer)
        return super().__new__(cls)

    def __init__(self, model_path):
        self.path = tokenizer_file(model_path)
        if not self.path.is_file():
            what = "does not exist"
            raise TokenizerError(f"tokenizer model {self.path} {what}; expected a SentencePiece .model file")
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.Load(str(self.path))
        except (RuntimeError, OSError) as err:
            raise TokenizerError(f"{self.path} is not a SentencePiece model ({err})") from None
        self._setup_special_ids()

    def _setup_special_ids(self) -> None:
        """The ids decode() leaves out. Without a pad piece pad_id is 0 (unk), which byte fallback never
        produces from text, so dropping it loses nothing. (A family with its own special tokens overrides this.)"""
        self._special_ids = {i for i in (self.bos_id, self.eos_id, self.pad_id) if i >= 0}

    # ---- vocabulary --------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.sp.vocab_size()

    @property
    def bos_id(self) -> int:
        return self.sp.bos_id()

    @property
    def eos_id(self) -> int:
        return self.sp.eos_id()

    @property
    def unk_id(self) -> int:
        return self.sp.unk_id()

    @property
    def pad_id(self) -> int:
        """The model's pad piece if it has one, else 0 (the unknown token), for padding batches."""
        pad = self.sp.pad_id()
        return pad if pad >= 0 else 0

    def id_to_piece(self, token_id: int) -> str:
        self._check_ids([token_id])
        return self.sp.id_to_piece(int(token_id))

    def piece_to_id(self, piece: str) -> int:
        """The id of a piece, e.g. "▁the" or "<0xE4>"; a piece not in the vocabulary gives unk_id."""
        return self.sp.piece_to_id(piece)

    # ---- text <-> ids ------------------------------------------------------------------------------
    def encode(self, text: str, bos: bool = True, eos: bool = False) -> List[int]:
        if not isinstance(text, str):
            raise TokenizerError(f"encode expects a str, got {type(text).__name__}")
        return self._add_special(self.sp.encode(self._preprocess(text)), bos, eos)

    def encode_batch(self, texts: Sequence[str], bos: bool = True, eos: bool = False) -> List[List[int]]:
        """encode() for each text (sentencepiece encodes the list in one call)."""
        texts = list(texts)
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise TokenizerError(f"encode_batch expects strings, item {i} is a {type(text).__name__}")
        return [self._add_special(ids, bos, eos) for ids in self.sp.encode([self._preprocess(t) for t in texts])]

    def decode(self, ids: Iterable[int]) -> str:
        """ids (a list, or a 1-D tensor) -> text, leaving out BOS, EOS and padding."""
        ids = [int(i) for i in ids]
        self._check_ids(ids)
        return self._postprocess(self.sp.decode([i for i in ids if i not in self._special_ids]))

    # ---- helpers -----------------------------------------------------------------------------------
    def _preprocess(self, text: str) -> str:
        """Text -> what SentencePiece sees (a family with its own text rules overrides this)."""
        return text

    def _postprocess(self, text: str) -> str:
        return text

    def _add_special(self, ids: List[int], bos: bool, eos: bool) -> List[int]:
        if bos:
            if self.bos_id < 0:
                raise TokenizerError(f"{self.path} has no BOS piece; call encode(..., bos=False)")
            ids = [self.bos_id] + ids
        if eos:
            if self.eos_id < 0:
                raise TokenizerError(f"{self.path} has no EOS piece; call encode(..., eos=False)")
            ids = ids + [self.eos_id]
        return ids

    def _check_ids(self, ids: List[int]) -> None:
        bad = [i for i in ids if not 0 <= int(i) < self.vocab_size]
        if bad:
            raise TokenizerError(f"token ids {bad[:5]} are outside the vocabulary of {self.path} "
                                 f"(0 .. {self.vocab_size - 1})")

    def __repr__(self) -> str:
        return f"Tokenizer({str(self.path)!r}, vocab_size={self.vocab_size})"


# ---- byte-level BPE (BLOOM's tokenizer.json) ----------------------------------------------------------
# The same interface over a byte-level BPE `tokenizer.json` (BLOOM), through the `tokenizers` library.
#
# Byte-level BPE first maps every UTF-8 byte of the text to one of 256 printable characters, then merges
# frequent pairs of those into pieces. Every string is a sequence of bytes, so every string has an encoding:
# there is no unknown token in practice and decode(encode(text)) == text for any text (Chinese, emoji, ...).
# The file is a `tokenizers` JSON (vocabulary, merges, pre-tokenizer, decoder); the `tokenizers` library,
# which wrote BLOOM's own file, does the work, so the ids are exactly that library's.
#
#     ids = tokenizers.Tokenizer.from_file(path).encode(text, add_special_tokens=False).ids
#           with bos_id in front / eos_id behind when asked (as the SentencePiece Tokenizer does)
#
# Special ids are looked up by their text among the file's added tokens: BOS "<s>", EOS "</s>", pad "<pad>",
# unknown "<unk>" (BLOOM: 1, 2, 3, 0). A file without a pad token pads with id 0, like LLaMA's tokenizer.
# BLOOM's file has 250,680 tokens while the model has 250,880 embedding rows (rounded up for fast matrix
# shapes): a model may be larger than its tokenizer, never smaller.

BOS_TEXTS = ("<s>", "<|endoftext|>")
EOS_TEXTS = ("</s>", "<|endoftext|>")
PAD_TEXTS = ("<pad>",)
UNK_TEXTS = ("<unk>",)


def read_tokenizer_json(path: Path):
    """A tokenizers.Tokenizer from a tokenizer.json; TokenizerError naming the file if it is not one."""
    from tokenizers import Tokenizer as _HFTokenizer
    try:
        return _HFTokenizer.from_file(str(path))
    except Exception as err:  # tokenizers raises a bare Exception for a malformed file
        raise TokenizerError(f"{path} is not a tokenizers JSON file ({str(err).splitlines()[0]})") from None


def tokenizer_json_size(path: Path) -> int:
    """How many ids a tokenizer.json can produce (its vocabulary with the added tokens)."""
    return read_tokenizer_json(Path(path)).get_vocab_size(with_added_tokens=True)


class ByteLevelBPETokenizer(Tokenizer):
    """`Tokenizer(path)` returns one of these when path is a .json file. Same methods as Tokenizer."""

    family = "bloom"      # data.py's prompt format (Alpaca, as for LLaMA)

    def __init__(self, model_path):
        self.path = tokenizer_file(model_path)
        if not self.path.is_file():
            raise TokenizerError(f"tokenizer file {self.path} does not exist; expected a tokenizer.json")
        self.bpe = read_tokenizer_json(self.path)
        self._size = self.bpe.get_vocab_size(with_added_tokens=True)
        self._bos, self._eos = self._special(BOS_TEXTS), self._special(EOS_TEXTS)
        self._pad, self._unk = self._special(PAD_TEXTS), self._special(UNK_TEXTS)
        self._special_ids = {i for i in (self._bos, self._eos, self._pad) if i >= 0}

    def _special(self, texts: Sequence[str]) -> int:
        for text in texts:
            token_id = self.bpe.token_to_id(text)
            if token_id is not None:
                return token_id
        return -1

    # ---- vocabulary --------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self._size

    @property
    def bos_id(self) -> int:
        return self._bos

    @property
    def eos_id(self) -> int:
        return self._eos

    @property
    def unk_id(self) -> int:
        return self._unk

    @property
    def pad_id(self) -> int:
        return self._pad if self._pad >= 0 else 0

    def id_to_piece(self, token_id: int) -> str:
        self._check_ids([token_id])
        return self.bpe.id_to_token(int(token_id))

    def piece_to_id(self, piece: str) -> int:
        token_id = self.bpe.token_to_id(piece)
        return token_id if token_id is not None else self.unk_id

    # ---- text <-> ids ------------------------------------------------------------------------------
    def encode(self, text: str, bos: bool = True, eos: bool = False) -> List[int]:
        if not isinstance(text, str):
            raise TokenizerError(f"encode expects a str, got {type(text).__name__}")
        return self._add_special(self.bpe.encode(text, add_special_tokens=False).ids, bos, eos)

    def encode_batch(self, texts: Sequence[str], bos: bool = True, eos: bool = False) -> List[List[int]]:
        texts = list(texts)
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise TokenizerError(f"encode_batch expects strings, item {i} is a {type(text).__name__}")
        encodings = self.bpe.encode_batch(texts, add_special_tokens=False)
        return [self._add_special(e.ids, bos, eos) for e in encodings]

    def decode(self, ids: Iterable[int]) -> str:
        """ids -> text, leaving out BOS, EOS and padding (the bytes of the pieces, joined and UTF-8 decoded)."""
        ids = [int(i) for i in ids]
        self._check_ids(ids)
        return self.bpe.decode([i for i in ids if i not in self._special_ids], skip_special_tokens=False)

