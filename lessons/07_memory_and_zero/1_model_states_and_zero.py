"""Lesson 07, step 1: model-state memory of mixed-precision Adam (混合精度), per PEFT method, and under ZeRO
(零冗余优化器) stages 1/2/3 with CPU offload on 8 GPUs, checked against DeepSpeed's own estimators.

Run from the repository root:
    DS_ACCELERATOR=cpu PYTHONPATH=. python lessons/07_memory_and_zero/1_model_states_and_zero.py

The functions `model_state_bytes`, `zero_bytes_per_gpu`, `deepspeed_cold_estimate` and the per-method
trainable counts (`lora_trainable`, ..., reached as `closed_form_trainable(cfg, config)` through each method's
registry entry) are pure (numbers in, numbers out) and live in minipeft/memory.py, so other tools
(tools/compare_methods.py) reuse them; this script checks them.
"""

import contextlib
import io
import os
import re

os.environ.setdefault("DS_ACCELERATOR", "cpu")   # DeepSpeed would otherwise look for a GPU

import torch

from minipeft.config import ModelConfig
from minipeft.memory import deepspeed_cold_estimate, model_state_bytes, zero_bytes_per_gpu
from minipeft.model import Transformer
from minipeft.peft import (AdapterConfig, FullConfig, LlamaAdapterConfig, LoRAConfig, PrefixConfig, PromptConfig,
                           apply_peft, closed_form_trainable)

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # lessons/, for checks.py
from checks import check, check_equal, check_quoted, check_true  # noqa: E402

GiB = 2 ** 30


# ================================================================================================
# The reusable formulas live in minipeft/memory.py (imported above): model_state_bytes, zero_bytes_per_gpu,
# deepspeed_cold_estimate, the per-method trainable counts. Read them there; this script checks them.
# ================================================================================================
# ================================================================================================
# 1. Bytes per parameter
# ================================================================================================
print("1. Mixed-precision Adam: 2 (16-bit weight) + 2 (16-bit grad) + 12 (fp32 master + m + v) = 16 bytes")
# Measure it: one step of torch's Adam on an fp32 copy of a 1000-element parameter.
weight_16 = torch.zeros(1000, dtype=torch.bfloat16, requires_grad=True)
weight_16.grad = torch.ones(1000, dtype=torch.bfloat16)
master = weight_16.detach().float().requires_grad_()                 # fp32 master copy
master.grad = weight_16.grad.float()
optimizer = torch.optim.Adam([master])
optimizer.step()
state_bytes = sum(t.numel() * t.element_size() for t in optimizer.state[master].values() if t.numel() > 1)
measured = (weight_16.numel() * weight_16.element_size() + weight_16.grad.numel() * weight_16.grad.element_size()
            + master.numel() * master.element_size() + state_bytes) / 1000
check("measured bytes per parameter (bf16 weight + grad, fp32 master, Adam m and v)", measured, 16, 0)
check_equal("model_state_bytes(1, 1)['total']", model_state_bytes(1, 1)["total"], 16)
check_equal("model_state_bytes(1, 0)['total'] (a frozen parameter)", model_state_bytes(1, 0)["total"], 2)

# ================================================================================================
# 2. Full fine-tuning of 7B vs each PEFT method
# ================================================================================================
cfg = ModelConfig.from_name("llama-7b")
methods = {
    "full": FullConfig(),
    "lora": LoRAConfig(rank=8, alpha=16, targets=("wq", "wv")),
    "prompt": PromptConfig(prompt_len=20, init="random"),
    "prefix": PrefixConfig(prefix_len=10, reparam_hidden=None),
    "prefix+mlp": PrefixConfig(prefix_len=10, reparam_hidden=512),
    "adapter": AdapterConfig(bottleneck=64),
    "llama_adapter": LlamaAdapterConfig(prompt_len=10, adapter_layers=30),
}
print("2. LLaMA-7B, one GPU, model states only (trainable counts from apply_peft on the meta device)")
rows = {}
for name, peft_config in methods.items():
    with torch.device("meta"):                                      # shapes only, no memory
        model = apply_peft(Transformer(cfg), peft_config)
    report = model.report
    formula = closed_form_trainable(cfg, peft_config)
    check_equal(f"{name}: apply_peft trainable == closed form", report.trainable, formula)
    states = model_state_bytes(report.total, report.trainable)
    per_tensor = sum(p.numel() * (16 if p.requires_grad else 2) for p in model.parameters())   # tensor by tensor
    check_equal(f"{name}: model_state_bytes == sum over tensors of 16 or 2 bytes", states["total"], per_tensor)
    rows[name] = (report, states)
    if name == "full":
        largest_layer = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())

