"""The DeepSpeed path: the same loop as loop.py, with a DeepSpeed engine doing the optimizer step.

    deepspeed --num_gpus 8 tools/finetune.py --deepspeed tools/ds_configs/zero3_offload_reference.json ...

What differs from the plain loop (DeepSpeedTrainer overrides exactly these):
- build_optimizer: deepspeed.initialize over the trainable parameters only, with the config made to agree
  with the command line (deepspeed_config.py), a client torch AdamW when the config names no optimizer (so
  nothing compiles) and our warm-up + cosine schedule when it names no scheduler.
- backward / optimizer_step: DeepSpeed owns accumulation (engine.backward / engine.step after every
  micro-batch), clipping and fp16 loss scaling; the step's grad norm and skip flag are read back from it.
- checkpoints: the engine's own (save_checkpoint / load_checkpoint, frozen parameters excluded), with the run
  identity and the RNG states (checkpoints.py) as client state; a tag counts once rank 0 has marked it
  complete after all ranks wrote it, and the newest --keep-checkpoints complete tags are kept.
  Every file of a tag is read once with torch.load(weights_only=True) before DeepSpeed reads it (DeepSpeed
  itself unpickles with weights_only=False), so a planted pickle is refused instead of run.
- save_final: the fp32 master copy of each trainable parameter is gathered on every rank (full size, also
  under ZeRO-3) and rank 0 writes the adapter.
Under ZeRO-3 the base is built already partitioned and filled from the checkpoint tensor by tensor
(load_base_partitioned), so no rank ever holds the whole model.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Dict, Optional

import torch

from ..distributed import is_partitioned
from ..fileio import write_json_atomic
from ..peft import save_adapter
from . import checkpoints
from .config import BASE_DTYPES, TrainConfig, TrainError
from .deepspeed_config import fill_deepspeed_schedule, get_path
from .evaluate import batch_loss
from .loop import Trainer


def init_distributed_for_deepspeed() -> None:
    """Start the process group for DeepSpeed: NCCL with CUDA, gloo on CPU (with DeepSpeed's shared-memory
    op switched off, so nothing compiles). Without a launcher, sets up a world of one process."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed
    import torch.distributed as dist
    if dist.is_initialized():
        return
    if "RANK" not in os.environ:
        import socket
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        deepspeed.init_distributed()
    else:
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        deepspeed.init_distributed(dist_backend="gloo")


