"""TrainConfig: everything a run needs to know, and the checks that stop a bad run before any work.

The method's own hyper-parameters are not renamed here: `peft` holds the method's config dataclass
(LoRAConfig(rank=8, ...), see minipeft/peft/config.py), which validates itself. TrainConfig holds the rest:
data, model, optimisation, evaluation, checkpoints and DeepSpeed. Values that a DeepSpeed config may fix
are None when not given on the command line.

The defaults of what was not given are decided in one place, resolve_defaults(cfg), once per run (prepare_run
calls it, after a DeepSpeed config has fixed what it fixes):
    model, train_data   the shipped tiny model and demo data (assets/) when none is named
    peft                the method's default config; LoRA's default targets become the family's (BLOOM: wqkv)
    RUN_DEFAULTS        batch size, accumulation, weight decay, clipping, precision
    lr                  the method's tuned rate from the PEFT registry: learning_rate("tiny_base") for the
                        shipped model, learning_rate("real_base") otherwise (none: an error naming --lr)
The Trainer takes only a resolved config (is_resolved), and resolving a resolved config changes nothing.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from .. import assets_dir
from ..reservation import Reservation, claim_output
from ..peft import METHODS, PeftConfigError, get_method
from ..family_registry import get_family

# Values that a DeepSpeed config may fix; None in TrainConfig means "not given on the command line".
RUN_DEFAULTS = {"batch_size": 8, "grad_accum": 1, "weight_decay": 0.0, "max_grad_norm": 1.0, "precision": "fp32"}

BASE_DTYPES = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class TrainError(ValueError):
    """A training setup that cannot work (bad flag value, a DeepSpeed config contradicting the command line,
    a checkpoint of another run); the message names the flag, key or file."""


class RunFailed(TrainError):
    """A run that started and could not finish (a non-finite update; a stop on request, TrainStopped): the tools
    exit 1 for it, and 2 for bad input."""


@dataclass
class TrainConfig:
    # data
    train_data: Optional[str] = None      # Alpaca JSON / JSON Lines, or a tokenized file from prepare_data.py
    val_data: Optional[str] = None        # None: a seeded split of train_data (val_fraction)
    val_fraction: float = 0.1
    max_seq_len: int = 256
    train_on_prompt: bool = False
    strict_data: bool = False
    # model
    model: Optional[str] = None           # our checkpoint folder; None = the shipped tiny model
    tokenizer: Optional[str] = None       # default: <model>/tokenizer.model, else <model>/tokenizer.json
    base_dtype: str = "auto"              # frozen base weights: auto = float32 for fp32, else the half dtype
    # method: its name and its config (None: the method's defaults); either one decides the other
    method: Optional[str] = None          # "lora" when neither is given
    peft: Optional[Any] = None            # LoRAConfig(...), PromptConfig(...), ... (minipeft.peft)
    # optimisation (None = not given: the default, or the DeepSpeed config's value)
    lr: Optional[float] = None
    weight_decay: Optional[float] = None
    batch_size: Optional[int] = None
    grad_accum: Optional[int] = None
    max_grad_norm: Optional[float] = None
    precision: Optional[str] = None
    epochs: float = 3.0
    max_steps: Optional[int] = None
    warmup_ratio: float = 0.05
    warmup_steps: Optional[int] = None
    min_lr_ratio: float = 0.0
    gradient_checkpointing: bool = False
    seed: int = 0
    device: Optional[str] = None          # default: cuda if available, else cpu
    # evaluation, logging, checkpoints
    out: Optional[str] = None             # run folder; default runs/<method>-<timestamp>
    eval_every: int = 0                   # 0: evaluate only at the end
    eval_batch_size: int = 16
    exact_match: bool = True              # greedy generation on the validation records at each evaluation
    save_every: int = 0                   # 0: no periodic checkpoints
    keep_checkpoints: int = 2
    resume: Optional[str] = None          # a checkpoint file, or a run folder (its latest checkpoint)
    overwrite: bool = False               # start afresh in an --out that holds another run (its files removed)
    progress: bool = True
    deepspeed: Optional[str] = None       # DeepSpeed JSON config
    local_rank: Optional[int] = None      # set by the deepspeed launcher

    def __post_init__(self):
        if self.peft is not None:
            given = getattr(self.peft, "method", None)
            if self.method is not None and self.method != given:
                raise TrainError(f"method is {self.method!r} but peft is a {type(self.peft).__name__} "
                                 f"(method {given!r}); give one of them, or make them agree")
            self.method = given
        elif self.method is None:
            self.method = "lora"

    @property
    def peft_config(self):
        """The method's config: `peft`, or the method's defaults."""
        return self.peft if self.peft is not None else get_method(self.method, "--method").config_class()

    def filled(self) -> "TrainConfig":
        """resolve_defaults(self) (the older name)."""
        return resolve_defaults(self)


def resolve_defaults(cfg: TrainConfig) -> TrainConfig:
    """A copy with every default in place of the values not given (the module docstring says which); the one
    place they are decided. TrainError (naming --lr) for a method without a tuned rate for this kind of base."""
    values = {k: v for k, v in RUN_DEFAULTS.items() if getattr(cfg, k) is None}
    if cfg.model is None:
        values["model"] = str(assets_dir() / "tiny-llama")
    if cfg.train_data is None:
        values["train_data"] = str(assets_dir() / "demo_data" / "train.json")
        if cfg.val_data is None:
            values["val_data"] = str(assets_dir() / "demo_data" / "heldout.json")
    if cfg.lr is None:
        kind = "tiny_base" if cfg.model is None else "real_base"
        try:
            values["lr"] = get_method(cfg.method, "--method").learning_rate(kind)
        except PeftConfigError as err:
            raise TrainError(str(err)) from None
    model = values.get("model", cfg.model)
    peft = cfg.peft_config
    if _takes_family_targets(peft):                                   # the family's default targets
        from ..checkpoint import open_checkpoint
        peft = peft_for_family(peft, open_checkpoint(model).config().family)
    values["peft"] = peft
    return dataclasses.replace(cfg, **values)


def _takes_family_targets(peft) -> bool:
    """A method config left at its default targets, for a method whose registry entry says what they mean per
    family (family_targets)."""
    method = get_method(peft.method)
    return method.family_targets is not None and peft.targets == type(peft)().targets


def peft_for_family(peft, family: str):
    """A config left at its default targets takes what they mean in the family (the registry's family_targets:
    LoRA's and DoRA's wq, wv become BLOOM's and ChatGLM-6B's fused wqkv, as HF peft's query_key_value; (IA)^3's
    wk, wv, w2 become wqkv, w2); any other config is returned as it is."""
    if _takes_family_targets(peft):
        return dataclasses.replace(peft, targets=get_method(peft.method).family_targets(get_family(family)))
    return peft


def is_resolved(cfg: TrainConfig) -> bool:
    """True for a config resolve_defaults made (nothing left to fill)."""
    return all(getattr(cfg, name) is not None for name in (*RUN_DEFAULTS, "model", "train_data", "lr", "peft"))


def check_config(cfg: TrainConfig) -> None:
    """Flag values that cannot work -> TrainError before anything is loaded. (The method's own settings
    were checked by its config dataclass when it was made.)"""
    def need(condition, message):
        if not condition:
            raise TrainError(message)
    need(cfg.method in METHODS, f"--method {cfg.method!r}: expected one of {', '.join(METHODS)}")
    need(cfg.precision in (None, "fp32", "bf16", "fp16"), f"--precision {cfg.precision!r}: expected fp32, bf16 or fp16")
    for name in ("batch_size", "grad_accum", "max_seq_len", "eval_batch_size"):
        value = getattr(cfg, name)
        need(value is None or value >= 1, f"--{name.replace('_', '-')} must be >= 1, got {value}")
    need(cfg.max_steps is None or cfg.max_steps >= 1, f"--max-steps must be >= 1, got {cfg.max_steps}")
    need(cfg.epochs > 0, f"--epochs must be > 0, got {cfg.epochs}")
    need(cfg.lr is None or (math.isfinite(cfg.lr) and cfg.lr > 0), f"--lr must be a finite number > 0, got {cfg.lr}")
    need(cfg.max_grad_norm is None or (math.isfinite(cfg.max_grad_norm) and cfg.max_grad_norm > 0),
         f"--max-grad-norm must be a finite number > 0 (the clipping norm), got {cfg.max_grad_norm}")
    need(cfg.weight_decay is None or (math.isfinite(cfg.weight_decay) and cfg.weight_decay >= 0),
         f"--weight-decay must be a finite number >= 0, got {cfg.weight_decay}")
    need(cfg.keep_checkpoints >= 1, f"--keep-checkpoints must be >= 1, got {cfg.keep_checkpoints} (for no "
         f"checkpoints at all, use --save-every 0)")
    need(cfg.out is None or not Path(cfg.out).is_file(), f"--out {cfg.out}: is a file; the run folder must be a folder")
    check_device(cfg.device)
    if cfg.out is not None:
        check_run_folder(cfg, Path(cfg.out))
    need(0.0 <= cfg.warmup_ratio < 1.0, f"--warmup-ratio must be in [0, 1), got {cfg.warmup_ratio}")
    need(0.0 <= cfg.min_lr_ratio <= 1.0, f"--min-lr-ratio must be in [0, 1], got {cfg.min_lr_ratio}")
    need(cfg.save_every >= 0 and cfg.eval_every >= 0, "--save-every and --eval-every must be >= 0")
    need(cfg.base_dtype in BASE_DTYPES, f"--base-dtype {cfg.base_dtype!r}: expected one of {', '.join(BASE_DTYPES)}")
    for name in ("train_data", "val_data", "deepspeed"):
        path = getattr(cfg, name)
        need(path is None or Path(path).is_file(), f"--{name.replace('_', '-')} {path}: file not found")


# What a run writes into its folder (loop.py); an --out holding any of them belongs to another run.
RUN_FILES = ("train_config.json", "metrics.jsonl", "checkpoints", "adapter")


def run_folder_in_use(folder: Path) -> bool:
    return any((folder / name).exists() for name in RUN_FILES)


def check_run_folder(cfg: TrainConfig, folder: Path) -> None:
    """The run folder is a folder, and one that holds no other run unless --resume or --overwrite (TrainError)."""
    if folder.is_file():
        raise TrainError(f"--out {folder}: is a file; the run folder must be a folder")
    if cfg.resume is None and not cfg.overwrite and run_folder_in_use(folder):
        raise TrainError(f"--out {folder}: holds another run ({', '.join(RUN_FILES)}); continue it with --resume "
                         f"{folder}, choose a new --out, or pass --overwrite to start afresh there")


def reserve_run_folder(cfg: TrainConfig, folder: Optional[Path] = None) -> Reservation:
    """Claim the run folder for this process until the run ends (reservation.claim_output; a claim it holds already is
    joined): another process writing it -> TrainError in one line; under the claim check_run_folder runs again,
    and --overwrite (which removes RUN_FILES) may not remove an input of the run."""
    folder = Path(folder if folder is not None else cfg.out)
    removes = [] if cfg.resume is not None else [folder / name for name in RUN_FILES]
    return claim_output(folder, cfg.overwrite, error=TrainError, removes=removes,
                        inputs=[cfg.train_data, cfg.val_data, cfg.model, cfg.tokenizer, cfg.deepspeed],
                        refuse=lambda f: check_run_folder(cfg, f))


def check_device(device: Optional[str]) -> None:
    """--device names a device this machine has; TrainError otherwise."""
    if device is None:
        return
    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError):
        raise TrainError(f"--device {device!r}: not a device name (cpu, cuda, cuda:1)") from None
    if parsed.type == "cuda" and not (torch.cuda.is_available() and (parsed.index or 0) < torch.cuda.device_count()):
        raise TrainError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA devices")
    if parsed.type not in ("cpu", "cuda"):
        raise TrainError(f"--device {device}: expected cpu or cuda[:N]")


def base_dtype(cfg: TrainConfig) -> torch.dtype:
    """The dtype the frozen base weights are loaded in. "auto": float32 for fp32 training, else the
    precision's half dtype, so a 7B base takes 2 bytes per parameter. Trainable parameters are always kept
    in float32 (apply_peft(trainable_dtype=torch.float32) in the Trainer), which autocast and the fp16 loss
    scaler need."""
    if cfg.base_dtype != "auto":
        return BASE_DTYPES[cfg.base_dtype]
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.precision, torch.float32)


def peft_config_from(cfg: TrainConfig):
    """The method's config dataclass of a run (its `peft`, or the method's defaults)."""
    return cfg.peft_config
