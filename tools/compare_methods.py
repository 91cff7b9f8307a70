"""Compare full fine-tuning, LoRA, LLaMA-Adapter, prompt tuning, prefix tuning and Houlsby adapters on one
base model, one data set, one token budget and one seed; and compute what the same methods cost at
LLaMA-7B shape under the reference recipe (ZeRO-3 + CPU offload on 8 GPUs).

    PYTHONPATH=. python tools/compare_methods.py --threads 2                 # shipped tiny model + demo data
    PYTHONPATH=. python tools/compare_methods.py --sweep --threads 2         # first choose the lrs by a sweep
    PYTHONPATH=. python tools/compare_methods.py --data ../shared/data/alpaca_zh_demo.json --base checkpoints/x
    deepspeed --num_gpus 8 tools/compare_methods.py --deepspeed tools/ds_configs/zero3_offload_reference.json \\
        --base checkpoints/llama-7b --data alpaca_data_zh.json --max-seq-len 512 --max-train-examples 0
    PYTHONPATH=. python tools/compare_methods.py --only-7b-table             # the computed table only

What every method shares: the base weights (a fresh copy each), the training examples and their order
(epoch_order(seed, epoch)), the number of optimizer steps and examples per step (so the same training
tokens), the warm-up + cosine schedule, AdamW, clipping. What differs: the method, and its peak learning
rate (prompt-like methods need rates 10-100x larger than full fine-tuning: a few hundred parameters that
must move the output of a frozen network; a sweep, --sweep, picks each rate from a small grid by the
validation loss on training records kept out of the training subset, never on the held-out set).

Per method it reports: trainable parameters (apply_peft's count and %), final training loss (the mean
step loss over the last 1/evals-per-epoch epoch), best and final validation loss and the epoch of the
best (validation is evaluated evals-per-epoch times per epoch), exact-match accuracy of greedy answers on
the held-out records, training tokens/s (real tokens of the training steps / time in those steps, not
counting evaluation), and peak memory: on CUDA torch.cuda.max_memory_allocated, on CPU the process's peak
resident set (VmHWM, reset before each method through /proc/self/clear_refs), which includes the ~0.3-0.5
GB that Python + torch take before any model exists.

Output in --out (default runs/compare-<time>): results.json (everything, including the curves, the sweep
and the machine), results.md (the two tables), loss_curves.png, and runs/<method>/metrics.jsonl.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import os
import platform
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from minipeft.train import (METHODS, TINY_COMPARISON_LR, TrainConfig, TrainError, build_trainer,  # noqa: E402
                            load_deepspeed_config, prepare_run, resolve_deepspeed_config)

# The order of the reference table, with the Houlsby adapter as a sixth.
METHOD_ORDER = ("full", "lora", "llama_adapter", "prompt", "prefix", "adapter")
METHOD_TITLES = {"full": "full fine-tuning", "lora": "LoRA", "llama_adapter": "LLaMA-Adapter",
                 "prompt": "prompt tuning", "prefix": "prefix tuning", "adapter": "adapter (Houlsby)"}

# Peak learning rates used without --sweep: minipeft/train/learning_rates.py's TINY_COMPARISON_LR, chosen by
# `--sweep` on the shipped tiny model and demo data (grid SWEEP_LRS extended past its edge where needed,
# 1 epoch of 400 examples, lowest validation loss on 160 training records outside the training subset); the
# sweep's numbers are in lessons/08_comparison/results.json. LLaMA-Adapter's zero-initialised gates need a
# very large rate here.
CHOSEN_LR = TINY_COMPARISON_LR
# Three rates per method, a factor ~3 apart, centred on the usual ratio between methods: full fine-tuning
# lowest; LoRA and adapters ~3x higher; LLaMA-Adapter, prefix and prompt tuning 10-100x higher.
SWEEP_LRS = {"full": (3e-4, 1e-3, 3e-3), "lora": (1e-3, 3e-3, 1e-2), "llama_adapter": (3e-3, 1e-2, 3e-2),
             "prompt": (3e-2, 1e-1, 3e-1), "prefix": (3e-3, 1e-2, 3e-2), "adapter": (1e-3, 3e-3, 1e-2)}

GiB = 2 ** 30


class CompareError(ValueError):
    """A flag value that cannot work; the message names the flag."""


# ---- peak memory ---------------------------------------------------------------------------------
class PeakMemory:
    """Peak memory of one method's run: CUDA's allocator peak, or the process's peak resident set (VmHWM)
    reset through /proc/self/clear_refs. kind says which; value is None where neither can be read."""

    def __init__(self, device: torch.device):
        self.device = device
        self.kind = "cuda_max_allocated" if device.type == "cuda" else "cpu_peak_rss"

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")                       # resets VmHWM to the current resident set
        except OSError:
            self.kind = "cpu_peak_rss_since_start"  # cannot reset: the peak since the process started

    def read(self) -> Optional[int]:
        if self.device.type == "cuda":
            return int(torch.cuda.max_memory_allocated(self.device))
        try:
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
        import resource
        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


# ---- one method ----------------------------------------------------------------------------------
def run_method(cfg: TrainConfig, base, tokenizer, data, ds_config, *, evals_per_epoch: int,
               with_exact_match: bool, say=print) -> dict:
    """Train one method from a fresh copy of `base`, evaluating the validation loss evals_per_epoch times
    per epoch (and before training). Returns the numbers of the results table and the curves."""
    trainer = build_trainer(cfg, copy.deepcopy(base), tokenizer, data, ds_config)
    memory = PeakMemory(trainer.device)
    memory.reset()
    steps_per_epoch = trainer.batches_per_epoch / cfg.grad_accum
    eval_interval = max(1, round(steps_per_epoch / evals_per_epoch))

    def epoch_of(step):
        return step / steps_per_epoch

    val_curve = [(0.0, trainer.evaluate(with_exact_match=False).get("val_loss", float("nan")))]
    train_points: List[tuple] = []              # (epoch, step loss)
    train_seconds, train_tokens = 0.0, 0
    while trainer.step < trainer.total_steps:
        started = time.perf_counter()
        metrics = trainer.train_step()
        train_seconds += time.perf_counter() - started
        train_tokens += metrics["tokens"]
        train_points.append((epoch_of(trainer.step), metrics["loss"]))
        trainer.log(metrics)
        if trainer.step % eval_interval == 0 or trainer.step == trainer.total_steps:
            val = trainer.evaluate(with_exact_match=False)
            trainer.log({"eval": True, **val})
            val_curve.append((epoch_of(trainer.step), val.get("val_loss", float("nan"))))
    peak = memory.read()

    final = {}
    if with_exact_match:
        final = trainer.evaluate(with_exact_match=True)
        trainer.log({"eval": True, "when": "final", **final})

    # Training loss curve: the mean step loss over each evaluation interval.
    train_curve = []
    for start in range(0, len(train_points), eval_interval):
        chunk = train_points[start:start + eval_interval]
        train_curve.append((chunk[-1][0], sum(loss for _, loss in chunk) / len(chunk)))
    best_epoch, best_val = min(val_curve[1:] or val_curve, key=lambda point: point[1])
    # apply_peft's report; under ZeRO-3 a parameter holds only its shard, and ds_numel its full size.
    sizes = [(getattr(p, "ds_numel", p.numel()), p.requires_grad) for p in trainer.model.parameters()]
    trainable, total = sum(n for n, grad in sizes if grad), sum(n for n, _ in sizes)
    return {
        "method": cfg.method, "lr": cfg.lr, "steps": trainer.total_steps,
        "trainable": trainable, "total": total, "trainable_percent": 100.0 * trainable / total,
        "final_train_loss": train_curve[-1][1],
        "initial_val_loss": val_curve[0][1],
        "best_val_loss": best_val, "best_val_epoch": best_epoch, "final_val_loss": val_curve[-1][1],
        "exact_match": final.get("exact_match"),
        "tokens_per_s": train_tokens / max(train_seconds, 1e-9), "train_tokens": train_tokens,
        "train_seconds": train_seconds,
        "peak_memory_bytes": peak, "peak_memory_kind": memory.kind,
        "curves": {"train": train_curve, "val": val_curve},
        "generations": list(getattr(trainer, "last_generations", []))[:8] if with_exact_match else [],
    }


# ---- the computed LLaMA-7B table -----------------------------------------------------------------
# The reference recipe and each method's usual hyper-parameters at 7B (as in lesson 07).
REFERENCE_7B = {"n_gpus": 8, "micro_batch": 4, "seq_len": 512, "zero_stage": 3, "offload_optimizer": True,
                "offload_params": True, "precision": "fp16"}


def reference_peft_configs() -> Dict[str, object]:
    from minipeft.peft import (AdapterConfig, FullConfig, LlamaAdapterConfig, LoRAConfig, PrefixConfig,
                               PromptConfig)
    return {"full": FullConfig(), "lora": LoRAConfig(rank=8, alpha=16, targets=("wq", "wv")),
            "llama_adapter": LlamaAdapterConfig(prompt_len=10, adapter_layers=30),
            "prompt": PromptConfig(prompt_len=20, init="random"),
            "prefix": PrefixConfig(prefix_len=10, reparam_hidden=512),
            "adapter": AdapterConfig(bottleneck=64)}


def table_7b(model_name: str = "llama-7b") -> dict:
    """Per method at LLaMA-7B shape, under REFERENCE_7B: trainable parameters (apply_peft on the meta
    device), Adam's optimizer state (12 bytes per trainable parameter: fp32 master, m, v), and memory per
    GPU and on the node's CPU under ZeRO-3 with the optimizer and the parameters offloaded:

      per GPU = DeepSpeed's gather buffer for the largest layer (4 bytes x V*d; the persistent model states
                on the GPU are 0 with both offloads) + activations of batch 4 x 512 (lesson 07: 26d+8f+4H+8
                bytes per token per trainable block; 16d+6f+4H+8 per frozen block that the gradient must
                pass through; blocks below the lowest trainable parameter keep nothing) + fp32 logits.
      with recomputation: the activations of model_activation_bytes(recompute=True) instead (full), or for
                PEFT the kept block inputs 2d per token per block + one frozen block being recomputed.
      CPU (node) = 2 Psi (16-bit weights) + 14 Psi_t (16-bit gradients + optimizer state)."""
    from minipeft.config import ModelConfig
    from minipeft.memory import (ADAM_32, block_activation_bytes_per_token, head_bytes_per_token,
                                 model_activation_bytes, rope_table_bytes_per_token, zero_bytes_per_gpu)
    from minipeft.model import Transformer
    from minipeft.peft import apply_peft
    cfg = ModelConfig.from_name(model_name)
    r = REFERENCE_7B
    batch, seq, n_gpus = r["micro_batch"], r["seq_len"], r["n_gpus"]
    rows = {}
    for method, peft_config in reference_peft_configs().items():
        with torch.device("meta"):
            model = apply_peft(Transformer(cfg), peft_config)
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


# ---- tables and picture --------------------------------------------------------------------------
def fmt(value, spec):
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


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
            f"{r['final_val_loss']:.4f} | {fmt(r['exact_match'] and 100 * r['exact_match'], '.1f')}"
            f"{'%' if r['exact_match'] is not None else ''} | {r['tokens_per_s']:,.0f} | {memory} |")
    return "\n".join(lines)


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


def plot_curves(results: Dict[str, dict], path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax_train, ax_val) = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for method in (m for m in METHOD_ORDER if m in results):
        curves = results[method]["curves"]
        line, = ax_train.plot(*zip(*curves["train"]), marker=".", label=METHOD_TITLES[method])
        ax_val.plot(*zip(*curves["val"]), marker=".", color=line.get_color(), label=METHOD_TITLES[method])
        best = (results[method]["best_val_epoch"], results[method]["best_val_loss"])
        ax_val.plot(*best, marker="o", markersize=9, markerfacecolor="none", color=line.get_color())
    ax_train.set_title("training loss (mean per evaluation interval)")
    ax_val.set_title("validation loss (circle: lowest)")
    for ax in (ax_train, ax_val):
        ax.set_xlabel("epoch")
        ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
    ax_train.set_ylabel("loss (nats per response token)")
    ax_val.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


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


# ---- command line --------------------------------------------------------------------------------
def parse_method_values(items: List[str], flag: str, many: bool = False) -> dict:
    """["lora=3e-3", "prompt=0.1"] -> {"lora": 0.003, ...}; many=True: "lora=1e-3,3e-3" -> tuples."""
    out = {}
    for item in items or []:
        method, sep, value = item.partition("=")
        if not sep or method not in METHODS + ("all",):
            raise CompareError(f"{flag} {item!r}: expected METHOD=VALUE with METHOD one of {', '.join(METHODS)} "
                               "or all")
        try:
            values = tuple(float(v) for v in value.split(",")) if many else float(value)
        except ValueError:
            raise CompareError(f"{flag} {item!r}: {value!r} is not a number") from None
        if any(v <= 0 for v in (values if many else (values,))):
            raise CompareError(f"{flag} {item!r}: learning rates must be > 0")
        out.update({m: values for m in METHODS} if method == "all" else {method: values})
    return out


def build_arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="compare_methods.py", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Train every PEFT method on the same base, data, token budget and seed; write a Markdown "
                    "table, a JSON file and a loss-curve PNG, plus a computed LLaMA-7B memory table.")
    p.add_argument("--base", help="our checkpoint folder (default: the shipped tiny-llama)")
    p.add_argument("--data", help="Alpaca JSON / JSON Lines training file (default: the shipped demo_data/train.json)")
    p.add_argument("--val-data", help="held-out file for validation loss and exact match (default: demo_data/"
                   "heldout.json with the default data, else a seeded --val-fraction split of --data)")
    p.add_argument("--val-fraction", type=float, default=0.1, help="held-out share of --data when no --val-data")
    p.add_argument("--methods", default=",".join(METHOD_ORDER), help="comma-separated methods to run")
    p.add_argument("--max-train-examples", type=int, default=400,
                   help="train on the first N training examples (0: all). 400 x 3 epochs fits the CPU budget "
                        "and leaves the rest of the demo file for the sweep's validation")
    p.add_argument("--max-val-examples", type=int, default=160, help="use the first N held-out records (0: all)")
    p.add_argument("--epochs", type=float, default=3.0, help="passes over the training subset (the reference: 3)")
    p.add_argument("--evals-per-epoch", type=int, default=4, help="validation-loss evaluations per epoch")
    p.add_argument("--batch-size", type=int, help="micro-batch size (default 8, or the DeepSpeed config's)")
    p.add_argument("--grad-accum", type=int, help="micro-batches per step (default 1, or the DeepSpeed config's)")
    p.add_argument("--max-seq-len", type=int, default=256, help="tokens per example")
    p.add_argument("--precision", choices=("fp32", "bf16", "fp16"), help="default fp32 (or the DeepSpeed config's)")
    p.add_argument("--warmup-ratio", type=float, default=0.05, help="share of steps with linear warm-up")
    p.add_argument("--lr", action="append", metavar="METHOD=LR",
                   help=f"peak lr of one method, or all=LR for every method (repeatable, later wins); default the "
                        f"sweep's choice {CHOSEN_LR}")
    p.add_argument("--sweep", action="store_true", help="choose each method's lr by a sweep first")
    p.add_argument("--sweep-lrs", action="append", metavar="METHOD=LR,LR,...",
                   help=f"a method's sweep grid (repeatable; default {SWEEP_LRS})")
    p.add_argument("--sweep-epochs", type=float, default=1.0, help="budget of each sweep run")
    p.add_argument("--sweep-extend", type=int, default=2,
                   help="when the best rate is at an edge of the grid, try up to this many rates beyond it")
    p.add_argument("--sweep-val-examples", type=int, default=160,
                   help="validation records of the sweep: the last N training records, outside the training subset")
    p.add_argument("--no-exact-match", dest="exact_match", action="store_false", help="skip greedy exact match")
    p.add_argument("--seed", type=int, default=0, help="seed of every init and the data order")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    p.add_argument("--device", help="cpu, cuda (default: cuda if available)")
    p.add_argument("--gradient-checkpointing", action="store_true", help="recompute block activations in backward")
    p.add_argument("--deepspeed", help="DeepSpeed JSON config (tools/ds_configs/*.json), as in tools/finetune.py; a "
                   "config that fixes optimizer.params.lr gives every method that lr (the reference recipe)")
    p.add_argument("--local_rank", "--local-rank", dest="local_rank", type=int, help="set by the deepspeed launcher")
    p.add_argument("--out", help="output folder (default runs/compare-<time>)")
    p.add_argument("--no-plot", dest="plot", action="store_false", help="skip the PNG")
    p.add_argument("--only-7b-table", action="store_true", help="print the computed LLaMA-7B table and stop")
    p.add_argument("--model-7b", default="llama-7b", help="ModelConfig preset of the computed table")
    return p


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


def main(argv=None) -> int:
    started = time.perf_counter()
    args = build_arg_parser().parse_args(argv)
    command = "python tools/compare_methods.py " + " ".join(argv if argv is not None else sys.argv[1:])
    try:
        methods = [m.strip() for m in args.methods.split(",") if m.strip()]
        unknown = [m for m in methods if m not in METHODS]
        if unknown or not methods:
            raise CompareError(f"--methods {args.methods!r}: expected a comma-separated list of {', '.join(METHODS)}")
        lr_given = parse_method_values(args.lr, "--lr")
        sweep_grid = {**SWEEP_LRS, **parse_method_values(args.sweep_lrs, "--sweep-lrs", many=True)}
        for name in ("evals_per_epoch", "max_seq_len"):
            if getattr(args, name) < 1:
                raise CompareError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
        for name in ("max_train_examples", "max_val_examples", "sweep_val_examples"):
            if getattr(args, name) < 0:
                raise CompareError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
        if args.threads is not None:
            if args.threads < 1:
                raise CompareError(f"--threads must be >= 1, got {args.threads}")
            torch.set_num_threads(args.threads)
    except CompareError as err:
        print(f"compare_methods.py: error: {err}", file=sys.stderr)
        return 2

    out = Path(args.out) if args.out else Path("runs") / f"compare-{time.strftime('%Y%m%d-%H%M%S')}"
    big_table = table_7b(args.model_7b)
    if args.only_7b_table:
        print(table_7b_markdown(big_table))
        return 0

    data_path = args.data or shipped("demo_data/train.json")
    val_path = args.val_data or (shipped("demo_data/heldout.json") if args.data is None else None)
    base_cfg = TrainConfig(
        train_data=data_path, val_data=val_path, val_fraction=args.val_fraction, max_seq_len=args.max_seq_len,
        model=args.base or shipped("tiny-llama"), method=methods[0], batch_size=args.batch_size,
        grad_accum=args.grad_accum, precision=args.precision, epochs=args.epochs, warmup_ratio=args.warmup_ratio,
        gradient_checkpointing=args.gradient_checkpointing, seed=args.seed, device=args.device, progress=False,
        exact_match=args.exact_match, deepspeed=args.deepspeed, local_rank=args.local_rank)
    try:
        ds_source = load_deepspeed_config(args.deepspeed) if args.deepspeed else None
        filled_cfg, _, base, tokenizer, data = prepare_run(base_cfg)
    except (TrainError, ValueError) as err:
        print(f"compare_methods.py: error: {err}", file=sys.stderr)
        return 2
    from minipeft.train import world_info
    rank, world_size = world_info()
    say = print if rank == 0 else (lambda *a, **k: None)
    for line in data.report:
        say(line)

    # The training subset, the held-out subset, and the sweep's validation records (after the subset).
    all_train = data.train
    n_train = len(all_train) if args.max_train_examples == 0 else min(args.max_train_examples, len(all_train))
    spare = all_train[n_train:]
    sweep_val = spare[-args.sweep_val_examples:] if args.sweep_val_examples and spare else []
    data.train = all_train[:n_train]
    if args.max_val_examples:
        data.val, data.val_records = data.val[:args.max_val_examples], data.val_records[:args.max_val_examples]
    say(f"training on {len(data.train)} examples x {args.epochs:g} epochs; validation {len(data.val)} examples "
        f"({len(data.val_records)} records for exact match); base {filled_cfg.model}")

    fixed_lr = None
    if ds_source is not None:
        value = (ds_source.get("optimizer") or {}).get("params", {}).get("lr")
        if value not in (None, "auto"):
            fixed_lr = float(value)
            say(f"{args.deepspeed} fixes optimizer.params.lr = {fixed_lr:g}: every method uses it (as in the "
                "reference recipe); set it to \"auto\" for per-method rates")

    def method_cfg(method: str, lr: float, epochs: float, run_name: str) -> tuple:
        cfg = dataclasses.replace(base_cfg, method=method, lr=lr, epochs=epochs, out=str(out / "runs" / run_name))
        ds_config = None
        if ds_source is not None:
            ds_config, cfg = resolve_deepspeed_config(ds_source, cfg, world_size, source=f"--deepspeed {args.deepspeed}")
        return cfg.filled(), ds_config

    # ---- the learning-rate sweep
    sweep: Dict[str, Dict[str, float]] = {}
    chosen = {m: fixed_lr or lr_given.get(m, CHOSEN_LR[m]) for m in methods}
    if args.sweep and fixed_lr is None:
        if not sweep_val:
            say("the sweep validates on the held-out set: no training records are left outside the subset "
                "(lower --max-train-examples to keep some)")
        sweep_data = dataclasses.replace(data, val=sweep_val or data.val, val_records=[])
        for method in methods:
            if method in lr_given:
                continue
            sweep[method] = {}
            grid = sorted(sweep_grid[method])
            tried: Dict[float, float] = {}
            for _ in range(1 + args.sweep_extend):
                for lr in grid:
                    if lr in tried:
                        continue
                    cfg, ds_config = method_cfg(method, lr, args.sweep_epochs, f"sweep-{method}-{lr:g}")
                    result = run_method(cfg, base, tokenizer, sweep_data, ds_config, evals_per_epoch=1,
                                        with_exact_match=False)
                    tried[lr] = result["final_val_loss"]
                    sweep[method][f"{lr:g}"] = result["final_val_loss"]
                    say(f"sweep {method:13s} lr {lr:<8g} val loss {result['final_val_loss']:.4f}  "
                        f"({result['train_seconds']:.0f} s)")
                finite = {lr: v for lr, v in tried.items() if math.isfinite(v)}
                if not finite:
                    break
                best = min(finite, key=finite.get)
                chosen[method] = best
                # The best rate at an edge of the grid: try one more rate beyond it (the grid's own ratio).
                ordered = sorted(tried)
                if len(ordered) < 2 or best not in (ordered[0], ordered[-1]):
                    break
                ratio = ordered[-1] / ordered[-2] if best == ordered[-1] else ordered[1] / ordered[0]
                grid = [best * ratio if best == ordered[-1] else best / ratio]
            say(f"sweep {method}: chosen lr {chosen[method]:g}")

    # ---- the comparison
    results: Dict[str, dict] = {}
    for method in methods:
        cfg, ds_config = method_cfg(method, chosen[method], args.epochs, method)
        result = run_method(cfg, base, tokenizer, data, ds_config, evals_per_epoch=args.evals_per_epoch,
                            with_exact_match=args.exact_match)
        results[method] = result
        say(f"{method:13s} lr {cfg.lr:<7g} trainable {result['trainable']:>9,} ({result['trainable_percent']:.3f}%) "
            f"train {result['final_train_loss']:.4f} val best {result['best_val_loss']:.4f} "
            f"@{result['best_val_epoch']:.2f} final {result['final_val_loss']:.4f} EM "
            f"{fmt(result['exact_match'], '.3f')} {result['tokens_per_s']:.0f} tok/s ({result['train_seconds']:.0f} s)")

    if rank != 0:
        return 0
    first = results[methods[0]]
    settings = {"base": display_path(filled_cfg.model), "data": display_path(data_path),
                "val_data": display_path(val_path), "train_examples": len(data.train),
                "val_examples": len(data.val), "exact_match_records": len(data.val_records),
                "sweep_val_examples": len(sweep_val), "epochs": args.epochs, "steps": first["steps"],
                "batch_size": filled_cfg.batch_size, "grad_accum": filled_cfg.grad_accum, "world_size": world_size,
                "max_seq_len": args.max_seq_len, "precision": filled_cfg.precision, "seed": args.seed,
                "warmup_ratio": args.warmup_ratio, "evals_per_epoch": args.evals_per_epoch,
                "deepspeed": args.deepspeed, "method_hyper": {m: _method_hyper(filled_cfg, m) for m in methods}}
    everything = {"command": command, "machine": machine_description(torch.get_num_threads()),
                  "settings": settings, "sweep": sweep, "sweep_grid": {m: list(sweep_grid[m]) for m in sweep},
                  "lr": chosen, "results": results, "table_7b": big_table,
                  "wall_seconds": time.perf_counter() - started}
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / "results.json", json.dumps(everything, indent=1) + "\n")
    title = (f"{Path(filled_cfg.model).name} on {Path(data_path).name}: {len(data.train)} examples x "
             f"{args.epochs:g} epochs, batch {filled_cfg.batch_size}x{filled_cfg.grad_accum}, seed {args.seed}")
    markdown = (f"# PEFT methods compared\n\n`{command}`\n\n{title}\n\n{results_table(results)}\n\n"
                f"## Computed: LLaMA-7B shape, ZeRO-3 + CPU offload (optimizer and parameters), 8 GPUs, "
                f"batch 4 x 512, fp16\n\n{table_7b_markdown(big_table)}\n")
    write_atomic(out / "results.md", markdown)
    if args.plot:
        plot_curves(results, out / "loss_curves.png", title)
    print("\n" + results_table(results) + "\n")
    print(table_7b_markdown(big_table) + "\n")
    print(f"written {out}/results.json, results.md" + (", loss_curves.png" if args.plot else "")
          + f"; wall time {time.perf_counter() - started:.0f} s")
    return 0


def _method_hyper(cfg: TrainConfig, method: str) -> dict:
    """The hyper-parameters the run used for `method` (its config's defaults)."""
    return dataclasses.asdict(dataclasses.replace(cfg, method=method, peft=None).peft_config)


if __name__ == "__main__":
    exit_code = main()
    from minipeft.train import world_info
    if world_info()[1] > 1 or os.environ.get("LOCAL_RANK") is not None:
        import torch.distributed as dist
        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()
            sys.stdout.flush()
            os._exit(exit_code)
    sys.exit(exit_code)
