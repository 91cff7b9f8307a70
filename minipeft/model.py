"""The LLaMA decoder, all of it, in plain torch.nn (and ChatGLM2-6B, through two config switches).

Shapes: B batch, T new tokens, S = past length + T keys, d = dim, H query heads, G = n_kv_heads,
hd = head_dim = d / H, V vocab.

    h_0     = tok_embeddings(tokens)                                   (B, T, d)   (or given input_embeds)
    h'      = h + Attention(RMSNorm(h))                                 per layer
    h_next  = h' + FeedForward(RMSNorm(h'))
    logits  = output(RMSNorm(h_L))                                      (B, T, V)

RMSNorm(x)      = x / sqrt(mean(x^2) + eps) * g
RoPE            rotates each adjacent pair (x[2i], x[2i+1]) of a query/key head by the angle
                pos * theta^(-2i/hd): Meta's complex-number form, so Meta checkpoints load unpermuted.
Attention       softmax(q k^T / sqrt(hd) + causal mask) v, with G key/value heads shared by H/G query
                heads each (grouped-query attention), computed by scaled_dot_product_attention.
FeedForward     w2(silu(w1 x) * w3 x)  (SwiGLU)

Cache / past key values: a list with one (k, v) pair per layer, each (B, G, S_past, hd). Keys are stored
*after* rotation, so anything placed in the cache (a real earlier token, or a prefix-tuning prefix) is
used exactly as stored. New tokens take positions start_pos .. start_pos+T-1, with start_pos defaulting
to the past length.

ChatGLM2-6B ("chatglm2") is this decoder with cfg.qkv_bias (wq/wk/wv carry biases) and cfg.rotary_fraction 0.5
(RoPE turns adjacent pairs of the first hd/2 dims only, with angles pos * theta^(-2i/(hd/2)); the rest pass).

The attention seam (attention_seam.py), the same in every family: each block's attention has
`project(x, rotation=None) -> (q, k, v)` and `attend(q, k, v, mask)`; here rotation is the (cos, sin) pair the
forward computed once for all layers, stacked in one tensor (None: no RoPE) and mask the bool mask of build_mask.
bloom.py and chatglm.py copy some functions of this file word for word (marked `# Copied from minipeft.model.<name>`
there): change one here and tests/test_copies.py names each copy to change with it.

This file knows nothing about PEFT: prompt tuning uses `input_embeds`, prefix tuning uses
`past_key_values`, and the other methods replace sub-modules (LoRALinear subclasses nn.Linear).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .attention_seam import SEPARATE_QKV
from .config import ConfigError, ModelConfig
from .kv_cache import KVCache, append_kv, cache_length

Rotation = Tuple[torch.Tensor, torch.Tensor]    # (cos, sin) of rope_cos_sin: a pair, or the two stacked (2, ...)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_float = x.float()                                                        # normalise in fp32
        normed = x_float * torch.rsqrt(x_float.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.to(x.dtype)


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """positions (B, T) int -> cos, sin each (B, 1, T, hd/2) in float32 (the 1 broadcasts over heads)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim))
    angles = positions.to(torch.float32)[..., None] * inv_freq                     # (B, T, hd/2)
    return angles.cos()[:, None], angles.sin()[:, None]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs: (x0, x1) -> (x0 cos - x1 sin, x0 sin + x1 cos). x (B, heads, T, hd). When cos covers
    fewer than hd/2 pairs (ChatGLM2: rotary_dim = hd/2), only the first 2 * cos.shape[-1] dims turn."""
    rotated_dims = 2 * cos.shape[-1]
    if rotated_dims < x.shape[-1]:
        return torch.cat([apply_rope(x[..., :rotated_dims], cos, sin), x[..., rotated_dims:]], dim=-1)
    pairs = x.float().unflatten(-1, (-1, 2))                                       # (B, heads, T, hd/2, 2)
    x0, x1 = pairs[..., 0], pairs[..., 1]
    rotated = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)      # (B, heads, T, hd/2, 2)
    return rotated.flatten(-2).to(x.dtype)                                         # (B, heads, T, hd)


class Attention(nn.Module):
    qkv_layout = SEPARATE_QKV                                                      # wq, wk, wv (attention_seam.py)

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=cfg.qkv_bias)   # bias: ChatGLM2
        self.wk = nn.Linear(cfg.dim, cfg.kv_dim, bias=cfg.qkv_bias)
        self.wv = nn.Linear(cfg.dim, cfg.kv_dim, bias=cfg.qkv_bias)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)

    def project(self, x: torch.Tensor, rotation: Optional[Rotation] = None):
        """x (B, T, d) -> q (B, H, T, hd), k (B, G, T, hd), v (B, G, T, hd); q and k rotated by rotation = (cos, sin)
        from rope_cos_sin, or not at all when rotation is None (a projection that carries no position)."""
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)       # (B, H, T, hd)
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)    # (B, G, T, hd)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)    # (B, G, T, hd)
        if rotation is None:
            return q, k, v
        cos, sin = rotation
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
        """q (B, H, T, hd), k/v (B, G, S, hd), mask (B or 1, 1, T, S) bool (True = may attend) or None for
        plain causal attention with no past. Returns (B, H, T, hd)."""
        repeats = self.n_heads // self.n_kv_heads
        k = k.repeat_interleave(repeats, dim=1)                                    # (B, H, S, hd)
        v = v.repeat_interleave(repeats, dim=1)                                    # (B, H, S, hd)
        is_causal = mask is None and q.shape[2] > 1
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal)

    def forward(self, x, rotation, mask, past_kv=None):
        """x (B, T, d) -> (B, T, d), and this layer's updated (k, v) with the past in front."""
        B, T, _ = x.shape
        q, k, v = self.project(x, rotation)
        k, v = append_kv(past_kv, k, v)                                            # (B, G, S, hd) each
        out = self.attend(q, k, v, mask)                                           # (B, H, T, hd)
        out = out.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)      # (B, T, H*hd)
        return self.wo(out), (k, v)


