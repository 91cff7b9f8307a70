"""Draws one figure per method: where it attaches in a decoder block, and what is trained (orange).

    PYTHONPATH=. python lessons/figures/draw_methods.py            redraw into a temporary folder and
                                                                   compare byte for byte with the PNGs here
    PYTHONPATH=. python lessons/figures/draw_methods.py --write    redraw the committed PNGs

The output is deterministic (Agg backend, fixed size and dpi, no timestamp or software tag in the PNG),
so a rerun on the same matplotlib gives the same bytes. Labels are English: matplotlib's default font
has no Chinese glyphs; each README gives the Chinese terms beside the figure.
"""

import sys
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import FancyArrowPatch, Rectangle  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # lessons/
from checks import check_equal  # noqa: E402

HERE = Path(__file__).resolve().parent
FROZEN, TRAINED, EDGE = "#d9d9d9", "#f4a259", "#333333"
METHODS = {
    "full": "Full fine-tuning: every weight trains",
    "lora": "LoRA: a low-rank bypass s·B·A beside W_q and W_v",
    "prompt": "Prompt tuning: P trainable rows before the input embeddings",
    "prefix": "Prefix tuning: P trainable keys/values in every layer",
    "adapter": "Houlsby adapter: two bottlenecks per layer, before each residual add",
    "llama_adapter": "LLaMA-Adapter: gated prompt, its own softmax, top layers only",
}
# (label, x, y, width): the base decoder, bottom to top; y in [0, 10]
BASE = [("token embeddings E", 3.0, 0.4, 4.0), ("RMSNorm", 3.0, 1.6, 4.0), ("W_q   W_k   W_v", 3.0, 2.6, 4.0),
        ("attention softmax(q kᵀ/√hd) v", 3.0, 3.6, 4.0), ("W_o", 3.0, 4.6, 4.0), ("+ residual", 3.0, 5.4, 4.0),
        ("RMSNorm", 3.0, 6.2, 4.0), ("FFN = MLP: W_2(silu(W_1 x) ⊙ W_3 x)", 3.0, 7.0, 4.0), ("+ residual", 3.0, 7.8, 4.0),
        ("final RMSNorm, W_out -> logits", 3.0, 9.0, 4.0)]


def box(ax, label, x, y, w, color, h=0.55, size=8):
    ax.add_patch(Rectangle((x, y), w, h, facecolor=color, edgecolor=EDGE, linewidth=0.8))
    ax.text(x + w / 2, y + h / 2, label, ha="center", va="center", fontsize=size)


def arrow(ax, start, end):
    ax.add_patch(FancyArrowPatch(start, end, arrowstyle="-|>", mutation_scale=8, color=EDGE, linewidth=0.8))


def draw(method: str, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6.4, 5.2), dpi=100)
    ax.set_xlim(0, 10)
    ax.set_ylim(0, 10.6)
    ax.axis("off")
    ax.set_title(METHODS[method], fontsize=9)
    ax.add_patch(Rectangle((2.6, 1.35), 4.8, 7.2, facecolor="none", edgecolor="#888888", linestyle="--", linewidth=0.8))
    ax.text(7.45, 8.3, "× n_layers" if method != "llama_adapter" else "× n_layers\n(prompt in the\ntop L only)",
            fontsize=7, va="top")
    for label, x, y, w in BASE:
        box(ax, label, x, y, w, TRAINED if method == "full" else FROZEN, size=7)
    for (_, _, y0, _), (_, _, y1, _) in zip(BASE, BASE[1:]):
        arrow(ax, (5.0, y0 + 0.55), (5.0, y1))
    if method == "lora":
        box(ax, "s·B·A (rank r)\nB = 0 at start", 7.6, 2.45, 2.2, TRAINED, h=0.85, size=7)
        arrow(ax, (7.6, 2.87), (7.0, 2.87))
        ax.text(7.65, 1.9, "y = W0 x + s·B(A x)\nmergeable: W0 + s·BA", fontsize=6.5)
    elif method == "prompt":
        box(ax, "soft prompt\nP × d", 0.1, 0.3, 2.3, TRAINED, h=0.75, size=7)
        arrow(ax, (2.4, 0.67), (3.0, 0.67))
        ax.text(0.1, 1.25, "[prompt ; E(x)]:\nn -> P + n positions", fontsize=6.5)
    elif method == "prefix":
        box(ax, "prefix K_l, V_l\n(P slots, no RoPE)", 0.1, 3.45, 2.4, TRAINED, h=0.85, size=7)
        arrow(ax, (2.5, 3.87), (3.0, 3.87))
        box(ax, "MLP reparam.\n(training only)", 0.1, 2.2, 2.4, TRAINED, h=0.75, size=7)
        arrow(ax, (1.3, 2.95), (1.3, 3.45))
        ax.text(0.1, 4.6, "same softmax over\n[prefix ; real keys]", fontsize=6.5)
    elif method == "adapter":
        box(ax, "adapter: d->m->d\nW_up = 0 at start", 7.6, 4.5, 2.2, TRAINED, h=0.8, size=7)
        box(ax, "adapter: d->m->d\nW_up = 0 at start", 7.6, 6.9, 2.2, TRAINED, h=0.8, size=7)
        arrow(ax, (7.0, 4.87), (7.6, 4.87))
        arrow(ax, (7.6, 5.1), (7.0, 5.6))
        arrow(ax, (7.0, 7.27), (7.6, 7.27))
        arrow(ax, (7.6, 7.5), (7.0, 8.0))
        ax.text(7.6, 3.9, "not mergeable\n(GELU in between)", fontsize=6.5)
    elif method == "llama_adapter":
        box(ax, "adaption prompt\nK × d -> W_k, W_v", 0.1, 2.45, 2.4, TRAINED, h=0.85, size=7)
        box(ax, "gate tanh(g) times\nsoftmax(q k_pᵀ/√hd) v_p\ng = 0 at start", 0.05, 3.45, 2.5, TRAINED, h=1.0, size=6)
        arrow(ax, (1.3, 3.3), (1.3, 3.45))
        arrow(ax, (2.55, 3.9), (3.0, 3.9))
        ax.text(0.1, 4.65, "its own softmax,\nadded to the output", fontsize=6.5)
    ax.add_patch(Rectangle((0.1, 9.95), 0.35, 0.3, facecolor=FROZEN, edgecolor=EDGE))
    ax.text(0.55, 10.1, "frozen", fontsize=7, va="center")
    ax.add_patch(Rectangle((1.6, 9.95), 0.35, 0.3, facecolor=TRAINED, edgecolor=EDGE))
    ax.text(2.05, 10.1, "trained", fontsize=7, va="center")
    fig.savefig(path, dpi=100, metadata={"Software": None})
    plt.close(fig)


def draw_all(folder: Path) -> None:
    for method in METHODS:
        draw(method, folder / f"{method}.png")


if __name__ == "__main__":
    if "--write" in sys.argv:
        draw_all(HERE)
        print(f"wrote {len(METHODS)} figures to {HERE}")
    with tempfile.TemporaryDirectory() as tmp:
        draw_all(Path(tmp))
        for method in METHODS:
            fresh, committed = (Path(tmp) / f"{method}.png").read_bytes(), (HERE / f"{method}.png").read_bytes()
            check_equal(f"{method}.png redrawn == committed ({len(committed):,} bytes)", fresh == committed, True)
    print("all checks passed")
