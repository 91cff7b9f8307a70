"""Lesson 06, try this: is the update of full fine-tuning low-rank? (全量微调的更新 ΔW 是低秩的吗?)

LoRA assumes the *update* ΔW = W - W0 has low rank, not W itself. Fine-tune the shipped tiny model in
full for 30 steps on the demo tasks, take ΔW of three matrices, and compare the share of ||ΔW||_F^2 in
the top 8 singular values (奇异值) with the same share for W0 and for a random Gaussian matrix of the
same shape (a matrix with no structure at all).

    PYTHONPATH=. python lessons/06_lora/3_try_full_ft_update_svd.py
Change STEPS or LR and watch the shares move.
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # lessons/
from checks import check, check_quoted, check_true  # noqa: E402
from tiny_training import demo_examples, load_tiny, train_steps  # noqa: E402

from minipeft.peft import FullConfig, apply_peft

STEPS, LR, TOP = 30, 1e-3, 8
MATRICES = ["layers.1.attention.wq.weight", "layers.1.attention.wv.weight", "layers.1.feed_forward.w2.weight"]


def top_share(matrix: torch.Tensor, k: int) -> float:
    """Share of the squared Frobenius norm held by the k largest singular values."""
    s = torch.linalg.svdvals(matrix)
    return ((s[:k] ** 2).sum() / (s ** 2).sum()).item()


base, tokenizer = load_tiny()
_, examples = demo_examples(tokenizer, "train", n=96)
before = {name: p.detach().double().clone() for name, p in base.named_parameters() if name in MATRICES}
model = apply_peft(base, FullConfig())
losses = train_steps(model, examples, STEPS, LR)
print(f"full fine-tuning, {STEPS} AdamW steps at lr {LR}: loss {losses[0]:.3f} -> {losses[-1]:.3f}")
after = dict(base.named_parameters())             # apply_peft trained the base's own Parameters in place

torch.manual_seed(0)
shares = {"delta": [], "random": [], "w0": []}
for name in MATRICES:
    delta = after[name].detach().double() - before[name]                     # (d_out, d_in)
    print(f"{name} {tuple(delta.shape)}")
    s = torch.linalg.svdvals(delta)
    check("  sum of s_i^2 == sum of the squared entries (SVD keeps the norm)", (s ** 2).sum(), (delta ** 2).sum(),
          1e-9 * (delta ** 2).sum().item())
    share_delta, share_w0 = top_share(delta, TOP), top_share(before[name], TOP)
    share_random = top_share(torch.randn_like(delta), TOP)
    for key, value in (("delta", share_delta), ("random", share_random), ("w0", share_w0)):
        shares[key].append(100 * value)
    print(f"    top-{TOP} share of the norm: ΔW {share_delta:.3f}, W0 {share_w0:.3f}, random {share_random:.3f}")
    check_true(f"  ΔW's top-{TOP} share is over twice a random matrix's ({share_random:.3f})", share_delta,
               f"> {2 * share_random:.3f}", share_delta > 2 * share_random)
    check_true(f"  ΔW is more concentrated than W0 itself ({share_w0:.3f}): the update, not W, is low-rank",
               share_delta, f"> {share_w0:.3f}", share_delta > share_w0)
    check_true(f"  but not exactly rank {TOP}: the rest of the norm is not zero", 1 - share_delta, "> 0.05",
               1 - share_delta > 0.05)

check_quoted("the README's shares (%): ΔW, random, W0 for wq, wv, w2", (Path(__file__).resolve().parent /
             "README.md").read_text(encoding="utf-8"), "hold {} % (wq), {} % (wv), {} % (w2) of ||ΔW||², against {} %, "
             "{} %, {} % for a random matrix and {} %, {} %, {} % for W0", shares["delta"] + shares["random"] + shares["w0"], 0.5)
print("all checks passed")
