"""Lesson 01, step 1: RMSNorm and rotary position embeddings (RoPE, 旋转位置编码).

Run from the repository root:
    PYTHONPATH=. python lessons/01_decoder/1_rmsnorm_and_rope.py

Every quantity is printed and checked against an independent float64 computation written here,
and against minipeft.model (RMSNorm, rope_cos_sin, apply_rope).
"""

import math

import torch

from minipeft.model import RMSNorm, apply_rope, rope_cos_sin

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # lessons/, for checks.py
from checks import check  # noqa: E402


torch.manual_seed(0)

# ------------------------------------------------------------------------------------------------
print("1. RMSNorm(x) = x / sqrt(mean(x^2) + eps) * g")
# Hand-worked: x = (3, 4): mean(x^2) = (9 + 16) / 2 = 12.5, rms = sqrt(12.5) = 3.5355...,
# x / rms = (0.84853, 1.13137).
norm = RMSNorm(2, eps=0.0)
hand = torch.tensor([3 / math.sqrt(12.5), 4 / math.sqrt(12.5)])
print(f"   x = (3, 4) -> {norm(torch.tensor([3.0, 4.0])).tolist()}")
check("hand example (3, 4) -> (0.84853, 1.13137)", norm(torch.tensor([3.0, 4.0])), hand, 1e-6)

d, eps = 16, 1e-6
x = torch.randn(3, d, dtype=torch.float64)                         # (tokens, d)
gain = 1 + 0.1 * torch.randn(d, dtype=torch.float64)               # the learned gain g (d,)
reference = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps) * gain
norm = RMSNorm(d, eps)
norm.weight.data = gain.float()
check("minipeft RMSNorm == float64 formula", norm(x.float()), reference, 1e-5)
unit_gain = reference / gain
check("with g = 1 every row has root-mean-square 1", unit_gain.pow(2).mean(-1).sqrt(), torch.ones(3), 1e-5)
check("scale invariance: RMSNorm(5 x) == RMSNorm(x)", norm(5 * x.float()), norm(x.float()), 1e-5)

# ------------------------------------------------------------------------------------------------
print("2. RoPE angles: pair i of a head rotates by pos * theta_i, theta_i = base^(-2i/hd)")
head_dim, base = 8, 10000.0            # base: the number theta_i is computed from (cfg.rope_theta)
# With hd = 8: base^(-2i/8) = 10000^(-i/4) = 10^(-i), i = 0..3: frequencies 1, 0.1, 0.01, 0.001.
frequencies = torch.tensor([1.0, 0.1, 0.01, 0.001], dtype=torch.float64)
positions = torch.arange(6)[None]                                  # (1, T=6): positions 0..5
cos, sin = rope_cos_sin(positions, head_dim, base)               # each (1, 1, 6, 4)
angles = positions[0, :, None].double() * frequencies              # (6, 4)
check("cos(pos * 10^-i) from rope_cos_sin", cos[0, 0], angles.cos(), 1e-6)
check("sin(pos * 10^-i) from rope_cos_sin", sin[0, 0], angles.sin(), 1e-6)

