"""Prefix tuning: P trainable key/value slots in front of every layer's attention, fed as past key/values.

Shapes: B batch, n real tokens, P = prefix_len, L = n_layers, G = n_kv_heads, hd = head_dim,
kv_dim = G * hd, d = model dim, h = reparam_hidden.

For layer l the attention of real token t (position P + t) is

    softmax( q_t [K_l ; k_1..k_{t}]^T / sqrt(hd) ) [V_l ; v_1..v_t]      K_l, V_l: (G, P, hd)

exactly as if P earlier tokens were already in the KV cache: the prefix keys K_l are used as stored (never
rotated), every query sees every prefix slot, and real tokens take positions P..P+n-1. This is the
original prefix-tuning code's and Hugging Face peft's behaviour; the model needs nothing new because
past key/values already work this way. Whether the real positions move up by P is the base family's call
(PeftModel reads `cache_prefix_shifts_positions`): ChatGLM-6B keeps them at 0..n-1 with their block ids,
because its own P-tuning v2 (`pre_seq_len` / `PrefixEncoder`) feeds the prefix as past key/values and numbers
the real tokens as without it, so prefixes trained on the original mean the same here.

Reparameterisation (training is unstable when the prefix is trained directly, Li & Liang 2021):

    E                       (P, d)                  nn.Embedding, N(0, 1)
    flat = W2 tanh(W1 E)    (P, L * 2 * kv_dim)     W1: d -> h, W2: h -> L*2*kv_dim (with biases)
    flat viewed as (P, L, 2, G, hd), ordered [layer][k/v][head][head_dim] like peft's prefix encoder,
    K_l = flat[:, l, 0] and V_l = flat[:, l, 1] transposed to (G, P, hd).

`fold()` evaluates the MLP once and keeps only the result as plain parameters `prefix_keys` and
`prefix_values`, each (L, G, P, hd); the output is unchanged and the MLP is deleted. With
reparam_hidden=None those two tensors are the trained parameters from the start (init N(0, 1), the scale
of real keys/values computed from unit-RMS hidden states), so a folded state dict loads into
`PrefixKV(cfg, P, reparam_hidden=None)`.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.nn as nn

from ..config import ModelConfig
from .config import PrefixConfig


class PrefixKV(nn.Module):
    def __init__(self, model_cfg: ModelConfig, prefix_len: int, reparam_hidden: Optional[int] = 512):
        super().__init__()
        PrefixConfig(prefix_len=prefix_len, reparam_hidden=reparam_hidden)   # checks both (PeftConfigError)
        self.prefix_len = prefix_len
        self.n_layers, self.n_kv_heads, self.head_dim = model_cfg.n_layers, model_cfg.n_kv_heads, model_cfg.head_dim
        self.kv_dim = model_cfg.kv_dim
        self.reparam_hidden = reparam_hidden
        prefix_shape = (self.n_layers, self.n_kv_heads, prefix_len, self.head_dim)      # (L, G, P, hd)
        if reparam_hidden is None:
            self.prefix_keys = nn.Parameter(torch.randn(prefix_shape))
            self.prefix_values = nn.Parameter(torch.randn(prefix_shape))
        else:
            self.prefix_embedding = nn.Embedding(prefix_len, model_cfg.dim)                 # (P, d)
            self.reparam = nn.Sequential(
                nn.Linear(model_cfg.dim, reparam_hidden),
                nn.Tanh(),
                nn.Linear(reparam_hidden, self.n_layers * 2 * self.kv_dim),
            )

    def adapter_params(self) -> dict:
        """Everything here trains: the prefix tensors, or the embedding and the MLP that make them."""
        return dict(self.named_parameters())

    def saved_tensors(self) -> dict:
        """An adapter folder holds the prefix folded: prefix_keys, prefix_values (L, G, P, hd)."""
        keys, values = self.prefix_tensors()
        return {"prefix_keys": keys.detach().contiguous().clone(), "prefix_values": values.detach().contiguous().clone()}

    @property
    def folded(self) -> bool:
        """True when the prefix is held as plain tensors (after fold(), or trained without the MLP)."""
        return not hasattr(self, "reparam")

    def prefix_tensors(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of all layers, each (L, G, P, hd)."""
        if self.folded:
            return self.prefix_keys, self.prefix_values
        P, L, G, hd = self.prefix_len, self.n_layers, self.n_kv_heads, self.head_dim
        flat = self.reparam(self.prefix_embedding.weight)                                 # (P, L*2*kv_dim)
        per_slot = flat.view(P, L, 2, G, hd)                                               # [layer][k/v][head][hd]
        keys_values = per_slot.permute(2, 1, 3, 0, 4)                                      # (2, L, G, P, hd)
        return keys_values[0], keys_values[1]

    # the attached-module protocol (peft_model.py): P key/value slots in front of every layer's keys
    @property
    def num_virtual_tokens(self) -> int:
        return self.prefix_len

    def past_key_values(self, batch_size: int) -> List[Tuple[torch.Tensor, torch.Tensor]]:
        return self(batch_size)

    def forward(self, batch_size: int) -> List[Tuple[torch.Tensor, torch.Tensor]]:
        """Per layer (k, v), each (B, G, P, hd): the past_key_values a Transformer takes."""
        keys, values = self.prefix_tensors()                                               # (L, G, P, hd)
        shape = (batch_size, self.n_kv_heads, self.prefix_len, self.head_dim)
        return [(keys[i].unsqueeze(0).expand(shape), values[i].unsqueeze(0).expand(shape))
                for i in range(self.n_layers)]

    @torch.no_grad()
    def fold(self) -> None:
        """Replace the MLP by its output: plain `prefix_keys`, `prefix_values` (L, G, P, hd). Same forward."""
        if self.folded:
            return
        requires_grad = self.prefix_embedding.weight.requires_grad
        keys, values = self.prefix_tensors()
        del self.prefix_embedding, self.reparam
        self.prefix_keys = nn.Parameter(keys.contiguous().clone(), requires_grad=requires_grad)
        self.prefix_values = nn.Parameter(values.contiguous().clone(), requires_grad=requires_grad)

    def extra_repr(self) -> str:
        return (f"prefix_len={self.prefix_len}, n_layers={self.n_layers}, n_kv_heads={self.n_kv_heads}, "
                f"head_dim={self.head_dim}, reparam_hidden={self.reparam_hidden}, folded={self.folded}")


def install(model: nn.Module, config: PrefixConfig, **_) -> dict:
    """The registry's entry point: a PrefixKV attached beside the base as `prefix` (PeftModel feeds it to the
    model as past_key_values)."""
    embedding = model.tok_embeddings.weight
    prefix = PrefixKV(model.config, config.prefix_len, config.reparam_hidden)
    return {"prefix": prefix.to(device=embedding.device, dtype=embedding.dtype)}