class DeepSpeedTrainer(Trainer):
    """Trainer whose optimizer step is a DeepSpeed engine's (see the module docstring)."""

    def __init__(self, cfg: TrainConfig, base_model, tokenizer, data, ds_config: dict):
        self.ds_config = ds_config
        super().__init__(cfg, base_model, tokenizer, data)   # "cuda" is this rank's GPU (set_device(LOCAL_RANK))

    def build_optimizer(self) -> None:
        import deepspeed
        cfg = self.cfg
        ds_config = fill_deepspeed_schedule(dict(self.ds_config), cfg, self.total_steps, self.warmup_steps,
                                            source=f"--deepspeed {cfg.deepspeed}")
        params = self.model.param_groups(cfg.lr)     # groups by lr multiple (LoRA+), as loop.py
        optimizer = None
        if "optimizer" not in ds_config:       # a client AdamW (torch's: nothing to compile)
            optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8,
                                          weight_decay=cfg.weight_decay)
            ds_config.setdefault("zero_force_ds_cpu_optimizer", False)
        half = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(cfg.precision)
        if half is not None and any(is_partitioned(p) for p in self.model.parameters()):
            # DeepSpeed casts a model to its half dtype only when no part of it came from zero.Init; with a
            # partitioned base (already in `half`), cast the method's new parameters as it would have.
            for p in self.model.parameters():
                if not is_partitioned(p):
                    p.data = p.data.to(half)
        client_scheduler = None
        if "scheduler" not in ds_config:       # our warm-up + cosine, built on DeepSpeed's optimizer
            client_scheduler = lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, self.schedule)  # noqa: E731
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=self.model, model_parameters=params, optimizer=optimizer, lr_scheduler=client_scheduler,
            config=ds_config)
        self.ds_config = ds_config
        self.scaler = None
        self.forward_model = self.engine

    def backward(self, batch) -> float:
        loss = batch_loss(self.engine, batch)
        self.engine.backward(loss)            # DeepSpeed scales by 1/accumulation and owns the step
        self.engine.step()
        return loss.item()

    def optimizer_step(self):
        grad_norm = self.engine.get_global_grad_norm()
        grad_norm = float(grad_norm) if grad_norm is not None else float("nan")
        engine_skipped = getattr(self.engine, "skipped_steps", 0)
        skipped = bool(engine_skipped > self.skipped_steps)
        self.skipped_steps = engine_skipped
        return grad_norm, skipped

    def eval_precision(self) -> str:
        return "fp32"                         # DeepSpeed casts the model itself

    # -- checkpoints: the engine's own
    def save_checkpoint(self) -> Path:
        """The engine's checkpoint as tag step-NNNNNN; once every rank has written its part, rank 0 marks the tag
        complete (DeepSpeed's own `latest` is written before that, so a kill between leaves it naming a tag
        that lacks a rank's files). Then only the newest keep_checkpoints complete tags are kept."""
        import shutil
        import torch.distributed as dist
        tag = f"step-{self.step:06d}"
        root = self.checkpoint_dir / "deepspeed"
        self.engine.save_checkpoint(str(root), tag=tag, exclude_frozen_parameters=True,
                                    client_state={"step": self.step, "identity": checkpoints.run_identity(self),
                                                  "rng": checkpoints.rng_state()})
        dist.barrier()                                    # every rank has written its part of the tag
        if self.is_main:
            write_json_atomic(root / tag / COMPLETE_MARK, {"step": self.step, "world_size": self.world_size})
            kept = {p.name for p in complete_tags(root)[-self.cfg.keep_checkpoints:]}
            for old in root.glob("step-*"):
                if old.name not in kept:
                    shutil.rmtree(old)
        return root / tag

    def resume(self, where) -> None:
        where = Path(where)
        folder = where / "checkpoints" / "deepspeed" if (where / "checkpoints").is_dir() else where
        tags = complete_tags(folder)
        if not tags:
            raise TrainError(f"--resume {where}: no complete DeepSpeed checkpoint (a step-* tag with {COMPLETE_MARK}) "
                             f"in {folder}")
        tag = tags[-1]
        with torch.serialization.safe_globals(deepspeed_checkpoint_classes()):
            for path in sorted(tag.glob("*.pt")):
                checkpoints.load_plain(path, "DeepSpeed checkpoint file")
        _, client = self.engine.load_checkpoint(str(folder), tag=tag.name, load_module_strict=False)
        checkpoints.check_identity(self, client.get("identity", {}), str(tag))
        self.step = client["step"]
        if client.get("rng") is not None:
            checkpoints.set_rng_state(client["rng"])
        self.forget_metrics_after(self.step)

    # -- the final adapter
    def full_trainable_state(self) -> Dict[str, torch.Tensor]:
        """name -> the complete fp32 value of each trainable parameter (DeepSpeed's master copy: not the
        bf16/fp16 working copy, and never a ZeRO shard). A collective: every rank calls it."""
        from deepspeed.utils import safe_get_full_fp32_param
        state = {}
        for name, p in self.trainable:
            full = safe_get_full_fp32_param(p)            # all-gathers the shards (ZeRO-1/2/3)
            state[name] = (full if full is not None else p.detach()).detach().float().cpu().clone()
        return state

    def save_final(self, folder: Optional[Path] = None) -> Path:
        """Every rank takes part in gathering; rank 0 writes the complete fp32 tensors with save_adapter."""
        import deepspeed
        import torch.distributed as dist
        folder = Path(folder) if folder is not None else self.run_dir / "adapter"
        masters = self.full_trainable_state()
        needed = list(self.model.parameters()) if self.model.trains_base else [p for _, p in self.trainable]
        gathered = (deepspeed.zero.GatheredParameters(needed, modifier_rank=None)
                    if self.engine.zero_optimization_stage() == 3 else contextlib.nullcontext())
        with gathered:                                    # parameters are complete (not shards) inside
            if self.is_main:
                working = {}
                try:
                    for name, p in self.trainable:        # write the fp32 masters, not the working copies
                        working[name] = p.data
                        p.data = masters[name].to(p.device)
                    save_adapter(self.model, folder, overwrite=True)   # the run's own folder
                finally:
                    for name, p in self.trainable:
                        if name in working:
                            p.data = working[name]
        dist.barrier()
        return folder


