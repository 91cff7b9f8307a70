"""Compare full fine-tuning, LoRA, LLaMA-Adapter, prompt tuning, prefix tuning and Houlsby adapters on one
base model or several (--bases), one data set, one token budget and one seed; and compute what the same methods
cost at the shape of each 7B base under the reference recipe (ZeRO-3 + CPU offload on 8 GPUs).

    PYTHONPATH=. python tools/compare_methods.py --threads 2                 # shipped tiny model + demo data
    PYTHONPATH=. python tools/compare_methods.py --sweep --threads 2         # first choose the lrs by a sweep
    PYTHONPATH=. python tools/compare_methods.py --data ../shared/data/alpaca_zh_demo.json --base checkpoints/x
    deepspeed --num_gpus 8 tools/compare_methods.py --deepspeed tools/ds_configs/zero3_offload_reference.json \\
        --base checkpoints/llama-7b --data alpaca_data_zh.json --max-seq-len 512 --max-train-examples 0
    PYTHONPATH=. python tools/compare_methods.py --only-7b-table             # the computed table only
    PYTHONPATH=. python tools/compare_methods.py --bases all --sweep --threads 1 --jobs 2     # the four tiny bases
    deepspeed --num_gpus 8 tools/compare_methods.py --deepspeed tools/ds_configs/zero3_offload_reference.json \
        --bases llama=ckpt/llama-7b,chinese-llama=ckpt/chinese-llama-7b,chatglm=ckpt/chatglm-6b,bloom=ckpt/bloom-7b1 \
        --data alpaca_data_zh.json --max-seq-len 512 --max-train-examples 0         # the reference's whole table

What every method shares, and how the rates are swept (--sweep): tools/compare_run.py. Every base gets the same
methods, records, epochs, steps, seed and sweep grid; each renders the records in its own prompt format (the
Alpaca template for LLaMA and BLOOM, "[Round 0]\n问：...\n答：" for ChatGLM-6B) and counts tokens with its own
tokenizer, so "the same budget" is the same examples and steps.

Per method it reports: trainable parameters (apply_peft's count and %), final training loss (the mean
step loss over the last 1/evals-per-epoch epoch), best and final validation loss and the epoch of the
best (validation is evaluated evals-per-epoch times per epoch), exact-match accuracy of greedy answers on
the held-out records, training tokens/s (real tokens of the training steps / time in those steps, not
counting evaluation), and peak memory: on CUDA torch.cuda.max_memory_allocated, on CPU the process's peak
resident set (VmHWM, reset before each method through /proc/self/clear_refs), which includes the ~0.3-0.5
GB that Python + torch take before any model exists.

Output in --out (default runs/compare-<time>): results.json (everything, including the curves, the sweep
and the machine), results.md (the two tables), loss_curves.png, and runs/<method>/metrics.jsonl. With --bases
each base gets that in --out/<label>/, and --out itself gets results.json (all bases), results.md (one table
of every base and method, the per-task accuracy, the costs, the 7B tables), generations.md (answers side by
side) and loss_curves.png (a row per base). The tables other than the costs are the same bit for bit on a rerun.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Dict, List

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from compare_report import (METHOD_ORDER, METHOD_TITLES, MODELS_7B, bases_table, display_path, fmt,  # noqa: E402,F401
                            machine_description, plot_curves, results_table, shipped, table_7b, table_7b_markdown,
                            write_bases_report)
from compare_run import run_method, sweep_learning_rates  # noqa: E402
from minipeft.fileio import write_text_atomic  # noqa: E402
from minipeft.train import (METHODS, TINY_COMPARISON_LR, TrainConfig, TrainError, load_deepspeed_config,  # noqa: E402
                            prepare_run, resolve_deepspeed_config)
from minipeft.train.prepare import with_family_defaults  # noqa: E402

# Peak learning rates used without --sweep: learning_rates.py's TINY_COMPARISON_LR, chosen by `--sweep` on the
# shipped tiny LLaMA and demo data (SWEEP_LRS extended past its edge where needed, 1 epoch of 400 examples, lowest
# validation loss on 160 training records outside the subset; the numbers: lessons/08_comparison/results.json,
# bases.llama.sweep). LLaMA-Adapter's zero-initialised gates need a very large rate here.
CHOSEN_LR = TINY_COMPARISON_LR
# Three rates per method, a factor ~3 apart, centred on the usual ratio between methods: full fine-tuning
# lowest; LoRA and adapters ~3x higher; LLaMA-Adapter, prefix and prompt tuning 10-100x higher.
SWEEP_LRS = {"full": (3e-4, 1e-3, 3e-3), "lora": (1e-3, 3e-3, 1e-2), "llama_adapter": (3e-3, 1e-2, 3e-2),
             "prompt": (3e-2, 1e-1, 3e-1), "prefix": (3e-3, 1e-2, 3e-2), "adapter": (1e-3, 3e-3, 1e-2)}
# The shipped tiny bases, in the reference table's order (minipeft/assets/README.md says how each was made).
SHIPPED_BASES = {"llama": "tiny-llama", "chinese-llama": "tiny-chinese-llama", "chatglm": "tiny-chatglm",
                 "bloom": "tiny-bloom"}


class CompareError(ValueError):
    """A flag value that cannot work; the message names the flag."""


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
    p.add_argument("--bases", help="compare on several bases: comma-separated shipped names (" + ", ".join(SHIPPED_BASES)
                   + "), LABEL=FOLDER or FOLDER items, or 'all' for the four shipped ones; writes one table for all")
    p.add_argument("--jobs", type=int, default=1, help="with --bases: run this many bases at once, one process each "
                   "(each with --threads threads); the numbers do not depend on it")
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
    p.add_argument("--resume", action="store_true", help="with --bases: keep a base whose --out/<label>/results.json "
                   "was made with the same settings (an interrupted comparison goes on where it stopped)")
    p.add_argument("--only-7b-table", action="store_true", help="print the computed 7B table(s) and stop")
    p.add_argument("--model-7b", default="llama-7b", help="ModelConfig preset of the computed table (one base)")
    p.add_argument("--models-7b", default=",".join(MODELS_7B), help="presets of the computed tables with --bases")
    return p


def parse_bases(value: str) -> List[tuple]:
    """--bases -> [(label, folder)]: shipped names, LABEL=FOLDER, FOLDER (label: its name), or 'all'."""
    items = [item.strip() for item in value.split(",") if item.strip()]
    if items == ["all"]:
        items = list(SHIPPED_BASES)
    bases = []
    for item in items:
        label, sep, folder = item.partition("=")
        if not sep:
            label, folder = (item, shipped(SHIPPED_BASES[item])) if item in SHIPPED_BASES else (Path(item).name, item)
        if not Path(folder).is_dir():
            raise CompareError(f"--bases {item!r}: {folder} is not a checkpoint folder (shipped names: "
                               f"{', '.join(SHIPPED_BASES)}, or all)")
        bases.append((label, folder))
    labels = [label for label, _ in bases]
    if not bases or len(set(labels)) != len(labels):
        raise CompareError(f"--bases {value!r}: expected distinct, non-empty labels, got {labels}")
    return bases


def check_args(args) -> tuple:
    """-> (methods, lr_given, sweep_grid, bases or None); CompareError naming the flag."""
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise CompareError(f"--methods {args.methods!r}: expected a comma-separated list of {', '.join(METHODS)}")
    lr_given = parse_method_values(args.lr, "--lr")
    sweep_grid = {**SWEEP_LRS, **parse_method_values(args.sweep_lrs, "--sweep-lrs", many=True)}
    for name in ("evals_per_epoch", "max_seq_len", "jobs"):
        if getattr(args, name) < 1:
            raise CompareError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for name in ("max_train_examples", "max_val_examples", "sweep_val_examples"):
        if getattr(args, name) < 0:
            raise CompareError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    if args.threads is not None and args.threads < 1:
        raise CompareError(f"--threads must be >= 1, got {args.threads}")
    bases = None
    if args.bases is not None:
        if args.base is not None:
            raise CompareError("--base and --bases: give one of them")
        bases = parse_bases(args.bases)
        if args.jobs > 1 and args.deepspeed:
            raise CompareError("--jobs > 1 with --deepspeed: the ranks run the bases one after the other; drop --jobs")
    unknown_7b = [m for m in args.models_7b.split(",") if m not in MODELS_7B + ("llama-13b", "chatglm2-6b")]
    if unknown_7b:
        raise CompareError(f"--models-7b: unknown preset(s) {unknown_7b}; expected some of {', '.join(MODELS_7B)}")
    return methods, lr_given, sweep_grid, bases


# Flags that change no number of a base's run (they say where and how many at once).
NOT_IN_IDENTITY = ("bases", "base", "jobs", "out", "resume", "plot", "local_rank", "only_7b_table", "models_7b")


def run_identity(args, base_folder: str) -> dict:
    """What a base's numbers depend on: every other flag and the base folder (for --resume)."""
    return {**{k: v for k, v in sorted(vars(args).items()) if k not in NOT_IN_IDENTITY},
            "base_folder": str(Path(base_folder).resolve())}


