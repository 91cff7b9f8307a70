"""A DeepSpeed JSON config made to agree with the command line, before any work starts.

"auto" values in the config are filled from the command line (micro batch, accumulation, train batch = micro
* accumulation * world size, lr, weight decay, clipping, fp16/bf16, scheduler steps); values the command line
did not give are taken from the config; a fixed value that contradicts the command line stops the run with a
message naming both. So one JSON serves any number of GPUs.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Tuple

from ..fileio import read_json
from .config import RUN_DEFAULTS, TrainConfig, TrainError

# (path in the DeepSpeed config, TrainConfig field) pairs that "auto" fills and that must agree otherwise
DS_LINKED_VALUES = [
    (("train_micro_batch_size_per_gpu",), "batch_size"),
    (("gradient_accumulation_steps",), "grad_accum"),
    (("gradient_clipping",), "max_grad_norm"),
    (("optimizer", "params", "lr"), "lr"),
    (("optimizer", "params", "weight_decay"), "weight_decay"),
]
FLAG_NAMES = {"batch_size": "--batch-size", "grad_accum": "--grad-accum", "max_grad_norm": "--max-grad-norm",
              "lr": "--lr", "weight_decay": "--weight-decay", "precision": "--precision"}


def load_deepspeed_config(path) -> dict:
    """The JSON object of a DeepSpeed config file; TrainError naming --deepspeed and the file otherwise."""
    try:
        return read_json(path, TrainError)
    except TrainError as err:
        raise TrainError(f"--deepspeed {err}") from None


def get_path(d: dict, path):
    """d[path[0]][path[1]]..., None where a key is missing."""
    for key in path:
        if not isinstance(d, dict) or key not in d:
            return None
        d = d[key]
    return d


def set_path(d: dict, path, value) -> None:
    for key in path[:-1]:
        d = d.setdefault(key, {})
    d[path[-1]] = value


def resolve_deepspeed_config(ds: dict, cfg: TrainConfig, world_size: int, source: str = "DeepSpeed config"
                             ) -> Tuple[dict, TrainConfig]:
    """Fill the config's "auto" values from the command line and the command line's missing values from
    the config. A fixed config value that differs from a value given on the command line, or a fixed
    train_batch_size != micro * accumulation * world size, raises TrainError. Returns (config, filled cfg)."""
    ds = json.loads(json.dumps(ds))                                                  # a deep copy
    taken = {}
    for path, name in DS_LINKED_VALUES:
        fixed = get_path(ds, path)
        given = getattr(cfg, name)
        if fixed is None or fixed == "auto":
            continue
        if given is not None and float(given) != float(fixed):
            raise TrainError(f"{source}: {'.'.join(path)} is {fixed} but {FLAG_NAMES[name]} is {given}; "
                             f"make them agree, or set {'.'.join(path)} to \"auto\"")
        taken[name] = type(RUN_DEFAULTS.get(name, 1.0))(fixed) if name != "lr" else float(fixed)
    fp16_on, bf16_on = get_path(ds, ("fp16", "enabled")), get_path(ds, ("bf16", "enabled"))
    fixed_precision = "fp16" if fp16_on is True else "bf16" if bf16_on is True else None
    if fixed_precision and cfg.precision is not None and cfg.precision != fixed_precision:
        raise TrainError(f"{source}: {fixed_precision}.enabled is true but --precision is {cfg.precision}")
    if fixed_precision:
        taken["precision"] = fixed_precision
    cfg = dataclasses.replace(cfg, **taken).filled()

    for path, name in DS_LINKED_VALUES:
        if get_path(ds, path) == "auto" or (path[-1] in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps")
                                        and get_path(ds, path) is None):
            set_path(ds, path, getattr(cfg, name))
    for key in ("fp16", "bf16"):
        if get_path(ds, (key, "enabled")) in ("auto", None) and (key in ds or cfg.precision == key):
            set_path(ds, (key, "enabled"), cfg.precision == key)
    expected = cfg.batch_size * cfg.grad_accum * world_size
    train_batch = ds.get("train_batch_size", "auto")
    if train_batch == "auto":
        ds["train_batch_size"] = expected
    elif int(train_batch) != expected:
        raise TrainError(f"{source}: train_batch_size is {train_batch} but micro batch {cfg.batch_size} x "
                         f"gradient accumulation {cfg.grad_accum} x world size {world_size} = {expected}; "
                         "set train_batch_size to \"auto\" or make them agree")
    return ds, cfg


def fill_deepspeed_schedule(ds: dict, cfg: TrainConfig, total_steps: int, warmup_steps: int,
                            source: str = "DeepSpeed config") -> dict:
    """Fill "auto" in a config scheduler's params, then refuse any "auto" left that this script does not fill."""
    params = get_path(ds, ("scheduler", "params")) or {}
    fills = {"warmup_num_steps": warmup_steps, "total_num_steps": total_steps, "warmup_max_lr": cfg.lr,
             "warmup_min_lr": 0.0, "cos_min_ratio": cfg.min_lr_ratio, "warmup_min_ratio": 0.0}
    for key, value in params.items():
        if value == "auto" and key in fills:
            params[key] = fills[key]

    def find_auto(d, prefix=""):
        for key, value in d.items():
            if isinstance(value, dict):
                yield from find_auto(value, f"{prefix}{key}.")
            elif value == "auto":
                yield prefix + key
    left = list(find_auto(ds))
    if left:
        raise TrainError(f"{source}: \"auto\" at {left} is not a value this script fills; give a number")
    return ds
