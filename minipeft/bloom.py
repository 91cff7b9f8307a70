"""The BLOOM decoder (BigScience, bloom-7b1), all of it, in plain torch.nn: a sibling of model.py.

Shapes: B batch, T new tokens, S = past length + T keys, d = dim, H heads (G = H: no grouped-query
attention), hd = head_dim = d / H, V vocab, f = ffn_hidden_dim = 4d.

    h_0     = LayerNorm_embed(tok_embeddings(tokens))                    (B, T, d)  (or of given input_embeds)
    h'      = h + Attention(LayerNorm(h))                                per layer (pre-LN, weight and bias)
    h_next  = h' + FeedForward(LayerNorm(h'))
    logits  = LayerNorm(h_L) E^T                                         (B, T, V)  tied: E = tok_embeddings

Attention   [q_h, k_h, v_h] = the h-th (3 hd)-wide slice of wqkv(x) (one fused Linear with bias, laid out
            per head like transformers' query_key_value), then for head h
                softmax(q k^T / sqrt(hd) + m_h * (j - i) + causal mask) v,     out = wo(heads) (with bias)
            where j is the key's position and i the query's, both counted over the attention mask (a padding
            key has none and is masked). No rotary embedding: the position enters only through this bias.
ALiBi       m_h for H heads: with c = 2^floor(log2 H), m_h = (2^(-8/c))^h for h = 1..c; when H is not a power
            of two the remaining H - c heads take the odd powers 1, 3, 5, .. of 2^(-8/(2c)), i.e. every
            other slope of the 2c-head series. bloom-7b1 (H = 32): m = 2^-0.25, 2^-0.5, .., 2^-8.
            transformers adds m_h * j instead of m_h * (j - i): softmax does not change when a row is shifted
            by a constant (m_h * i is one per query row), so the two are the same attention; the relative form
            keeps the bias <= 0 and small, which bf16 represents better.
FeedForward w2(gelu_tanh(w1 x)), both with bias (transformers' dense_h_to_4h, dense_4h_to_h).

Cache / past key values: a list with one (k, v) pair per layer, each (B, H, S_past, hd). Keys carry no
position at all (ALiBi lives in the scores), so a cached key, or a prefix-tuning prefix, needs no rotation:
it only needs its position j, which is its index in the attention mask. Prefix slots in front of the cache
take positions 0..P-1 and real tokens P.., exactly as transformers does when peft prepends P ones to the
mask. `position_ids` and `start_pos` are accepted for the common signature and not needed: positions come
from the attention mask (all ones when none is given).

The attention seam (attention_seam.py) is model.py's: `project(x, rotation=None)` (rotation is always None
here, nothing turns) and `attend(q, k, v, mask)` with mask the ALiBi bias above, so every PEFT method installs as
on LLaMA. Blocks marked `# Copied from minipeft.model.<name>` are model.py's text; tests/test_copies.py keeps
them so.

This file knows nothing about PEFT, like model.py.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .attention_seam import PER_HEAD_FUSED_QKV
from .config import ConfigError, ModelConfig
from .kv_cache import KVCache, append_kv, cache_length


def alibi_slopes(n_heads: int) -> torch.Tensor:
    """(H,) float32 slopes m_1..m_H, two geometric series when H is not a power of two (module docstring)."""
    closest = 2 ** math.floor(math.log2(n_heads))
    base = 2.0 ** (-8.0 / closest)
    slopes = [base ** power for power in range(1, closest + 1)]
    if closest != n_heads:
        extra_base = 2.0 ** (-8.0 / (2 * closest))
        slopes += [extra_base ** power for power in range(1, 2 * (n_heads - closest), 2)]
    return torch.tensor(slopes, dtype=torch.float32)


class BloomAttention(nn.Module):
    qkv_layout = PER_HEAD_FUSED_QKV                                                 # wqkv, per head [q_h, k_h, v_h]

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads = self.n_kv_heads = cfg.n_heads
        self.head_dim = cfg.head_dim
        self.wqkv = nn.Linear(cfg.dim, 3 * cfg.dim, bias=True)     # per head [q_h, k_h, v_h]
        self.wo = nn.Linear(cfg.dim, cfg.dim, bias=True)

    def project(self, x: torch.Tensor, rotation: None = None):
        """x (B, T, d) -> q, k, v each (B, H, T, hd). rotation is always None: BLOOM rotates nothing, ALiBi is
        added to the scores instead (the seam's signature, attention_seam.py)."""
        if rotation is not None:
            raise ValueError("BLOOM has no rotary embedding (ALiBi is in the attention bias): rotation must be None")
        B, T, _ = x.shape
        fused = self.wqkv(x).view(B, T, self.n_heads, 3, self.head_dim)            # (B, T, H, 3, hd)
        q, k, v = fused.unbind(dim=3)                                               # (B, T, H, hd) each
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)              # (B, H, T, hd) each

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """q (B, H, T, hd), k/v (B, H, S, hd), mask (B, H, T, S) float: the ALiBi bias, -inf where a key is hidden.
        Returns softmax(q k^T / sqrt(hd) + mask) v, (B, H, T, hd)."""
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask.to(q.dtype))

    # Copied from minipeft.model.Attention.forward
    def forward(self, x, rotation, mask, past_kv=None):
        """x (B, T, d) -> (B, T, d), and this layer's updated (k, v) with the past in front."""
        B, T, _ = x.shape
        q, k, v = self.project(x, rotation)
        k, v = append_kv(past_kv, k, v)                                            # (B, G, S, hd) each
        out = self.attend(q, k, v, mask)                                           # (B, H, T, hd)
        out = out.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)      # (B, T, H*hd)
        return self.wo(out), (k, v)


