"""Lesson 08: check the two tables that tools/compare_methods.py wrote into lessons/08_comparison/results.json.

Run from the repository root:
    PYTHONPATH=. python lessons/08_comparison/1_check_tables.py

1. The computed LLaMA-7B table, against lesson 07's formulas written out here by hand: trainable counts
   from apply_peft on the meta device and from the closed forms of lessons 02-06; Adam's 12 bytes per
   trainable parameter; ZeRO-3 with the optimizer and the parameters offloaded leaves no model states on
   the GPU and 2 Psi + 14 Psi_t on the CPU; activations of 26d + 8f + 4H + 8 bytes per token in a trainable
   block and 16d + 6f + 4H + 8 in a frozen one.
2. The trained table: each method's trainable count equals apply_peft's on the base the run used (built on
   the meta device from its config.json), every number is finite, the best validation loss is the lowest
   point of its curve, and results.md holds the rows of results.json.
"""

import dataclasses
import json
import math
from pathlib import Path

import torch

from minipeft.config import ModelConfig
from minipeft.memory import closed_form_trainable
from minipeft.model import Transformer
from minipeft.peft import PEFT_CONFIGS, apply_peft

import sys

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # lessons/, for checks.py
from checks import check  # noqa: E402

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
GiB = 2 ** 30


results = json.loads((HERE / "results.json").read_text())
markdown = (HERE / "results.md").read_text()

# ================================================================================================
print("1. LLaMA-7B, ZeRO-3 + CPU offload of optimizer and parameters, 8 GPUs, batch 4 x 512, fp16")
table = results["table_7b"]
cfg = ModelConfig.from_name(table["model"])
d, f, H, L, kv, V = cfg.dim, cfg.ffn_hidden_dim, cfg.n_heads, cfg.n_layers, cfg.kv_dim, cfg.vocab_size
B, T = table["recipe"]["micro_batch"], table["recipe"]["seq_len"]
psi = 6_738_415_616
check("LLaMA-7B parameters (12 L d^2-ish + 2 V d, exactly)", closed_form_trainable(cfg, "full"), psi)
trainable_block = 26 * d + 8 * f + 4 * H + 8            # lesson 07, step 2
frozen_block = 16 * d + 6 * f + 4 * H + 8
outside = 4 * cfg.head_dim + 8 + 8 * d + 4              # cos/sin + token ids + final norm and output input
for method, row in table["rows"].items():
    print(f" {method}  {row['hyper']}")
    config = PEFT_CONFIGS[method](**{k: tuple(v) if isinstance(v, list) else v for k, v in row["hyper"].items()})
    with torch.device("meta"):
        report = apply_peft(Transformer(cfg), config).report
    hyper = {k: v for k, v in dataclasses.asdict(config).items() if k in ("rank", "targets", "prompt_len",
                                                                         "prefix_len", "reparam_hidden",
                                                                         "bottleneck", "adapter_layers")}
    if method == "lora":
        hyper.pop("prompt_len", None)
    check("trainable == apply_peft's report", row["trainable"], report.trainable)
    check("trainable == closed form", row["trainable"], closed_form_trainable(cfg, method, **hyper))
    check("total == Psi + trainable (Psi for full)", row["total"], psi + (0 if method == "full" else row["trainable"]))
    check("optimizer state == 12 bytes x trainable", row["optimizer_state_bytes"], 12 * row["trainable"])
    check("GPU model states == 0 (all offloaded)", row["model_states_gpu_bytes"], 0)
    check("CPU == 2 x total + 14 x trainable", row["cpu_node_bytes"], 2 * row["total"] + 14 * row["trainable"])
    tokens = B * (T + (config.prompt_len if method == "prompt" else 0))
    if method == "full":
        activations = B * T * (L * trainable_block + outside)
    else:
        blocks = config.adapter_layers if method == "llama_adapter" else L
        activations = tokens * (blocks * frozen_block + outside)
    check("activations (lesson 07's per-token block formulas)", row["activation_bytes"], activations)
    check("logits, fp32 B x T x V", row["logits_bytes"], 4 * B * T * V)
    largest = V * d if method != "prefix" else max(V * d, (config.reparam_hidden + 1) * L * 2 * kv)  # the MLP's output layer + bias
    check("gather buffer == 4 bytes x largest layer", row["gather_buffer_bytes"], 4 * largest)
    check("per GPU == buffer + activations + logits", row["per_gpu_bytes"],
          4 * largest + activations + 4 * B * T * V)
full_row, lora_row = table["rows"]["full"], table["rows"]["lora"]
print(f"   full fine-tuning {full_row['per_gpu_bytes'] / GiB:.2f} GiB per GPU, LoRA {lora_row['per_gpu_bytes'] / GiB:.2f}:"
      " with both offloads the GPU holds activations, not model states")
