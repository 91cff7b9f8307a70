"""The attention seam: what every family's attention exposes, so a PEFT method installs the same way on all.

Shapes: B batch, T new tokens, S = past length + T keys, d = dim, H query heads, G key/value heads, hd = head_dim.

    q, k, v = attention.project(x, rotation=None)   x (B, T, d) -> q (B, H, T, hd), k and v (B, G, T, hd)
    out     = attention.attend(q, k, v, mask)       k, v (B, G, S, hd) with the past in front -> (B, H, T, hd)
    y, kv   = attention(x, rotation, mask, past_kv) project, append to the cache, attend, wo: (B, T, d), (k, v)

rotation    the position encoding the family's forward computed for these T tokens, passed through the blocks
            as one argument: LLaMA / ChatGLM2 (model.py) and ChatGLM-6B (chatglm.py) a (cos, sin) pair, each
            (B, 1, T, rotated pairs); BLOOM (bloom.py) always None, since ALiBi lives in the scores (the mask).
            The forwards stack the pair into one tensor (2, B, 1, T, pairs) and `project` reads it with
            `cos, sin = rotation`, so a plain tuple works as well. One tensor, not a tuple, because gradient
            checkpointing saves a block's tensor arguments as saved tensors but keeps any other argument by
            plain reference: a tuple would hide the tables from saved-tensor hooks (lesson 07 counts them).
            rotation=None is a position-free projection: no RoPE on q or k. That is what LLaMA-Adapter's prompt
            keys/values need (peft/llama_adapter.py), on every family.
mask        what the family's forward built, handed to attend unchanged: a bool mask (B or 1, 1, T, S), True =
            may attend, or None for plain causal attention with no past (model.py, chatglm.py); an additive float
            bias (B, H, T, S), ALiBi with -inf where a key is hidden (bloom.py).

Each attention class also says, as data, where its q/k/v projections live: the class attribute `qkv_layout`,
a QKVLayout below. Code that must find the projections without knowing the family reads it.

This module imports nothing from the family files (they import it), so the PEFT methods can depend on it alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple


@dataclass(frozen=True)
class QKVLayout:
    """Where an attention's query / key / value projections live.

    fused=False   three Linear modules: wq (d -> H hd), wk and wv (d -> G hd); rows of each are head after head.
    fused=True    one Linear wqkv (d -> 3 H hd, G = H) whose output rows are grouped per head:
                  [q_0, k_0, v_0, q_1, k_1, v_1, ...], hd rows each (BLOOM's query_key_value, ChatGLM-6B's),
                  so wqkv(x).view(B, T, H, 3, hd)[..., j, :] is q (j = 0), k (1), v (2)."""

    fused: bool

    @property
    def modules(self) -> Tuple[str, ...]:
        """The names of the projection modules on the attention: ("wq", "wk", "wv") or ("wqkv",)."""
        return ("wqkv",) if self.fused else ("wq", "wk", "wv")


SEPARATE_QKV = QKVLayout(fused=False)          # model.py: LLaMA, ChatGLM2
PER_HEAD_FUSED_QKV = QKVLayout(fused=True)     # bloom.py, chatglm.py
