"""Byte-level BPE tokenizer (BLOOM's `tokenizer.json`), behind the same interface as the SentencePiece one.

Byte-level BPE first maps every UTF-8 byte of the text to one of 256 printable characters, then merges
frequent pairs of those into pieces. Every string is a sequence of bytes, so every string has an encoding:
there is no unknown token in practice and decode(encode(text)) == text for any text (Chinese, emoji, ...).
The file is a `tokenizers` JSON (vocabulary, merges, pre-tokenizer, decoder); the `tokenizers` library,
which wrote BLOOM's own file, does the work, so the ids are exactly that library's.

    ids = tokenizers.Tokenizer.from_file(path).encode(text, add_special_tokens=False).ids
          with bos_id in front / eos_id behind when asked (as the SentencePiece Tokenizer does)

Special ids are looked up by their text among the file's added tokens: BOS "<s>", EOS "</s>", pad "<pad>",
unknown "<unk>" (BLOOM: 1, 2, 3, 0). A file without a pad token pads with id 0, like LLaMA's tokenizer.
BLOOM's file has 250,680 tokens while the model has 250,880 embedding rows (rounded up for fast matrix
shapes): a model may be larger than its tokenizer, never smaller.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, List, Sequence

from .tokenizer import Tokenizer, TokenizerError, tokenizer_file

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
