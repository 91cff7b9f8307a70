"""Lesson 06, step 1: LoRA (低秩适配) on one linear layer: the rank of Delta W = B A, the parameter count,
the forward pass, why B starts at zero, and what the alpha / r scaling is for.

Run from the repository root:
    PYTHONPATH=. python lessons/06_lora/1_low_rank_update.py

Every library result (minipeft.peft.LoRALinear) is compared with a float64 computation written here.
"""

import torch

from minipeft.peft import LoRALinear
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # lessons/, for checks.py
from checks import check, check_equal  # noqa: E402


torch.manual_seed(0)
d_in, d_out, rank, alpha = 48, 32, 4, 8.0
lora = LoRALinear(d_in, d_out, rank=rank, alpha=alpha)
lora.weight.requires_grad_(False)                                    # W0 is frozen
print(f"LoRALinear: W0 {tuple(lora.weight.shape)}, A {tuple(lora.lora_A.shape)}, B {tuple(lora.lora_B.shape)}, "
      f"r = {rank}, alpha = {alpha}, s = alpha / r = {lora.scaling}")

# ------------------------------------------------------------------------------------------------
print("1. Delta W = s B A has rank <= r (B: d_out x r, A: r x d_in)")
with torch.no_grad():
    lora.lora_B.normal_()                                            # pretend B has been trained
B, A = lora.lora_B.detach().double(), lora.lora_A.detach().double()
delta = lora.scaling * B @ A                                          # (d_out, d_in), float64
check("delta_weight() == (alpha / r) B A", lora.delta_weight(), delta, 1e-5)
singular_values = torch.linalg.svdvals(delta)
print(f"   singular values of Delta W: the first {rank}: {singular_values[:rank].numpy().round(3)}, "
      f"the {rank + 1}th on: at most {singular_values[rank:].max():.1e}")
check(f"singular values {rank + 1}..{min(d_in, d_out)} are zero", singular_values[rank:] / singular_values[0],
      torch.zeros(min(d_in, d_out) - rank), 1e-12)
assert torch.linalg.matrix_rank(delta).item() == rank, "rank(B A) should be r for random B, A"
print(f"  [ok] matrix_rank(Delta W) = {rank}")

# ------------------------------------------------------------------------------------------------
print("2. Parameters: r (d_in + d_out) instead of d_in d_out")
trainable = sum(p.numel() for p in lora.parameters() if p.requires_grad)
check_equal("LoRALinear trainable == r (d_in + d_out) = 4 * (48 + 32)", trainable, rank * (d_in + d_out))
check_equal("the full matrix: d_in d_out = 48 * 32", lora.weight.numel(), d_in * d_out)
check_equal("LLaMA-7B wq, r = 8: 8 * (4096 + 4096)", 8 * (4096 + 4096), 65_536)
check("... 256x fewer than 4096^2 = 16,777,216", 4096 * 4096 / (8 * (4096 + 4096)), 256, 0)

# ------------------------------------------------------------------------------------------------
print("3. Forward: y = W0 x + s B (A x)  ==  (W0 + Delta W) x")
x = torch.randn(5, d_in, dtype=torch.float64)                        # (tokens, d_in)
W0 = lora.weight.detach().double()
reference = x @ W0.T + lora.scaling * (x @ A.T) @ B.T               # (tokens, d_out)
check("LoRALinear(x) == x W0^T + s x A^T B^T (float64)", lora(x.float()), reference, 1e-4)
check("... == x (W0 + Delta W)^T: one matrix", reference, x @ (W0 + delta).T, 1e-10)
# The note writes Delta W = A x B with A (d x r), B (r x d): the row-vector form, a token row x times A then B.
A_note, B_note = A.T, B.T                                            # (d_in, r) down, (r, d_out) up
check_equal("the note's A is the code's A^T: (d_in, r)", tuple(A_note.shape), (d_in, rank))
check("x A_note B_note == x (B A)^T: the note's product is the code's, transposed", lora.scaling * x @ A_note @ B_note,
      x @ delta.T, 1e-12)

