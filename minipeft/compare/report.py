"""What tools/compare_methods.py writes: the tables, the per-task scores, the generations side by side, the loss
curves, and the computed memory table of each 7B base under the reference recipe.

Per method and base (`answer_scores`, from the greedy generations of the held-out records):
    exact match       share of records whose generated answer (stripped) equals the expected one
    per task          the same within each task (a demo task has one fixed instruction: make_demo_data.TASKS)
    answer chars      mean length in characters of the generated answers (stripped), beside the expected mean
    train/val gap     final validation loss - final training loss (nats per response token)
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_demo_data import TASKS  # noqa: E402
from minipeft.fileio import write_atomic, write_text_atomic  # noqa: E402

# The order of the reference table, with the Houlsby adapter as a sixth.
METHOD_ORDER = ("full", "lora", "llama_adapter", "prompt", "prefix", "adapter")
METHOD_TITLES = {"full": "full fine-tuning", "lora": "LoRA", "llama_adapter": "LLaMA-Adapter",
                 "prompt": "prompt tuning", "prefix": "prefix tuning", "adapter": "adapter (Houlsby)"}
TASK_OF_INSTRUCTION = {instruction: task for task, instruction in TASKS.items()}
GiB = 2 ** 30


def fmt(value, spec):
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def percent(value) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def shipped(path: str) -> str:
    import minipeft
    return str(Path(minipeft.assets_dir()) / path)


def display_path(path) -> Optional[str]:
    """A path relative to the repository root when it lies inside it (so results.json is portable)."""
    if path is None:
        return None
    root = Path(__file__).resolve().parents[1]
    try:
        return str(Path(path).resolve().relative_to(root))
    except ValueError:
        return str(path)


# ---- scores of the generations -------------------------------------------------------------------
def task_of(instruction: str) -> str:
    return TASK_OF_INSTRUCTION.get(instruction, "other")


def answer_scores(records: Sequence, texts: Sequence[str]) -> dict:
    """Per-task accuracy and answer lengths of greedy generations `texts` for `records` (data.Record)."""
    if not texts:
        return {"per_task": {}, "answer_chars_mean": None, "expected_chars_mean": None}
    per_task: Dict[str, List[bool]] = {}
    for record, text in zip(records, texts):
        per_task.setdefault(task_of(record.instruction), []).append(text.strip() == record.output.strip())
    return {"per_task": {task: sum(hits) / len(hits) for task, hits in sorted(per_task.items())},
            "answer_chars_mean": sum(len(t.strip()) for t in texts) / len(texts),
            "expected_chars_mean": sum(len(r.output.strip()) for r in records[:len(texts)]) / len(texts)}


# ---- one base ------------------------------------------------------------------------------------
def results_table(results: Dict[str, dict]) -> str:
    lines = ["| method | lr | trainable | % | final train loss | best val loss (epoch) | final val loss | "
             "exact match | tokens/s | peak memory |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for method in (m for m in METHOD_ORDER if m in results):
        r = results[method]
        memory = "-" if r["peak_memory_bytes"] is None else f"{r['peak_memory_bytes'] / 2**20:,.0f} MiB"
        lines.append(
            f"| {METHOD_TITLES[method]} | {r['lr']:g} | {r['trainable']:,} | {r['trainable_percent']:.3f} | "
            f"{r['final_train_loss']:.4f} | {r['best_val_loss']:.4f} ({r['best_val_epoch']:.2f}) | "
            f"{r['final_val_loss']:.4f} | {percent(r['exact_match'])} | {r['tokens_per_s']:,.0f} | {memory} |")
    return "\n".join(lines)


def plot_curves(results: Dict[str, dict], path: Path, title: str, axes=None) -> None:
    """Training and validation curves of every method; into `axes` (a pair) when given, else a new PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    own = axes is None
    if own:
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    ax_train, ax_val = axes
    for method in (m for m in METHOD_ORDER if m in results):
        curves = results[method]["curves"]
        line, = ax_train.plot(*zip(*curves["train"]), marker=".", label=METHOD_TITLES[method])
        ax_val.plot(*zip(*curves["val"]), marker=".", color=line.get_color(), label=METHOD_TITLES[method])
        best = (results[method]["best_val_epoch"], results[method]["best_val_loss"])
        ax_val.plot(*best, marker="o", markersize=9, markerfacecolor="none", color=line.get_color())
    ax_train.set_title("training loss (mean per evaluation interval)" if own else f"{title}: training loss", fontsize=9)
    ax_val.set_title("validation loss (circle: lowest)" if own else f"{title}: validation loss", fontsize=9)
    for ax in (ax_train, ax_val):
        ax.set_xlabel("epoch")
        ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
    ax_train.set_ylabel("loss (nats per response token)")
    ax_val.legend(fontsize=8)
    if own:
        fig.suptitle(title, fontsize=9)
        fig.tight_layout()
        save_figure(fig, path)