print(f"   {'method':14s} {'trainable':>13s} {'%':>8s} {'weights':>9s} {'grads':>8s} {'Adam':>8s} {'total GiB':>10s}")
for name, (report, states) in rows.items():
    print(f"   {name:14s} {report.trainable:13,d} {report.percent:8.3f} {states['weights'] / GiB:9.2f}"
          f" {states['gradients'] / GiB:8.2f} {states['optimizer'] / GiB:8.2f} {states['total'] / GiB:10.2f}")
psi = 6_738_415_616
check_equal("full: 16 * 6,738,415,616 bytes", rows["full"][1]["total"], 107_814_649_856)
check("full fine-tuning needs 100.4 GiB of model states", rows["full"][1]["total"] / GiB, 100.41, 0.01)
check_equal("lora: 2 * (psi + 4,194,304) + 14 * 4,194,304", rows["lora"][1]["total"],
            2 * (psi + 4_194_304) + 14 * 4_194_304)
lora_states, frozen_16bit = rows["lora"][1]["total"], 2 * psi
check("lora: model states 12.61 GiB", lora_states / GiB, 12.61, 0.005)
check("lora: the frozen 16-bit base weights, 2 psi = 12.55 GiB", frozen_16bit / GiB, 12.55, 0.005)
check("lora: LoRA's own weights, gradients and Adam states, 16 * 4,194,304 = 0.06 GiB", (lora_states - frozen_16bit) / GiB,
      0.06, 0.005)
check_equal("lora: the optimizer state is 12 bytes per trainable parameter", rows["lora"][1]["optimizer"], 12 * 4_194_304)
check("lora: of which the Adam state, 0.05 GiB", rows["lora"][1]["optimizer"] / GiB, 0.05, 0.005)
check("lora: 0.062% of the parameters are trainable", rows["lora"][0].percent, 0.062, 0.0005)
frozen_share = {name: 2 * psi / rows[name][1]["total"] for name in rows if name != "full"}
for name in ("lora", "prompt", "prefix", "llama_adapter"):
    check_true(f"{name}: the frozen 16-bit base weights are > 99% of the model states", f"{frozen_share[name]:.2%}",
               "> 99%", frozen_share[name] > 0.99)
check("adapter: the frozen 16-bit base weights, 96.1% of the states", frozen_share["adapter"], 0.961, 0.0005)
check("prefix+mlp: the frozen 16-bit base weights, 86.0% of the states (the MLP is trained)",
      frozen_share["prefix+mlp"], 0.860, 0.0005)
for folder, phrase, values in (
        ("07_memory_and_zero", "over 99 % for LoRA, prompt, prefix and LLaMA-Adapter (LoRA's Adam state is {} GiB), {} % "
         "for adapters (适配器), {} % for prefix tuning", [rows["lora"][1]["optimizer"] / GiB, 100 * frozen_share["adapter"],
                                                           100 * frozen_share["prefix+mlp"]]),
        ("06_lora", "the 7B model's training state is {} GiB. Of that, {} GiB are the frozen 16-bit base weights",
         [lora_states / GiB, frozen_16bit / GiB]),
        ("06_lora", "(16-bit weight and gradient, fp32 master copy, Adam's m and v): {} GiB",
         (lora_states - frozen_16bit) / GiB)):
    readme = (Path(__file__).resolve().parents[1] / folder / "README.md").read_text(encoding="utf-8")
    check_quoted(f"{folder}/README.md", readme, phrase, values, 0.05 if "%" in phrase else 0.005)

