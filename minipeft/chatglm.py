"""The ChatGLM-6B decoder (GLM, v1), all of it, in plain torch.nn, in model.py's style.

Shapes: B batch, T new tokens, S = past length + T keys, d = dim, H heads (G = H: plain multi-head attention),
hd = head_dim = d / H, F = ffn_hidden_dim, V vocab.

    h_0     = tok_embeddings(tokens)                                   (B, T, d)   (or given input_embeds)
    x       = LN1(h);   h' = alpha * x + Attention(x)                  per layer (GLM residual: the *normed* input)
    x'      = LN2(h');  h_next = alpha * x' + FeedForward(x')
    logits  = LN_f(h_L) @ tok_embeddings.weight^T                      (B, T, V)   (output tied to the embedding)

alpha           sqrt(2 * 28) = 7.483..., for *every* layer count: the original's GLMBlock computes
                (2 * self.num_layers) ** 0.5 with num_layers left at its default of 28 (ChatGLMModel never passes
                its own count), so a 2-layer model uses the same alpha as the 28-layer one. The GLM paper's
                sqrt(2 * num_layers) coincides at 28 layers only.
LN              LayerNorm with weight and bias, eps 1e-5.
FeedForward     w2(gelu(w1 x)), both with bias; gelu(x) = 0.5 x (1 + tanh(0.7978845608028654 (x + 0.044715 x^3)))
                (the original's tanh form, computed in the activation dtype).
Attention       wqkv: one fused Linear d -> 3 H hd with bias; per head its rows are [q (hd), k (hd), v (hd)].
                scores = (q / (sqrt(hd) c)) k^T, masked to -10000, then in float32 times c, softmax, back to the
                activation dtype, times v; c = layer index + 1 (the original's query-key layer scaling: the same
                function as q k^T / sqrt(hd), ordered so that fp16 scores do not overflow). wo: H hd -> d with bias.
2D rotary       each head's dims split in two halves: the first half turns by the position id, the second by the
                block position id, with angles id * inv_freq_i, inv_freq_i = 10000^(-2i/(hd/2)) rounded to fp16
                as the original stores it. The original rotates each half in rotate-half form (pairs (i, i + hd/4));
                conversion permutes the q/k rows of wqkv (checkpoint/hf_chatglm.py) so that here each half turns
                *adjacent* pairs like model.apply_rope: one call over the head with the two angle tables side by
                side, cos = [cos(pos * f), cos(block * f)] (B, 1, T, hd/2).
Positions       a prompt is "context [gMASK] <sop> response": the context (up to and including [gMASK]) counts
                0 .. n-1; every token from <sop> on takes the position of [gMASK]. Block ids are 0 over the context
                and 1, 2, ... from <sop>. position_ids are (B, 2, T): [:, 0] positions, [:, 1] block ids.
Mask            prefix-LM: causal, except that every query sees every context key (block id 0), so the context
                attends bidirectionally; padding keys (attention_mask 0) are hidden.

Called with token ids alone (no cache) the model derives its positions and mask from the [gMASK] / [MASK] and <sop>
ids (`glm_position_ids`), as the original does; with a left-padded batch pass attention_mask and each row counts
from its first real token (pads get positions 0, 0, as the original tokenizer pads). With a cache (decoding, or a
prefix-tuning prefix), pass position_ids (B, 2, T): `generate` does (`prompt_position_ids` / `next_position_ids`).

Cache: one (k, v) per layer, each (B, H, S, hd), keys stored after rotation (kv_cache.py), as in model.py.

The attention seam (attention_seam.py) is model.py's: `project(x, rotation=None)` with rotation the (cos, sin) of
glm_rope_cos_sin stacked in one tensor (None: no rotation), and `attend(q, k, v, mask)` with the bool prefix-LM
mask. Blocks marked `# Copied from minipeft.model.<name>` are model.py's text; tests/test_copies.py keeps them so.
"""

from __future__ import annotations

import math
from typing import List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .attention_seam import PER_HEAD_FUSED_QKV
from .config import ConfigError, ModelConfig
from .kv_cache import KVCache, append_kv, cache_length

GLM_ALPHA = (2 * 28) ** 0.5            # see the module docstring: the original's alpha for any layer count
MASKED_SCORE = -10000.0                # the original fills masked scores with this (before the float32 * c)


def glm_gelu(x: torch.Tensor) -> torch.Tensor:
    """The tanh approximation of GELU, written as the original writes it."""
    return 0.5 * x * (1.0 + torch.tanh(0.7978845608028654 * x * (1.0 + 0.044715 * x * x)))


