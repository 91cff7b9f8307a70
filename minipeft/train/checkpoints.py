"""Resumable checkpoints of the plain loop, and the identity a run must share with the checkpoint it resumes.

A checkpoint (checkpoints/step-NNNNNN.pt, every --save-every steps, temp file + rename) holds the trainable
parameters, the optimizer, scheduler and grad-scaler states, the step and the RNG states (CPU, CUDA,
Python), so that on CPU a run stopped after N steps and resumed is bit-identical to one that never stopped.
It is read with torch.load(weights_only=True): only tensors and plain containers, never code.
(DeepSpeed runs use the engine's own checkpoints: deepspeed.py.)

The run identity is derived, not listed by hand: the method's whole config (every hyper-parameter of its
dataclass), the run settings that decide what a step computes (data stream, optimizer, schedule, precision),
a digest of the base model's files and one of the training examples. Resuming with any of them changed
(--lr included) is refused with a message naming the setting.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import random
from pathlib import Path

import torch

from ..fileio import write_atomic
from ..peft.config import config_fields
from .config import TrainError

# Run settings (TrainConfig fields) that decide what a step computes; the method config is added in full.
IDENTITY_SETTINGS = ("method", "seed", "batch_size", "grad_accum", "max_seq_len", "train_on_prompt", "lr",
                     "weight_decay", "max_grad_norm", "precision", "base_dtype", "epochs", "max_steps",
                     "warmup_ratio", "warmup_steps", "min_lr_ratio")
SAMPLE = 1 << 20          # bytes read from each end of a weight file for the base model's digest


def base_model_digest(folder) -> str:
    """A digest of a checkpoint folder's files: every name and size, and the first and last MiB of each
    (the headers and some weights), so another base of the same shape is told apart without reading 13 GB."""
    digest = hashlib.sha256()
    for path in sorted(p for p in Path(folder).iterdir() if p.is_file() and not p.name.startswith(".")):
        size = path.stat().st_size
        digest.update(f"{path.name}:{size};".encode())
        with open(path, "rb") as f:
            digest.update(f.read(SAMPLE))
            f.seek(max(0, size - SAMPLE))
            digest.update(f.read(SAMPLE))
    return digest.hexdigest()[:16]


def data_digest(examples) -> str:
    digest = hashlib.sha256()
    for e in examples:
        digest.update(json.dumps([e.input_ids, e.labels]).encode())
    return digest.hexdigest()[:16]


def run_identity(trainer) -> dict:
    """The settings a checkpoint must share with the run that resumes it."""
    identity = {name: getattr(trainer.cfg, name) for name in IDENTITY_SETTINGS}
    identity.update({f"peft.{k}": v for k, v in config_fields(trainer.cfg.peft).items()})
    identity["world_size"] = trainer.world_size
    identity["train_examples"] = len(trainer.data.train)
    if getattr(trainer, "_digests", None) is None:           # computed once per run
        model = trainer.cfg.model
        trainer._digests = {"base_model": base_model_digest(model) if model and Path(model).is_dir() else None,
                            "train_data": data_digest(trainer.data.train)}
    identity.update(trainer._digests)
    return identity


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(rng: dict) -> None:
    torch.set_rng_state(rng["torch"])
    random.setstate(rng["python"])
    if rng["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])


def load_plain(path: Path, what: str) -> dict:
    """torch.load(weights_only=True): tensors and plain containers only, never code; TrainError otherwise."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:        # a global: code, never run
        found = [line.strip() for line in str(err).splitlines() if "GLOBAL" in line]
        raise TrainError(f"--resume {path}: refused: not a readable {what}, it holds more than tensors and plain "
                         f"data (loading it could run code){': ' + found[0] if found else ''}") from None
    except Exception as err:     # noqa: BLE001 - a pickle that is not plain data, or a damaged file
        raise TrainError(f"--resume {path}: not a readable {what} ({type(err).__name__}: "
                         f"{str(err).splitlines()[0] if str(err) else ''})") from None


def check_identity(trainer, saved: dict, source: str) -> None:
    mine = run_identity(trainer)
    for key in sorted(set(saved) | set(mine)):
        if saved.get(key) != mine.get(key):
            raise TrainError(f"{source}: checkpoint has {key} = {saved.get(key)!r} but this run has "
                             f"{mine.get(key)!r}; resume with the same settings")


def save(trainer) -> Path:
    """Write the resumable state of step trainer.step; keeps the newest keep_checkpoints."""
    state = {
        "step": trainer.step,
        "identity": run_identity(trainer),
        "trainable": {n: p.detach().cpu().clone() for n, p in trainer.trainable},
        "optimizer": trainer.optimizer.state_dict(),
        "scheduler": trainer.scheduler.state_dict(),
        "scaler": trainer.scaler.state_dict(),
        "skipped_steps": trainer.skipped_steps,
        "rng": rng_state(),
    }
    trainer.checkpoint_dir.mkdir(parents=True, exist_ok=True)
    path = trainer.checkpoint_dir / f"step-{trainer.step:06d}.pt"
    write_atomic(path, lambda tmp: torch.save(state, tmp))
    for old in sorted(trainer.checkpoint_dir.glob("step-*.pt"))[:-trainer.cfg.keep_checkpoints]:
        old.unlink()        # keep_checkpoints >= 1 (check_config), so the newest always stays
    return path


def find(where: Path) -> Path:
    """A checkpoint file, or the newest checkpoint of a run folder."""
    if where.is_dir():
        candidates = sorted((where / "checkpoints").glob("step-*.pt")) or sorted(where.glob("step-*.pt"))
        if not candidates:
            raise TrainError(f"--resume {where}: no checkpoints (step-*.pt) in {where}/checkpoints")
        return candidates[-1]
    if not where.is_file():
        raise TrainError(f"--resume {where}: file not found")
    return where


def resume(trainer, where) -> None:
    """Load the newest checkpoint of `where` into the trainer (parameters, optimizer, schedule, RNG, step)."""
    path = find(Path(where))
    state = load_plain(path, "minipeft checkpoint")
    if not isinstance(state, dict) or not {"identity", "trainable", "step", "rng"} <= set(state):
        raise TrainError(f"--resume {path}: not a minipeft checkpoint (no identity/trainable/step/rng)")
    check_identity(trainer, state["identity"], str(path))
    params = dict(trainer.trainable)
    if set(params) != set(state["trainable"]):
        raise TrainError(f"{path}: its trainable parameters are not this run's")
    with torch.no_grad():
        for name, tensor in state["trainable"].items():
            params[name].copy_(tensor)
    trainer.optimizer.load_state_dict(state["optimizer"])
    trainer.scheduler.load_state_dict(state["scheduler"])
    trainer.scaler.load_state_dict(state["scaler"])
    trainer.skipped_steps = state["skipped_steps"]
    trainer.step = state["step"]
    set_rng_state(state["rng"])
    trainer.forget_metrics_after(trainer.step)

