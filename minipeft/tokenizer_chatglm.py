"""ChatGLM-6B's and ChatGLM2-6B's tokenizers behind tokenizer.Tokenizer's interface.

ChatGLM-6B (`ice_text.model`): the special tokens are pieces of the SentencePiece model itself
([MASK], [gMASK], <sop>, <eop>, and <pad>), and text is rewritten before SentencePiece sees it:

    "\\n" -> "<n>"      "\\t" -> "<|tab|>"      a run of k spaces (2 <= k <= 80) -> "<|blank_k|>"

(longest runs first, as the original does); decode undoes it. A prompt ends "[gMASK] <sop>" and a response ends
"<eop>":  encode(prompt, bos=True) = sp(prompt) + [gMASK, <sop>];  encode(response, eos=True) = sp(response) + [<eop>].
bos_id is <sop>, eos_id is <eop> (generation stops there).

ChatGLM2-6B (`tokenizer.model`): plain SentencePiece; its special tokens are *not* pieces but ids appended after
the n pieces: [MASK] n, [gMASK] n+1, [sMASK] n+2, sop n+3, eop n+4 (vocab_size n + 5). A prompt *starts*
"[gMASK] sop": encode(prompt, bos=True) = [gMASK, sop] + sp(prompt); a response ends with SentencePiece's </s>.
The pad id is the unknown piece (0), as the original's.
"""

from __future__ import annotations

from typing import List

from .tokenizer import Tokenizer, TokenizerError

MAX_BLANK_RUN = 80
CHATGLM_SPECIAL_PIECES = ("[MASK]", "[gMASK]", "<sop>", "<eop>", "<n>")
CHATGLM2_SPECIAL_TOKENS = ("[MASK]", "[gMASK]", "[sMASK]", "sop", "eop")


def glm_text_rewrite(text: str) -> str:
    """ChatGLM-6B's rewrite before SentencePiece: newline -> <n>, tab -> <|tab|>, k spaces -> <|blank_k|>."""
    text = text.replace("\n", "<n>").replace("\t", "<|tab|>")
    for run in range(MAX_BLANK_RUN, 1, -1):
        text = text.replace(" " * run, f"<|blank_{run}|>")
    return text


class ChatGLMTokenizer(Tokenizer):
    family = "chatglm"

    def _setup_special_ids(self) -> None:
        unk = self.sp.unk_id()
        missing = [p for p in CHATGLM_SPECIAL_PIECES if self.sp.piece_to_id(p) == unk]
        if missing:
            raise TokenizerError(f"{self.path} lacks the ChatGLM-6B special pieces {missing}; expected ChatGLM-6B's "
                                 f"ice_text.model (with [MASK], [gMASK], <sop>, <eop>, <n>)")
        self.mask_id, self.gmask_id, self.sop_id, self.eop_id = (self.sp.piece_to_id(p) for p in CHATGLM_SPECIAL_PIECES[:4])
        pad = self.sp.piece_to_id("<pad>")
        self._pad_id = pad if pad != unk else unk
        self._special_ids = {self.mask_id, self.gmask_id, self.sop_id, self.eop_id, self._pad_id}

    @property
    def bos_id(self) -> int:
        return self.sop_id

    @property
    def eos_id(self) -> int:
        return self.eop_id

    @property
    def pad_id(self) -> int:
        return self._pad_id

    def _preprocess(self, text: str) -> str:
        return glm_text_rewrite(text)

    def _postprocess(self, text: str) -> str:
        text = text.replace("<n>", "\n").replace("<|tab|>", "\t")
        for run in range(2, MAX_BLANK_RUN + 1):
            text = text.replace(f"<|blank_{run}|>", " " * run)
        return text

    def _add_special(self, ids: List[int], bos: bool, eos: bool) -> List[int]:
        return ids + ([self.gmask_id, self.sop_id] if bos else []) + ([self.eop_id] if eos else [])


class ChatGLM2Tokenizer(Tokenizer):
    family = "chatglm2"

    def _setup_special_ids(self) -> None:
        if self.sp.eos_id() < 0:
            raise TokenizerError(f"{self.path} has no EOS piece (</s>); expected ChatGLM2-6B's tokenizer.model")
        self.n_pieces = self.sp.vocab_size()
        self.special_ids = {name: self.n_pieces + i for i, name in enumerate(CHATGLM2_SPECIAL_TOKENS)}
        self.mask_id, self.gmask_id, self.sop_id = self.special_ids["[MASK]"], self.special_ids["[gMASK]"], self.special_ids["sop"]
        self._special_ids = set(self.special_ids.values()) | {self.sp.eos_id(), self.pad_id} | (
            {self.sp.bos_id()} if self.sp.bos_id() >= 0 else set())

    @property
    def vocab_size(self) -> int:
        return self.n_pieces + len(CHATGLM2_SPECIAL_TOKENS)

    @property
    def bos_id(self) -> int:
        return self.sop_id

    @property
    def pad_id(self) -> int:
        return self.sp.unk_id()

    def id_to_piece(self, token_id: int) -> str:
        self._check_ids([token_id])
        names = {v: k for k, v in self.special_ids.items()}
        return names.get(int(token_id)) or self.sp.id_to_piece(int(token_id))

    def piece_to_id(self, piece: str) -> int:
        return self.special_ids.get(piece, self.sp.piece_to_id(piece))

    def _add_special(self, ids: List[int], bos: bool, eos: bool) -> List[int]:
        return ([self.gmask_id, self.sop_id] if bos else []) + ids + ([self.sp.eos_id()] if eos else [])