print("3. Rotating adjacent pairs == multiplying complex numbers z_i = x[2i] + j x[2i+1] by e^(j pos theta_i)")
x = torch.randn(1, 1, 6, head_dim, dtype=torch.float64)           # (B, heads, T, hd)
rotated = apply_rope(x.float(), cos, sin).double()                # the library
z = torch.view_as_complex(x.reshape(1, 1, 6, head_dim // 2, 2).contiguous())     # (1, 1, 6, 4) complex
z_rotated = z * torch.polar(torch.ones_like(angles), angles)                        # times e^(j angle)
check("apply_rope == complex multiplication", rotated, torch.view_as_real(z_rotated).flatten(-2), 1e-6)


def rotation_matrix(pos: int) -> torch.Tensor:
    """R_pos: block-diagonal (hd, hd) with a 2x2 rotation by pos * theta_i in block i (float64)."""
    R = torch.zeros(head_dim, head_dim, dtype=torch.float64)
    for i, freq in enumerate(frequencies):
        c, s = math.cos(pos * freq), math.sin(pos * freq)
        R[2 * i:2 * i + 2, 2 * i:2 * i + 2] = torch.tensor([[c, -s], [s, c]], dtype=torch.float64)
    return R


by_matrix = torch.stack([rotation_matrix(p) @ x[0, 0, p] for p in range(6)])          # (6, hd)
check("apply_rope == block-diagonal rotation matrix R_pos x", rotated[0, 0], by_matrix, 1e-6)
check("a rotation keeps the length: |R x| == |x|", rotated.norm(dim=-1), x.norm(dim=-1), 1e-6)

# ------------------------------------------------------------------------------------------------
print("4. q_m . k_n depends only on m - n:  (R_m q) . (R_n k) = q^T R_(n-m) k")
q = torch.randn(head_dim, dtype=torch.float64)
k = torch.randn(head_dim, dtype=torch.float64)


def rope_score(m: int, n: int) -> float:
    """Score of query q at position m against key k at position n, rotated by the library."""
    pos = torch.tensor([[m, n]])
    cos_mn, sin_mn = rope_cos_sin(pos, head_dim, base)
    both = torch.stack([q, k])[None, None].float()                # (1, 1, 2, hd): q at m, k at n
    rq, rk = apply_rope(both, cos_mn, sin_mn)[0, 0].double()
    return float(rq @ rk)


m, n = 5, 2
score = rope_score(m, n)
check("R_m^T R_n == R_(n-m)", rotation_matrix(m).T @ rotation_matrix(n), rotation_matrix(n - m), 1e-12)
check("score == q^T R_(n-m) k (float64)", score, q @ rotation_matrix(n - m) @ k, 1e-5)
zq = torch.view_as_complex(q.reshape(-1, 2).contiguous())
zk = torch.view_as_complex(k.reshape(-1, 2).contiguous())
complex_form = (zq * zk.conj() * torch.polar(torch.ones(4, dtype=torch.float64), (m - n) * frequencies)).sum().real
check("score == Re sum_i q_i conj(k_i) e^(j (m-n) theta_i)", score, complex_form, 1e-5)
for shift in (1, 10, 100):
    shifted = rope_score(m + shift, n + shift)
    print(f"   positions ({m + shift}, {n + shift}): score {shifted:.6f}  vs  ({m}, {n}): {score:.6f}")
    check(f"shift both positions by {shift}: same score", shifted, score, 1e-4)
different = rope_score(m + 1, n)
print(f"   positions ({m + 1}, {n}) (relative distance changed): score {different:.6f}")
assert abs(different - score) > 1e-3, "changing the relative distance should change the score"

# Hand-worked: q = k = e_0 (only pair 0, frequency 1): score = cos((m - n) * 1).
e0 = torch.zeros(head_dim, dtype=torch.float64)
e0[0] = 1.0
q, k = e0, e0
check("hand example q = k = e_0, m - n = 3: score = cos(3) = -0.98999", rope_score(3, 0), math.cos(3.0), 1e-6)

# ------------------------------------------------------------------------------------------------
print("5. Hugging Face's layout: the pairs (i, i + hd/2) instead of (2i, 2i+1), the same rotation permuted")
# HF keeps x[2i] in slot i and x[2i+1] in slot i + hd/2 ("half split") and rotates with
#   y -> y * [cos, cos] + rotate_half(y) * [sin, sin],   rotate_half([y1, y2]) = [-y2, y1].
# minipeft.checkpoint.permute_for_hf moves a Meta-layout row block into that layout.
from minipeft.checkpoint import permute_for_hf  # noqa: E402

x = torch.randn(head_dim, dtype=torch.float64)
pos = 7
angle = pos * frequencies                                           # (hd/2,)
y = permute_for_hf(x[:, None], n_heads=1)[:, 0]                     # HF layout of x
check("permute_for_hf puts x[2i] in slot i and x[2i+1] in slot i + hd/2", y, torch.cat([x[0::2], x[1::2]]), 0)
y1, y2 = y[:head_dim // 2], y[head_dim // 2:]
hf_rotated = y * torch.cat([angle.cos(), angle.cos()]) + torch.cat([-y2, y1]) * torch.cat([angle.sin(), angle.sin()])
ours = rotation_matrix(pos) @ x
check("HF rotation of the permuted vector == permuted Meta rotation", hf_rotated,
      permute_for_hf(ours[:, None], n_heads=1)[:, 0], 1e-12)
print("   (so a Hugging Face checkpoint works once wq/wk rows are permuted back: minipeft/checkpoint.py)")

print("all checks passed")
