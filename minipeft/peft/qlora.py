"""QLoRA: LoRA on a base whose linear layers are stored in 4-bit NormalFloat (Dettmers et al., 2023).

Shapes: x (..., d_in); W0 (d_out, d_in) kept only as NF4 codes + absmax constants (quant/nf4.py, 4.127 bits per
weight with double quantisation); A (r, d_in), B (d_out, r) trainable, in float32.

    y = x W0_hat^T + s * dropout(x) A^T B^T,       W0_hat = dequantize(NF4(W0)),   s = alpha / r     (..., d_out)

which is LoRA (lora.py) with the frozen W0 replaced by its 4-bit round trip W0_hat, dequantised on the fly in
the compute dtype (the base's dtype: fp32 here, bf16 on a GPU). Gradients flow through W0_hat to x and into A
and B; W0 itself has none. What the paper adds beyond that (paged optimizers) is not needed at this size.

Which layers: every nn.Linear of the decoder blocks is quantised (wq wk wv wo w1 w2 w3, or a family's fused
wqkv), as QLoRA does; the embedding, the norms and the output layer stay as they were (the output layer reads
every hidden state into V logits and is tied to the embedding in some families). LoRA goes on `targets`, as in
LoRAConfig (default wq, wv: the family's query and value projections; the paper puts it on all of them, which
`targets=("wq", "wk", "wv", "wo", "w1", "w2", "w3")` does); each target becomes a QLoRALinear (NF4 + A, B), the
other layers plain NF4Linear.

Init: A Kaiming-uniform (a = sqrt(5)), B = 0, as LoRALinear: at the start the model is the quantised base exactly.

Saving: an adapter folder holds only A and B (the same names as LoRA's, layers.0.attention.wq.lora_A, ...).
Loading quantises the full-precision base again; quantisation is deterministic, so the 4-bit base is the same,
byte for byte, as the one the adapter was trained on (tests/test_qlora.py checks it).

Trainable parameters: the same closed form as LoRA, n_layers * sum over targets of r * (d_in + d_out).
A LLaMA-7B base in NF4 with double quantisation: 6.48e9 block weights * 4.127 bits = 3.34 GB, plus the bf16
embedding, output and norms (0.52 GB): 3.87 GB, against 13.48 GB in bf16 (memory.py,
qlora_base_bytes).

Why a method of its own rather than a quantize_base switch on every method: the quantisation changes what the
frozen base is, so it belongs to the adapter's identity (an adapter trained on the 4-bit base is loaded onto
the 4-bit base); as its own entry it is compared, saved and resumed like any other method, with no method
file changed.
"""

from __future__ import annotations

import math
from typing import Dict

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..distributed import is_partitioned
from ..quant.nf4_linear import NF4Linear
from .config import LORA_TARGETS, PeftConfigError, QLoRAConfig
from .replace import replace_module

QUANTIZED_EXCEPT = ("output",)          # linear layers outside the blocks stay as they were


class QLoRALinear(NF4Linear):
    """NF4Linear (the frozen 4-bit W0) + s * B A on a dropout of the input. See the module docstring."""

    def __init__(self, linear: nn.Linear, rank: int, alpha: float, dropout: float = 0.0, block_size: int = 64,
                 double_quant: bool = True):
        super().__init__(linear, block_size, double_quant)
        self.rank, self.alpha, self.scaling = rank, alpha, alpha / rank
        device = self.packed.device
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, device=device))     # (r, d_in)
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, device=device))    # (d_out, r)
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def adapter_params(self) -> dict:
        """What QLoRA trains in this module: A (r, d_in) and B (d_out, r)."""
        return {"lora_A": self.lora_A, "lora_B": self.lora_B}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x)                                                # (..., d_out), x W0_hat^T (+ bias)
        lora_in = self.lora_dropout(x).to(self.lora_A.dtype)                  # (..., d_in)
        update = F.linear(F.linear(lora_in, self.lora_A), self.lora_B)        # (..., r) -> (..., d_out)
        return y + (self.scaling * update).to(y.dtype)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}, alpha={self.alpha}"


def quantized_linears(model: nn.Module) -> Dict[str, nn.Linear]:
    """{name: nn.Linear} of every linear layer QLoRA quantises (all but those named in QUANTIZED_EXCEPT)."""
    return {name: m for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and name.rsplit(".", 1)[-1] not in QUANTIZED_EXCEPT}


def install_qlora(model: nn.Module, config: QLoRAConfig) -> Dict[str, NF4Linear]:
    """Replace every linear layer of the blocks by its NF4 form, a QLoRALinear where its last name component is
    in config.targets. Returns {module name: the new module}. PeftConfigError for a target the model does not
    have, a rank larger than a layer's width, or a ZeRO-3 partitioned base (a shard cannot be quantised whole)."""
    linears = quantized_linears(model)
    found = {name.rsplit(".", 1)[-1] for name in linears}
    missing = [t for t in config.targets if t not in found]
    if missing:
        raise PeftConfigError(f"QLoRAConfig.targets (--lora-targets): {missing} match no linear layer of the "
                              f"blocks; the model's are {sorted(found & set(LORA_TARGETS))}")
    if any(is_partitioned(m.weight) for m in linears.values()):
        raise PeftConfigError("qlora: the base's weights are partitioned by ZeRO-3; QLoRA quantises whole "
                              "weights: train it without --deepspeed (one device) or with ZeRO stage 0-2")
    targets = {name: linear for name, linear in linears.items() if name.rsplit(".", 1)[-1] in config.targets}
    for name, linear in targets.items():
        limit = min(linear.in_features, linear.out_features)
        if config.rank > limit:
            raise PeftConfigError(f"QLoRAConfig.rank {config.rank} is larger than min(d_in, d_out) = {limit} "
                                  f"of {name} ({linear.in_features} -> {linear.out_features})")
    installed = {}
    for name, linear in linears.items():
        if name in targets:
            new = QLoRALinear(linear, config.rank, config.alpha, config.dropout, config.block_size,
                              config.double_quant)
        else:
            new = NF4Linear(linear, config.block_size, config.double_quant)
        replace_module(model, name, new)             # the full-precision weight is freed with the old module
        installed[name] = new
    return installed


def install(model: nn.Module, config: QLoRAConfig, **_) -> dict:
    """The registry's entry point: QLoRA replaces sub-modules, so nothing is attached beside the base."""
    install_qlora(model, config)
    return {}
