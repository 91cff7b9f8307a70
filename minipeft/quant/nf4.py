"""4-bit NormalFloat (NF4): the data type QLoRA stores a frozen base in (Dettmers et al., 2023, section 3 and
appendix E), with block-wise absmax scaling and double quantisation of the scales.

The code book. Pretrained weights are close to normal with mean 0, so the 16 code values are quantiles of
N(0, 1), rescaled to [-1, 1]. Two halves, so that 0 is a code value exactly (padding and zero weights stay 0):
    positive  q = Phi^-1(p) for 8 probabilities p evenly spaced from 1/2 (excluded) to 1 - delta (included)
    negative  q = -Phi^-1(p) for 7 probabilities evenly spaced the same way, from 1/2 (excluded) to 1 - delta
    zero      q = 0
    NF4 = sorted(positive + zero + negative) / Phi^-1(1 - delta),   delta = (1/32 + 1/30) / 2
(delta keeps Phi^-1 finite at the ends; it is the mean of 1 / (2 * 16) and 1 / (2 * 15): half a step of the
16- and 15-value grids). 7 values below 0, 8 above, -1 and +1 both in the code book.

Block-wise quantisation of a weight W (any shape, n numbers), block size b (64), codes c in 0..15:
    w = W.flatten() padded with zeros to n_blocks * b,  blocks  w_k (b,), k = 0 .. n_blocks - 1
    absmax_k = max |w_k|                                        (n_blocks,) float32
    c_ki = argmin_j | w_ki / absmax_k - NF4[j] |                 the nearest code value    (n_blocks, b)
    W_hat_ki = NF4[c_ki] * absmax_k                              dequantised
    packed = 16 * c[0::2] + c[1::2]                              two codes per byte, the first in the high half
The nearest code is found against the midpoints between neighbouring code values, in float64 (the same
choice as the argmin, with no rounding at near-ties).

Double quantisation (section 3, "Double Quantization"): the absmax values, 32 bits per block of 64 weights
(0.5 bits per parameter), are quantised too, in blocks of 256 after subtracting their mean (they are all
positive; centred, a symmetric code uses all of its range):
    a = absmax - mean(absmax),  blocks a_m (256,)
    scale_m = max |a_m| / 127                                   (ceil(n_blocks / 256),) float32
    a_code = round(a / scale_m)  in -127..127                   (n_blocks,) int8
    absmax_hat = a_code * scale_m + mean                        what the weights are dequantised with
The paper quantises these constants as 8-bit floats; here they are a linear int8 code (the absmax values of one
tensor sit within a narrow band around their mean, where a linear code is finer than an 8-bit float). The bits
are the same:
    4 + 32 / 64                  = 4.5   bits per parameter without double quantisation
    4 + 8 / 64 + 32 / (64 * 256) = 4.127 bits per parameter with it (the paper's 0.127 bits of constants)
plus one float32 mean per tensor.
"""

from __future__ import annotations

import math
from typing import Dict

import torch
import torch.nn.functional as F

NF4_DELTA = 0.5 * (1 / 32 + 1 / 30)           # the end probabilities are 1/2 +- (1/2 - delta)
BLOCK_SIZE = 64                               # weights per absmax (QLoRA's default)
SCALE_BLOCK_SIZE = 256                        # absmax values per second-level scale (double quantisation)
INT8_MAX = 127
_CHUNK = 1 << 16                              # blocks quantised at a time (bounds the float64 working copy)


