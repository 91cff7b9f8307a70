"""Lesson 11, section 2: DoRA, LoRA's update split into a direction and a magnitude (方向与幅度).

Checks, in float64 on one layer: W' = m * (W0 + s B A) / ||W0 + s B A||_row against the module's output; the rows of
W' have length m; at init W' = W0; the norm is detached (m's gradient and A, B's gradients against a hand derivation);
merging; then a try-this run: DoRA and LoRA for the same 10 steps on the shipped tiny model.

    PYTHONPATH=. python lessons/11_beyond_the_note/2_dora.py
Try TARGETS = ("wq", "wk", "wv", "wo") or a smaller LR: where does DoRA's magnitude help?
"""

import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # lessons/
from checks import check, check_equal, check_true  # noqa: E402
from tiny_training import demo_examples, load_tiny, train_steps, val_loss  # noqa: E402

from minipeft.peft import DoRAConfig, DoRALinear, LoRAConfig, apply_peft

torch.manual_seed(0)
d_in, d_out, r, alpha = 6, 5, 2, 4.0
print(f"1. one layer: d_in {d_in}, d_out {d_out}, r {r}, s = alpha / r = {alpha / r}, float64")
linear = torch.nn.Linear(d_in, d_out, bias=True).double()
dora = DoRALinear.from_linear(copy.deepcopy(linear), rank=r, alpha=alpha)
dora.init_magnitude()
x = torch.randn(3, d_in, dtype=torch.float64)
W0, b = linear.weight.detach(), linear.bias.detach()
check("init: m = ||W0||_row (one length per output row)", dora.lora_magnitude, W0.norm(dim=1), 1e-15)
check("init: B = 0, so W' = W0 and the layer is unchanged", dora(x), linear(x), 1e-15)

with torch.no_grad():
    dora.lora_B.copy_(torch.randn(d_out, r, dtype=torch.float64))
    dora.lora_magnitude.mul_(torch.linspace(0.5, 1.5, d_out, dtype=torch.float64))
A, B, m, s = dora.lora_A.detach(), dora.lora_B.detach(), dora.lora_magnitude.detach(), dora.scaling
V = W0 + s * B @ A                                                    # the direction, before normalising
W_new = m[:, None] * V / V.norm(dim=1, keepdim=True)                  # (d_out, d_in)
check("y = x W'^T + b with W' = m * V / ||V||_row", dora(x), x @ W_new.T + b, 1e-12)
check("every row of W' has length m", W_new.norm(dim=1), m, 1e-12)
check("merged (to_linear) gives the same output", dora.to_linear()(x), dora(x), 1e-12)

print("2. the norm is a constant in backward (paper section 4.3): gradients by hand")
dora.zero_grad()
G = torch.randn(3, d_out, dtype=torch.float64)                        # upstream gradient dL/dy
(dora(x) * G).sum().backward()
norm = V.norm(dim=1)                                                   # treated as a constant
check("dL/dm_i = sum_t G_ti (x_t V_i^T) / ||V_i||", dora.lora_magnitude.grad, (G * (x @ V.T)).sum(0) / norm, 1e-12)
g = m / norm                                                           # (d_out,)
dB = s * (G * g).T @ (x @ A.T)                                         # y = g * (x V^T) + b, V = W0 + s B A
check("dL/dB = s (g * G)^T (x A^T)", dora.lora_B.grad, dB, 1e-12)
check("dL/dA = s B^T (g * G)^T x", dora.lora_A.grad, s * B.T @ (G * g).T @ x, 1e-12)

print("3. try this: DoRA and LoRA, 10 steps each on the shipped tiny model (wq, wv, r 8)")
STEPS, LR, TARGETS = 10, 1e-2, ("wq", "wv")
tiny, tokenizer = load_tiny()
_, train_examples = demo_examples(tokenizer, "train", n=40)
_, heldout = demo_examples(tokenizer, "heldout", n=24)
before = val_loss(tiny, heldout)
results = {}
for name, config in (("dora", DoRAConfig(targets=TARGETS)), ("lora", LoRAConfig(targets=TARGETS))):
    model, _ = load_tiny()
    torch.manual_seed(0)                                                   # the same A init in every run
    model = apply_peft(model, config)
    train_steps(model, train_examples, STEPS, LR, batch_size=4)
    results[name] = (val_loss(model, heldout), model.report.trainable)
    print(f"  {name}: {results[name][1]:6,} trainable, held-out loss {before:.3f} -> {results[name][0]:.3f}")
cfg = tiny.config
check_equal("DoRA adds one magnitude per output row: L * (d + kv)", results["dora"][1] - results["lora"][1],
            cfg.n_layers * (cfg.dim + cfg.kv_dim))
for name in results:
    check_true(f"{name}'s held-out loss falls", results[name][0], f"< {before:.3f}", results[name][0] < before)
check_true("over these 10 steps DoRA ends lower than LoRA", results["dora"][0], f"< LoRA's {results['lora'][0]:.3f}",
           results["dora"][0] < results["lora"][0])
check("DoRA's held-out loss, as README says", results["dora"][0], 6.048, 0.01)
check("LoRA's held-out loss, as README says (section 1's run)", results["lora"][0], 6.314, 0.01)
print("all checks passed")
