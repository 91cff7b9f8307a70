"""tools/compare_methods.py's command line: its flags, their checks (one-line CompareError naming the flag), and
main(), which runs one base or several (--bases; --jobs of them at once in worker processes) and writes the
outputs. The plugins (--plugin, MINIPEFT_PLUGINS) are imported before the parser is built, so a method they
register is a valid --methods name.
"""

from __future__ import annotations

import argparse
import math
import multiprocessing
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import List

import torch

from .. import cli_types as T
from ..peft import METHODS, PeftConfigError
from ..plugins import PluginError, add_plugin_flag, load_plugins
from ..train import TrainError, world_info
from .base_run import run_base
from .outputs import check_label, claim_compare_out
from .methods import REFERENCE_ORDER, default_lr, default_lrs, method_order, sweep_grids
from .report import bases_table, results_table, shipped, write_bases_report
from .table_7b import MODELS_7B, table_7b, table_7b_markdown

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
        if not sep or method not in (*METHODS, "all"):
            raise CompareError(f"{flag} {item!r}: expected METHOD=VALUE with METHOD one of {', '.join(method_order())} "
                               "or all")
        try:
            values = tuple(float(v) for v in value.split(",")) if many else float(value)
        except ValueError:
            raise CompareError(f"{flag} {item!r}: {value!r} is not a number") from None
        if not all(math.isfinite(v) and v > 0 for v in (values if many else (values,))):
            raise CompareError(f"{flag} {item!r}: learning rates must be finite numbers > 0")
        out.update({m: values for m in method_order()} if method == "all" else {method: values})
    return out


def build_arg_parser() -> argparse.ArgumentParser:
    p = T.ArgumentParser(
        prog="compare_methods.py", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Train every PEFT method on the same base, data, token budget and seed; write a Markdown "
                    "table, a JSON file and a loss-curve PNG, plus a computed LLaMA-7B memory table.")
    p.add_argument("--base", help="our checkpoint folder (default: the shipped tiny-llama)")
    p.add_argument("--bases", help="compare on several bases: comma-separated shipped names (" + ", ".join(SHIPPED_BASES)
                   + "), LABEL=FOLDER or FOLDER items, or 'all' for the four shipped ones; writes one table for all")
    p.add_argument("--jobs", type=T.threads, default=1, help="with --bases: run this many bases at once, one process each "
                   "(each with --threads threads); the numbers do not depend on it")
    p.add_argument("--data", help="Alpaca JSON / JSON Lines training file (default: the shipped demo_data/train.json)")
    p.add_argument("--val-data", help="held-out file for validation loss and exact match (default: demo_data/"
                   "heldout.json with the default data, else a seeded --val-fraction split of --data)")
    p.add_argument("--val-fraction", type=T.fraction, default=0.1, help="held-out share of --data when no --val-data")
    p.add_argument("--methods", default=",".join(REFERENCE_ORDER), help="comma-separated methods to run (any "
                   "registered method, a plugin's too)")
    p.add_argument("--max-train-examples", type=T.non_negative_int, default=400,
                   help="train on the first N training examples (0: all). 400 x 3 epochs fits the CPU budget "
                        "and leaves the rest of the demo file for the sweep's validation")
    p.add_argument("--max-val-examples", type=T.non_negative_int, default=160, help="use the first N held-out records (0: all)")
    p.add_argument("--epochs", type=T.positive_float, default=3.0, help="passes over the training subset (the reference: 3)")
    p.add_argument("--evals-per-epoch", type=T.positive_int, default=4, help="validation-loss evaluations per epoch")
    p.add_argument("--batch-size", type=T.batch_size, help="micro-batch size (default 8, or the DeepSpeed config's)")
    p.add_argument("--grad-accum", type=T.batch_size, help="micro-batches per step (default 1, or the DeepSpeed config's)")
    p.add_argument("--max-seq-len", type=T.seq_len, default=256, help="tokens per example")
    p.add_argument("--precision", choices=("fp32", "bf16", "fp16"), help="default fp32 (or the DeepSpeed config's)")
    p.add_argument("--warmup-ratio", type=T.fraction, default=0.05, help="share of steps with linear warm-up")
    p.add_argument("--lr", action="append", metavar="METHOD=LR",
                   help=f"peak lr of one method, or all=LR for every method (repeatable, later wins); default the "
                        f"rate the PEFT registry holds for this budget {default_lrs()}")
    p.add_argument("--sweep", action="store_true", help="choose each method's lr by a sweep first")
    p.add_argument("--sweep-lrs", action="append", metavar="METHOD=LR,LR,...",
                   help=f"a method's sweep grid (repeatable; default the PEFT registry's {sweep_grids()})")
    p.add_argument("--sweep-epochs", type=T.positive_float, default=1.0, help="budget of each sweep run")
    p.add_argument("--sweep-extend", type=T.non_negative_int, default=2,
                   help="when the best rate is at an edge of the grid, try up to this many rates beyond it")
    p.add_argument("--sweep-val-examples", type=T.non_negative_int, default=160,
                   help="validation records of the sweep: the last N training records, outside the training subset")
    p.add_argument("--no-exact-match", dest="exact_match", action="store_false", help="skip greedy exact match")
    p.add_argument("--seed", type=T.seed, default=0, help="seed of every init and the data order")
    p.add_argument("--threads", type=T.threads, help="torch CPU threads (default: torch's)")
    p.add_argument("--device", help="cpu, cuda (default: cuda if available)")
    p.add_argument("--gradient-checkpointing", action="store_true", help="recompute block activations in backward")
    p.add_argument("--deepspeed", help="DeepSpeed JSON config (tools/ds_configs/*.json), as in tools/finetune.py; a "
                   "config that fixes optimizer.params.lr gives every method that lr (the reference recipe)")
    p.add_argument("--local_rank", "--local-rank", dest="local_rank", type=T.local_rank, help="set by the deepspeed launcher")
    p.add_argument("--out", help="output folder (default runs/compare-<time>)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier comparison in --out (its results, "
                   "runs and base folders are removed first; without it such an --out is refused unless --resume)")
    p.add_argument("--no-plot", dest="plot", action="store_false", help="skip the PNG")
    p.add_argument("--resume", action="store_true", help="with --bases: keep a base whose --out/<label>/results.json "
                   "was made with the same settings (an interrupted comparison goes on where it stopped)")
    p.add_argument("--only-7b-table", action="store_true", help="print the computed 7B table(s) and stop")
    p.add_argument("--model-7b", default="llama-7b", help="ModelConfig preset of the computed table (one base)")
    p.add_argument("--models-7b", default=",".join(MODELS_7B), help="presets of the computed tables with --bases")
    add_plugin_flag(p)
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
        check_label(label, CompareError)                  # a folder inside --out
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
        raise CompareError(f"--methods {args.methods!r}: expected a comma-separated list of {', '.join(method_order())}")
    lr_given = parse_method_values(args.lr, "--lr")
    grids = {**sweep_grids(), **parse_method_values(args.sweep_lrs, "--sweep-lrs", many=True)}
    for method in (m for m in methods if m not in lr_given):
        if args.sweep and method not in grids:
            raise CompareError(f"--sweep: method {method!r} has no sweep grid in the PEFT registry; give --sweep-lrs "
                               f"{method}=LR,LR,... (or its rate with --lr {method}=LR)")
        if not args.sweep and not args.deepspeed:     # (a DeepSpeed config may fix every method's rate)
            try:
                default_lr(method)
            except PeftConfigError as err:
                raise CompareError(f"{err} {method}=LR (or --sweep with a grid)") from None
    # (the numbers' ranges are the parser's types: minipeft/cli_types.py)
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
    return methods, lr_given, grids, bases


