"""The training loop, plain PyTorch on a CPU or one GPU. (DeepSpeed runs the same loop: deepspeed.py.)

One optimizer step s (0-based) with accumulation A and micro-batch size b:

    for a in 0..A-1:   micro-batch m = s*A + a  (b examples of this epoch's order)
        loss_m = mean over the label tokens of the micro-batch of  -log p(label_{t+1} | tokens_{<=t})
        grad  += d(loss_m / A) / d(theta)            (theta = the trainable parameters only)
    grad       <- grad * min(1, max_grad_norm / ||grad||_2)                                  (clipping)
    theta      <- AdamW(theta, grad, lr_s)           betas (0.9, 0.999), eps 1e-8, decoupled weight decay
    lr_s        = lr * (s + 1) / warmup                                               for s < warmup
                = lr * (r + (1 - r) * (1 + cos(pi * (s - warmup) / (total - warmup))) / 2)    after
                  (r = min_lr_ratio)

Precision: fp32; bf16 (autocast, on CPU too; trainable parameters stay fp32); fp16 (autocast + GradScaler:
the loss is multiplied by a scale S before backward, the gradients divided by S before clipping, and a step
whose gradients overflow (inf/nan) is skipped while S is halved; a skipped step does not advance the lr).

Data order: the examples of epoch e are visited in `epoch_order(n, seed, e)` (rank r of W taking positions
r, r+W, ...); micro-batch m is batch (m mod batches_per_epoch) of epoch m // batches_per_epoch. So the whole
data stream is a function of (seed, step), and a resumed run replays it exactly.

Output in the run folder: train_config.json, metrics.jsonl (a JSON object per line: training steps and
evaluations), checkpoints/ (checkpoints.py) and adapter/ (save_adapter; for "full" a complete checkpoint).
SIGTERM, Ctrl-C or MINIPEFT_STOP_AT_STEP=k stop it after a step with a checkpoint (TrainStopped; stopping.py).
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Dict, List, Optional

import torch

from ..data import collate, epoch_order
from ..distributed import world_info
from ..fileio import write_json_atomic
from ..checkpoint import CheckpointError
from ..peft import apply_peft, save_adapter
from . import checkpoints
from .config import RunFailed, TrainConfig, TrainError, is_resolved, reserve_run_folder
from .data_setup import RunData
from .evaluate import autocast, batch_loss, evaluate_loss, exact_match
from .stopping import StopSignals, TrainStopped


def lr_factor(step: int, total_steps: int, warmup_steps: int, min_lr_ratio: float = 0.0) -> float:
    """Multiplier of the base lr at optimizer step `step` (0-based): linear warm-up, then cosine decay."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return min_lr_ratio + (1.0 - min_lr_ratio) * cosine


def default_run_dir(method: str) -> Path:
    return Path("runs") / f"{method}-{time.strftime('%Y%m%d-%H%M%S')}"


