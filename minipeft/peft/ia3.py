"""(IA)^3: infused adapter by inhibiting and amplifying inner activations (Liu et al., 2022). A learned vector
rescales chosen activations elementwise; nothing else changes.

Shapes: x (..., d_in), W (d_out, d_in) frozen with bias b (d_out) or none; l a trained vector, init ones.

    output target (wk, wv; a fused wqkv):   y = l_out * (x W^T + b)        l_out (d_out,)
    feed-forward target (w2):               y = (l_ff * x) W^T + b         l_ff  (d_in,)

In LLaMA's block that is the paper's three vectors: l_k and l_v rescale the keys and values as wk and wv output
them, before RoPE rotates the keys (as peft on k_proj; RoPE mixes the two entries of a pair, so a scale after it
would differ unless both entries of each pair had the same factor), and l_ff rescales the MLP's inner activation silu(w1 x) * w3 x, which is the input of w2 (HF peft's
`feedforward_modules`: down_proj for LLaMA, dense_4h_to_h for BLOOM scale their input).

Fused q/k/v (BLOOM, ChatGLM-6B's wqkv): HF peft targets BLOOM's query_key_value and scales its whole output, so l
is 3 H hd long and rescales the queries too (one vector over [q_h, k_h, v_h] of every head). This file follows
peft's definition: IA3Config's default targets become ("wqkv", "w2") on such a family. The paper's k, v only
would be the q entries of l held at one.

Init: every l = 1, so the model starts exactly as the base (x * 1 is x, bit for bit).

Trainable parameters: d_out per output target, d_in per feed-forward target. LLaMA-7B (kv = 4096, f = 11008):
32 * (4096 + 4096 + 11008) = 614,400; BLOOM-7B1 (d = 4096, f = 16384): 30 * (3 * 4096 + 16384) = 860,160.

Mergeable: an output scale multiplies W's rows and b (W <- diag(l) W, b <- l * b), a feed-forward scale W's
columns (W <- W diag(l)); unmerge divides again (refused where an entry of l is 0: the scaled-away row is lost).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import IA3Config, PeftConfigError
from .lora import choose_targets
from .replace import replace_module


class IA3Linear(nn.Linear):
    """nn.Linear (frozen W, optional b) with a learned vector on its output, or on its input (`scales_input`)."""

    def __init__(self, in_features: int, out_features: int, scales_input: bool, bias: bool = False,
                 device=None, dtype=None):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._add_scale(scales_input)

    def _add_scale(self, scales_input: bool) -> None:
        self.scales_input = scales_input
        width = self.in_features if scales_input else self.out_features
        self.ia3_scale = nn.Parameter(torch.ones(width, device=self.weight.device, dtype=self.weight.dtype))  # l
        self.merged = False

    @classmethod
    def from_linear(cls, linear: nn.Linear, scales_input: bool) -> "IA3Linear":
        """Wrap an existing nn.Linear: its weight (and bias) Parameter objects are reused, not copied."""
        module = cls(linear.in_features, linear.out_features, scales_input, bias=linear.bias is not None,
                     device="meta")
        module.weight = linear.weight
        module.bias = linear.bias
        module._add_scale(scales_input)
        return module

    def adapter_params(self) -> dict:
        """What (IA)^3 trains here: the vector l, (d_in,) or (d_out,)."""
        return {"ia3_scale": self.ia3_scale}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return F.linear(x, self.weight, self.bias)
        scale = self.ia3_scale
        if self.scales_input:                                                 # (l * x) W^T + b
            return F.linear((x.to(scale.dtype) * scale).to(x.dtype), self.weight, self.bias)
        y = F.linear(x, self.weight, self.bias)                               # (..., d_out)
        return (y.to(scale.dtype) * scale).to(y.dtype)                        # l * (x W^T + b)

    def _scaled(self, scale: torch.Tensor):
        """(weight, bias) with `scale` folded in (on rows and b, or on columns)."""
        work = torch.promote_types(self.weight.dtype, torch.float32)
        scale = scale.to(work)
        if self.scales_input:
            return (self.weight.to(work) * scale[None, :]).to(self.weight.dtype), self.bias
        bias = None if self.bias is None else (self.bias.to(work) * scale).to(self.bias.dtype)
        return (self.weight.to(work) * scale[:, None]).to(self.weight.dtype), bias

    @torch.no_grad()
    def merge(self) -> None:
        """W <- diag(l) W and b <- l * b (output scale), or W <- W diag(l) (feed-forward scale)."""
        if not self.merged:
            weight, bias = self._scaled(self.ia3_scale.detach())
            self.weight.copy_(weight)
            if bias is not None and bias is not self.bias:
                self.bias.copy_(bias)
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Divide l out again (restores W, b up to rounding)."""
        if self.merged:
            if (self.ia3_scale == 0).any():
                raise PeftConfigError("IA3Linear.unmerge: the vector has zero entries; the rows or columns it "
                                      "scaled to zero cannot be restored")
            weight, bias = self._scaled(1.0 / self.ia3_scale.detach().to(torch.float64))
            self.weight.copy_(weight)
            if bias is not None and bias is not self.bias:
                self.bias.copy_(bias)
            self.merged = False

    def to_linear(self) -> nn.Linear:
        """A plain nn.Linear with l folded into its weight (and bias)."""
        weight, bias = (self.weight, self.bias) if self.merged else self._scaled(self.ia3_scale.detach())
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        linear.weight = nn.Parameter(weight.detach(), requires_grad=self.weight.requires_grad)
        if self.bias is not None:
            linear.bias = self.bias if bias is self.bias else nn.Parameter(bias.detach(),
                                                                           requires_grad=self.bias.requires_grad)
        return linear

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, scales={'input' if self.scales_input else 'output'}, merged={self.merged}"


def install(model: nn.Module, config: IA3Config, **_) -> dict:
    """The registry's entry point: every target Linear becomes an IA3Linear (feed-forward ones scale their
    input); nothing is attached beside the base."""
    for name, linear in choose_targets(model, config, "--ia3-targets"):
        scales_input = name.rsplit(".", 1)[-1] in config.feedforward
        replace_module(model, name, IA3Linear.from_linear(linear, scales_input))
    return {}