class FeedForward(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.w1 = nn.Linear(cfg.dim, cfg.ffn_hidden_dim, bias=False)   # gate
        self.w2 = nn.Linear(cfg.ffn_hidden_dim, cfg.dim, bias=False)   # down
        self.w3 = nn.Linear(cfg.dim, cfg.ffn_hidden_dim, bias=False)   # up

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))                            # (B, T, d)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.feed_forward = FeedForward(cfg)

    def forward(self, h, rotation, mask, past_kv=None):
        attn_out, new_kv = self.attention(self.attention_norm(h), rotation, mask, past_kv)
        h = h + attn_out
        h = h + self.feed_forward(self.ffn_norm(h))
        return h, new_kv


def widen_attention_mask(attention_mask: torch.Tensor, B: int, T: int, past_len: int) -> torch.Tensor:
    """attention_mask (B, S_past + T), or (B, T) over the new tokens only -> (B, S_past + T): the past keys of a
    (B, T) mask are all real (ones in front)."""
    S = past_len + T
    if attention_mask.shape[1] == T and past_len > 0:
        attention_mask = torch.cat([attention_mask.new_ones(B, past_len), attention_mask], dim=1)
    if attention_mask.shape != (B, S):
        raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, expected ({B}, {S}) or ({B}, {T})")
    return attention_mask


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.gradient_checkpointing = False   # recompute each block's activations in backward
        if self.output.weight.device.type != "meta":
            self.init_weights()

    def init_weights(self, std: float = 0.02) -> None:
        """Random init for training from scratch (nanoGPT-style): N(0, std) for every matrix, ones for norms."""
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                nn.init.ones_(p)
            elif name.endswith(".bias"):                                           # ChatGLM2's QKV bias
                nn.init.zeros_(p)
            else:
                nn.init.normal_(p, mean=0.0, std=std)

    def forward(
        self,
        tokens: Optional[torch.Tensor] = None,         # (B, T) int64
        *,
        input_embeds: Optional[torch.Tensor] = None,   # (B, T, d), instead of tokens
        past_key_values: Optional[KVCache] = None,     # per layer (k, v), each (B, G, S_past, hd)
        start_pos: Optional[int] = None,               # position of the first new token; default S_past
        position_ids: Optional[torch.Tensor] = None,   # (B, T) explicit positions (e.g. left padding)
        attention_mask: Optional[torch.Tensor] = None, # (B, S_past + T) or (B, T): 1 = real key, 0 = padding
        use_cache: bool = False,
        return_hidden: bool = False,                   # give h_L (B, T, d) instead of logits (see head())
    ):
        """Returns logits (B, T, V); with use_cache=True, (logits, cache) where cache holds past + new keys.
        With return_hidden=True the last block's output h_L (B, T, d) instead of the logits: head(h_L) gives
        them, so a loss can apply the output layer to only the positions it needs."""
        h = self.embed(tokens, input_embeds)                                             # (B, T, d)
        B, T, _ = h.shape
        past_len = self.past_length(past_key_values)
        if position_ids is None:
            first = past_len if start_pos is None else start_pos
            position_ids = torch.arange(first, first + T, device=h.device).expand(B, T)   # (B, T)
        cos, sin = rope_cos_sin(position_ids, self.config.rotary_dim, self.config.rope_theta)   # (B, 1, T, rot/2) each
        rotation = torch.stack([cos, sin])             # (2, B, 1, T, rot/2): one tensor (attention_seam.py says why)
        mask = self.build_mask(B, T, past_len, attention_mask, h.device)
        h, new_cache = self.forward_layers(h, rotation, mask, past_key_values)
        out = h if return_hidden else self.head(h)                                     # (B, T, d) | (B, T, V)
        return (out, new_cache) if use_cache else out

    def embed(self, tokens: Optional[torch.Tensor], input_embeds: Optional[torch.Tensor]) -> torch.Tensor:
        """tokens (B, T) -> their embeddings (B, T, d), or the given input_embeds (B, T, d): exactly one of the two."""
        if (tokens is None) == (input_embeds is None):
            raise ValueError("pass exactly one of tokens or input_embeds")
        return self.tok_embeddings(tokens) if tokens is not None else input_embeds

    def past_length(self, past_key_values: Optional[KVCache]) -> int:
        """S_past, the positions the cache holds (0 without one); the cache must have one (k, v) per layer."""
        past_len = cache_length(past_key_values)
        if past_key_values is not None and len(past_key_values) != len(self.layers):
            raise ValueError(f"past_key_values has {len(past_key_values)} layers, the model {len(self.layers)}")
        return past_len

    def forward_layers(self, h: torch.Tensor, rotation, mask, past_key_values: Optional[KVCache]):
        """h (B, T, d) through every block, each with its layer's past (k, v) -> (h_L, the new cache). With
        gradient_checkpointing (training only) a block keeps only its inputs and recomputes the rest in backward."""
        new_cache = []
        for i, layer in enumerate(self.layers):
            past_kv = past_key_values[i] if past_key_values is not None else None
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                h, kv = checkpoint(layer, h, rotation, mask, past_kv, use_reentrant=False)
            else:
                h, kv = layer(h, rotation, mask, past_kv)
            new_cache.append(kv)
        return h, new_cache

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """The last block's output (..., d) -> logits (..., V): final RMSNorm, then the output layer.
        Decoding (no grad, a few rows x (n, d)) computes W x^T (V, n) and returns its transpose: the same
        products, but BLAS need not transpose the (V, d) matrix for each step (about 1.6x faster on CPU)."""
        x = self.norm(h)
        if x.dim() == 2 and x.shape[0] <= 16 and type(self.output) is nn.Linear and not torch.is_grad_enabled():
            return (self.output.weight @ x.T).T                                        # (n, V), a view
        return self.output(x)

    @staticmethod
    def build_mask(B: int, T: int, past_len: int, attention_mask: Optional[torch.Tensor], device) -> Optional[torch.Tensor]:
        """Boolean (B|1, 1, T, S) mask, True where query t may attend key s; None for plain causal, no past.

        Causal: key s is visible to new token t when s <= past_len + t. Padding keys (attention_mask 0) are
        hidden, except that every token always sees itself, so a padding row never has nothing to attend
        to (its output is ignored anyway)."""
        S = past_len + T
        if attention_mask is None and past_len == 0:
            return None
        query_pos = torch.arange(past_len, S, device=device)[:, None]                 # (T, 1)
        key_pos = torch.arange(S, device=device)[None, :]                             # (1, S)
        mask = (key_pos <= query_pos)[None, None]                                     # (1, 1, T, S)
        if attention_mask is not None:
            attention_mask = widen_attention_mask(attention_mask.to(device=device, dtype=torch.bool), B, T, past_len)
            mask = mask & attention_mask[:, None, None, :]                            # (B, 1, T, S)
            mask = mask | (key_pos == query_pos)[None, None]                          # a token sees itself
        return mask

    def num_parameters(self, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)


def check_config(cfg: ModelConfig) -> None:
    """This decoder's own checks of a ModelConfig (LLaMA and ChatGLM2; the family record hands it to
    ModelConfig.__post_init__): RoPE turns pairs, so head_dim and the rotated part must be even."""
    if cfg.head_dim % 2 != 0:
        raise ConfigError(f"head_dim ({cfg.head_dim}) must be even for rotary embeddings")
    if cfg.rotary_fraction not in (0.5, 1.0) or cfg.rotary_dim % 2 != 0:
        raise ConfigError(f"rotary_fraction {cfg.rotary_fraction}: expected 1.0 (LLaMA) or 0.5 (ChatGLM2), "
                          f"with an even number of rotated dims (head_dim {cfg.head_dim})")