class Trainer:
    """Builds the PEFT model, optimizer and schedule and runs the loop.

        trainer = Trainer(cfg, base_model, tokenizer, data); trainer.train(); trainer.save_final()
    """

    def __init__(self, cfg: TrainConfig, base_model, tokenizer, data: RunData):
        if not is_resolved(cfg):                   # every default is decided once, before (config.py)
            raise TrainError("Trainer takes a resolved TrainConfig: the one prepare_run returns, or "
                             "resolve_defaults(cfg)")
        self.cfg = cfg
        self.tokenizer, self.data = tokenizer, data
        self.pad_id = tokenizer.pad_id if tokenizer is not None else 0
        self.rank, self.world_size = world_info()
        self.is_main = self.rank == 0
        self.device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.run_dir = Path(cfg.out) if cfg.out else default_run_dir(cfg.method)
        # The run folder is this run's until close() (or the process's exit): another run writing it is refused.
        self.reservation = reserve_run_folder(cfg, self.run_dir) if self.is_main else None

        # The method's random init (LoRA A, a soft prompt, a prefix MLP) depends on the seed only. Its
        # parameters are float32 beside a frozen base that may be half precision (autocast and the fp16 loss
        # scaler need float32 master weights).
        torch.manual_seed(cfg.seed)
        self.model = apply_peft(base_model, cfg.peft, tokenizer=tokenizer, trainable_dtype=torch.float32,
                                generator=torch.Generator().manual_seed(cfg.seed)).to(self.device)
        self.model.gradient_checkpointing = cfg.gradient_checkpointing
        self.trainable = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]

        # Data stream: each rank's share of an epoch, cut to equal lengths so all ranks step together.
        self.examples_per_rank = len(data.train) // self.world_size
        if self.examples_per_rank == 0:
            raise TrainError(f"{len(data.train)} training examples cannot be shared by {self.world_size} ranks")
        self.batches_per_epoch = math.ceil(self.examples_per_rank / cfg.batch_size)
        self.total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * self.batches_per_epoch / cfg.grad_accum))
        self.warmup_steps = (cfg.warmup_steps if cfg.warmup_steps is not None
                             else round(cfg.warmup_ratio * self.total_steps))
        self.step = 0
        self.skipped_steps = 0
        self._order_cache = (-1, [])
        self.forward_model = self.model        # what batches go through (DeepSpeed: its engine)
        self.build_optimizer()

    def schedule(self, step: int) -> float:
        return lr_factor(step, self.total_steps, self.warmup_steps, self.cfg.min_lr_ratio)

    def build_optimizer(self) -> None:
        """AdamW over the trainable parameters (a group per lr multiple: LoRA+), warm-up + cosine, fp16 scaler."""
        cfg = self.cfg
        self.optimizer = torch.optim.AdamW(self.model.param_groups(cfg.lr), lr=cfg.lr, betas=(0.9, 0.999),
                                           eps=1e-8, weight_decay=cfg.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self.schedule)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=cfg.precision == "fp16")

    # -- data
    def micro_batch(self, micro_index: int) -> Dict[str, torch.Tensor]:
        """Micro-batch number micro_index of this rank's data stream (see the module docstring)."""
        epoch, position = divmod(micro_index, self.batches_per_epoch)
        if self._order_cache[0] != epoch:
            order = epoch_order(len(self.data.train), self.cfg.seed, epoch)
            self._order_cache = (epoch, order[self.rank::self.world_size][:self.examples_per_rank])
        mine = self._order_cache[1]
        chosen = mine[position * self.cfg.batch_size:(position + 1) * self.cfg.batch_size]
        batch = collate([self.data.train[i] for i in chosen], self.pad_id)
        return {k: v.to(self.device) for k, v in batch.items()}

    # -- one optimizer step
    def backward(self, batch: Dict[str, torch.Tensor]) -> float:
        """Forward and backward of one micro-batch (gradients accumulate); returns its loss."""
        with autocast(self.device, self.cfg.precision):
            loss = batch_loss(self.model, batch)
        self.scaler.scale(loss / self.cfg.grad_accum).backward()
        return loss.item()

    def optimizer_step(self):
        """Unscale, clip, step (skipped on fp16 overflow), advance the schedule, count skipped steps.
        Returns (grad norm, skipped)."""
        self.scaler.unscale_(self.optimizer)
        grad_norm = float(torch.nn.utils.clip_grad_norm_([p for _, p in self.trainable], self.cfg.max_grad_norm))
        scale_before = self.scaler.get_scale()
        self.scaler.step(self.optimizer)          # skipped when the gradients overflowed
        self.scaler.update()
        skipped = self.scaler.is_enabled() and self.scaler.get_scale() < scale_before
        self.optimizer.zero_grad(set_to_none=True)
        if not skipped:                           # as DeepSpeed does: a skipped update does not advance the lr
            self.scheduler.step()
        self.skipped_steps += int(skipped)
        return grad_norm, skipped

    def train_step(self) -> dict:
        """grad_accum micro-batches and one optimizer update. Returns this step's metrics."""
        cfg = self.cfg
        self.forward_model.train()
        lr = self.optimizer.param_groups[0]["lr"]           # the lr this step uses
        losses, tokens = [], 0
        for a in range(cfg.grad_accum):
            batch = self.micro_batch(self.step * cfg.grad_accum + a)
            tokens += int(batch["attention_mask"].sum())
            losses.append(self.backward(batch))
        grad_norm, skipped = self.optimizer_step()
        self.step += 1
        loss = sum(losses) / len(losses)
        if self.world_size > 1:                   # the mean over ranks, for the log
            import torch.distributed as dist
            both = torch.tensor([loss, float(tokens)], dtype=torch.float64)
            dist.all_reduce(both)
            loss, tokens = both[0].item() / self.world_size, int(both[1].item())
        return {"step": self.step, "epoch": round(self.step * cfg.grad_accum / self.batches_per_epoch, 4),
                "loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens": tokens, "skipped": skipped}

    # -- evaluation
    def eval_precision(self) -> str:
        return self.cfg.precision

    def evaluate(self, with_exact_match: Optional[bool] = None) -> dict:
        """Validation loss (and exact-match accuracy by greedy generation) with the current weights."""
        result = {"step": self.step}
        if not self.data.val:
            return result
        result["val_loss"] = evaluate_loss(self.forward_model, self.data.val, batch_size=self.cfg.eval_batch_size,
                                           pad_id=self.pad_id, device=self.device, precision=self.eval_precision())
        use_em = self.cfg.exact_match if with_exact_match is None else with_exact_match
        if use_em and self.data.val_records and self.tokenizer is not None:
            accuracy, texts = exact_match(self.forward_model, self.tokenizer, self.data.val_records,
                                          batch_size=self.cfg.eval_batch_size, device=self.device,
                                          precision=self.eval_precision())
            result["exact_match"] = accuracy
            self.last_generations = texts
        return result

    # -- the loop
    def train(self) -> List[dict]:
        """Run from self.step to total_steps; returns the metrics of every step."""
        from tqdm import tqdm
        cfg = self.cfg
        if self.is_main:
            if self.step == 0 and cfg.overwrite:
                self.clear_run_dir()
            self.run_dir.mkdir(parents=True, exist_ok=True)
            write_json_atomic(self.run_dir / "train_config.json", dataclasses.asdict(cfg))
        history = []
        signals = StopSignals()                             # (a bad MINIPEFT_STOP_AT_STEP: a TrainError)
        bar = tqdm(total=self.total_steps, initial=self.step, disable=not (self.is_main and cfg.progress),
                   desc=f"{cfg.method}", unit="step", dynamic_ncols=True)
        with signals:
            while self.step < self.total_steps:
                started = time.perf_counter()
                metrics = self.train_step()
                metrics["tokens_per_s"] = metrics["tokens"] / max(1e-9, time.perf_counter() - started)
                history.append(metrics)
                self.log(metrics)
                if not metrics["skipped"]:                      # an fp16 overflow skip changed nothing
                    self.check_finite(metrics)
                bar.update(1)
                bar.set_postfix(loss=f"{metrics['loss']:.4f}", tok_s=f"{metrics['tokens_per_s']:.0f}")
                if cfg.eval_every and self.step % cfg.eval_every == 0 and self.step < self.total_steps:
                    self.log({"eval": True, **self.evaluate()})
                saved = None
                if cfg.save_every and self.step % cfg.save_every == 0:
                    saved = self.save_checkpoint()
                if signals.agreed_stop(self.step, self.world_size):
                    bar.close()
                    saved = saved or self.save_checkpoint()
                    raise TrainStopped(signals.message(self.step, self.total_steps, saved,
                                                       f"--resume {self.run_dir}"))
        bar.close()
        return history

    def check_finite(self, metrics: dict) -> None:
        """Stop (RunFailed) when the loss or a trainable weight is no longer finite: every later step and the
        adapter would be garbage. Nothing is saved after it."""
        hint = "lower --lr or --max-grad-norm, or train in fp32"
        if not math.isfinite(metrics["loss"]):
            raise RunFailed(f"step {self.step}: the training loss is {metrics['loss']}; stopping ({hint})")
        for name, p in self.trainable:
            if not bool(torch.isfinite(p.detach()).all()):
                raise RunFailed(f"step {self.step}: {name} holds non-finite values after the update; stopping ({hint})")

    def log(self, metrics: dict) -> None:
        if not self.is_main:
            return
        path = self.run_dir / "metrics.jsonl"
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            with open(path, "a", encoding="utf-8") as f:
                f.write(json.dumps(metrics) + "\n")
        except OSError as err:           # a full disk, a folder that became read-only
            raise TrainError(f"{path}: cannot write the metrics ({err.strerror or err})") from None

    def clear_run_dir(self) -> None:
        """--overwrite: remove what an earlier run wrote into this run folder (and nothing else)."""
        import shutil
        from .config import RUN_FILES
        for name in RUN_FILES:
            path = self.run_dir / name
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()

    def forget_metrics_after(self, step: int) -> None:
        """After a resume at `step`: drop the metrics lines of the steps that will be replayed (and a line cut
        short by the kill)."""
        if self.is_main:
            checkpoints.forget_metrics_after(self.run_dir / "metrics.jsonl", step)

    # -- checkpoints (checkpoints.py) and the final adapter
    @property
    def checkpoint_dir(self) -> Path:
        return self.run_dir / "checkpoints"

    def save_checkpoint(self) -> Path:
        return checkpoints.save(self)

    def resume(self, where) -> None:
        """Continue from a checkpoint file, or the newest checkpoint of a run folder."""
        checkpoints.resume(self, where)

    def full_trainable_state(self) -> Dict[str, torch.Tensor]:
        """name -> the complete fp32 value of each trainable parameter."""
        return {n: p.detach() for n, p in self.trainable}

    def save_final(self, folder: Optional[Path] = None) -> Path:
        """save_adapter into run_dir/adapter (for "full": a complete checkpoint folder)."""
        folder = Path(folder) if folder is not None else self.run_dir / "adapter"
        from safetensors import SafetensorError
        try:
            save_adapter(self.model, folder, overwrite=True)     # the run folder is this run's (reserve_run_folder)
        except (OSError, SafetensorError, CheckpointError) as err:   # a full disk: the temporary folder is gone
            raise TrainError(f"{folder}: cannot write the adapter ({checkpoints.write_failure(err)}); nothing was written "
                             f"there; the checkpoints in {self.checkpoint_dir} remain") from None
        return folder

    def close(self) -> None:
        """The run is over: its run folder is free for another run (the reservation is also dropped at exit)."""
        if self.reservation is not None:
            self.reservation.release(outer_too=True)