check("full: 11.95 GiB of activations at batch 4 x 512", round(full_row["activation_bytes"] / GiB, 2), 11.95, 0.005)
check("full: 100.41 GiB of model states on the CPU", round(full_row["cpu_node_bytes"] / GiB, 2), 100.41, 0.005)

# ================================================================================================
print("2. The trained table")
settings = results["settings"]
base_config_path = Path(settings["base"]) / "config.json"
if not base_config_path.is_absolute():
    base_config_path = ROOT / base_config_path
base_cfg = ModelConfig.load(base_config_path)
steps = {r["steps"] for r in results["results"].values()}
tokens = {r["train_tokens"] for r in results["results"].values()}
check("every method took the same number of steps", len(steps), 1)
check("every method saw the same training tokens", len(tokens), 1)
for method, r in results["results"].items():
    hyper = settings["method_hyper"][method]
    config = PEFT_CONFIGS[method](**{k: tuple(v) if isinstance(v, list) else v for k, v in hyper.items()})
    with torch.device("meta"):
        report = apply_peft(Transformer(base_cfg), config).report
    check(f"{method}: trainable == apply_peft's report on the base", r["trainable"], report.trainable)
    numbers = [r[k] for k in ("final_train_loss", "best_val_loss", "final_val_loss", "tokens_per_s", "exact_match")]
    check(f"{method}: all numbers finite", sum(not math.isfinite(x) for x in numbers), 0)
    check(f"{method}: best val loss == lowest point of its curve", r["best_val_loss"],
          min(v for _, v in r["curves"]["val"][1:]))
    row_start = f"| {r['lr']:g} | {r['trainable']:,} | {r['trainable_percent']:.3f} | {r['final_train_loss']:.4f} |"
    check(f"{method}: its row is in results.md", int(row_start in markdown), 1)

# ================================================================================================
print("3. The README's side-by-side generations and its 150 vs 600 steps table")
readme = (HERE / "README.md").read_text()
heldout = json.loads((ROOT / "minipeft" / "assets" / "demo_data" / "heldout.json").read_text(encoding="utf-8"))


def cell(text):
    return " ".join(text.replace("|", "/").split()) or "(empty)"


for i, record in enumerate(heldout[:8]):
    row = f"| {cell(record['input'])} | {cell(record['output'])} | " + " | ".join(
        cell(r["generations"][i]) for r in results["results"].values()) + " |"
    check(f"generations of held-out record {i} are the README's row {i}", int(row in readme), 1)
repo_readme = (ROOT / "README.md").read_text()
names = {"full": "full fine-tuning", "adapter": "adapter (Houlsby)", "lora": "LoRA", "prefix": "prefix tuning",
         "llama_adapter": "LLaMA-Adapter", "prompt": "prompt tuning"}
budget_table = readme.split("| method | 150 steps (table 1) | 600 steps (README) |")[1].split("\n\n")[0]
for method, name in names.items():
    line = next(l for l in budget_table.splitlines() if l.startswith(f"| {name} | "))
    short, long = (float(x) for x in line.strip("| ").split(" | ")[1:])
    check(f"{method}: 150-step column == results.json's final val loss", short,
          round(results["results"][method]["final_val_loss"], 3), 0)
    check(f"{method}: 600-step column appears in the repository README's table", int(f"-> {long:.3f} |" in repo_readme), 1)

# ================================================================================================
print("4. lessons/README.md's 'trainable at 7B' column == closed_form_trainable")
index = (ROOT / "lessons" / "README.md").read_text()
rows_7b = {"full fine-tuning": ("full", {}), "LoRA r = 8": ("lora", {"rank": 8, "targets": ("wq", "wv")}),
           "prompt tuning P = 20": ("prompt", {"prompt_len": 20}),
           "prefix tuning P = 10": ("prefix", {"prefix_len": 10, "reparam_hidden": None}),
           "Houlsby adapter m = 64": ("adapter", {"bottleneck": 64}),
           "LLaMA-Adapter K = 10": ("llama_adapter", {"prompt_len": 10, "adapter_layers": 30})}
for label, (method, hyper) in rows_7b.items():
    line = next(l for l in index.splitlines() if l.startswith(f"| {label}"))
    shown = int(line.rstrip(" |").split(" | ")[-1].split(" ")[0].replace(",", ""))
    check(f"{label}: {shown:,}", shown, closed_form_trainable(cfg, method, **hyper))
prefix_line = next(l for l in index.splitlines() if l.startswith("| prefix tuning P = 10"))
check("prefix tuning with its MLP while training", int("136,618,496" in prefix_line and
      closed_form_trainable(cfg, "prefix", prefix_len=10, reparam_hidden=512) == 136_618_496), 1)

print("all checks passed")
