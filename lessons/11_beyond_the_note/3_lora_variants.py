"""Lesson 11, section 3: three LoRA variants as LoRAConfig options: rsLoRA's scale, PiSSA's init, LoRA+'s rates.

Checks: (a) rsLoRA: B's first gradient shrinks like 1/sqrt(r) with s = alpha / r and stays flat with alpha / sqrt(r);
(b) PiSSA in float64: A, B from the top-r singular triplets, W0' + s B A = W0, the principal part's share of the
tiny model's weights, both A and B move at the first step; (c) LoRA+: Adam's first step moves B by ratio x lr;
then try this: PiSSA and LoRA+ for 10 steps on the shipped tiny model, against section 1's plain LoRA (6.314).

    PYTHONPATH=. python lessons/11_beyond_the_note/3_lora_variants.py
Try LR_PLUS = LR (B at 16 x 1e-2 = 0.16 overshoots: worse than plain LoRA), RATIO = 4, or PiSSA at LR = 3e-3.
"""

import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # lessons/
from checks import check, check_equal, check_true  # noqa: E402
from tiny_training import demo_examples, load_tiny, train_steps, val_loss  # noqa: E402

from minipeft.data import causal_lm_loss, collate
from minipeft.peft import LoRAConfig, LoRALinear, apply_peft

print("(a) rsLoRA: the size of B's first gradient against r (alpha = 16, mean over 20 random layers)")


def grad_B_norm(rank: int, rslora: bool, trials: int = 20) -> float:
    total = 0.0
    for seed in range(trials):
        torch.manual_seed(seed)
        layer = LoRALinear(64, 64, rank=rank, alpha=16.0, rslora=rslora).double()
        x, G = torch.randn(8, 64, dtype=torch.float64), torch.randn(8, 64, dtype=torch.float64)
        (layer(x) * G).sum().backward()                       # dL/dB = s G^T (x A^T): r columns
        total += layer.lora_B.grad.norm().item()
    return total / trials


for rslora, label, expected in ((False, "alpha / r", 0.25), (True, "alpha / sqrt(r)", 1.0)):
    ratio = grad_B_norm(64, rslora) / grad_B_norm(4, rslora)
    check(f"||dL/dB|| at r = 64 over r = 4, s = {label} (sqrt(4/64) = 0.25, or flat)", ratio, expected, 0.05)

print("(b) PiSSA on one layer, float64: d_out 12, d_in 10, r 3, alpha 6")
torch.manual_seed(0)
linear = torch.nn.Linear(10, 12, bias=False).double()
W0 = linear.weight.detach().clone()
pissa = LoRALinear.from_linear(copy.deepcopy(linear), rank=3, alpha=6.0)
pissa.init_pissa()
U, S, Vh = torch.linalg.svd(W0)
s = pissa.scaling
A, B = pissa.lora_A.detach(), pissa.lora_B.detach()
check("s B A = the top-3 part U_3 diag(S_3) V_3^T", s * B @ A, U[:, :3] @ torch.diag(S[:3]) @ Vh[:3], 1e-12)
check("W0' + s B A = W0 (the model starts as the base)", pissa.weight.detach() + s * B @ A, W0, 1e-12)
check("A's rows and B's columns share sqrt(S_i / s) evenly", A.norm(dim=1), B.norm(dim=0), 1e-12)
x, G = torch.randn(4, 10, dtype=torch.float64), torch.randn(4, 12, dtype=torch.float64)
(pissa(x) * G).sum().backward()
check_true("A's first gradient is nonzero (LoRA's is exactly 0, as B = 0)", pissa.lora_A.grad.norm().item(), "> 0",
           pissa.lora_A.grad.norm().item() > 0)

tiny, tokenizer = load_tiny()
wq = tiny.layers[0].attention.wq.weight.detach().double()
values = torch.linalg.svdvals(wq)
share = (values[:8] ** 2).sum().item() / (values ** 2).sum().item()
check("tiny model, layer 0 wq (192 x 192): the top 8 of 192 directions hold this share of ||W||_F^2", share,
      0.390, 0.005)
check_true("more than their count's share 8 / 192", share, f"> {8 / 192:.3f}", share > 8 / 192)

print("(c) LoRA+: Adam's first step moves every entry of B by ratio x lr, A not at all (its gradient is 0)")
RATIO, LR = 16.0, 1e-2
model = apply_peft(copy.deepcopy(tiny), LoRAConfig(lora_plus_ratio=RATIO))
wq_lora = model.base.layers[0].attention.wq
B_before, A_before = wq_lora.lora_B.detach().clone(), wq_lora.lora_A.detach().clone()
optimizer = torch.optim.AdamW(model.param_groups(LR), lr=LR, weight_decay=0.0)
check_equal("groups: [lr, ratio x lr]", [g["lr"] for g in optimizer.param_groups], [LR, RATIO * LR])
_, train_examples = demo_examples(tokenizer, "train", n=40)
_, heldout = demo_examples(tokenizer, "heldout", n=24)
batch = train_examples[:4]
inputs = collate(batch, pad_id=0)
causal_lm_loss(model(inputs["input_ids"]), inputs["labels"]).backward()
optimizer.step()
moved = (wq_lora.lora_B.detach() - B_before).abs()
check("|change of B| = ratio x lr (Adam's first step: lr * g / |g|)", moved.max(), RATIO * LR, 1e-6)
check("A unchanged", (wq_lora.lora_A.detach() - A_before).abs().max(), 0.0, 0.0)

print("try this: 10 steps each on the shipped tiny model (wq, wv, r 8)")
before = val_loss(tiny, heldout)
LORA_LOSS = 6.314                                                        # section 1's plain LoRA run
LR_PLUS = LR / 4                                                         # LoRA+ at a lower base rate: B at 4e-2
results = {}
for name, config, lr in (("pissa", LoRAConfig(init="pissa"), LR), ("lora+", LoRAConfig(lora_plus_ratio=RATIO), LR_PLUS)):
    model, _ = load_tiny()
    torch.manual_seed(0)                                                   # the same A init in every run
    model = apply_peft(model, config)
    train_steps(model, train_examples, 10, lr, batch_size=4)
    results[name] = val_loss(model, heldout)
    print(f"  {name} (lr {lr:g}): held-out loss {before:.3f} -> {results[name]:.3f} (plain LoRA at 1e-2: {LORA_LOSS})")
check("PiSSA's held-out loss, as README says", results["pissa"], 5.610, 0.01)
check("LoRA+'s held-out loss (A at 2.5e-3, B at 4e-2), as README says", results["lora+"], 5.727, 0.01)
for name, loss in results.items():
    check_true(f"{name} ends below plain LoRA", loss, f"< {LORA_LOSS}", loss < LORA_LOSS)
print("all checks passed")
