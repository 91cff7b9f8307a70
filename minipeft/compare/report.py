"""What tools/compare_methods.py writes besides the curves: the results table of one base, the tables of several
(the numbers, the per-task accuracy, the costs), the greedy answers side by side, and the description of the
machine. The scores come from scores.py, the 7B tables from table_7b.py, the plots from plots.py.

    train/val gap     final validation loss - final training loss (nats per response token)
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
from pathlib import Path
from typing import Dict, Optional, Sequence

import torch

from ..fileio import write_text_atomic
from .methods import ordered, title
from .plots import plot_bases
from .scores import task_of
from .table_7b import table_7b, table_7b_markdown


def fmt(value, spec):
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def percent(value) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def shipped(path: str) -> str:
    from .. import assets_dir
    return str(Path(assets_dir()) / path)


def display_path(path) -> Optional[str]:
    """A path relative to the repository root when it lies inside it (so results.json is portable)."""
    if path is None:
        return None
    root = Path(__file__).resolve().parents[2]
    try:
        return str(Path(path).resolve().relative_to(root))
    except ValueError:
        return str(path)


# ---- one base ------------------------------------------------------------------------------------
def results_table(results: Dict[str, dict]) -> str:
    lines = ["| method | lr | trainable | % | final train loss | best val loss (epoch) | final val loss | "
             "exact match | tokens/s | peak memory |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for method in ordered(results):
        r = results[method]
        memory = "-" if r["peak_memory_bytes"] is None else f"{r['peak_memory_bytes'] / 2**20:,.0f} MiB"
        lines.append(
            f"| {title(method)} | {r['lr']:g} | {r['trainable']:,} | {r['trainable_percent']:.3f} | "
            f"{r['final_train_loss']:.4f} | {r['best_val_loss']:.4f} ({r['best_val_epoch']:.2f}) | "
            f"{r['final_val_loss']:.4f} | {percent(r['exact_match'])} | {r['tokens_per_s']:,.0f} | {memory} |")
    return "\n".join(lines)


# ---- several bases -------------------------------------------------------------------------------
def base_method_results(bases: Dict[str, dict]):
    """(base label, method, its result) for every base, methods in the reference table's order."""
    for label, run in bases.items():
        for method in ordered(run["results"]):
            yield label, method, run["results"][method]


def bases_table(bases: Dict[str, dict]) -> str:
    """One row per base and method: the numbers a rerun reproduces bit for bit (no timings)."""
    lines = ["| base | method | lr | trainable (%) | final train loss | held-out loss (best, epoch) | train/val gap | "
             "exact match | answer chars (expected) |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for label, method, r in base_method_results(bases):
        lines.append(
            f"| {label} | {title(method)} | {r['lr']:g} | {r['trainable']:,} ({r['trainable_percent']:.2f}) | "
            f"{r['final_train_loss']:.4f} | {r['final_val_loss']:.4f} ({r['best_val_loss']:.4f}, "
            f"{r['best_val_epoch']:.2f}) | {r['train_val_gap']:+.4f} | {percent(r['exact_match'])} | "
            f"{fmt(r['answer_chars_mean'], '.1f')} ({fmt(r['expected_chars_mean'], '.1f')}) |")
    return "\n".join(lines)


def per_task_table(bases: Dict[str, dict]) -> str:
    tasks = sorted({t for run in bases.values() for r in run["results"].values() for t in r["per_task"]})
    lines = ["| base | method | " + " | ".join(tasks) + " |", "| --- | --- |" + " ---: |" * len(tasks)]
    for label, method, r in base_method_results(bases):
        lines.append(f"| {label} | {title(method)} | "
                     + " | ".join(percent(r["per_task"].get(t)) for t in tasks) + " |")
    return "\n".join(lines)


def cost_table(bases: Dict[str, dict]) -> str:
    """Timings and memory: these differ from run to run (the machine is shared), the other tables do not."""
    lines = ["| base | method | training seconds | tokens/s | peak memory |", "| --- | --- | ---: | ---: | ---: |"]
    for label, method, r in base_method_results(bases):
        memory = "-" if r["peak_memory_bytes"] is None else f"{r['peak_memory_bytes'] / 2**20:,.0f} MiB"
        lines.append(f"| {label} | {title(method)} | {r['train_seconds']:.0f} | {r['tokens_per_s']:,.0f} | "
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
    methods = ordered(dict.fromkeys(m for run in bases.values() for m in run["results"]))
    out = []
    for index in chosen:
        record = records[index]
        out.append(f"**{task_of(record.instruction)}** (record {index}): {record.instruction} / input `{record.input}` / "
                   f"expected {answer_cell(record.output)}\n")
        out.append("| base | " + " | ".join(title(m) for m in methods) + " |")
        out.append("| --- |" + " --- |" * len(methods))
        for label, run in bases.items():
            texts = [run["results"][m]["generations"] for m in methods if m in run["results"]]
            out.append(f"| {label} | " + " | ".join(answer_cell(t[index]) if index < len(t) else "-" for t in texts) + " |")
        out.append("")
    return "\n".join(out)


def write_bases_report(bases: Dict[str, dict], out: Path, command: str, wall_seconds: float, *,
                       models_7b: Sequence[str], jobs: int, plot: bool = True) -> None:
    """--out/results.json, results.md, generations.md and loss_curves.png for all bases together."""
    from ..data import Record
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