def _base_job(argv: List[str], label: str, folder: str, out: str, command: str) -> dict:
    """One base in a worker process (--jobs): the plugins are imported and the flags parsed again there."""
    load_plugins(argv)
    args = build_arg_parser().parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    methods, lr_given, sweep_grid, _ = check_args(args)
    say = lambda *a, **k: print(f"[{label}]", *a, **k, flush=True)  # noqa: E731
    return run_base(args, folder, Path(out), command, methods=methods, lr_given=lr_given, sweep_grid=sweep_grid, say=say)


def main(argv=None) -> int:
    started = time.perf_counter()
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        load_plugins(argv)                # first: a plugin's methods are --methods choices
    except PluginError as err:
        print(f"compare_methods.py: error: {err}", file=sys.stderr)
        return 2
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
    rank = world_info()[0]
    try:                                  # --out is this comparison's until it ends (rank 0 writes it)
        reservation = claim_compare_out(args, out, bases, CompareError) if rank == 0 else None
    except (CompareError, OSError) as err:
        print(f"compare_methods.py: error: {err}", file=sys.stderr)
        return 2
    try:
        return _compare(args, argv, out, command, methods, lr_given, sweep_grid, bases, rank, started)
    finally:
        if reservation is not None:
            reservation.release()


def _compare(args, argv, out: Path, command: str, methods, lr_given, sweep_grid, bases, rank: int, started) -> int:
    """main() once --out is reserved: run the base(s) and write the outputs."""
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


def run_command_line(argv=None) -> int:
    """main() as tools/compare_methods.py runs it: under the deepspeed launcher every rank waits for the others
    and leaves the process group before exiting."""
    exit_code = main(argv)
    if world_info()[1] > 1 or os.environ.get("LOCAL_RANK") is not None:
        import torch.distributed as dist
        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()
            sys.stdout.flush()
            os._exit(exit_code)
    return exit_code
