"""LLaMA-Adapter (Zhang et al. 2023): a gated, zero-initialised adaption prompt on the top L layers.

Shapes: B batch, T new tokens, S = past + T keys, K = prompt_len, d = model dim, H query heads,
G = n_kv_heads, hd = head_dim.

In each adapted layer, with the layer's own frozen projections wq, wk, wv, wo:

    q, k, v     = Attention.project(x)            (B,H,T,hd) rotated, (B,G,S,hd) rotated, (B,G,S,hd)
    A           = softmax(q k^T / sqrt(hd) + mask) v                   (B, H, T, hd)   the normal attention
    P           = adapter_prompt                                       (K, d)          trainable
    k_p, v_p    = wk(P), wv(P) viewed as (G, K, hd), NOT rotated, each repeated H/G times -> (H, K, hd),
                  shared by every row of the batch
    A_p         = softmax(q k_p^T / sqrt(hd)) v_p  (softmax in float32) (B, H, T, hd)
    out         = wo( A + gate[h] * A_p )          gate = tanh(adapter_gate) (default) or adapter_gate
                                                   ("plain", as lit-llama / peft), adapter_gate (H,) zeros
                  (= wo(A) + wo(gate * A_p): wo is linear, so adding before or after wo is the same; peft adds
                  after, this adds before)

The prompt has its own softmax. One softmax over [k_p ; k] would renormalise the real tokens'
probabilities, so it would change the output even at initialisation; with the separate softmax the real
attention A is untouched and the prompt adds a gated term, so with adapter_gate = 0 the model is
bit-for-bit the base model (A + 0 = A). The prompt never changes the queries, the real keys or the cache:
prompt keys/values are recomputed on every call (K is small) and never enter the KV cache.

adapter_prompt starts N(0, 1): the prompt stands where a hidden state RMSNorm(h) would stand (unit RMS),
so its keys/values have the scale of real ones; this is what the official LLaMA-Adapter, lit-llama and
peft do. It must be random rather than zeros: zero prompt keys give a uniform softmax over identical zero
values, A_p = 0, and then neither the gate nor the prompt would ever receive a gradient. At step one only
the gate gets a gradient (the prompt's is exactly 0 because gate = tanh(0) = 0, while dtanh/dg = 1 at 0).

On BLOOM (bloom.py) the layer's projection is the fused wqkv (with bias): k_p, v_p are the k and v slices of
wqkv(P), and the real scores carry ALiBi's m_h (j - i) while the prompt's carry no position bias at all
(the prompt has no position, as on LLaMA it gets no rotation). Hugging Face peft's adaption prompt (0.21.2)
knows only the llama, mistral and gpt2 model types, so on BLOOM there is no peer: the tests check this layer
against a float64 computation instead.
"""

from __future__ import annotations

import math
from typing import List

import torch
import torch.nn as nn

from ..bloom import BloomAttention
from ..model import Attention
from .config import GATE_KINDS, LlamaAdapterConfig, PeftConfigError  # noqa: F401  (GATE_KINDS: the gate forms)


class AdaptionPrompt:
    """The gated prompt term shared by every family's adapted attention: the prompt and gate parameters,
    A_p and `attend` = the family's own attention + the gated term. A family class supplies
    `prompt_keys_values()` -> k_p, v_p each (G, K, hd), computed with no position."""

    def _add_prompt(self, prompt_len: int, gate: str, dim: int, weight: torch.Tensor, init_std: float) -> None:
        LlamaAdapterConfig(prompt_len=prompt_len, gate=gate)                # checks both (PeftConfigError)
        self.prompt_len, self.gate_kind = prompt_len, gate
        prompt = torch.empty(prompt_len, dim, device=weight.device, dtype=weight.dtype)
        self.adapter_prompt = nn.Parameter(prompt.normal_(0.0, init_std))                  # (K, d)
        self.adapter_gate = nn.Parameter(torch.zeros(self.n_heads, device=weight.device, dtype=weight.dtype))

    def adapter_params(self) -> dict:
        """What LLaMA-Adapter trains in this layer: the prompt (K, d) and the gate (H,)."""
        return {"adapter_prompt": self.adapter_prompt, "adapter_gate": self.adapter_gate}

    def gate_values(self) -> torch.Tensor:
        """(H,) the factor each head's prompt attention is multiplied by."""
        return torch.tanh(self.adapter_gate) if self.gate_kind == "tanh" else self.adapter_gate

    def prompt_attention(self, q: torch.Tensor) -> torch.Tensor:
        """q (B, H, T, hd) -> gate * softmax(q k_p^T / sqrt(hd)) v_p, (B, H, T, hd) in q's dtype."""
        repeats = self.n_heads // self.n_kv_heads
        prompt_k, prompt_v = self.prompt_keys_values()                                 # (G, K, hd) each
        prompt_k = prompt_k.repeat_interleave(repeats, dim=0).float()                  # (H, K, hd)
        prompt_v = prompt_v.repeat_interleave(repeats, dim=0).float()                  # (H, K, hd)
        scores = q.float() @ prompt_k.transpose(-1, -2) / math.sqrt(self.head_dim)    # (B, H, T, K)
        probs = torch.softmax(scores, dim=-1)                                          # (B, H, T, K) float32
        gated = probs * self.gate_values().float().view(1, -1, 1, 1)                   # (B, H, T, K)
        return (gated @ prompt_v).to(q.dtype)                                          # (B, H, T, hd)

    def attend(self, q, k, v, mask):
        """The layer's own attention plus the gated prompt term, (B, H, T, hd); the family's forward does the
        rest (projections, cache, wo), so the cache and the call signature are the base layer's."""
        return super().attend(q, k, v, mask) + self.prompt_attention(q)

    def extra_repr(self) -> str:
        return f"prompt_len={self.prompt_len}, n_heads={self.n_heads}, gate={self.gate_kind!r}"