# ================================================================================================
# 3. ZeRO on 8 GPUs: full fine-tuning of 7B
# ================================================================================================
N = 8
print(f"3. ZeRO on {N} GPUs, full fine-tuning of 7B (psi = {psi:,}), the paper's accounting")
expected = {0: 16 * psi, 1: 2 * psi + 2 * psi + 12 * psi / N, 2: 2 * psi + (2 + 12) * psi / N, 3: 16 * psi / N}
for stage in (0, 1, 2, 3):
    got = zero_bytes_per_gpu(psi, psi, N, stage)["gpu"]
    print(f"   stage {stage}: {got / GiB:7.2f} GiB per GPU")
    check(f"stage {stage} per GPU", got, expected[stage], 1)
offload = zero_bytes_per_gpu(psi, psi, N, 3, offload_optimizer=True)
print(f"   stage 3 + offload optimizer: GPU {offload['gpu'] / GiB:.2f} GiB, CPU {offload['cpu'] / GiB:.2f} GiB")
check("stage 3 + offload optimizer: GPU keeps 2 psi / N", offload["gpu"], 2 * psi / N, 1)
both = zero_bytes_per_gpu(psi, psi, N, 3, offload_optimizer=True, offload_params=True)
check("stage 3 + offload both: GPU keeps nothing permanently", both["gpu"], 0, 1)
check("stage 3 + offload both: CPU holds 16 psi", both["cpu"], 16 * psi, 1)
# Communication per GPU per step, in parameters' worth: data parallel all-reduces the gradients
# (= reduce-scatter Psi + all-gather Psi); ZeRO-3 reduce-scatters the gradients (Psi) and all-gathers the
# weights twice, for forward and again for backward (2 Psi): 3 Psi / 2 Psi = 1.5x.
check("ZeRO-3 communication / data parallel = (1 + 2) / (1 + 1) = 1.5", (1 + 2) / (1 + 1), 1.5, 0)
lora_trainable, lora_total = rows["lora"][0].trainable, rows["lora"][0].total
lora3 = zero_bytes_per_gpu(lora_total, lora_trainable, N, 3)["gpu"]
print(f"   LoRA under stage 3: {lora3 / GiB:.2f} GiB per GPU; stage 0 (no ZeRO): "
      f"{zero_bytes_per_gpu(lora_total, lora_trainable, N, 0)['gpu'] / GiB:.2f} GiB")
check("LoRA stage 3 == LoRA single-GPU total / 8", lora3, rows["lora"][1]["total"] / N, 1)

# ================================================================================================
# 4. DeepSpeed's estimators
# ================================================================================================
print(f"4. DeepSpeed's estimators (*_all_cold), 1 node x {N} GPUs; largest layer = {largest_layer:,} params")
check_equal("largest layer = the embedding (or output) matrix, V * d", largest_layer, 32000 * 4096)
from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs_all_cold  # noqa: E402
from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs_all_cold  # noqa: E402
# The functions the *_all_cold ones print from; they return exact bytes (cpu, gpu[, largest layer]).
from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs  # noqa: E402
from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs  # noqa: E402


def parse_table(printed: str) -> dict:
    """The estimator's printed table -> {(offload_optimizer, offload_params, zero_init): (cpu_GiB, gpu_GiB)}.
    (DeepSpeed prints "GB" for bytes / 2**30.)"""
    table = {}
    for cpu_gb, gpu_gb, options in re.findall(r"([\d.]+)GB \|\s+([\d.]+)GB \| (.*)", printed):
        offload_param = re.search(r"offload_param=(\S+?),?(\s|$)", options)
        offload_opt = re.search(r"offload_optimizer=(\S+?),?(\s|$)", options)
        offload_param = offload_param is not None and offload_param.group(1) != "none"   # "cpu" or an enum name
        offload_opt = offload_opt is not None and offload_opt.group(1) != "none"
        zero_init = "zero_init=0" not in options
        table[(offload_opt, offload_param, zero_init)] = (float(cpu_gb), float(gpu_gb))
    return table


