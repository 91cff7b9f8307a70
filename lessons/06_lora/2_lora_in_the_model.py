"""Lesson 06, step 2: LoRA inside the decoder: starts as the base model, equals the base model with
W0 + Delta W, merges into plain weights, and LLaMA-7B's trainable count (4,194,304 at r = 8 on wq, wv).

Run from the repository root:
    PYTHONPATH=. python lessons/06_lora/2_lora_in_the_model.py
"""

import copy

import torch

from minipeft.config import ModelConfig
from minipeft.model import Transformer
from minipeft.peft import LoRAConfig, LoRALinear, apply_peft, merge_lora
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # lessons/, for checks.py
from checks import check, check_equal, check_quoted  # noqa: E402


torch.manual_seed(0)
cfg = ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=50, multiple_of=16)
base = Transformer(cfg).eval()
base.init_weights(std=0.3)                                           # O(1) logits so that differences show
reference_base = copy.deepcopy(base)                                 # an untouched copy of the base
tokens = torch.randint(0, cfg.vocab_size, (2, 6))
base_logits = reference_base(tokens)

rank, alpha = 4, 8.0
model = apply_peft(base, LoRAConfig(rank=rank, alpha=alpha, targets=("wq", "wv")))
print(f"tiny model (d={cfg.dim}, kv_dim={cfg.kv_dim}, L={cfg.n_layers}) with LoRA r={rank} on wq, wv: {model.report}")

# ------------------------------------------------------------------------------------------------
print("1. Only A and B train: L * r * ((d + d) + (d + kv_dim)) parameters")
names = [name for name, p in model.named_parameters() if p.requires_grad]
assert all(name.endswith(("lora_A", "lora_B")) for name in names), f"unexpected trainable parameters: {names}"
check_equal("trainable == 2 * 4 * ((32 + 32) + (32 + 16))", model.report.trainable,
            cfg.n_layers * rank * ((cfg.dim + cfg.dim) + (cfg.dim + cfg.kv_dim)))
check("B = 0: the LoRA model starts exactly as the base model", model(tokens), base_logits, 0)

# ------------------------------------------------------------------------------------------------
print("2. With trained (here: random) B, the model == the base model with W0 + (alpha/r) B A")
with torch.no_grad():
    for module in model.modules():
        if isinstance(module, LoRALinear):
            module.lora_B.normal_(0, 0.3)
lora_logits = model(tokens)
edited = copy.deepcopy(reference_base)                               # float64 edit of the plain base
edited_state = {}
for name, module in model.base.named_modules():
    if isinstance(module, LoRALinear):
        B, A = module.lora_B.detach().double(), module.lora_A.detach().double()
        edited_state[name + ".weight"] = module.weight.detach().double() + (alpha / rank) * B @ A
with torch.no_grad():
    for name, weight in edited_state.items():
        edited.get_parameter(name).copy_(weight.float())
check("LoRA logits == base with W0 + s B A (computed in float64)", lora_logits, edited(tokens), 5e-5)
assert (lora_logits - base_logits).abs().max() > 1e-2, "a nonzero B should change the output"

print("3. Merging: W = W0 + Delta W in place, same outputs, no extra cost at inference")
one = model.base.layers[0].attention.wq
W0 = one.weight.detach().clone()
one.merge()
check("LoRALinear.merge(): weight == W0 + s B A", one.weight, W0.double() + one.delta_weight().double(), 1e-6)
check("merged model gives the same logits", model(tokens), lora_logits, 5e-5)
one.unmerge()
check("unmerge() restores W0", one.weight, W0, 1e-6)
merged = merge_lora(model)                                           # a plain Transformer again
assert not any(isinstance(m, LoRALinear) for m in merged.modules()), "merge_lora should leave plain nn.Linear"
check("merge_lora(model): plain Transformer, same logits", merged(tokens), lora_logits, 5e-5)
check_equal("merged model has the base's parameter count", merged.num_parameters(), reference_base.num_parameters())

# ------------------------------------------------------------------------------------------------
print("4. LLaMA-7B: r = 8 on wq and wv, built on the meta device")
cfg7 = ModelConfig.from_name("llama-7b")
with torch.device("meta"):
    model7 = apply_peft(Transformer(cfg7), LoRAConfig(rank=8, alpha=16, targets=("wq", "wv")))
print(f"   {model7.report}")
check_equal("32 layers * 2 matrices * 8 * (4096 + 4096)", 32 * 2 * 8 * (4096 + 4096), 4_194_304)
check_equal("apply_peft trainable", model7.report.trainable, 4_194_304)
base7 = model7.report.total - model7.report.trainable                 # the base's own parameters
check_equal("the base's parameters (report total - trainable)", base7, 6_738_415_616)
check("trainable / the base's parameters: 0.0622 %", 100 * model7.report.trainable / base7, 0.0622, 5e-5)
check("trainable / (base + LoRA), as the report prints: 0.0622 %", model7.report.percent, 0.0622, 5e-5)
check_quoted("the README's two denominators", (Path(__file__).resolve().parent / "README.md").read_text(encoding="utf-8"),
             "Both give 0.062 %: {} % vs {} %", [100 * model7.report.trainable / base7, model7.report.percent], 5e-6)
all_targets = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")
with torch.device("meta"):
    model7_all = apply_peft(Transformer(cfg7), LoRAConfig(rank=8, alpha=16, targets=all_targets))
per_layer = 4 * 8 * (4096 + 4096) + 3 * 8 * (4096 + 11008)
check_equal("every linear of every block: 32 * (4 * 8 * 8192 + 3 * 8 * 15104)", model7_all.report.trainable,
            32 * per_layer)
print(f"   ({model7_all.report.percent:.3f}% of the parameters; rank r stays the only knob)")

print("all checks passed")
