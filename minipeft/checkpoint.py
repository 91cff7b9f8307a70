"""Checkpoints: our folder format, Meta and Hugging Face LLaMA readers, conversion.

(Being built: see issue 2. The key mapping below is the part other modules already rely on.)
"""

from __future__ import annotations

import torch

from .config import ModelConfig


def hf_key_to_ours(key: str) -> str:
    """Hugging Face LLaMA parameter name -> ours (Meta's names)."""
    key = key.removeprefix("model.")
    fixed = {"embed_tokens.weight": "tok_embeddings.weight", "norm.weight": "norm.weight",
             "lm_head.weight": "output.weight"}
    if key in fixed:
        return fixed[key]
    for hf, ours in (("self_attn.q_proj", "attention.wq"), ("self_attn.k_proj", "attention.wk"),
                     ("self_attn.v_proj", "attention.wv"), ("self_attn.o_proj", "attention.wo"),
                     ("mlp.gate_proj", "feed_forward.w1"), ("mlp.down_proj", "feed_forward.w2"),
                     ("mlp.up_proj", "feed_forward.w3"), ("input_layernorm", "attention_norm"),
                     ("post_attention_layernorm", "ffn_norm")):
        if f".{hf}." in key:
            return key.replace(hf, ours)
    raise KeyError(key)


def unpermute_hf_rotary(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo transformers' q/k permutation (half-split rotary -> Meta's adjacent pairs).
    Per head, HF row c*(hd/2)+i holds Meta row 2i+c. w: (n_heads*hd, d_in)."""
    dim1, dim2 = w.shape
    return w.view(n_heads, 2, dim1 // n_heads // 2, dim2).transpose(1, 2).reshape(dim1, dim2)


def permute_for_hf(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Meta's adjacent-pair rows -> transformers' half-split layout (the inverse of unpermute_hf_rotary)."""
    dim1, dim2 = w.shape
    return w.view(n_heads, dim1 // n_heads // 2, 2, dim2).transpose(1, 2).reshape(dim1, dim2)


def hf_tensor_to_ours(hf_key: str, tensor: torch.Tensor, cfg: ModelConfig):
    """One HF tensor -> (our key, our tensor), undoing the rotary permutation on q and k."""
    key = hf_key_to_ours(hf_key)
    if key.endswith("attention.wq.weight"):
        tensor = unpermute_hf_rotary(tensor, cfg.n_heads)
    elif key.endswith("attention.wk.weight"):
        tensor = unpermute_hf_rotary(tensor, cfg.n_kv_heads)
    return key, tensor
