"""Lesson 11, section 1: (IA)^3, three learned vectors that rescale activations (激活缩放).

Checks, in float64 on one layer and on a small decoder: the two placements (output: l * (x W^T + b); feed-forward:
(l * x) W^T + b) against the formulas, identity at init (ones), merging into W and b, the count at LLaMA-7B shape;
then a try-this run: (IA)^3 and LoRA for the same 10 steps on the shipped tiny model.

    PYTHONPATH=. python lessons/11_beyond_the_note/1_ia3.py
Try STEPS = 30 and LR_IA3 = 3e-2 or 3e-1 (a 30-step sweep: 5.43 / 4.04 / 3.92 held-out loss at 3e-2 / 1e-1 / 3e-1).
"""

import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # lessons/
from checks import check, check_equal, check_true  # noqa: E402
from tiny_training import demo_examples, load_tiny, train_steps, val_loss  # noqa: E402

from minipeft.config import ModelConfig
from minipeft.family_registry import build_model
from minipeft.peft import IA3Config, IA3Linear, LoRAConfig, apply_peft, merge_lora

torch.manual_seed(0)
print("1. the two placements, one layer (d_in 6 -> d_out 4, with bias), float64")
linear = torch.nn.Linear(6, 4, bias=True).double()
x = torch.randn(3, 6, dtype=torch.float64)
out_scaled = IA3Linear.from_linear(copy.deepcopy(linear), scales_input=False)
in_scaled = IA3Linear.from_linear(copy.deepcopy(linear), scales_input=True)
check("init: l = 1, the layer is unchanged (output placement)", out_scaled(x), linear(x), 0.0)
check("init: l = 1, the layer is unchanged (input placement)", in_scaled(x), linear(x), 0.0)
with torch.no_grad():
    out_scaled.ia3_scale.copy_(torch.tensor([0.5, 2.0, 1.0, -1.0], dtype=torch.float64))
    in_scaled.ia3_scale.copy_(torch.linspace(0.5, 1.5, 6, dtype=torch.float64))
W, b = linear.weight.detach(), linear.bias.detach()
check("output: y = l * (x W^T + b)", out_scaled(x), out_scaled.ia3_scale * (x @ W.T + b), 1e-12)
check("feed-forward: y = (l * x) W^T + b", in_scaled(x), (in_scaled.ia3_scale * x) @ W.T + b, 1e-12)
check("merged output scale: diag(l) W and l * b", out_scaled.to_linear()(x), out_scaled(x), 1e-12)
check("merged input scale: W diag(l), b unchanged", in_scaled.to_linear()(x), in_scaled(x), 1e-12)

print("2. in a small decoder: k, v outputs and the MLP's inner activation (the input of w2)")
cfg = ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=64, ffn_hidden_dim=48, max_seq_len=32)
torch.manual_seed(1)
base = build_model(cfg).double().eval()
tokens = torch.randint(0, 64, (2, 7))
model = apply_peft(copy.deepcopy(base), IA3Config()).eval()
check("the model starts as the base (bit for bit)", model(tokens), base(tokens), 0.0)
check_equal("trainable = L * (kv + kv + f)", model.report.trainable, cfg.n_layers * (2 * cfg.kv_dim + cfg.ffn_hidden_dim))
with torch.no_grad():
    for p in model.parameters():
        if p.requires_grad:
            p.add_(0.3 * torch.randn_like(p))
    scaled = model(tokens)
check("merge_lora folds the vectors into the weights: same logits", merge_lora(model)(tokens), scaled, 1e-10)

print("3. LLaMA-7B shape (meta device, no memory)")
with torch.device("meta"):
    big = apply_peft(build_model(ModelConfig.from_name("llama-7b")), IA3Config(), trainable_dtype=None)
check_equal("(IA)^3 trainable = 32 * (4096 + 4096 + 11008)", big.report.trainable, 614_400)
with torch.device("meta"):
    big_lora = apply_peft(build_model(ModelConfig.from_name("llama-7b")), LoRAConfig(), trainable_dtype=None)
check_equal("LoRA r = 8 on wq, wv, for scale", big_lora.report.trainable, 4_194_304)

print("4. try this: (IA)^3 and LoRA, 10 steps each on the shipped tiny model")
STEPS, LR_IA3, LR_LORA = 10, 1e-1, 1e-2
tiny, tokenizer = load_tiny()
_, train_examples = demo_examples(tokenizer, "train", n=40)
_, heldout = demo_examples(tokenizer, "heldout", n=24)
before = val_loss(tiny, heldout)
results = {}
for name, config, lr in (("ia3", IA3Config(), LR_IA3), ("lora", LoRAConfig(), LR_LORA)):
    model, _ = load_tiny()
    torch.manual_seed(0)                                                   # the same A init in every run
    model = apply_peft(model, config)
    train_steps(model, train_examples, STEPS, lr, batch_size=4)
    results[name] = (val_loss(model, heldout), model.report.trainable)
    print(f"  {name:4s} lr {lr:g}: {results[name][1]:6,} trainable, held-out loss {before:.3f} -> {results[name][0]:.3f}")
check_equal("(IA)^3 trains L * (kv + kv + f) = 4 * (96 + 96 + 512)", results["ia3"][1], 2_816)
check_true("(IA)^3's held-out loss falls", results["ia3"][0], f"< {before:.3f}", results["ia3"][0] < before)
check_true("LoRA's held-out loss falls", results["lora"][0], f"< {before:.3f}", results["lora"][0] < before)
ratio = results["lora"][1] / results["ia3"][1]
check_true("LoRA trains 7.6x more numbers", ratio, "> 7", ratio > 7)
check_true("over these 10 steps (IA)^3 ends lower than LoRA", results["ia3"][0], f"< LoRA's {results['lora'][0]:.3f}",
           results["ia3"][0] < results["lora"][0])
check("(IA)^3's held-out loss, as README says", results["ia3"][0], 5.705, 0.01)
check("LoRA's held-out loss, as README says", results["lora"][0], 6.314, 0.01)
print("all checks passed")