def run_base(args, base_folder: str, out: Path, command: str, *, methods, lr_given, sweep_grid, say=print) -> dict:
    """The sweep and the comparison on one base; writes out/results.json, results.md, loss_curves.png (rank 0).
    Returns everything results.json holds, or raises TrainError / ValueError for a bad base or data.
    With --resume a results.json already in `out` with the same run_identity is returned as it is."""
    identity = json.loads(json.dumps(run_identity(args, base_folder)))
    if args.resume and (out / "results.json").is_file():
        earlier = json.loads((out / "results.json").read_text(encoding="utf-8"))
        if earlier.get("identity") == identity:
            say(f"--resume: {out / 'results.json'} was made with these settings; kept")
            return earlier
        say(f"--resume: {out / 'results.json'} was made with other settings; running again")
    started = time.perf_counter()
    data_path = args.data or shipped("demo_data/train.json")
    val_path = args.val_data or (shipped("demo_data/heldout.json") if args.data is None else None)
    base_cfg = TrainConfig(
        train_data=data_path, val_data=val_path, val_fraction=args.val_fraction, max_seq_len=args.max_seq_len,
        model=base_folder, method=methods[0], batch_size=args.batch_size,
        grad_accum=args.grad_accum, precision=args.precision, epochs=args.epochs, warmup_ratio=args.warmup_ratio,
        gradient_checkpointing=args.gradient_checkpointing, seed=args.seed, device=args.device, progress=False,
        exact_match=args.exact_match, deepspeed=args.deepspeed, local_rank=args.local_rank)
    ds_source = load_deepspeed_config(args.deepspeed) if args.deepspeed else None
    filled_cfg, _, base, tokenizer, data = prepare_run(base_cfg)
    from minipeft.train import world_info
    rank, world_size = world_info()
    say = say if rank == 0 else (lambda *a, **k: None)
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
        return with_family_defaults(cfg.filled(), base.config.family), ds_config    # BLOOM's / GLM's LoRA on wqkv

    # ---- the learning-rate sweep
    sweep: Dict[str, Dict[str, float]] = {}
    chosen = {m: fixed_lr or lr_given.get(m, CHOSEN_LR[m]) for m in methods}
    if args.sweep and fixed_lr is None:
        if not sweep_val:
            say("the sweep validates on the held-out set: no training records are left outside the subset "
                "(lower --max-train-examples to keep some)")
        sweep_data = dataclasses.replace(data, val=sweep_val or data.val, val_records=[])
        sweep, swept = sweep_learning_rates(method_cfg, [m for m in methods if m not in lr_given], sweep_grid,
                                            base=base, tokenizer=tokenizer, data=sweep_data,
                                            sweep_epochs=args.sweep_epochs, sweep_extend=args.sweep_extend, say=say)
        chosen.update(swept)

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

    family = base.config.family
    big_table = table_7b(args.model_7b)
    first = results[methods[0]]
    settings = {"base": display_path(filled_cfg.model), "family": family, "data": display_path(data_path),
                "val_data": display_path(val_path), "train_examples": len(data.train),
                "val_examples": len(data.val), "exact_match_records": len(data.val_records),
                "sweep_val_examples": len(sweep_val), "epochs": args.epochs, "steps": first["steps"],
                "batch_size": filled_cfg.batch_size, "grad_accum": filled_cfg.grad_accum, "world_size": world_size,
                "max_seq_len": args.max_seq_len, "precision": filled_cfg.precision, "seed": args.seed,
                "warmup_ratio": args.warmup_ratio, "evals_per_epoch": args.evals_per_epoch,
                "deepspeed": args.deepspeed, "method_hyper": {m: _method_hyper(filled_cfg, m, family) for m in methods}}
    everything = {"command": command, "identity": identity, "machine": machine_description(torch.get_num_threads()),
                  "settings": settings, "sweep": sweep, "sweep_grid": {m: list(sweep_grid[m]) for m in sweep},
                  "lr": chosen, "results": results, "table_7b": big_table,
                  "records": [dataclasses.asdict(r) for r in data.val_records],
                  "wall_seconds": time.perf_counter() - started}
    if rank != 0:
        return everything
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "results.json", json.dumps(everything, indent=1, ensure_ascii=False) + "\n")
    title = (f"{Path(filled_cfg.model).name} on {Path(data_path).name}: {len(data.train)} examples x "
             f"{args.epochs:g} epochs, batch {filled_cfg.batch_size}x{filled_cfg.grad_accum}, seed {args.seed}")
    markdown = (f"# PEFT methods compared\n\n`{command}`\n\n{title}\n\n{results_table(results)}\n\n"
                f"## Computed: {args.model_7b} shape, ZeRO-3 + CPU offload (optimizer and parameters), 8 GPUs, "
                f"batch 4 x 512, fp16\n\n{table_7b_markdown(big_table)}\n")
    write_text_atomic(out / "results.md", markdown)
    if args.plot:
        plot_curves(results, out / "loss_curves.png", title)
    return everything


