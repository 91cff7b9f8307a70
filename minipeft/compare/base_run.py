"""One base of the comparison: its data subsets, the learning-rate sweep, every method from a fresh copy of the
base, and that base's results.json, results.md and loss_curves.png (run_base). Every base gets the same methods,
records, epochs, steps, seed and sweep grid; each renders the records in its own prompt format and counts tokens
with its own tokenizer, so "the same budget" is the same examples and steps.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from pathlib import Path
from typing import Dict

import torch

from ..fileio import write_text_atomic
from ..peft import get_method
from ..train import TrainConfig, load_deepspeed_config, prepare_run, resolve_deepspeed_config, world_info
from ..train.checkpoints import input_digests
from ..train.prepare import with_family_defaults
from .method_run import run_method
from .methods import default_lr
from .plots import plot_curves
from .report import display_path, fmt, machine_description, results_table, shipped
from .sweep import sweep_learning_rates
from .table_7b import table_7b, table_7b_markdown

# Flags that change no number of a base's run (they say where and how many at once).
NOT_IN_IDENTITY = ("bases", "base", "jobs", "out", "resume", "plot", "local_rank", "only_7b_table", "models_7b")
# Flags that name files: their content counts (train.checkpoints.input_digests), not their path.
BY_CONTENT = ("data", "val_data", "deepspeed")


def run_identity(args, base_folder: str, data_path, val_path) -> dict:
    """What a base's numbers depend on (for --resume): every other flag, and by content the base folder (weights
    and tokenizer), the training and held-out files and the DeepSpeed config. The plugins count only when some
    are given (so a run without them keeps the identity it had before there were plugins)."""
    flags = {k: v for k, v in sorted(vars(args).items())
             if k not in NOT_IN_IDENTITY + BY_CONTENT and not (k == "plugin" and not v)}
    return {**flags, "content": input_digests(base_model=base_folder, deepspeed=args.deepspeed,
                                              files={"data": data_path, "val_data": val_path})}


def earlier_results(path: Path):
    """The results.json a --resume may keep, or None when it cannot be read (then the base runs again)."""
    try:
        earlier = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return earlier if isinstance(earlier, dict) else None


def rank_zero() -> bool:
    return os.environ.get("RANK", "0") == "0" and world_info()[0] == 0


def run_base(args, base_folder: str, out: Path, command: str, *, methods, lr_given, sweep_grid, say=print) -> dict:
    """The sweep and the comparison on one base; writes out/results.json, results.md, loss_curves.png (rank 0).
    Returns everything results.json holds, or raises TrainError / ValueError for a bad base or data.
    With --resume a results.json already in `out` with the same run_identity is returned as it is."""
    data_path = args.data or shipped("demo_data/train.json")
    val_path = args.val_data or (shipped("demo_data/heldout.json") if args.data is None else None)
    identity = json.loads(json.dumps(run_identity(args, base_folder, data_path, val_path)))
    if args.resume and (out / "results.json").is_file():
        earlier = earlier_results(out / "results.json")
        if earlier is not None and earlier.get("identity") == identity:
            say(f"--resume: {out / 'results.json'} was made with these settings; kept")
            return earlier
        say(f"--resume: {out / 'results.json'} was made with other settings; running again" if earlier is not None
            else f"--resume: {out / 'results.json'} cannot be read; running again")
    if args.resume and rank_zero() and (out / "runs").is_dir():
        shutil.rmtree(out / "runs")       # run again: the methods' run folders start afresh (not appended to)
    started = time.perf_counter()
    # prepare_run fills in its method's default rate for a real base, which the shared settings never use (each
    # method gets its own rate below): prepare with a method that has one, when the first method has none.
    prepare_method = next((m for m in methods if get_method(m).learning_rates.real_base is not None), "full")
    base_cfg = TrainConfig(
        train_data=data_path, val_data=val_path, val_fraction=args.val_fraction, max_seq_len=args.max_seq_len,
        model=base_folder, method=prepare_method, batch_size=args.batch_size,
        grad_accum=args.grad_accum, precision=args.precision, epochs=args.epochs, warmup_ratio=args.warmup_ratio,
        gradient_checkpointing=args.gradient_checkpointing, seed=args.seed, device=args.device, progress=False,
        exact_match=args.exact_match, deepspeed=args.deepspeed, local_rank=args.local_rank)
    ds_source = load_deepspeed_config(args.deepspeed) if args.deepspeed else None
    filled_cfg, _, base, tokenizer, data = prepare_run(base_cfg)
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
    swept: Dict[str, float] = {}
    if args.sweep and fixed_lr is None:
        if not sweep_val:
            say("the sweep validates on the held-out set: no training records are left outside the subset "
                "(lower --max-train-examples to keep some)")
        sweep_data = dataclasses.replace(data, val=sweep_val or data.val, val_records=[])
        sweep, swept = sweep_learning_rates(method_cfg, [m for m in methods if m not in lr_given], sweep_grid,
                                            base=base, tokenizer=tokenizer, data=sweep_data,
                                            sweep_epochs=args.sweep_epochs, sweep_extend=args.sweep_extend, say=say)
    # Each method's rate: the DeepSpeed config's fixed one, else --lr METHOD=, else the sweep's choice, else the
    # registry's rate for this budget (default_lr: a one-line PeftConfigError naming --lr if the method has none).
    chosen = {m: fixed_lr or lr_given.get(m) or swept.get(m) or default_lr(m) for m in methods}

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


def _method_hyper(cfg: TrainConfig, method: str, family: str) -> dict:
    """The hyper-parameters the run used for `method` (its config's defaults, with the family's LoRA targets)."""
    method_cfg = with_family_defaults(dataclasses.replace(cfg, method=method, peft=None).filled(), family)
    return dataclasses.asdict(method_cfg.peft_config)
