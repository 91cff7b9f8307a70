"""NF4 (minipeft/quant/nf4.py) against the QLoRA paper's definition and against bitsandbytes.

- the 16 code values: recomputed here in float64 from the paper's definition with erfinv (the module uses
  ndtri), and against the table bitsandbytes publishes (hard-coded below as it prints them);
- quantisation: each code is the nearest code value (a brute-force argmin in float64), each dequantised value
  is exactly NF4[code] * absmax, the error is at most half the widest gap times absmax, packing is two codes per
  byte (high half first), zero blocks and odd sizes work, and the same weight gives the same bytes;
- double quantisation: the absmax round trip is within half a second-level step, and the stored bytes are the
  paper's 4.127 bits per weight (memory.py's closed form);
- bitsandbytes' CPU backend (a test-only dependency): the same packed bytes and absmax, the same dequantised
  values; with double quantisation both stay close to the exact NF4 values. Skipped, with the reason, only where
  bitsandbytes does not import.
"""

import math

import pytest
import torch

from minipeft import memory
from minipeft.quant import nf4

# bitsandbytes/functional.py, get_4bit_type("nf4"): the values QLoRA's reference implementation uses.
BITSANDBYTES_NF4 = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
                    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
                    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
                    0.7229568362236023, 1.0]


def paper_nf4_float64() -> torch.Tensor:
    """QLoRA appendix E, written out again: quantiles of N(0, 1) at 8 evenly spaced probabilities in (1/2, 1 -
    delta] and 7 in the same way for the negative half, 0, normalised by the largest; Phi^-1(p) = sqrt(2)
    erfinv(2p - 1)."""
    delta = (1 / 32 + 1 / 30) / 2
    top = 1 - delta

    def quantile(p):
        return math.sqrt(2) * torch.erfinv(2 * p - 1)
    positive = quantile(torch.tensor([0.5 + (top - 0.5) * k / 8 for k in range(1, 9)], dtype=torch.float64))
    negative = -quantile(torch.tensor([0.5 + (top - 0.5) * k / 7 for k in range(1, 8)], dtype=torch.float64))
    values = torch.cat([negative, torch.zeros(1, dtype=torch.float64), positive])
    return (values / quantile(torch.tensor(top, dtype=torch.float64))).sort().values


def test_code_values_follow_the_paper_and_match_bitsandbytes_table():
    ours = nf4.nf4_code_values(torch.float64)
    assert torch.allclose(ours, paper_nf4_float64(), atol=1e-14, rtol=0)
    assert torch.allclose(ours, torch.tensor(BITSANDBYTES_NF4, dtype=torch.float64), atol=2e-7, rtol=0)
    assert ours[7] == 0 and ours[0] == -1 and ours[-1] == 1
    assert (ours < 0).sum() == 7 and (ours > 0).sum() == 8
    assert torch.equal(nf4.NF4, ours.float())


def weight(rows=37, cols=50, seed=0):
    """A weight whose size is not a multiple of the block (1,850 = 28 blocks of 64 + 58)."""
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)) * 0.05


def brute_force_codes(w: torch.Tensor, block_size: int):
    """(codes, absmax): the nearest code value to each w / absmax by argmin over all 16, in float64."""
    flat = w.reshape(-1).float()
    n_blocks = math.ceil(flat.numel() / block_size)
    blocks = torch.cat([flat, flat.new_zeros(n_blocks * block_size - flat.numel())]).view(n_blocks, block_size)
    absmax = blocks.abs().amax(dim=1)
    normalised = (blocks / torch.where(absmax > 0, absmax, torch.ones_like(absmax))[:, None]).double()
    distance = (normalised[..., None] - nf4.nf4_code_values(torch.float64)).abs()          # (n_blocks, b, 16)
    return distance.argmin(dim=-1).reshape(-1), absmax


@pytest.mark.parametrize("block_size", [64, 32])
def test_codes_are_the_nearest_code_values_and_dequantise_exactly(block_size):
    w = weight()
    tensors = nf4.quantize_nf4(w, block_size=block_size, double_quant=False)
    codes, absmax = brute_force_codes(w, block_size)
    assert torch.equal(nf4.unpack_codes(tensors["packed"]).long(), codes)
    assert torch.equal(tensors["absmax"], absmax)
    w_hat = nf4.dequantize_nf4(tensors, w.shape, block_size)
    expected = (nf4.NF4[codes].view(-1, block_size) * absmax[:, None]).reshape(-1)[:w.numel()].view(w.shape)
    assert torch.equal(w_hat, expected)
    widest_gap = (nf4.nf4_code_values(torch.float64).diff().max() / 2).item()
    per_weight_absmax = absmax.repeat_interleave(block_size)[:w.numel()].view(w.shape)
    assert ((w - w_hat).abs() <= widest_gap * per_weight_absmax * (1 + 1e-6)).all()
    assert w_hat.dtype == torch.float32


