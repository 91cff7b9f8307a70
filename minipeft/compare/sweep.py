"""The learning-rate sweep of tools/compare_methods.py --sweep: each method's grid (its registry entry's
sweep_grid, or --sweep-lrs) is run for sweep_epochs, scored by the validation loss on training records kept out
of the training subset (never the held-out set); when the lowest loss sits at an edge of the grid, one more rate
beyond that edge (the grid's own ratio) is tried, up to sweep_extend times.
"""

from __future__ import annotations

import math
from typing import Dict

from .method_run import run_method


def sweep_learning_rates(method_cfg, methods, grids: Dict[str, tuple], *, base, tokenizer, data,
                         sweep_epochs: float, sweep_extend: int, say=print):
    """-> ({method: {lr: final val loss}}, {method: chosen lr}); method_cfg(method, lr, epochs, name) -> cfg."""
    sweep: Dict[str, Dict[str, float]] = {}
    chosen: Dict[str, float] = {}
    for method in methods:
        sweep[method] = {}
        grid = sorted(grids[method])
        tried: Dict[float, float] = {}
        for _ in range(1 + sweep_extend):
            for lr in grid:
                if lr in tried:
                    continue
                cfg, ds_config = method_cfg(method, lr, sweep_epochs, f"sweep-{method}-{lr:g}")
                result = run_method(cfg, base, tokenizer, data, ds_config, evals_per_epoch=1, with_exact_match=False)
                tried[lr] = result["final_val_loss"]
                sweep[method][f"{lr:g}"] = result["final_val_loss"]
                say(f"sweep {method:13s} lr {lr:<8g} val loss {result['final_val_loss']:.4f}  "
                    f"({result['train_seconds']:.0f} s)")
            finite = {lr: v for lr, v in tried.items() if math.isfinite(v)}
            if not finite:
                break
            best = min(finite, key=finite.get)
            chosen[method] = best
            # The best rate at an edge of the grid: try one more rate beyond it (the grid's own ratio).
            ordered = sorted(tried)
            if len(ordered) < 2 or best not in (ordered[0], ordered[-1]):
                break
            ratio = ordered[-1] / ordered[-2] if best == ordered[-1] else ordered[1] / ordered[0]
            grid = [best * ratio if best == ordered[-1] else best / ratio]
        if method in chosen:
            say(f"sweep {method}: chosen lr {chosen[method]:g}")
    return sweep, chosen