def _base_job(argv: List[str], label: str, folder: str, out: str, command: str) -> dict:
    """One base in a worker process (--jobs): the flags are parsed again there."""
    args = build_arg_parser().parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    methods, lr_given, sweep_grid, _ = check_args(args)
    say = lambda *a, **k: print(f"[{label}]", *a, **k, flush=True)  # noqa: E731
    return run_base(args, folder, Path(out), command, methods=methods, lr_given=lr_given, sweep_grid=sweep_grid, say=say)


def main(argv=None) -> int:
    started = time.perf_counter()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_arg_parser().parse_args(argv)
    command = "python tools/compare_methods.py " + " ".join(argv)
    try:
        methods, lr_given, sweep_grid, bases = check_args(args)
    except CompareError as err:
        print(f"compare_methods.py: error: {err}", file=sys.stderr)
        return 2
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.only_7b_table:
        for name in (args.models_7b.split(",") if bases else [args.model_7b]):
            print(f"{name}\n{table_7b_markdown(table_7b(name))}\n")
        return 0
    out = Path(args.out) if args.out else Path("runs") / f"compare-{time.strftime('%Y%m%d-%H%M%S')}"
    from minipeft.train import world_info
    rank = world_info()[0]
    try:
        if bases is None:
            everything = run_base(args, args.base or shipped("tiny-llama"), out, command, methods=methods,
                                  lr_given=lr_given, sweep_grid=sweep_grid)
            if rank == 0:
                print("\n" + results_table(everything["results"]) + "\n")
                print(table_7b_markdown(everything["table_7b"]) + "\n")
                print(f"written {out}/results.json, results.md" + (", loss_curves.png" if args.plot else "")
                      + f"; wall time {time.perf_counter() - started:.0f} s")
            return 0
        if args.jobs > 1:
            with ProcessPoolExecutor(max_workers=args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
                futures = {label: pool.submit(_base_job, argv, label, folder, str(out / label), command)
                           for label, folder in bases}
                runs = {label: future.result() for label, future in futures.items()}
        else:
            runs = {label: run_base(args, folder, out / label, command, methods=methods, lr_given=lr_given,
                                    sweep_grid=sweep_grid, say=lambda *a, _l=label, **k: print(f"[{_l}]", *a, **k))
                    for label, folder in bases}
    except (TrainError, ValueError) as err:
        print(f"compare_methods.py: error: {err}", file=sys.stderr)
        return 2
    if rank == 0:
        write_bases_report(runs, out, command, time.perf_counter() - started, models_7b=args.models_7b.split(","),
                           jobs=args.jobs, plot=args.plot)
        print("\n" + bases_table(runs) + "\n")
        print(f"written {out}/results.json, results.md, generations.md" + (", loss_curves.png" if args.plot else "")
              + f" and a folder per base; wall time {time.perf_counter() - started:.0f} s")
    return 0


def _method_hyper(cfg: TrainConfig, method: str, family: str) -> dict:
    """The hyper-parameters the run used for `method` (its config's defaults, with the family's LoRA targets)."""
    method_cfg = with_family_defaults(dataclasses.replace(cfg, method=method, peft=None).filled(), family)
    return dataclasses.asdict(method_cfg.peft_config)


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