# ------------------------------------------------------------------------------------------------
print("4. Init: A random (Kaiming-uniform), B = 0, so Delta W = 0 and the layer starts as W0")
fresh = LoRALinear(d_in, d_out, rank=rank, alpha=alpha)
fresh.weight.requires_grad_(False)
check("B == 0 at init", fresh.lora_B, torch.zeros(d_out, rank), 0)
bound = (1 / d_in) ** 0.5                                            # kaiming_uniform(a=sqrt(5)): U(-1/sqrt(d_in), 1/sqrt(d_in))
assert fresh.lora_A.abs().max() <= bound and fresh.lora_A.abs().max() > 0.9 * bound, "A should be U(-1/sqrt(d_in), ..)"
print(f"  [ok] A ~ U(-{bound:.3f}, {bound:.3f})")
check("LoRA layer at init == the frozen linear", fresh(x.float()), x.float() @ fresh.weight.T, 0)

# Gradients of the loss sum(G * y) for an upstream gradient G = dL/dy (tokens, d_out):
#   dL/dB = s G^T (x A^T)        (d_out, r)     nonzero
#   dL/dA = s B^T G^T x          (r, d_in)      zero while B = 0
G = torch.randn(5, d_out, dtype=torch.float64)
(fresh(x.float()) * G.float()).sum().backward()
A0 = fresh.lora_A.detach().double()
check("dL/dB == s G^T (x A^T)", fresh.lora_B.grad, fresh.scaling * G.T @ (x @ A0.T), 1e-4)
check("dL/dA == s B^T G^T x == 0 at the first step", fresh.lora_A.grad, torch.zeros(rank, d_in), 0)
print("   (if both were zero nothing would ever move; if both were random the model would not start as W0)")

# ------------------------------------------------------------------------------------------------
print("5. The alpha / r scaling: after one Adam step the update's size does not depend on r")
# Adam's first step moves each entry by exactly -lr * sign(gradient) (m / sqrt(v) = g / |g|). For one token x
# and upstream gradient G: sign(dL/dB[i, k]) = sign(G_i) sign((A x)_k), so
#   (Delta W x)_i = s (B A x)_i = -s lr sign(G_i) sum_k |(A x)_k|,
# a sum of r terms: proportional to r unless s = alpha / r cancels it.
lr = 1e-3


def first_adam_step(r: int, seed: int):
    """One Adam step on a fresh LoRALinear of rank r; returns (Delta W x after the step, the hand formula)."""
    torch.manual_seed(seed)
    layer = LoRALinear(d_in, d_out, rank=r, alpha=alpha)
    layer.weight.requires_grad_(False)
    x1, G1 = torch.randn(1, d_in), torch.randn(1, d_out)              # one token, its upstream gradient
    optimizer = torch.optim.Adam([layer.lora_A, layer.lora_B], lr=lr, eps=1e-12)
    (layer(x1) * G1).sum().backward()
    A_before = layer.lora_A.detach().double().clone()                # A does not move at step 1 (its grad is 0)
    optimizer.step()
    change = (layer.delta_weight().double() @ x1.double().T).T       # (1, d_out) = Delta W x after one step
    hand = -(alpha / r) * lr * torch.sign(G1.double()) * (A_before @ x1.double().T).abs().sum()
    return change, hand


sizes = {}
for r in (2, 4, 8, 16, 32):
    change, hand = first_adam_step(r, seed=0)
    check(f"r = {r:2d}: Delta W x == -(alpha/r) lr sign(G) sum_k |(A x)_k|", change, hand, 1e-7)
    # The size, averaged over 20 random layers and tokens (one draw of r numbers is noisy for small r):
    sizes[r] = sum(first_adam_step(r, seed)[0].norm().item() for seed in range(20)) / 20
    print(f"     mean |Delta W x| = {sizes[r]:.2e}; with a fixed scale alpha instead of alpha/r: {sizes[r] * r:.2e}")
spread_scaled = max(sizes.values()) / min(sizes.values())
spread_unscaled = max(s * r for r, s in sizes.items()) / min(s * r for r, s in sizes.items())
print(f"   max/min over r = 2..32: {spread_scaled:.2f} with alpha/r, {spread_unscaled:.1f} with a fixed scale")
check("with alpha / r the first update does not depend on r (max/min ~ 1)", spread_scaled, 1.0, 0.25)
check("with a fixed scale it grows like r (max/min ~ 32/2 = 16)", spread_unscaled / 16, 1.0, 0.25)

print("all checks passed")