def glm_rope_cos_sin(position_ids: torch.Tensor, head_dim: int, dtype: torch.dtype):
    """position_ids (B, 2, T) -> cos, sin each (B, 1, T, hd/2): hd/4 pairs by position, then hd/4 by block id.
    inv_freq is rounded to fp16 as the original stores it; the angles are computed in fp16 for an fp16 model (as
    the original does), in float64 for a float64 one, else in float32."""
    quarter = head_dim // 4
    inv_freq = 1.0 / (10000 ** (torch.arange(0, 2 * quarter, 2, dtype=torch.float32) / (2 * quarter)))
    table_dtype = dtype if dtype in (torch.float16, torch.float64) else torch.float32
    inv_freq = inv_freq.half().to(device=position_ids.device, dtype=table_dtype)            # (hd/4,)
    angles = position_ids.to(table_dtype)[..., None] * inv_freq                             # (B, 2, T, hd/4)
    angles = torch.cat([angles[:, 0], angles[:, 1]], dim=-1)                                # (B, T, hd/2)
    return angles.cos()[:, None].to(dtype), angles.sin()[:, None].to(dtype)


def glm_position_ids(tokens: torch.Tensor, cfg: ModelConfig, attention_mask: Optional[torch.Tensor] = None):
    """tokens (B, T) -> position_ids (B, 2, T) (see the module docstring). Each row counts from its first real
    token (attention_mask 1: left or right padding, real tokens contiguous); pads get (0, 0). [gMASK] is used if the row has one, else [MASK]; a row
    with neither keeps plain positions, and a row without <sop> is all context."""
    if cfg.gmask_id is None or cfg.sop_id is None:
        raise ValueError(f"ChatGLM config has gmask_id={cfg.gmask_id}, sop_id={cfg.sop_id}: both are needed to "
                         f"derive position ids from tokens (or pass position_ids (B, 2, T))")
    B, T = tokens.shape
    positions = torch.zeros(B, 2, T, dtype=torch.long, device=tokens.device)
    for row, ids in enumerate(tokens.tolist()):
        real_flags = [True] * T if attention_mask is None else [bool(m) for m in attention_mask[row].tolist()]
        start, n = (real_flags.index(True) if any(real_flags) else 0), sum(real_flags)
        real = ids[start:start + n]
        context = real.index(cfg.sop_id) if cfg.sop_id in real else n
        mask_token = cfg.gmask_id if cfg.gmask_id in real else cfg.mask_id
        position = torch.arange(n)
        if mask_token is not None and mask_token in real:
            position[context:] = real.index(mask_token)
        block = torch.cat([torch.zeros(context, dtype=torch.long), torch.arange(1, n - context + 1)])
        positions[row, 0, start:start + n] = position
        positions[row, 1, start:start + n] = block
    return positions


def next_position_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """The positions of the next generated token from those of the last one: (B, 2, T) -> (B, 2, 1), the position
    stays at [gMASK]'s and the block id grows by one."""
    step = position_ids[..., -1:].clone()
    step[:, 1] += 1
    return step


class LayerNorm(nn.LayerNorm):
    """torch's LayerNorm (weight and bias), as the original uses it."""


class Attention(nn.Module):
    qkv_layout = PER_HEAD_FUSED_QKV                                                # wqkv, per head [q, k, v]

    def __init__(self, cfg: ModelConfig, layer_index: int):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_heads, cfg.head_dim
        self.score_scale = float(layer_index + 1)                                  # c in the module docstring
        self.wqkv = nn.Linear(cfg.dim, 3 * cfg.n_heads * cfg.head_dim, bias=True)  # per head [q, k, v]
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=True)

    def project(self, x: torch.Tensor, rotation: Optional[Tuple[torch.Tensor, torch.Tensor]] = None):
        """x (B, T, d) -> q (B, H, T, hd), k (B, H, T, hd), v (B, H, T, hd); q and k rotated by rotation = (cos, sin)
        from glm_rope_cos_sin, or not at all when rotation is None (a projection that carries no position)."""
        B, T, _ = x.shape
        qkv = self.wqkv(x).view(B, T, self.n_heads, 3, self.head_dim)              # (B, T, H, 3, hd)
        q, k, v = qkv.permute(3, 0, 2, 1, 4).unbind(0)                             # each (B, H, T, hd)
        if rotation is None:
            return q, k, v
        cos, sin = rotation
        return _rotate(q, cos, sin), _rotate(k, cos, sin), v

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
        """q (B, H, T, hd), k/v (B, H, S, hd), mask (B or 1, 1, T, S) bool (True = may attend). Returns (B, H, T, hd)."""
        c = self.score_scale
        scores = (q / (math.sqrt(self.head_dim) * c)) @ k.transpose(-1, -2)        # (B, H, T, S)
        if mask is not None:
            scores = scores.masked_fill(~mask, MASKED_SCORE)
        at_least_fp32 = torch.promote_types(scores.dtype, torch.float32)
        probs = (scores.to(at_least_fp32) * c).softmax(dim=-1).to(v.dtype)         # softmax in (at least) float32
        return probs @ v                                                           # (B, H, T, hd)

    # Copied from minipeft.model.Attention.forward
    def forward(self, x, rotation, mask, past_kv=None):
        """x (B, T, d) -> (B, T, d), and this layer's updated (k, v) with the past in front."""
        B, T, _ = x.shape
        q, k, v = self.project(x, rotation)
        k, v = append_kv(past_kv, k, v)                                            # (B, G, S, hd) each
        out = self.attend(q, k, v, mask)                                           # (B, H, T, hd)
        out = out.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)      # (B, T, H*hd)
        return self.wo(out), (k, v)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """model.apply_rope's adjacent-pair rotation, in the activation dtype (the original rotates in the model's
    dtype; in float32 the two agree bit for bit)."""
    pairs = x.unflatten(-1, (-1, 2))                                               # (B, heads, T, hd/2, 2)
    x0, x1 = pairs[..., 0], pairs[..., 1]
    return torch.stack((x0 * cos - x1 * sin, x1 * cos + x0 * sin), dim=-1).flatten(-2)