class BloomFeedForward(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.w1 = nn.Linear(cfg.dim, cfg.ffn_hidden_dim, bias=True)    # up (dense_h_to_4h)
        self.w2 = nn.Linear(cfg.ffn_hidden_dim, cfg.dim, bias=True)    # down (dense_4h_to_h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.gelu(self.w1(x), approximate="tanh"))                      # (B, T, d)


class BloomBlock(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attention_norm = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.attention = BloomAttention(cfg)
        self.ffn_norm = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.feed_forward = BloomFeedForward(cfg)

    # Copied from minipeft.model.Block.forward
    def forward(self, h, rotation, mask, past_kv=None):
        attn_out, new_kv = self.attention(self.attention_norm(h), rotation, mask, past_kv)
        h = h + attn_out
        h = h + self.feed_forward(self.ffn_norm(h))
        return h, new_kv


# Copied from minipeft.model.widen_attention_mask
def widen_attention_mask(attention_mask: torch.Tensor, B: int, T: int, past_len: int) -> torch.Tensor:
    """attention_mask (B, S_past + T), or (B, T) over the new tokens only -> (B, S_past + T): the past keys of a
    (B, T) mask are all real (ones in front)."""
    S = past_len + T
    if attention_mask.shape[1] == T and past_len > 0:
        attention_mask = torch.cat([attention_mask.new_ones(B, past_len), attention_mask], dim=1)
    if attention_mask.shape != (B, S):
        raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, expected ({B}, {S}) or ({B}, {T})")
    return attention_mask


class Bloom(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.embed_norm = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)                  # word_embeddings_layernorm
        self.layers = nn.ModuleList(BloomBlock(cfg) for _ in range(cfg.n_layers))
        self.norm = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.gradient_checkpointing = False
        if self.tok_embeddings.weight.device.type != "meta":
            self.init_weights()

    def init_weights(self, std: float = 0.02) -> None:
        """N(0, std) for matrices and the embedding, zeros for biases, ones for LayerNorm weights."""
        for name, p in self.named_parameters():
            if "norm" in name:
                nn.init.ones_(p) if name.endswith("weight") else nn.init.zeros_(p)
            elif name.endswith("bias"):
                nn.init.zeros_(p)
            else:
                nn.init.normal_(p, mean=0.0, std=std)

    def forward(
        self,
        tokens: Optional[torch.Tensor] = None,         # (B, T) int64
        *,
        input_embeds: Optional[torch.Tensor] = None,   # (B, T, d), instead of tokens (embed_norm still applies)
        past_key_values: Optional[KVCache] = None,     # per layer (k, v), each (B, H, S_past, hd)
        start_pos: Optional[int] = None,               # unused: positions come from the attention mask
        position_ids: Optional[torch.Tensor] = None,   # unused: ALiBi counts positions over the attention mask
        attention_mask: Optional[torch.Tensor] = None, # (B, S_past + T) or (B, T): 1 = real key, 0 = padding
        use_cache: bool = False,
        return_hidden: bool = False,                   # give h_L (B, T, d) instead of logits (see head())
    ):
        """Returns logits (B, T, V); with use_cache=True, (logits, cache). With return_hidden=True the last
        block's output h_L (B, T, d) instead of the logits (head(h_L) gives them)."""
        h = self.embed_norm(self.embed(tokens, input_embeds))                           # (B, T, d)
        B, T, _ = h.shape
        past_len = self.past_length(past_key_values)
        mask = self.alibi_bias(B, T, past_len, attention_mask, h.device)               # (B, H, T, S)
        h, new_cache = self.forward_layers(h, None, mask, past_key_values)             # no rotation: ALiBi
        out = h if return_hidden else self.head(h)                                     # (B, T, d) | (B, T, V)
        return (out, new_cache) if use_cache else out

    # Copied from minipeft.model.Transformer.embed
    def embed(self, tokens: Optional[torch.Tensor], input_embeds: Optional[torch.Tensor]) -> torch.Tensor:
        """tokens (B, T) -> their embeddings (B, T, d), or the given input_embeds (B, T, d): exactly one of the two."""
        if (tokens is None) == (input_embeds is None):
            raise ValueError("pass exactly one of tokens or input_embeds")
        return self.tok_embeddings(tokens) if tokens is not None else input_embeds

    # Copied from minipeft.model.Transformer.past_length
    def past_length(self, past_key_values: Optional[KVCache]) -> int:
        """S_past, the positions the cache holds (0 without one); the cache must have one (k, v) per layer."""
        past_len = cache_length(past_key_values)
        if past_key_values is not None and len(past_key_values) != len(self.layers):
            raise ValueError(f"past_key_values has {len(past_key_values)} layers, the model {len(self.layers)}")
        return past_len

    # Copied from minipeft.model.Transformer.forward_layers
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
        """The last block's output (..., d) -> logits (..., V): final LayerNorm, then the tied embedding."""
        return F.linear(self.norm(h), self.tok_embeddings.weight)

    def alibi_bias(self, B: int, T: int, past_len: int, attention_mask: Optional[torch.Tensor], device) -> torch.Tensor:
        """(B, H, T, S) float32: m_h * (j - i) where query t (at S_past + t) may see key s, -inf elsewhere.

        j, i are positions counted over the attention mask: pos[s] = (number of real keys up to s) - 1, so
        left padding does not shift the positions of a row's real tokens. Key s is visible to token t when
        s <= S_past + t and the key is real; every token always sees itself, so a padding row is never empty
        (its output is ignored anyway)."""
        S = past_len + T
        if attention_mask is None:
            real = torch.ones(B, S, dtype=torch.long, device=device)
        else:
            real = widen_attention_mask(attention_mask.to(device=device, dtype=torch.long), B, T, past_len)
        key_pos = ((real.cumsum(dim=1) - 1) * real).float()                            # (B, S)
        query_pos = key_pos[:, past_len:]                                              # (B, T)
        distance = key_pos[:, None, :] - query_pos[:, :, None]                        # (B, T, S)
        bias = alibi_slopes(self.config.n_heads).to(device)[None, :, None, None] * distance[:, None]       # (B, H, T, S)
        query_index = torch.arange(past_len, S, device=device)[:, None]               # (T, 1)
        key_index = torch.arange(S, device=device)[None, :]                           # (1, S)
        visible = (key_index <= query_index)[None] & real[:, None, :].bool()          # (B, T, S)
        visible = visible | (key_index == query_index)[None]                          # a token sees itself
        return bias.masked_fill(~visible[:, None], float("-inf"))

    # Copied from minipeft.model.Transformer.num_parameters
    def num_parameters(self, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)


def check_config(cfg: ModelConfig) -> None:
    """BLOOM's own checks of a ModelConfig (its family record hands this to ModelConfig.__post_init__): plain
    multi-head attention (the fused wqkv holds H keys and values), and the MLP width 4 d unless given."""
    if cfg.n_kv_heads != cfg.n_heads:
        raise ConfigError(f"n_kv_heads ({cfg.n_kv_heads}) must equal n_heads ({cfg.n_heads}) for BLOOM")
    if cfg.ffn_hidden_dim is None:
        cfg.ffn_hidden_dim = 4 * cfg.dim