def nf4_code_values(dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The 16 NF4 values in increasing order, (16,), computed in float64 (see the module docstring)."""
    top = 1.0 - NF4_DELTA
    p_positive = torch.linspace(0.5, top, 9, dtype=torch.float64)[1:]      # 8 probabilities above 1/2
    p_negative = torch.linspace(0.5, top, 8, dtype=torch.float64)[1:]      # 7
    values = torch.cat([-torch.special.ndtri(p_negative), torch.zeros(1, dtype=torch.float64),
                        torch.special.ndtri(p_positive)])
    values = values / torch.special.ndtri(torch.tensor(top, dtype=torch.float64))
    return values.sort().values.to(dtype)


NF4 = nf4_code_values(torch.float32)                                       # (16,), what codes index
_MIDPOINTS = (lambda q: (q[1:] + q[:-1]) / 2)(nf4_code_values(torch.float64))   # (15,) decision boundaries


def num_blocks(numel: int, block_size: int) -> int:
    return math.ceil(numel / block_size)


def check_block_size(block_size: int, what: str = "block_size") -> None:
    if not (isinstance(block_size, int) and block_size >= 2 and block_size % 2 == 0):
        raise ValueError(f"{what} must be an even integer >= 2 (two 4-bit codes share a byte), got {block_size!r}")


def nearest_codes(normalised: torch.Tensor) -> torch.Tensor:
    """Values in [-1, 1] -> the index of the nearest NF4 value, uint8 (same shape). Ties take the lower one."""
    boundaries = _MIDPOINTS.to(normalised.device)
    return torch.bucketize(normalised.double(), boundaries).to(torch.uint8)


def pack_codes(codes: torch.Tensor) -> torch.Tensor:
    """(n,) codes 0..15, n even -> (n/2,) uint8, two per byte: the first of each pair in the high 4 bits."""
    return (codes[0::2] << 4) | codes[1::2]


def unpack_codes(packed: torch.Tensor) -> torch.Tensor:
    """(n/2,) uint8 -> (n,) codes, the inverse of pack_codes."""
    return torch.stack([packed >> 4, packed & 0x0F], dim=-1).reshape(-1)


def quantize_absmax(absmax: torch.Tensor, scale_block_size: int = SCALE_BLOCK_SIZE) -> Dict[str, torch.Tensor]:
    """Double quantisation: absmax (n_blocks,) float32 -> {"absmax_codes" (n_blocks,) int8, "absmax_scales"
    (ceil(n_blocks / 256),) float32, "absmax_mean" () float32}."""
    mean = absmax.mean()
    centred = F.pad(absmax - mean, (0, num_blocks(absmax.numel(), scale_block_size) * scale_block_size
                                    - absmax.numel()))
    blocks = centred.view(-1, scale_block_size)                                     # (n_scales, 256)
    scales = blocks.abs().amax(dim=1) / INT8_MAX                                    # (n_scales,)
    safe = torch.where(scales > 0, scales, torch.ones_like(scales))
    codes = torch.round(blocks / safe[:, None]).clamp(-INT8_MAX, INT8_MAX).to(torch.int8)
    return {"absmax_codes": codes.reshape(-1)[:absmax.numel()], "absmax_scales": scales, "absmax_mean": mean}


def dequantize_absmax(absmax_codes: torch.Tensor, absmax_scales: torch.Tensor, absmax_mean: torch.Tensor,
                      scale_block_size: int = SCALE_BLOCK_SIZE) -> torch.Tensor:
    """absmax_hat = code * scale_m + mean, (n_blocks,) float32."""
    scale_per_block = absmax_scales.repeat_interleave(scale_block_size)[:absmax_codes.numel()]
    return absmax_codes.float() * scale_per_block + absmax_mean


def quantized_shapes(numel: int, block_size: int = BLOCK_SIZE, double_quant: bool = True,
                     scale_block_size: int = SCALE_BLOCK_SIZE) -> Dict[str, tuple]:
    """The tensors quantize_nf4 returns for a weight of `numel` numbers: name -> (shape, dtype)."""
    n_blocks = num_blocks(numel, block_size)
    shapes = {"packed": ((n_blocks * block_size // 2,), torch.uint8)}
    if double_quant:
        shapes.update(absmax_codes=((n_blocks,), torch.int8), absmax_mean=((), torch.float32),
                      absmax_scales=((num_blocks(n_blocks, scale_block_size),), torch.float32))
    else:
        shapes["absmax"] = ((n_blocks,), torch.float32)
    return shapes


@torch.no_grad()
def quantize_nf4(weight: torch.Tensor, block_size: int = BLOCK_SIZE, double_quant: bool = True,
                 scale_block_size: int = SCALE_BLOCK_SIZE) -> Dict[str, torch.Tensor]:
    """W (any shape) -> {"packed" (n_blocks * b / 2,) uint8, and "absmax" (n_blocks,) float32, or with
    double_quant its "absmax_codes", "absmax_scales", "absmax_mean"}. Deterministic: the same W gives the same
    bytes. A weight on the meta device gives empty meta tensors of the right shapes."""
    check_block_size(block_size)
    shapes = quantized_shapes(weight.numel(), block_size, double_quant, scale_block_size)
    if weight.is_meta:
        return {name: torch.empty(shape, dtype=dtype, device="meta") for name, (shape, dtype) in shapes.items()}
    n_blocks = num_blocks(weight.numel(), block_size)
    flat = weight.detach().reshape(-1).float()
    blocks = F.pad(flat, (0, n_blocks * block_size - flat.numel())).view(n_blocks, block_size)   # (n_blocks, b)
    absmax = blocks.abs().amax(dim=1)                                                          # (n_blocks,)
    safe = torch.where(absmax > 0, absmax, torch.ones_like(absmax))                           # a zero block: codes 0.0
    codes = torch.empty(n_blocks, block_size, dtype=torch.uint8, device=weight.device)
    for start in range(0, n_blocks, _CHUNK):                                                   # (chunk, b) at a time
        stop = start + _CHUNK
        codes[start:stop] = nearest_codes(blocks[start:stop] / safe[start:stop, None])
    out = {"packed": pack_codes(codes.reshape(-1))}
    out.update(quantize_absmax(absmax, scale_block_size) if double_quant else {"absmax": absmax})
    return out


def dequantize_nf4(tensors: Dict[str, torch.Tensor], shape, block_size: int = BLOCK_SIZE,
                   scale_block_size: int = SCALE_BLOCK_SIZE, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """quantize_nf4's tensors -> W_hat (shape) in `dtype`: NF4[code] * absmax (absmax_hat with double quant),
    computed in float32."""
    if "absmax" in tensors:
        absmax = tensors["absmax"]
    else:
        absmax = dequantize_absmax(tensors["absmax_codes"], tensors["absmax_scales"], tensors["absmax_mean"],
                                   scale_block_size)
    codes = unpack_codes(tensors["packed"]).to(torch.int32)                                    # (n_blocks * b,)
    values = NF4.to(absmax.device).index_select(0, codes).view(-1, block_size)                # (n_blocks, b)
    numel = math.prod(shape)
    return (values * absmax[:, None]).reshape(-1)[:numel].view(shape).to(dtype)


def quantized_bytes(tensors: Dict[str, torch.Tensor]) -> int:
    """Bytes the quantised tensors take."""
    return sum(t.numel() * t.element_size() for t in tensors.values())
