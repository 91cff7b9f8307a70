"""One method's run in the comparison: train it from a fresh copy of the base, evaluate the validation loss a few
times per epoch, and measure its peak memory, speed and greedy answers.

What every method shares: the base weights (a fresh copy each), the training examples and their order
(epoch_order(seed, epoch)), the number of optimizer steps and examples per step (so the same training
tokens), the warm-up + cosine schedule, AdamW, clipping. What differs: the method, and its peak learning
rate (prompt-like methods need rates 10-100x larger than full fine-tuning: a few hundred parameters that
must move the output of a frozen network; sweep.py picks each rate from a small grid).
"""

from __future__ import annotations

import copy
import time
from typing import List, Optional

import torch

from ..train import TrainConfig, build_trainer
from .scores import answer_scores


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
               with_exact_match: bool) -> dict:
    """Train one method from a fresh copy of `base`, evaluating the validation loss evals_per_epoch times
    per epoch (and before training). Returns the numbers of the results table, the curves and the greedy
    answers to the held-out records with their scores (scores.answer_scores)."""
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

    final, generations = {}, []
    if with_exact_match:
        final = trainer.evaluate(with_exact_match=True)
        trainer.log({"eval": True, "when": "final", **final})
        generations = list(getattr(trainer, "last_generations", []))
    trainer.close()                             # its run folder is written

    # Training loss curve: the mean step loss over each evaluation interval.
    train_curve = []
    for start in range(0, len(train_points), eval_interval):
        chunk = train_points[start:start + eval_interval]
        train_curve.append((chunk[-1][0], sum(loss for _, loss in chunk) / len(chunk)))
    best_epoch, best_val = min(val_curve[1:] or val_curve, key=lambda point: point[1])
    # apply_peft's report (under ZeRO-3 a parameter holds only its shard: the report counts its full size)
    trainable, total = trainer.model.report.trainable, trainer.model.report.total
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
        "train_val_gap": val_curve[-1][1] - train_curve[-1][1],
        "curves": {"train": train_curve, "val": val_curve},
        **answer_scores(data.val_records, generations),
        "generations": generations,
    }
