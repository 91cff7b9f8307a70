"""Bottleneck adapters (Houlsby et al., 2019): a small residual MLP after a sub-layer's output.

Shapes: h (..., d), bottleneck m << d, W_down (m, d) + b_down (m), W_up (d, m) + b_up (d).

    adapter(h) = h + W_up GELU(W_down h + b_down) + b_up                                   (..., d)

W_up and b_up start at zero, so every adapter starts as the identity and the model starts exactly as the
base model; at the first step the down projection gets exactly zero gradient (it is multiplied by W_up = 0)
and only the up projection moves.

Placement (Houlsby): after the attention output projection and after the feed-forward, before each
residual add. In our Transformer those outputs are `attention.wo(...)` and `feed_forward.w2(...)`, so each
of those Linear modules is replaced by a LinearWithAdapter computing adapter(linear(x)):

    h' = h + adapter(wo(attn(norm(h))))
    h_next = h' + adapter(w2(silu(w1 x) * w3 x)),  x = norm(h')

Trainable parameters per adapter: 2 d m + d + m; per model 2 * n_layers adapters. For LLaMA-7B (d = 4096,
32 layers) at m = 64: 64 * (2*4096*64 + 4096 + 64) = 33,820,672.
"""

from __future__ import annotations

from typing import Dict

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import AdapterConfig, PeftConfigError
from .replace import replace_module

# The Linear modules (last name component) whose outputs get an adapter.
ADAPTER_PLACES = ("wo", "w2")


class BottleneckAdapter(nn.Module):
    """h -> h + up(GELU(down(h))), up zero-initialised (identity at init)."""

    def __init__(self, dim: int, bottleneck: int, device=None, dtype=None):
        super().__init__()
        self.down = nn.Linear(dim, bottleneck, bias=True, device=device, dtype=dtype)   # d -> m
        self.up = nn.Linear(bottleneck, dim, bias=True, device=device, dtype=dtype)     # m -> d
        self.act = nn.GELU()
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def adapter_params(self) -> dict:
        """Everything in the adapter trains: down (m, d) + (m,), up (d, m) + (d,)."""
        return dict(self.named_parameters())

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """In the adapter's own dtype (float32 beside a half base: the dtype policy), added back in h's."""
        update = self.up(self.act(self.down(h.to(self.down.weight.dtype))))             # (..., d)
        return h + update.to(h.dtype)


class LinearWithAdapter(nn.Linear):
    """nn.Linear followed by a BottleneckAdapter: y = adapter(x W^T + b). The weight keeps its name
    `weight`; the adapter's parameters live under `.adapter`."""

    def __init__(self, in_features: int, out_features: int, bottleneck: int, bias: bool = False,
                 device=None, dtype=None):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.adapter = BottleneckAdapter(out_features, bottleneck, device=device, dtype=dtype)

    @classmethod
    def from_linear(cls, linear: nn.Linear, bottleneck: int) -> "LinearWithAdapter":
        """Wrap an existing nn.Linear: its weight (and bias) Parameter objects are reused, not copied."""
        module = cls(linear.in_features, linear.out_features, bottleneck, bias=linear.bias is not None,
                     device="meta")
        module.weight = linear.weight
        module.bias = linear.bias
        module.adapter = BottleneckAdapter(linear.out_features, bottleneck, device=linear.weight.device,
                                           dtype=linear.weight.dtype)
        return module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.adapter(F.linear(x, self.weight, self.bias))                       # (..., d_out)


def install_adapters(model: nn.Module, config) -> Dict[str, LinearWithAdapter]:
    """Replace every attention.wo and feed_forward.w2 of `model` by a LinearWithAdapter. Returns
    {module name: LinearWithAdapter}."""
    chosen = [(name, module) for name, module in model.named_modules()
              if type(module) is nn.Linear and name.rsplit(".", 1)[-1] in ADAPTER_PLACES]
    if not chosen:
        raise PeftConfigError(f"the model has no Linear module named one of {list(ADAPTER_PLACES)} "
                              "to put an adapter after")
    installed = {}
    for name, linear in chosen:
        module = LinearWithAdapter.from_linear(linear, config.bottleneck)
        replace_module(model, name, module)
        installed[name] = module
    return installed


def install(model: nn.Module, config: AdapterConfig, **_) -> dict:
    """The registry's entry point: adapters replace sub-modules, so nothing is attached beside the base."""
    install_adapters(model, config)
    return {}