captured = io.StringIO()
with contextlib.redirect_stdout(captured):
    estimate_zero3_model_states_mem_needs_all_cold(total_params=psi, largest_layer_params=largest_layer,
                                                   num_gpus_per_node=N, num_nodes=1)
zero3 = parse_table(captured.getvalue())
captured = io.StringIO()
with contextlib.redirect_stdout(captured):
    estimate_zero2_model_states_mem_needs_all_cold(total_params=psi, num_gpus_per_node=N, num_nodes=1)
zero2 = parse_table(captured.getvalue())
assert len(zero3) == 6 and len(zero2) == 2, f"could not read DeepSpeed's tables:\n{captured.getvalue()}"

cases = [("ZeRO-3 offload params + optimizer", 3, True, True, zero3[(True, True, True)]),
         ("ZeRO-3 offload optimizer", 3, True, False, zero3[(True, False, True)]),
         ("ZeRO-3 no offload", 3, False, False, zero3[(False, False, True)]),
         ("ZeRO-2 offload optimizer", 2, True, False, zero2[(True, False, True)]),
         ("ZeRO-2 no offload", 2, False, False, zero2[(False, False, True)])]
print(f"   {'':34s} {'DeepSpeed CPU / GPU GiB':>24s} {'paper formula GPU GiB':>22s}")
for name, stage, off_opt, off_par, (ds_cpu, ds_gpu) in cases:
    ours = deepspeed_cold_estimate(psi, largest_layer, N, stage, off_opt, off_par)
    paper = zero_bytes_per_gpu(psi, psi, N, stage, off_opt, off_par)
    print(f"   {name:34s} {ds_cpu:10.2f} / {ds_gpu:6.2f}      {paper['gpu'] / GiB:10.2f}")
    check(f"{name}: deepspeed_cold_estimate GPU == DeepSpeed", ours["gpu"] / GiB, ds_gpu, 0.006)
    check(f"{name}: deepspeed_cold_estimate CPU == DeepSpeed", ours["cpu"] / GiB, ds_cpu, 0.006)
    if stage == 3:
        exact = estimate_zero3_model_states_mem_needs(psi, largest_layer, N, 1, cpu_offload=off_opt,
                                                      cpu_offload_params=off_par, zero_init=True)
    else:
        exact = estimate_zero2_model_states_mem_needs(psi, N, 1, cpu_offload=off_opt)
    check(f"{name}: same to the byte (cpu, gpu)", abs(int(ours["cpu"]) - exact[0]) + abs(int(ours["gpu"]) - exact[1]), 0, 0)

# Where DeepSpeed and the paper differ, and by exactly how much.
paper3 = zero_bytes_per_gpu(psi, psi, N, 3)["gpu"]
ds3 = deepspeed_cold_estimate(psi, largest_layer, N, 3, False)["gpu"]
check("ZeRO-3: DeepSpeed - paper == 4 * largest layer + (18 - 16) * psi / N", ds3 - paper3,
      4 * largest_layer + 2 * psi / N, 1)
paper2 = zero_bytes_per_gpu(psi, psi, N, 2)["gpu"]
ds2 = deepspeed_cold_estimate(psi, largest_layer, N, 2, False)["gpu"]
check("ZeRO-2: DeepSpeed - paper == 4 * psi / N (the fp32 gradient partition)", ds2 - paper2, 4 * psi / N, 1)
# The figures measured in /work/shared/notes/deepspeed-on-cpu.md:
check("notes: ZeRO-3 no offload 14.61 GB per GPU", zero3[(False, False, True)][1], 14.61, 0.005)
check("notes: ZeRO-2 no offload 26.67 GB per GPU", zero2[(False, False, True)][1], 26.67, 0.005)

print("all checks passed")
