"""Lesson 03, try this: the reparameterisation MLP (重参数化) vs training the prefix directly.

Li & Liang train the prefix through an MLP because the direct prefix trains worse. Train both on the
shipped tiny model (P = 10) for the same 30 steps and compare the
held-out loss at two rates each (both at 3e-3, the MLP's best;
then 3e-2 for the MLP, 0.1 for the direct prefix); then fold the MLP away and check the model is unchanged.

    PYTHONPATH=. python lessons/03_prefix_tuning/2_try_mlp_vs_direct.py
Try other RATES, HIDDEN = 64, or STEPS = 100.
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # lessons/
from checks import check, check_equal, check_quoted, check_true  # noqa: E402
from tiny_training import demo_examples, load_tiny, train_steps, val_loss  # noqa: E402

from minipeft.peft import PrefixConfig, PrefixKV, apply_peft

P, HIDDEN, STEPS = 10, 512, 30
RATES = {HIDDEN: (3e-3, 3e-2), None: (3e-3, 1e-1)}   # the MLP's best, and each side's other end

_, tokenizer = load_tiny()
_, train_examples = demo_examples(tokenizer, "train", n=96)
_, heldout = demo_examples(tokenizer, "heldout", n=32)
base, _ = load_tiny()
base_loss = val_loss(base, heldout)
cfg = base.config
print(f"base model: held-out loss {base_loss:.3f}")

best, losses = {}, {}
for hidden in (HIDDEN, None):
    label = f"MLP h = {hidden}" if hidden else "direct"
    for lr in RATES[hidden]:
        base, _ = load_tiny()
        torch.manual_seed(0)
        model = apply_peft(base, PrefixConfig(prefix_len=P, reparam_hidden=hidden))
        train_steps(model, train_examples, STEPS, lr)
        loss = val_loss(model, heldout)
        print(f"  {label:11s} lr {lr:g}: {model.report.trainable:7,} trainable, held-out loss {loss:.3f}")
        losses[label, lr] = loss
        if label not in best or loss < best[label][0]:
            best[label] = (loss, model, lr)

mlp_loss, mlp_model, mlp_lr = best[f"MLP h = {HIDDEN}"]
direct_loss, _, direct_lr = best["direct"]
L, kv = cfg.n_layers, cfg.kv_dim
check_equal("direct prefix trainable == 2 L P kv_dim", best["direct"][1].report.trainable, 2 * L * P * kv)
check_equal("MLP trainable == P d + (d h + h) + (h + 1) L 2 kv_dim", mlp_model.report.trainable,
            P * cfg.dim + (cfg.dim * HIDDEN + HIDDEN) + (HIDDEN + 1) * L * 2 * kv)
check_true("both beat the base model: worse of the two held-out losses", max(mlp_loss, direct_loss),
           f"< base {base_loss:.3f}", max(mlp_loss, direct_loss) < base_loss)
at_mlp_rate = losses["direct", mlp_lr]
check_true(f"at the MLP's best rate ({mlp_lr:g}) the direct prefix is far behind: its loss", at_mlp_rate,
           f"> MLP's {mlp_loss:.3f} + 1", at_mlp_rate > mlp_loss + 1)
check_true("the direct prefix's best rate / the MLP's", direct_lr / mlp_lr, ">= 10", direct_lr / mlp_lr >= 10)
check_true("each at its own best rate they are close: |direct - MLP|", abs(direct_loss - mlp_loss), "< 1.0",
           abs(direct_loss - mlp_loss) < 1.0)
check_quoted("the README's three losses", (Path(__file__).resolve().parent / "README.md").read_text(encoding="utf-8"),
             "the direct prefix barely moves ({} vs the MLP's {}); the direct prefix needs a rate ~30× larger ({}), and "
             "with it is about as good ({})", [at_mlp_rate, mlp_loss, direct_lr, direct_loss], 0.005)
print("So at one shared rate the MLP wins clearly (Li & Liang report the direct prefix trains worse); the direct")
print("prefix needs a ~30x larger rate, and with it is about as good after 30 steps here. The MLP moves all layers'")
print("keys and values through shared weights, so one step of a given rate moves the prefix much more.")

print("Fold the trained MLP into plain keys and values: same model, 2 L P kv_dim numbers")
tokens = torch.tensor([heldout[0].input_ids])
mlp_model.eval()
with torch.no_grad():
    before = mlp_model(tokens)
    next(m for m in mlp_model.modules() if isinstance(m, PrefixKV)).fold()
    after = mlp_model(tokens)
check("logits after folding == before", after, before, 1e-4)
check_equal("trainable after folding", mlp_model.report.trainable, 2 * L * P * kv)
print("all checks passed")