class GatedAdapterPrompt(AdaptionPrompt, Attention):
    """A LLaMA Attention that reuses a frozen layer's wq/wk/wv/wo and adds the gated adaption-prompt term.

    Attention.forward runs unchanged; only `attend` adds the prompt term. Same call signature and cache.
    Attention.__init__ is deliberately not called: it would build new projections, and the point is to keep
    the layer's own modules (so their names stay `attention.wq.weight`, ...)."""

    def __init__(self, attention: Attention, prompt_len: int, gate: str = "tanh", init_std: float = 1.0):
        nn.Module.__init__(self)
        self.n_heads, self.n_kv_heads, self.head_dim = attention.n_heads, attention.n_kv_heads, attention.head_dim
        self.wq, self.wk, self.wv, self.wo = attention.wq, attention.wk, attention.wv, attention.wo
        # in_features, not weight.shape: a ZeRO-3 partitioned weight has shape (0,)
        self._add_prompt(prompt_len, gate, attention.wq.in_features, attention.wq.weight, init_std)

    def prompt_keys_values(self):
        """k_p = wk(P), v_p = wv(P), each (G, K, hd), not rotated."""
        K, G, hd = self.prompt_len, self.n_kv_heads, self.head_dim
        prompt = self.adapter_prompt.to(self.wk.weight.dtype)                           # (K, d)
        return (self.wk(prompt).view(K, G, hd).transpose(0, 1),                         # (G, K, hd)
                self.wv(prompt).view(K, G, hd).transpose(0, 1))


class BloomGatedAdapterPrompt(AdaptionPrompt, BloomAttention):
    """A BLOOM attention that reuses a frozen layer's wqkv/wo and adds the gated adaption-prompt term; the
    real scores keep their ALiBi bias, the prompt's get none."""

    def __init__(self, attention: BloomAttention, prompt_len: int, gate: str = "tanh", init_std: float = 1.0):
        nn.Module.__init__(self)
        self.n_heads, self.n_kv_heads, self.head_dim = attention.n_heads, attention.n_kv_heads, attention.head_dim
        self.wqkv, self.wo = attention.wqkv, attention.wo
        self._add_prompt(prompt_len, gate, attention.wqkv.in_features, attention.wqkv.weight, init_std)

    def prompt_keys_values(self):
        """The k and v slices of wqkv(P) (bias included), each (H, K, hd); no position, no ALiBi."""
        prompt = self.adapter_prompt.to(self.wqkv.weight.dtype)[None]                 # (1, K, d)
        _, prompt_k, prompt_v = self.project(prompt)                                  # (1, H, K, hd) each
        return prompt_k[0], prompt_v[0]


ADAPTED_ATTENTION = ((BloomAttention, BloomGatedAdapterPrompt), (Attention, GatedAdapterPrompt))


def install_llama_adapter(model: nn.Module, config: LlamaAdapterConfig) -> List[str]:
    """Replace layers[i].attention by its family's gated adapted attention for the top L layers of `model`
    (in place). L = config.adapter_layers, or min(30, n_layers) when None. Returns the names of the new
    trainable parameters (`layers.{i}.attention.adapter_prompt`, `layers.{i}.attention.adapter_gate`)."""
    n_layers = len(model.layers)
    adapter_layers = config.adapter_layers if config.adapter_layers is not None else min(30, n_layers)
    if not 1 <= adapter_layers <= n_layers:
        raise PeftConfigError(f"LlamaAdapterConfig.adapter_layers must be between 1 and the model's n_layers "
                              f"({n_layers}), got {config.adapter_layers!r}")
    names = []
    for i in range(n_layers - adapter_layers, n_layers):
        block = model.layers[i]
        if isinstance(block.attention, AdaptionPrompt):
            raise PeftConfigError(f"layer {i} already has a LLaMA-Adapter prompt; install it only once")
        adapted = next((new for old, new in ADAPTED_ATTENTION if isinstance(block.attention, old)), None)
        if adapted is None:
            raise PeftConfigError(f"layer {i}: LLaMA-Adapter has no adapted attention for "
                                  f"{type(block.attention).__name__}")
        block.attention = adapted(block.attention, config.prompt_len, config.gate)
        names += [f"layers.{i}.attention.adapter_prompt", f"layers.{i}.attention.adapter_gate"]
    return names


def install(model: nn.Module, config: LlamaAdapterConfig, **_) -> dict:
    """The registry's entry point: the adapted attentions replace sub-modules, nothing is attached beside."""
    install_llama_adapter(model, config)
    return {}
