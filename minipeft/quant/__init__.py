"""Storing frozen weights in fewer bits (QLoRA's base, minipeft/peft/qlora.py).

    nf4.py          the 4-bit NormalFloat code book, block-wise quantise / dequantise, double quantisation
    nf4_linear.py   NF4Linear: a frozen linear layer kept in NF4 and dequantised on the fly

Depends on torch only: below minipeft.peft, beside the decoders (which never import it).
"""

from .nf4 import NF4, dequantize_nf4, nf4_code_values, quantize_nf4
from .nf4_linear import NF4Linear

__all__ = ["NF4", "NF4Linear", "dequantize_nf4", "nf4_code_values", "quantize_nf4"]