def test_packing_two_codes_per_byte_high_half_first_and_zero_blocks():
    codes = torch.tensor([1, 2, 15, 0, 7, 9], dtype=torch.uint8)
    assert nf4.pack_codes(codes).tolist() == [0x12, 0xF0, 0x79]
    assert torch.equal(nf4.unpack_codes(nf4.pack_codes(codes)), codes)
    zeros = torch.zeros(3, 64)
    tensors = nf4.quantize_nf4(zeros, double_quant=True)
    assert torch.equal(nf4.dequantize_nf4(tensors, zeros.shape), zeros)          # code 7 is exactly 0
    with pytest.raises(ValueError, match="block_size must be an even integer"):
        nf4.quantize_nf4(zeros, block_size=3)


def test_double_quantisation_round_trip_and_bits_per_weight():
    w = weight(256, 300, seed=1)                                         # 1,200 blocks: 5 second-level blocks
    plain = nf4.quantize_nf4(w, double_quant=False)
    double = nf4.quantize_nf4(w, double_quant=True)
    assert torch.equal(plain["packed"], double["packed"])               # the codes use the exact absmax
    absmax = plain["absmax"]
    absmax_hat = nf4.dequantize_absmax(double["absmax_codes"], double["absmax_scales"], double["absmax_mean"])
    step = double["absmax_scales"].repeat_interleave(256)[:absmax.numel()]
    centred = absmax.double() - absmax.double().mean()
    assert torch.allclose(double["absmax_scales"].double(),
                          torch.stack([centred[i:i + 256].abs().max() for i in range(0, 1200, 256)]) / 127,
                          rtol=1e-6, atol=0)
    assert ((absmax_hat - absmax).abs() <= step / 2 + 1e-7).all()
    assert (absmax_hat - absmax).abs().max() < 0.01 * absmax.mean()
    bits = 8 * nf4.quantized_bytes(double) / w.numel()
    assert bits == 8 * memory.nf4_tensor_bytes(w.numel()) / w.numel()
    assert abs(bits - memory.nf4_bits_per_weight()) < 0.001 and abs(memory.nf4_bits_per_weight() - 4.127) < 5e-4
    assert 8 * nf4.quantized_bytes(plain) / w.numel() == memory.nf4_bits_per_weight(double_quant=False) == 4.5
    w_hat = nf4.dequantize_nf4(double, w.shape, dtype=torch.bfloat16)
    assert w_hat.dtype == torch.bfloat16


def test_quantisation_is_deterministic_bit_for_bit():
    w = weight(64, 96, seed=3)
    first, second = nf4.quantize_nf4(w), nf4.quantize_nf4(w.clone())
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    meta = nf4.quantize_nf4(torch.empty(64, 96, device="meta"))
    assert {k: (tuple(v.shape), v.dtype) for k, v in meta.items()} == \
        {k: (tuple(v.shape), v.dtype) for k, v in first.items()}


@pytest.fixture(scope="module")
def bnb_functional():
    try:
        import bitsandbytes.functional as functional
    except Exception as error:  # noqa: BLE001 - any import failure (no CPU build, a missing library) skips
        pytest.skip(f"bitsandbytes does not import here ({type(error).__name__}: {error}); the paper-definition "
                    f"tests above still ran")
    return functional


def test_bitsandbytes_gives_the_same_bytes_and_values(bnb_functional):
    w = weight(96, 130, seed=4)
    table = bnb_functional.get_4bit_type("nf4", device="cpu")
    assert torch.allclose(table.double(), torch.tensor(BITSANDBYTES_NF4, dtype=torch.float64), atol=0, rtol=0)
    theirs, state = bnb_functional.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=False)
    ours = nf4.quantize_nf4(w, block_size=64, double_quant=False)
    assert torch.equal(theirs.reshape(-1), ours["packed"])
    assert torch.equal(state.absmax, ours["absmax"])
    their_w = bnb_functional.dequantize_4bit(theirs, state)
    # the same codes times the same absmax; their table's float32 literals differ from ours by <= 2e-7
    assert torch.allclose(their_w, nf4.dequantize_nf4(ours, w.shape), atol=2e-7 * state.absmax.max().item(), rtol=0)

    theirs_dq, state_dq = bnb_functional.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    assert torch.equal(theirs_dq.reshape(-1), ours["packed"])                       # double quant leaves the codes
    exact = nf4.dequantize_nf4(ours, w.shape)
    their_error = (bnb_functional.dequantize_4bit(theirs_dq, state_dq) - exact).abs().max()
    our_error = (nf4.dequantize_nf4(nf4.quantize_nf4(w), w.shape) - exact).abs().max()
    assert our_error <= their_error and their_error < 0.01 * w.abs().max()