def save_figure(fig, path: Path) -> None:
    import matplotlib.pyplot as plt
    write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)


# ---- several bases -------------------------------------------------------------------------------
def base_method_results(bases: Dict[str, dict]):
    """(base label, method, its result) for every base, methods in the reference table's order."""
    for label, run in bases.items():
        for method in (m for m in METHOD_ORDER if m in run["results"]):
            yield label, method, run["results"][method]


def bases_table(bases: Dict[str, dict]) -> str:
    """One row per base and method: the numbers a rerun reproduces bit for bit (no timings)."""
    lines = ["| base | method | lr | trainable (%) | final train loss | held-out loss (best, epoch) | train/val gap | "
             "exact match | answer chars (expected) |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for label, method, r in base_method_results(bases):
        lines.append(
            f"| {label} | {METHOD_TITLES[method]} | {r['lr']:g} | {r['trainable']:,} ({r['trainable_percent']:.2f}) | "
            f"{r['final_train_loss']:.4f} | {r['final_val_loss']:.4f} ({r['best_val_loss']:.4f}, "
            f"{r['best_val_epoch']:.2f}) | {r['train_val_gap']:+.4f} | {percent(r['exact_match'])} | "
            f"{fmt(r['answer_chars_mean'], '.1f')} ({fmt(r['expected_chars_mean'], '.1f')}) |")
    return "\n".join(lines)


def per_task_table(bases: Dict[str, dict]) -> str:
    tasks = sorted({t for run in bases.values() for r in run["results"].values() for t in r["per_task"]})
    lines = ["| base | method | " + " | ".join(tasks) + " |", "| --- | --- |" + " ---: |" * len(tasks)]
    for label, method, r in base_method_results(bases):
        lines.append(f"| {label} | {METHOD_TITLES[method]} | "
                     + " | ".join(percent(r["per_task"].get(t)) for t in tasks) + " |")
    return "\n".join(lines)


def cost_table(bases: Dict[str, dict]) -> str:
    """Timings and memory: these differ from run to run (the machine is shared), the other tables do not."""
    lines = ["| base | method | training seconds | tokens/s | peak memory |", "| --- | --- | ---: | ---: | ---: |"]
    for label, method, r in base_method_results(bases):
        memory = "-" if r["peak_memory_bytes"] is None else f"{r['peak_memory_bytes'] / 2**20:,.0f} MiB"
        lines.append(f"| {label} | {METHOD_TITLES[method]} | {r['train_seconds']:.0f} | {r['tokens_per_s']:,.0f} | "
                     f"{memory} |")
    return "\n".join(lines)


def answer_cell(text: str) -> str:
    """One answer as a Markdown table cell: a code span (double backticks when the answer has one), | escaped,
    line breaks shown as ⏎."""
    shown = text.strip().replace("|", "\\|").replace("\n", "⏎") or " "
    return f"`` {shown} ``" if "`" in shown else f"`{shown}`"


def generations_markdown(bases: Dict[str, dict], records: Sequence, per_task: int = 2) -> str:
    """The first `per_task` held-out records of each task: the expected answer and every base x method's."""
    chosen, seen = [], {}
    for index, record in enumerate(records):
        task = task_of(record.instruction)
        if seen.get(task, 0) < per_task:
            seen[task] = seen.get(task, 0) + 1
            chosen.append(index)
    methods = [m for m in METHOD_ORDER if any(m in run["results"] for run in bases.values())]
    out = []
    for index in chosen:
        record = records[index]
        out.append(f"**{task_of(record.instruction)}** (record {index}): {record.instruction} / input `{record.input}` / "
                   f"expected {answer_cell(record.output)}\n")
        out.append("| base | " + " | ".join(METHOD_TITLES[m] for m in methods) + " |")
        out.append("| --- |" + " --- |" * len(methods))
        for label, run in bases.items():
            texts = [run["results"][m]["generations"] for m in methods if m in run["results"]]
            out.append(f"| {label} | " + " | ".join(answer_cell(t[index]) if index < len(t) else "-" for t in texts) + " |")
        out.append("")
    return "\n".join(out)


def plot_bases(bases: Dict[str, dict], path: Path) -> None:
    """One row of (training, validation) curves per base."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, grid = plt.subplots(len(bases), 2, figsize=(11, 3.6 * len(bases)), squeeze=False)
    for row, (label, run) in zip(grid, bases.items()):
        plot_curves(run["results"], path, label, axes=row)
    fig.tight_layout()
    save_figure(fig, path)


def write_bases_report(bases: Dict[str, dict], out: Path, command: str, wall_seconds: float, *,
                       models_7b: Sequence[str], jobs: int, plot: bool = True) -> None:
    """--out/results.json, results.md, generations.md and loss_curves.png for all bases together."""
    from minipeft.data import Record
    records = [Record(**r) for r in next(iter(bases.values()))["records"]]
    tables_7b = {name: table_7b(name) for name in models_7b}
    shared = {k: v for k, v in next(iter(bases.values()))["settings"].items() if k not in ("base", "family", "method_hyper")}
    everything = {"command": command, "machine": machine_description(torch.get_num_threads()),
                  "jobs": jobs, "settings": shared,
                  "bases": {label: {k: v for k, v in run.items() if k not in ("command", "identity", "machine", "table_7b", "records")}
                            for label, run in bases.items()},
                  "records": [dataclasses.asdict(r) for r in records], "tables_7b": tables_7b,
                  "wall_seconds": wall_seconds}
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "results.json", json.dumps(everything, indent=1, ensure_ascii=False) + "\n")
    sections = [f"# PEFT methods compared on {len(bases)} bases\n\n`{command}`\n",
                f"{shared['train_examples']} training examples x {shared['epochs']:g} epochs ({shared['steps']} steps of "
                f"{shared['batch_size']}x{shared['grad_accum']}), {shared['exact_match_records']} held-out records, "
                f"seed {shared['seed']}; bases: " + ", ".join(f"{label} ({run['settings']['base']}, {run['settings']['family']})"
                                                          for label, run in bases.items()) + "\n",
                "## Results (reproduced bit for bit by a rerun)\n", bases_table(bases) + "\n",
                "## Exact match per task\n", per_task_table(bases) + "\n",
                f"## Costs on this machine (these vary from run to run; this run {wall_seconds:.0f} s with --jobs {jobs}; "
                "each base's own run: " + ", ".join(f"{label} {run['wall_seconds']:.0f} s" for label, run in bases.items())
                + ")\n", cost_table(bases) + "\n"]
    for name, table in tables_7b.items():
        sections += [f"## Computed: {name}, ZeRO-3 + CPU offload (optimizer and parameters), 8 GPUs, batch 4 x 512, "
                     "fp16\n", table_7b_markdown(table) + "\n"]
    write_text_atomic(out / "results.md", "\n".join(sections))
    write_text_atomic(out / "generations.md", f"# Greedy answers side by side\n\n`{command}`\n\n"
                 + generations_markdown(bases, records))
    if plot:
        plot_bases({label: run for label, run in bases.items()}, out / "loss_curves.png")



def machine_description(threads: int) -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    info = {"cpu": cpu, "cpus_visible": os.cpu_count(), "torch_threads": threads, "python": platform.python_version(),
            "torch": torch.__version__, "platform": platform.platform()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


# ---- the computed 7B tables ----------------------------------------------------------------------
# The reference recipe and each method's usual hyper-parameters at 7B (as in lesson 07).
REFERENCE_7B = {"n_gpus": 8, "micro_batch": 4, "seq_len": 512, "zero_stage": 3, "offload_optimizer": True,
                "offload_params": True, "precision": "fp16"}
MODELS_7B = ("llama-7b", "chinese-llama-7b", "chatglm-6b", "bloom-7b1")


def reference_peft_configs(family: str = "llama", n_layers: int = 32) -> Dict[str, object]:
    """Each method's usual hyper-parameters at 7B: LoRA r 8 on q, v (on the fused wqkv where a family fuses them),
    LLaMA-Adapter on the top 30 layers (all 28 of ChatGLM-6B), 20 prompt / 10 prefix tokens, bottleneck 64."""
    from minipeft.peft import (AdapterConfig, FullConfig, LlamaAdapterConfig, LoRAConfig, PrefixConfig,
                               PromptConfig)
    from minipeft.peft.config import FAMILY_DEFAULT_LORA_TARGETS
    return {"full": FullConfig(),
            "lora": LoRAConfig(rank=8, alpha=16, targets=FAMILY_DEFAULT_LORA_TARGETS.get(family, ("wq", "wv"))),
            "llama_adapter": LlamaAdapterConfig(prompt_len=10, adapter_layers=min(30, n_layers)),
            "prompt": PromptConfig(prompt_len=20, init="random"),
            "prefix": PrefixConfig(prefix_len=10, reparam_hidden=512),
            "adapter": AdapterConfig(bottleneck=64)}


def table_7b(model_name: str = "llama-7b") -> dict:
    """Per method at the shape of a 7B preset, under REFERENCE_7B: trainable parameters (apply_peft on the meta
    device), Adam's optimizer state (12 bytes per trainable parameter: fp32 master, m, v), and memory per
    GPU and on the node's CPU under ZeRO-3 with the optimizer and the parameters offloaded:

      per GPU = DeepSpeed's gather buffer for the largest layer (4 bytes x V*d; the persistent model states
                on the GPU are 0 with both offloads) + activations of batch 4 x 512 (lesson 07: 26d+8f+4H+8
                bytes per token per trainable block; 16d+6f+4H+8 per frozen block that the gradient must
                pass through, with a GELU MLP's smaller f terms for BLOOM and ChatGLM-6B, memory.py; blocks below
                the lowest trainable parameter keep nothing) + fp32 logits.
      with recomputation: the activations of model_activation_bytes(recompute=True) instead (full), or for
                PEFT the kept block inputs 2d per token per block + one frozen block being recomputed.
      CPU (node) = 2 Psi (16-bit weights) + 14 Psi_t (16-bit gradients + optimizer state)."""
    from minipeft.config import ModelConfig
    from minipeft.families import build_model
    from minipeft.memory import (ADAM_32, block_activation_bytes_per_token, head_bytes_per_token,
                                 model_activation_bytes, rope_table_bytes_per_token, zero_bytes_per_gpu)
    from minipeft.peft import apply_peft
    cfg = ModelConfig.from_name(model_name)
    r = REFERENCE_7B
    batch, seq, n_gpus = r["micro_batch"], r["seq_len"], r["n_gpus"]
    rows = {}
    for method, peft_config in reference_peft_configs(cfg.family, cfg.n_layers).items():
        with torch.device("meta"):
            model = apply_peft(build_model(cfg), peft_config)
        report = model.report
        largest_layer = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
        states = zero_bytes_per_gpu(report.total, report.trainable, n_gpus, r["zero_stage"],
                                    offload_optimizer=r["offload_optimizer"], offload_params=r["offload_params"])
        gather_buffer = 4 * largest_layer
        tokens = batch * (seq + (peft_config.prompt_len if method == "prompt" else 0))
        blocks = peft_config.adapter_layers if method == "llama_adapter" else cfg.n_layers
        outside = rope_table_bytes_per_token(cfg) + head_bytes_per_token(cfg)
        if method == "full":
            activations = model_activation_bytes(cfg, batch, seq)
            recomputed = model_activation_bytes(cfg, batch, seq, recompute=True)
        else:
            frozen = block_activation_bytes_per_token(cfg, trainable_weights=False)
            activations = tokens * (blocks * frozen + outside)
            recomputed = tokens * (blocks * 2 * cfg.dim + frozen + outside)
        logits = batch * seq * cfg.vocab_size * 4
        rows[method] = {
            "hyper": dataclasses.asdict(peft_config),
            "trainable": report.trainable, "total": report.total, "trainable_percent": report.percent,
            "optimizer_state_bytes": ADAM_32 * report.trainable,
            "model_states_gpu_bytes": states["gpu"], "gather_buffer_bytes": gather_buffer,
            "activation_bytes": activations, "activation_bytes_recompute": recomputed, "logits_bytes": logits,
            "per_gpu_bytes": states["gpu"] + gather_buffer + activations + logits,
            "per_gpu_bytes_recompute": states["gpu"] + gather_buffer + recomputed + logits,
            "cpu_node_bytes": states["cpu"],
        }
    return {"model": model_name, "recipe": dict(REFERENCE_7B), "rows": rows}


def table_7b_markdown(table: dict) -> str:
    lines = ["| method | trainable | % | optimizer state (CPU) | per GPU: gather buffer + activations + logits "
             "| per GPU with recomputation | CPU of the node |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for method in (m for m in METHOD_ORDER if m in table["rows"]):
        r = table["rows"][method]
        lines.append(
            f"| {METHOD_TITLES[method]} | {r['trainable']:,} | {r['trainable_percent']:.3f} | "
            f"{r['optimizer_state_bytes'] / GiB:.3f} GiB | {r['gather_buffer_bytes'] / GiB:.2f} + "
            f"{r['activation_bytes'] / GiB:.2f} + {r['logits_bytes'] / GiB:.2f} = {r['per_gpu_bytes'] / GiB:.2f} GiB | "
            f"{r['per_gpu_bytes_recompute'] / GiB:.2f} GiB | {r['cpu_node_bytes'] / GiB:.2f} GiB |")
    return "\n".join(lines)
