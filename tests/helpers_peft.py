"""Test helpers for the prompt / prefix / LLaMA-Adapter tests: a float64 RoPE reference and an HF peer model.

`rope_f64(x, positions, theta)` rotates adjacent pairs with complex numbers (Meta's form), written here
independently of minipeft.model. `tiny_hf_pair(...)` builds a random transformers LlamaForCausalLM from a
config (nothing downloaded) and our Transformer with the same weights (through hf_tensor_to_ours).
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from minipeft.checkpoint import hf_tensor_to_ours
from minipeft.config import ModelConfig
from minipeft.model import Transformer


def rope_f64(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """x (..., T, hd) float64, positions (T,) -> each pair (x[2i], x[2i+1]) times exp(i * pos * theta^(-2i/hd))."""
    hd = x.shape[-1]
    freqs = theta ** (-torch.arange(0, hd, 2, dtype=torch.float64) / hd)               # (hd/2,)
    angles = positions.to(torch.float64)[:, None] * freqs                               # (T, hd/2)
    pairs = torch.view_as_complex(x.to(torch.float64).unflatten(-1, (-1, 2)).contiguous())   # (..., T, hd/2)
    return torch.view_as_real(pairs * torch.polar(torch.ones_like(angles), angles)).flatten(-2)


def hf_key_layout_to_ours(k: torch.Tensor) -> torch.Tensor:
    """Key head vectors (..., hd) in transformers' half-split rotary layout -> Meta's adjacent pairs.
    Per head, HF index c*(hd/2)+i holds Meta index 2i+c."""
    return k.unflatten(-1, (2, -1)).transpose(-1, -2).flatten(-2)


def tiny_hf_pair(n_layers: int = 3, n_heads: int = 4, n_kv_heads: int = 2, dim: int = 64, vocab: int = 97,
                 ffn: int = 112, seed: int = 0, init_std: float = 0.15):
    """-> (hf LlamaForCausalLM in eval mode, our Transformer with the same weights, our ModelConfig).
    init_std larger than transformers' 0.02 so attention patterns are far from uniform."""
    from transformers import LlamaConfig, LlamaForCausalLM

    hf_cfg = LlamaConfig(vocab_size=vocab, hidden_size=dim, intermediate_size=ffn, num_hidden_layers=n_layers,
                         num_attention_heads=n_heads, num_key_value_heads=n_kv_heads, rms_norm_eps=1e-5,
                         rope_theta=10000.0, max_position_embeddings=128, tie_word_embeddings=False,
                         initializer_range=init_std, attn_implementation="eager")
    torch.manual_seed(seed)
    hf = LlamaForCausalLM(hf_cfg).eval()
    cfg = ModelConfig(dim=dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv_heads, vocab_size=vocab,
                      ffn_hidden_dim=ffn, norm_eps=1e-5, rope_theta=10000.0, max_seq_len=128)
    ours = Transformer(cfg).eval()
    state = dict(hf_tensor_to_ours(k, v, cfg) for k, v in hf.state_dict().items())
    ours.load_state_dict(state, strict=True)
    return hf, ours, cfg


def assert_logits_close(ours: torch.Tensor, theirs: torch.Tensor, rel: float = 1e-5) -> None:
    """Max abs difference within rel * the largest logit magnitude."""
    assert ours.shape == theirs.shape, (ours.shape, theirs.shape)
    scale = theirs.abs().max().item()
    err = (ours - theirs).abs().max().item()
    assert err <= rel * scale, f"max |diff| {err:.3g} > {rel} * max |logit| {scale:.3g}"
