"""NF4Linear: a frozen linear layer whose weight is stored in 4-bit NormalFloat (nf4.py) and dequantised on the
fly, as QLoRA's base layers are.

Shapes: x (..., d_in), W (d_out, d_in) kept only as its NF4 tensors (buffers), optional bias (d_out,).

    forward    W_hat = dequantize(codes, absmax)  (d_out, d_in) in x's dtype,   y = x W_hat^T + bias
    backward   dL/dx = dL/dy W_hat   (W_hat dequantised again),                 W itself gets no gradient

The forward's W_hat is thrown away after the product: autograd keeps nothing of size d_out x d_in (a plain
F.linear(x, W_hat) would save W_hat for backward, one full-precision copy of every layer during a training step,
which is what the 4-bit storage was meant to avoid). Backward dequantises again, a small cost against the matrix
products (the QLoRA paper's bitsandbytes kernels do the same).

Storage per layer: d_out * d_in / 2 bytes of codes + the absmax constants (nf4.py: 4.127 bits per weight with
double quantisation) against 2 bytes (bf16) or 4 (fp32) per weight. The quantised tensors are buffers, so
`model.to(device)` moves them and `state_dict()` holds them; they are not parameters, so no optimizer sees them.
`quantized_numel` says how many weights they stand for (the trainable-parameter report counts them).
"""

from __future__ import annotations

from typing import Dict, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .nf4 import BLOCK_SIZE, SCALE_BLOCK_SIZE, dequantize_nf4, quantize_nf4, quantized_bytes


class _DequantizingMatmul(torch.autograd.Function):
    """y = x W_hat^T with W_hat rebuilt from the 4-bit tensors in forward and again in backward (none saved)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: "NF4Linear") -> torch.Tensor:
        ctx.layer = layer
        return F.linear(x, layer.dequantized_weight(x.dtype))                     # (..., d_out)

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        grad_x = grad_y @ ctx.layer.dequantized_weight(grad_y.dtype)              # (..., d_in)
        return grad_x, None


class NF4Linear(nn.Module):
    """A frozen nn.Linear replaced by its NF4 form (see the module docstring). `compute_dtype` is the original
    weight's dtype: what dequantized_weight() returns by default."""

    def __init__(self, linear: nn.Linear, block_size: int = BLOCK_SIZE, double_quant: bool = True):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.block_size, self.double_quant = block_size, double_quant
        self.compute_dtype = linear.weight.dtype
        self.quantized_numel = linear.in_features * linear.out_features
        self._names = []
        for name, tensor in quantize_nf4(linear.weight, block_size, double_quant).items():
            self.register_buffer(name, tensor)
            self._names.append(name)
        self.bias = linear.bias                                  # kept as it was (a frozen Parameter or None)

    def quantized_tensors(self) -> Dict[str, torch.Tensor]:
        """The NF4 buffers by name (packed codes and the absmax constants)."""
        return {name: getattr(self, name) for name in self._names}

    def quantized_bytes(self) -> int:
        return quantized_bytes(self.quantized_tensors())

    def dequantized_weight(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """W_hat (d_out, d_in) in `dtype` (default: the original weight's dtype)."""
        return dequantize_nf4(self.quantized_tensors(), (self.out_features, self.in_features), self.block_size,
                              SCALE_BLOCK_SIZE, dtype or self.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_autocast_enabled(x.device.type):                             # bf16 / fp16 training on a GPU
            x = x.to(torch.get_autocast_dtype(x.device.type))
        y = _DequantizingMatmul.apply(x, self)                                   # (..., d_out)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, nf4 block_size={self.block_size}"
                f", double_quant={self.double_quant}, compute_dtype={self.compute_dtype}")
