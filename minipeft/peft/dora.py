"""DoRA: weight-decomposed low-rank adaptation (Liu et al., 2024). LoRA's update, then each output row's length
set by a trained magnitude.

Shapes: x (..., d_in), W0 (d_out, d_in) frozen, A (r, d_in), B (d_out, r), m (d_out,), s LoRA's scale.

    W' = m * (W0 + s B A) / ||W0 + s B A||_row                                 (d_out, d_in)
    y  = x W'^T + b                                                          (..., d_out)

||V||_row is the L2 norm of each output row of our d_out x d_in weight (over its d_in inputs): a vector of d_out.
The paper writes W (d x k) acting as x W and calls it the column norm; it is the same vector, one number per output
feature, and HF peft computes it as torch.linalg.norm(W + s B A, dim=1) on the (out, in) weight, as here.

Init: LoRA's (B = 0, or PiSSA's A, B on the residual) and m = ||W0 + s B A||_row, so W' = W0 at the start (to
rounding: m / ||.|| is 1 up to the last bit) and the model starts as the base.

The norm is detached (treated as a constant in backward), as the paper suggests (section 4.3) and peft does: the
gradient reaches m through the ratio g = m / ||W0 + s B A||, and A, B through the direction term only. With g:

    y = g * (x W0^T) + g * s * (dropout(x) A^T B^T) + b                       (dropout off: = x W'^T + b)
    with dropout on in training: y = x W0^T + b + (g - 1) * (dropout(x) W0^T) + g * s * (dropout(x) A^T B^T)

(the second form is peft's: the base path keeps the clean x, the DoRA correction sees the dropped-out one).

Trainable parameters per replaced linear: r (d_in + d_out) + d_out. For LLaMA-7B, r = 8 on wq and wv:
4,194,304 + 32 * 2 * 4096 = 4,456,448.

Mergeable: merge() writes W' into the weight (keeping the norm it used, so unmerge() restores W0 to rounding);
merge_lora / to_linear give a plain nn.Linear with W'. DoRA is a LoRALinear subclass, so rsLoRA, PiSSA and LoRA+
(LoRAConfig's options) work here too; LoRA+ scales B's rate only (peft's create_loraplus_optimizer also puts
the magnitude, a 1-D parameter, at the higher rate).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import DoRAConfig
from .lora import LoRALinear, install_lora


class DoRALinear(LoRALinear):
    """LoRALinear + a magnitude per output row. See the module docstring."""

    def _add_lora(self, rank, alpha, dropout, rslora=False, lora_plus_ratio=1.0) -> None:
        super()._add_lora(rank, alpha, dropout, rslora, lora_plus_ratio)
        device, dtype = self.weight.device, self.weight.dtype
        self.lora_magnitude = nn.Parameter(torch.ones(self.out_features, device=device, dtype=dtype))   # (d_out,)
        self.merged_norm = None

    def adapter_params(self) -> dict:
        """A (r, d_in), B (d_out, r) and the magnitude m (d_out,)."""
        return {**super().adapter_params(), "lora_magnitude": self.lora_magnitude}

    def _work_dtype(self) -> torch.dtype:
        return torch.promote_types(self.weight.dtype, torch.float32)      # float32, or float64 for a float64 base

    def _updated_weight(self) -> torch.Tensor:
        """W0 + s B A (d_out, d_in) in the working dtype, detached."""
        work = self._work_dtype()
        with torch.no_grad():
            return self.weight.to(work) + self.scaling * (self.lora_B.to(work) @ self.lora_A.to(work))

    def row_norm(self) -> torch.Tensor:
        """||W0 + s B A||_row (d_out,) in the working dtype, detached: the paper's constant."""
        return torch.linalg.norm(self._updated_weight(), dim=1)

    @torch.no_grad()
    def init_magnitude(self) -> None:
        """m <- ||W0 + s B A||_row, so W' = W0 + s B A at the start (= W0 with B = 0, and with PiSSA)."""
        if not self.weight.is_meta:
            self.lora_magnitude.copy_(self.row_norm())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return F.linear(x, self.weight, self.bias)
        dtype = self.lora_A.dtype
        g = (self.lora_magnitude / self.row_norm().to(self.lora_magnitude.dtype)).to(dtype)   # (d_out,)
        base = F.linear(x, self.weight)                                      # x W0^T (..., d_out)
        dropped = self.lora_dropout(x)
        lora = self.scaling * F.linear(F.linear(dropped.to(dtype), self.lora_A), self.lora_B)   # (..., d_out)
        if dropped is x:                                                     # no dropout: g (x W0^T + s x A^T B^T)
            y = g * base.to(dtype) + g * lora
        else:                                                                # peft's form (module docstring)
            y = base.to(dtype) + (g - 1) * F.linear(dropped, self.weight).to(dtype) + g * lora
        y = y.to(x.dtype)
        return y + self.bias if self.bias is not None else y

    def merged_weight(self) -> torch.Tensor:
        """W' = g * (W0 + s B A), (d_out, d_in), in the weight's dtype."""
        with torch.no_grad():
            updated = self._updated_weight()                                 # (d_out, d_in)
            g = self.lora_magnitude.to(updated.dtype) / torch.linalg.norm(updated, dim=1)
            return (g[:, None] * updated).to(self.weight.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        """W0 <- W'; the norm it used is kept for unmerge (it cannot be recomputed from W')."""
        if not self.merged:
            self.merged_norm = self.row_norm()
            self.weight.copy_(self.merged_weight())
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """W0 <- W' / g - s B A with the norm merge() used (restores W0 up to rounding)."""
        if self.merged:
            work = self._work_dtype()
            g = self.lora_magnitude.to(work) / self.merged_norm
            delta = self.scaling * (self.lora_B.to(work) @ self.lora_A.to(work))
            restored = self.weight.to(work) / g[:, None] - delta
            self.weight.copy_(restored.to(self.weight.dtype))
            self.merged, self.merged_norm = False, None

    def to_linear(self) -> nn.Linear:
        """A plain nn.Linear whose weight is W' (the DoRA parameters are dropped)."""
        weight = self.weight.detach() if self.merged else self.merged_weight()
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        linear.weight = nn.Parameter(weight, requires_grad=self.weight.requires_grad)
        if self.bias is not None:
            linear.bias = self.bias
        return linear


def install(model: nn.Module, config: DoRAConfig, **_) -> dict:
    """The registry's entry point: LoRA's install with DoRALinear modules, then m from each starting weight."""
    for module in install_lora(model, config, module_class=DoRALinear).values():
        module.init_magnitude()
    return {}
