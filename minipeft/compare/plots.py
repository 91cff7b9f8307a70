"""The loss curves tools/compare_methods.py draws: training and validation loss of every method, one pair of
panels for one base (plot_curves) or a row of them per base (plot_bases); matplotlib is imported only here."""

from __future__ import annotations

from pathlib import Path
from typing import Dict

from ..fileio import write_atomic
from .methods import ordered, title


def plot_curves(results: Dict[str, dict], path: Path, heading: str, axes=None) -> None:
    """Training and validation curves of every method; into `axes` (a pair) when given, else a new PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    own = axes is None
    if own:
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    ax_train, ax_val = axes
    for method in ordered(results):
        curves = results[method]["curves"]
        line, = ax_train.plot(*zip(*curves["train"]), marker=".", label=title(method))
        ax_val.plot(*zip(*curves["val"]), marker=".", color=line.get_color(), label=title(method))
        best = (results[method]["best_val_epoch"], results[method]["best_val_loss"])
        ax_val.plot(*best, marker="o", markersize=9, markerfacecolor="none", color=line.get_color())
    ax_train.set_title("training loss (mean per evaluation interval)" if own else f"{heading}: training loss", fontsize=9)
    ax_val.set_title("validation loss (circle: lowest)" if own else f"{heading}: validation loss", fontsize=9)
    for ax in (ax_train, ax_val):
        ax.set_xlabel("epoch")
        ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
    ax_train.set_ylabel("loss (nats per response token)")
    ax_val.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)   # beside, never on a curve
    if own:
        fig.suptitle(heading, fontsize=9)
        fig.tight_layout()
        save_figure(fig, path)


def plot_bases(bases: Dict[str, dict], path: Path) -> None:
    """One row of (training, validation) curves per base."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, grid = plt.subplots(len(bases), 2, figsize=(11, 3.6 * len(bases)), squeeze=False)
    for row, (label, run) in zip(grid, bases.items()):
        plot_curves(run["results"], path, label, axes=row)
    fig.tight_layout()
    save_figure(fig, path)


def save_figure(fig, path: Path) -> None:
    import matplotlib.pyplot as plt
    write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