class FeedForward(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.w1 = nn.Linear(cfg.dim, cfg.ffn_hidden_dim, bias=True)    # dense_h_to_4h
        self.w2 = nn.Linear(cfg.ffn_hidden_dim, cfg.dim, bias=True)    # dense_4h_to_h

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(glm_gelu(self.w1(x)))                                       # (B, T, d)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_index: int):
        super().__init__()
        self.attention_norm = LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.attention = Attention(cfg, layer_index)
        self.ffn_norm = LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.feed_forward = FeedForward(cfg)

    def forward(self, h, rotation, mask, past_kv=None):
        x = self.attention_norm(h)                                                 # (B, T, d)
        attn_out, new_kv = self.attention(x, rotation, mask, past_kv)
        h = x * GLM_ALPHA + attn_out                                               # GLM residual on LN1(h)
        x = self.ffn_norm(h)
        h = x * GLM_ALPHA + self.feed_forward(x)                                   # ... and on LN2(h')
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


class ChatGLM(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg                                  # checked by check_config (below) when it was made
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.gradient_checkpointing = False
        if self.tok_embeddings.weight.device.type != "meta":
            self.init_weights()

    def init_weights(self, std: float = 0.02) -> None:
        """Random init: N(0, std) for every matrix and the embedding, zeros for biases, ones for norm weights."""
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                nn.init.ones_(p)
            elif name.endswith(".bias"):
                nn.init.zeros_(p)
            else:
                nn.init.normal_(p, mean=0.0, std=std)

    def prompt_position_ids(self, tokens: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(B, T) prompt ids (left-padded when attention_mask is given) -> (B, 2, T) position ids."""
        return glm_position_ids(tokens, self.config, attention_mask)

    next_position_ids = staticmethod(next_position_ids)

    # How tokens put in front of the real ones are numbered (PEFT's virtual tokens: peft/peft_model.py reads these).
    # Key/value slots in front (prefix tuning = the original's P-tuning v2, `pre_seq_len` / `PrefixEncoder`) shift
    # nothing: the original feeds them as past key/values, unrotated and seen by every token, and numbers the real
    # tokens exactly as without them. Embeddings in front (prompt tuning) are context: positions 0..P-1, block 0
    # (so the prefix-LM mask lets the context read them and them read the context); the real tokens' positions,
    # [gMASK]'s included (the reply takes it), move up by P, and their block ids stay (block 0 *is* the context,
    # and the reply's block ids count inside the blank).
    cache_prefix_shifts_positions = False

    @staticmethod
    def front_position_ids(batch: int, count: int, device) -> torch.Tensor:
        """The (B, 2, P) position ids of P embeddings put in front of the input: positions 0..P-1, block ids 0."""
        positions = torch.arange(count, device=device).expand(batch, count)
        return torch.stack([positions, torch.zeros_like(positions)], dim=1)

    @staticmethod
    def shift_position_ids(position_ids: torch.Tensor, offset: int) -> torch.Tensor:
        """(B, 2, T) -> the same tokens after `offset` context tokens in front: positions + offset, block ids kept."""
        shift = torch.tensor([offset, 0], device=position_ids.device, dtype=position_ids.dtype)
        return position_ids + shift[None, :, None]

    def forward(
        self,
        tokens: Optional[torch.Tensor] = None,         # (B, T) int64
        *,
        input_embeds: Optional[torch.Tensor] = None,   # (B, T, d), instead of tokens
        past_key_values: Optional[KVCache] = None,     # per layer (k, v), each (B, H, S_past, hd)
        start_pos: Optional[int] = None,               # not used: ChatGLM's positions are not a count (pass position_ids)
        position_ids: Optional[torch.Tensor] = None,   # (B, 2, T): positions and block ids
        attention_mask: Optional[torch.Tensor] = None, # (B, S_past + T) or (B, T): 1 = real key, 0 = padding
        use_cache: bool = False,
        return_hidden: bool = False,                   # give h_L (B, T, d) instead of logits (see head())
    ):
        """Returns logits (B, T, V); with use_cache=True, (logits, cache). With return_hidden=True, h_L (B, T, d)."""
        h = self.embed(tokens, input_embeds)                                             # (B, T, d)
        B, T, _ = h.shape
        past_len = self.past_length(past_key_values)
        if position_ids is None:
            if tokens is None or past_len > 0 or start_pos is not None:
                raise ValueError("ChatGLM-6B derives its 2D positions from token ids only without a cache; with "
                                 "input_embeds, a cache or start_pos pass position_ids (B, 2, T)")
            padding = attention_mask[:, -T:] if attention_mask is not None else None
            position_ids = glm_position_ids(tokens, self.config, padding)            # (B, 2, T)
        if position_ids.dim() != 3 or tuple(position_ids.shape) != (B, 2, T):
            raise ValueError(f"ChatGLM-6B position_ids have shape {tuple(position_ids.shape)}, expected ({B}, 2, {T}): "
                             f"[:, 0] positions, [:, 1] block positions")
        cos, sin = glm_rope_cos_sin(position_ids, self.config.head_dim, h.dtype)     # (B, 1, T, hd/2) each
        rotation = torch.stack([cos, sin])             # (2, B, 1, T, hd/2): one tensor (attention_seam.py says why)
        mask = self.build_mask(position_ids[:, 1], past_len, attention_mask)          # (B, 1, T, S)
        h, new_cache = self.forward_layers(h, rotation, mask, past_key_values)
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
        """The last block's output (..., d) -> logits (..., V): final LayerNorm, then the tied embedding matrix."""
        return F.linear(self.norm(h), self.tok_embeddings.weight)

    @staticmethod
    def build_mask(block_ids: torch.Tensor, past_len: int, attention_mask: Optional[torch.Tensor]) -> torch.Tensor:
        """Boolean (B, 1, T, S) prefix-LM mask, True where query t may attend key s.

        Causal (s <= past_len + t), or key s is a context token of this call (block id 0), so the context sees
        itself in both directions; past keys are all earlier than every new query, so causality covers them
        (a prefix-tuning prefix is visible to every token). Padding keys (attention_mask 0) are hidden, except
        that every token sees itself."""
        B, T = block_ids.shape
        S = past_len + T
        device = block_ids.device
        query_pos = torch.arange(past_len, S, device=device)[:, None]                  # (T, 1)
        key_pos = torch.arange(S, device=device)[None, :]                              # (1, S)
        context_key = torch.cat([torch.zeros(B, past_len, dtype=torch.bool, device=device), block_ids == 0], dim=1)
        mask = (key_pos <= query_pos)[None, None] | context_key[:, None, None, :]     # (B, 1, T, S)
        if attention_mask is not None:
            attention_mask = widen_attention_mask(attention_mask.to(device=device, dtype=torch.bool), B, T, past_len)
            mask = mask & attention_mask[:, None, None, :]
            mask = mask | (key_pos == query_pos)[None, None]
        return mask

    # Copied from minipeft.model.Transformer.num_parameters
    def num_parameters(self, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)


def check_config(cfg: ModelConfig) -> None:
    """ChatGLM-6B's own checks of a ModelConfig (its family record hands this to ModelConfig.__post_init__):
    plain multi-head attention, and a head that the 2D rotary splits into two halves of adjacent pairs."""
    if cfg.n_kv_heads != cfg.n_heads:
        raise ConfigError(f"ChatGLM-6B has plain multi-head attention: n_kv_heads {cfg.n_kv_heads} != n_heads {cfg.n_heads}")
    if cfg.head_dim % 4 != 0:
        raise ConfigError(f"ChatGLM-6B's 2D rotary needs head_dim divisible by 4, got {cfg.head_dim}")
    if cfg.rotary_fraction != 1.0:
        raise ConfigError(f"rotary_fraction {cfg.rotary_fraction}: ChatGLM-6B's 2D rotary turns the whole head (1.0)")