COMPLETE_MARK = "minipeft_complete.json"       # written by rank 0 after every rank has saved its part of a tag


def complete_tags(root: Path) -> list:
    """The tags under `root` that every rank finished writing, oldest first."""
    return sorted(p for p in Path(root).glob("step-*") if (p / COMPLETE_MARK).is_file())


def deepspeed_checkpoint_classes() -> list:
    """The plain-data classes DeepSpeed's own checkpoints pickle (a namedtuple, an enum, the loss scaler's
    attributes): allowed in the weights_only check, which refuses every other global (code)."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address
    return [fragment_address, ZeroStageEnum, LossScaler]


def zero3_dtype(cfg: TrainConfig, ds_config: dict) -> torch.dtype:
    """The dtype of a ZeRO-3 partitioned base: the config's (float16 / bfloat16 when enabled, else float32),
    which zero.Init takes from it (DeepSpeed 0.19 ignores an explicit dtype when the accelerator lacks fp16, as
    on CPU, and does not cast a zero.Init model itself). An explicit --base-dtype must agree."""
    dtype = (torch.float16 if get_path(ds_config, ("fp16", "enabled")) is True else
             torch.bfloat16 if get_path(ds_config, ("bf16", "enabled")) is True else torch.float32)
    if cfg.base_dtype != "auto" and BASE_DTYPES[cfg.base_dtype] != dtype:
        raise TrainError(f"--base-dtype {cfg.base_dtype}: under ZeRO-3 the base is held in the DeepSpeed "
                         f"config's dtype, {str(dtype).removeprefix('torch.')}; leave --base-dtype auto")
    return dtype


def load_base_partitioned(cfg: TrainConfig, ds_config: dict):
    """The base model for ZeRO-3 without a full copy on any rank. It is built inside deepspeed.zero.Init, so
    each parameter is cut into per-rank shards as it is created; then rank 0 streams the checkpoint
    (iter_checkpoint_tensors, one tensor at a time) and each weight in turn is gathered, overwritten by rank 0
    and partitioned again. Peak memory per rank: its shards plus one full tensor. Every rank calls this; an
    error on rank 0 (a bad checkpoint) is sent to the others so that all of them stop."""
    import deepspeed
    import torch.distributed as dist
    from ..checkpoint import CheckpointError, iter_checkpoint_tensors, open_checkpoint
    from ..families import build_model
    dtype = zero3_dtype(cfg, ds_config)
    with deepspeed.zero.Init(config_dict_or_path=ds_config):          # parameters in `dtype`
        model = build_model(open_checkpoint(cfg.model).config())
    params = dict(model.named_parameters())
    assert all(p.dtype == dtype for p in params.values()), "zero.Init chose another dtype than the config's"
    is_main = dist.get_rank() == 0
    tensors = iter_checkpoint_tensors(cfg.model, dtype) if is_main else None
    while True:
        name, tensor, failure = None, None, None
        if is_main:
            try:
                name, tensor = next(tensors, (None, None))
            except Exception as err:                     # noqa: BLE001 - re-raised below, on every rank
                failure = err
        message = [name, None if failure is None else f"{type(failure).__name__}: {failure}"]
        dist.broadcast_object_list(message, src=0)       # rank 0 names the next tensor (None: the end)
        name, error = message
        if error is not None:
            raise failure if is_main else CheckpointError(f"{cfg.model}: rank 0 could not read it: {error}")
        if name is None:
            return model.eval()
        with deepspeed.zero.GatheredParameters([params[name]], modifier_rank=0):   # rank 0's value is kept
            if is_main:
                params[name].data.copy_(tensor)
