"""Resumable checkpoints of the plain loop, and the identity a run must share with the checkpoint it resumes.

A checkpoint (checkpoints/step-NNNNNN.pt, every --save-every steps, temp file + rename) holds the trainable
parameters, the optimizer, scheduler and grad-scaler states, the step and the RNG states (CPU, CUDA,
Python), so that on CPU a run stopped after N steps and resumed is bit-identical to one that never stopped.
It is read with torch.load(weights_only=True): only tensors and plain containers, never code.
(DeepSpeed runs use the engine's own checkpoints: deepspeed.py.)

The run identity is derived, not listed by hand, and fails closed: every TrainConfig field is in it except
those in NOT_IN_IDENTITY, each there with the reason it cannot change what a step computes; a field added
to TrainConfig is therefore part of the identity until someone decides otherwise (tests/test_resume_identity.py
asks for that decision: STEP_SETTINGS lists the fields in it). Paths count by content (BY_CONTENT): the base
model's files, the training examples, the tokenizer file and the DeepSpeed config are digested, so a moved
file resumes and a changed one is refused. The method's config counts field by field (peft.rank, ...).
Resuming with any of them changed (--lr included) is refused with a message naming the setting.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import pickle
import random
from pathlib import Path

import torch

from ..fileio import file_sha256, read_json, write_atomic
from ..peft.config import config_fields
from .config import TrainConfig, TrainError

# TrainConfig fields that cannot change what a step computes (the data stream, the update, the numbers):
NOT_IN_IDENTITY = {
    "val_data": "validation only; without it the split changes the training examples, which are digested",
    "val_fraction": "as val_data: what it changes in the training set is in the train_data digest",
    "strict_data": "stops at a malformed record instead of skipping it; the examples that train are digested",
    "gradient_checkpointing": "recomputes the same activations in backward (memory for time; same RNG)",
    "device": "where a step runs, not what it computes (a checkpoint may continue on another device)",
    "out": "where the run writes",
    "eval_every": "evaluation reads the weights, draws no random numbers, and trains nothing",
    "eval_batch_size": "evaluation only",
    "exact_match": "evaluation only (greedy generation)",
    "save_every": "when checkpoints are written",
    "keep_checkpoints": "how many checkpoints are kept",
    "resume": "which checkpoint to continue from",
    "overwrite": "whether an earlier run's files are cleared",
    "progress": "the progress bar",
    "local_rank": "set by the launcher per rank; the world size is in the identity",
}
# The fields that are in it: every other one (STEP_SETTINGS documents the decision; the identity itself
# is derived from dataclasses.fields(TrainConfig), so a new field is in it until listed above).
STEP_SETTINGS = (
    "train_data", "max_seq_len", "train_on_prompt",                       # the examples
    "model", "tokenizer", "base_dtype",                                   # the model
    "method", "peft",                                                     # the method and its config
    "lr", "weight_decay", "batch_size", "grad_accum", "max_grad_norm", "precision", "epochs", "max_steps",
    "warmup_ratio", "warmup_steps", "min_lr_ratio", "seed",               # the update and the data order
    "deepspeed",                                                          # the engine's settings
)
# Settings that count by content, under these identity keys.
BY_CONTENT = {"model": "base_model", "train_data": "train_data", "tokenizer": "tokenizer", "deepspeed": "deepspeed"}
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


def identity_settings(cfg=TrainConfig) -> tuple:
    """The fields of the run identity: every field of the config (its own class: a subclass's new fields count
    too) but NOT_IN_IDENTITY, in declaration order."""
    return tuple(f.name for f in dataclasses.fields(cfg) if f.name not in NOT_IN_IDENTITY)


def input_digests(base_model=None, examples=None, tokenizer=None, deepspeed=None, files=None) -> dict:
    """The one home of the content digests that a resume compares (finetune's run identity, pretrain_tiny.py's
    train_state.pt, compare_methods.py's results.json): a base checkpoint folder (base_model_digest), tokenized
    examples (data_digest), a tokenizer file and any other files (their SHA-256), a DeepSpeed JSON config
    (json_digest). None for what was not given; `files` is {name: path} and gives one entry per name."""
    digests = {
        "base_model": base_model_digest(base_model) if base_model and Path(base_model).is_dir() else None,
        "train_data": data_digest(examples) if examples is not None else None,
        "tokenizer": file_sha256(tokenizer)[:16] if tokenizer else None,
        "deepspeed": json_digest(deepspeed) if deepspeed else None}
    for name, path in (files or {}).items():
        digests[name] = file_sha256(path)[:16] if path is not None and Path(path).is_file() else None
    return digests


def check_digests(saved: dict, mine: dict, source: str, error=None) -> None:
    """`error` (TrainError) naming the first input whose digest differs between `saved` and `mine`."""
    for key in sorted(set(saved) | set(mine)):
        if saved.get(key) != mine.get(key):
            raise (error or TrainError)(f"{source}: was made from another {key} (content digest {saved.get(key)} "
                                        f"there, {mine.get(key)} now); resume with the same inputs")


def content_digests(trainer) -> dict:
    """BY_CONTENT's digests of a run, computed once per run (the base model's folder, the training examples the
    run made, the tokenizer file it read, the DeepSpeed JSON config it was given)."""
    if getattr(trainer, "_digests", None) is None:
        cfg = trainer.cfg
        tokenizer_path = getattr(trainer.tokenizer, "path", None) or cfg.tokenizer
        trainer._digests = input_digests(base_model=cfg.model, examples=trainer.data.train, tokenizer=tokenizer_path,
                                         deepspeed=cfg.deepspeed)
    return trainer._digests


def json_digest(path) -> str:
    """A digest of a JSON file's content (key order and spacing do not count)."""
    data = read_json(Path(path), TrainError)
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def run_identity(trainer) -> dict:
    """The settings a checkpoint must share with the run that resumes it (the module docstring)."""
    cfg, identity = trainer.cfg, {}
    digests = content_digests(trainer)
    for name in identity_settings(cfg):
        if name == "peft":
            identity.update({f"peft.{k}": v for k, v in config_fields(cfg.peft).items()})
        elif name in BY_CONTENT:
            identity[BY_CONTENT[name]] = digests[BY_CONTENT[name]]
        else:
            identity[name] = getattr(cfg, name)
    identity["world_size"] = trainer.world_size
    identity["train_examples"] = len(trainer.data.train)
    return identity


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(rng: dict) -> None:
    torch.set_rng_state(rng["torch"])
    random.setstate(rng["python"])
    if rng["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])


def load_plain(path: Path, what: str, error=TrainError) -> dict:
    """torch.load(weights_only=True): tensors and plain containers only, never code; `error` otherwise (a
    truncated or damaged file too)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:        # a global: code, never run
        found = [line.strip() for line in str(err).splitlines() if "GLOBAL" in line]
        raise error(f"--resume {path}: refused: not a readable {what}, it holds more than tensors and plain "
                         f"data (loading it could run code){': ' + found[0] if found else ''}") from None
    except Exception as err:     # noqa: BLE001 - a pickle that is not plain data, or a damaged file
        raise error(f"--resume {path}: not a readable {what} ({type(err).__name__}: "
                         f"{str(err).splitlines()[0] if str(err) else ''})") from None


def write_failure(err: BaseException) -> str:
    """A failed write in a few words (OSError's strerror, else the first line of the message)."""
    if getattr(err, "strerror", None):
        return err.strerror
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__


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
    try:
        write_atomic(path, lambda tmp: torch.save(state, tmp))
    except (OSError, RuntimeError) as err:   # a full disk (torch.save says RuntimeError): the temporary is gone
        raise TrainError(f"{path}: cannot write the checkpoint ({write_failure(err)}); the earlier checkpoints "
                         f"remain") from None
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


def forget_metrics_after(path: Path, step: int) -> None:
    """After a resume at `step`: drop the lines of metrics.jsonl of the steps that will be replayed (and a line
    cut short by the kill)."""
    if not path.is_file():
        return

    def keep(line: str) -> bool:
        try:
            return json.loads(line).get("step", 0) <= step
        except json.JSONDecodeError:
            return False
    kept = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip() and keep(line)]
    write_atomic(path, lambda tmp: tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8"))


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

