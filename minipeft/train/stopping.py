"""Stopping a training run cleanly (finetune.py's loop and pretrain_tiny.py's): SIGTERM, Ctrl-C (SIGINT), and a
deterministic stop at a given step for tests.

    with StopSignals() as stop:                 # SIGTERM / SIGINT handlers (main thread only), restored after
        while step < total:
            ... one step ...
            if stop.after_step(step):           # a signal arrived during the step (or a save), or the env says so
                write a checkpoint; raise an error whose message is stop.message(...)

A signal only sets a flag: the step (or the checkpoint being written) finishes, then the loop writes a checkpoint
and ends with one line and a non-zero exit; `--resume` continues bit-identically. A second Ctrl-C interrupts at once.

MINIPEFT_STOP_AT_STEP (environment variable, for tests and for trying out --resume):
    =k           after step k the run stops exactly as on SIGTERM (checkpoint, one line, non-zero exit)
    =k:SIGNAL    after step k (and its checkpoint, when --save-every wrote one) the process sends itself SIGNAL:
                 SIGKILL (a crash at a known step), SIGSTOP (frozen there, for a test to kill), SIGTERM (the handler)
"""

from __future__ import annotations

import os
import signal
import threading
from typing import Optional, Tuple

from .config import RunFailed, TrainError


class TrainStopped(RunFailed):
    """The run was stopped on request (a signal, MINIPEFT_STOP_AT_STEP) after writing a checkpoint."""

STOP_AT_STEP_ENV = "MINIPEFT_STOP_AT_STEP"


class StopSettingError(TrainError):
    """MINIPEFT_STOP_AT_STEP holds something other than k or k:SIGNAL."""


def stop_at_step() -> Optional[Tuple[int, Optional[signal.Signals]]]:
    """(k, signal or None) from MINIPEFT_STOP_AT_STEP, None when it is unset or empty."""
    value = os.environ.get(STOP_AT_STEP_ENV, "").strip()
    if not value:
        return None
    step, _, name = value.partition(":")
    try:
        k = int(step)
        sig = signal.Signals[name.strip().upper()] if name.strip() else None
    except (ValueError, KeyError):
        raise StopSettingError(f"{STOP_AT_STEP_ENV}={value!r}: expected a step number k >= 1, or k:SIGNAL "
                               f"(e.g. 3:SIGKILL)") from None
    if k < 1:
        raise StopSettingError(f"{STOP_AT_STEP_ENV}={value!r}: the step must be >= 1")
    return k, sig


class StopSignals:
    """Turns SIGTERM and the first SIGINT into a request to stop after the current step (see the module)."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.reason: Optional[str] = None
        self.at_step = stop_at_step()
        self._previous = {}

    def _handle(self, signum, frame):
        if self.reason is not None and signum == signal.SIGINT:       # a second Ctrl-C: stop now
            signal.default_int_handler(signum, frame)
        self.reason = self.reason or signal.Signals(signum).name

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def after_step(self, step: int) -> bool:
        """True when the run should stop now, after `step` (1-based count of finished steps)."""
        if self.at_step is not None and self.at_step[0] == step:
            k, sig = self.at_step
            if sig is None:
                self.reason = self.reason or f"{STOP_AT_STEP_ENV}={k}"
            else:
                os.kill(os.getpid(), sig)            # SIGTERM comes back through _handle; SIGSTOP waits here
        return self.reason is not None

    def agreed_stop(self, step: int, world_size: int) -> bool:
        """after_step, agreed by every rank (a signal may reach the ranks at different steps)."""
        stop = self.after_step(step)
        if world_size > 1:
            import torch
            import torch.distributed as dist
            flag = torch.tensor([float(stop)])
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            if flag.item() and not stop:
                self.reason = "a signal to another rank"
            stop = bool(flag.item())
        return stop

    def message(self, step: int, total: int, checkpoint, resume_hint: str) -> str:
        return (f"stopped by {self.reason} after step {step} of {total}; checkpoint {checkpoint} written; "
                f"continue with {resume_hint}")
