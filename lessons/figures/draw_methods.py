"""Draws one figure per method: where it attaches in a decoder block, and what is trained (orange).

    PYTHONPATH=. python lessons/figures/draw_methods.py            redraw into a temporary folder and
                                                                   compare byte for byte with the PNGs here
    PYTHONPATH=. python lessons/figures/draw_methods.py --write    redraw the committed PNGs

Each figure shows the block's two residual paths (残差), the method's trained parts beside the frozen
ones, and bilingual labels. The Chinese glyphs come from Noto Sans SC, loaded by path from the pip package
`pylopdf-fonts-zh-cn` (pinned in the dev extra); Latin and math glyphs from matplotlib's own DejaVu Sans.
The output is deterministic (Agg backend, fixed size and dpi, fonts from pinned packages, no timestamp or
software tag in the PNG), so a rerun on the same matplotlib gives the same bytes.
"""

import importlib.resources
import sys
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib import font_manager  # noqa: E402
from matplotlib.patches import Circle, FancyArrowPatch, Rectangle  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # lessons/
from checks import check_equal  # noqa: E402

HERE = Path(__file__).resolve().parent
FROZEN, TRAINED, EDGE, RESIDUAL = "#d9d9d9", "#f4a259", "#333333", "#3b6ea8"
METHODS = {
    "full": "Full fine-tuning 全量微调: every weight trains",
    "lora": "LoRA 低秩适配: a parallel low-rank branch s·B·A beside W_q and W_v",
    "prompt": "Prompt tuning 提示微调: P trainable rows before the input embeddings",
    "prefix": "Prefix tuning 前缀微调: P trainable keys/values in every layer",
    "adapter": "Houlsby adapter 适配器: two bottlenecks per layer, before each residual add",
    "llama_adapter": "LLaMA-Adapter: a gated prompt with its own softmax, top L_a layers only",
}
X, W, H = 3.2, 3.6, 0.5          # the base column: left edge, width, box height
STEM = X + W / 2                 # where the main arrows run
# (label, y): the base decoder, bottom to top; y in [0, 10.8]
BASE = [("token embeddings E  词嵌入", 0.3), ("RMSNorm  均方根归一化", 1.3), ("W_q   W_k   W_v", 2.3),
        ("attention  注意力\nsoftmax(q kᵀ/√hd) v", 3.5), ("W_o", 4.55), ("⊕  residual add  残差相加", 5.4),
        ("RMSNorm  均方根归一化", 6.3), ("FFN = MLP  前馈网络\nW_2(silu(W_1 x) ⊙ W_3 x)", 7.3),
        ("⊕  residual add  残差相加", 8.4), ("final RMSNorm, W_out → logits  输出", 9.4)]


def load_fonts() -> list:
    """Register Noto Sans SC from its pip package by path; returns the font families to draw with (DejaVu
    Sans first, for Latin and math glyphs; Noto Sans SC for what DejaVu lacks)."""
    try:
        font_file = importlib.resources.files("pylopdf_fonts_zh_cn") / "NotoSansSC-Regular.otf"
    except ModuleNotFoundError:
        raise SystemExit("lessons/figures/draw_methods.py needs the CJK font package: "
                         "pip install pylopdf-fonts-zh-cn==0.1.1 (in the dev extra)") from None
    font_manager.fontManager.addfont(str(font_file))
    name = font_manager.FontProperties(fname=str(font_file)).get_name()
    return ["DejaVu Sans", name]


def box(ax, label, x, y, w, color, h=H, size=7):
    ax.add_patch(Rectangle((x, y), w, h, facecolor=color, edgecolor=EDGE, linewidth=0.8))
    ax.text(x + w / 2, y + h / 2, label, ha="center", va="center", fontsize=size)


def arrow(ax, start, end, color=EDGE, style="-|>"):
    ax.add_patch(FancyArrowPatch(start, end, arrowstyle=style, mutation_scale=8, color=color, linewidth=0.9))


def residual(ax, y_from, y_to, x_side):
    """The skip path: from the stem below a sub-layer, around it on the left, into the ⊕ box."""
    ax.plot([STEM, x_side, x_side], [y_from, y_from, y_to + H / 2], color=RESIDUAL, linewidth=1.1)
    arrow(ax, (x_side, y_to + H / 2), (X, y_to + H / 2), color=RESIDUAL)


def draw_base(ax, method):
    for label, y in BASE:
        box(ax, label, X, y, W, TRAINED if method == "full" else FROZEN, h=0.75 if "\n" in label else H)
    for (label, y0), (_, y1) in zip(BASE, BASE[1:]):
        arrow(ax, (STEM, y0 + (0.75 if "\n" in label else H)), (STEM, y1))
    residual(ax, 1.05, 5.4, X - 0.25)                # x + Attention(RMSNorm(x))
    residual(ax, 6.1, 8.4, X - 0.25)                 # h + FFN(RMSNorm(h))
    ax.text(X - 0.32, 3.0, "residual 残差", color=RESIDUAL, fontsize=6.5, rotation=90, ha="right", va="center")
    ax.add_patch(Rectangle((X - 0.5, 1.0), W + 0.85, 8.1, facecolor="none", edgecolor="#888888", linestyle="--",
                           linewidth=0.8))
    ax.text(X + W + 0.4, 9.05, "× L layers" + ("\n(prompt in the\ntop L_a only)" if method == "llama_adapter" else ""),
            fontsize=7, va="top")


def draw_method(ax, method):
    if method == "lora":           # a branch in parallel with the frozen W_q, W_v, joined by a sum
        ax.plot([STEM, 7.6], [2.05, 2.05], color=EDGE, linewidth=0.9)
        box(ax, "A: r × d_in (down)\nKaiming-uniform", 7.6, 1.75, 2.3, TRAINED, h=0.6, size=6.5)
        arrow(ax, (8.75, 2.35), (8.75, 2.75))
        box(ax, "B: d_out × r (up)\nB = 0 at start", 7.6, 2.75, 2.3, TRAINED, h=0.6, size=6.5)
        ax.add_patch(Circle((STEM, 3.17), 0.14, facecolor="white", edgecolor=EDGE, linewidth=0.8))
        ax.text(STEM, 3.17, "+", ha="center", va="center", fontsize=8)
        arrow(ax, (7.6, 3.17), (STEM + 0.15, 3.17))
        ax.text(7.6, 3.55, "× s = α/r, added to\nW_q x and W_v x only", fontsize=6.5)
        ax.text(7.6, 1.05, "旁路: y = W0 x + s·B(A x)\nmergeable: W0 + s·BA", fontsize=6.5)
    elif method == "prompt":
        box(ax, "soft prompt  软提示\nP × d", 0.1, 0.2, 2.5, TRAINED, h=0.7, size=7)
        arrow(ax, (2.6, 0.55), (X, 0.55))
        ax.text(0.1, 1.25, "[prompt ; E(x)]:\nn → P + n positions", fontsize=6.5)
    elif method == "prefix":
        box(ax, "prefix K_l, V_l  前缀\n(P slots, no RoPE)", 0.1, 3.45, 2.5, TRAINED, h=0.75, size=7)
        arrow(ax, (2.6, 3.85), (X, 3.85))
        box(ax, "MLP reparam.  重参数化\n(training only)", 0.1, 2.2, 2.5, TRAINED, h=0.7, size=7)
        arrow(ax, (1.35, 2.9), (1.35, 3.45))
        ax.text(0.1, 4.45, "one softmax over\n[prefix ; real keys]", fontsize=6.5)
    elif method == "adapter":
        for y_out, y_add in ((4.55 + H + 0.1, 5.4), (7.3 + 0.75 + 0.1, 8.4)):
            ax.plot([STEM, 7.55], [y_out + 0.05, y_out + 0.05], color=EDGE, linewidth=0.9)
            box(ax, "adapter 适配器: d → m → d\nW_up = 0 at start", 7.55, y_out - 0.3, 2.4, TRAINED, h=0.7, size=6.5)
            arrow(ax, (7.55, y_out + 0.3), (X + W, y_add + H / 2))
        ax.text(7.55, 4.0, "h + W_up·GELU(W_down h)\nnot mergeable (GELU)", fontsize=6.5)
    elif method == "llama_adapter":
        box(ax, "adaption prompt 适配提示\nK × d, via frozen W_k, W_v", 0.05, 1.95, 2.6, TRAINED, h=0.75, size=6.5)
        arrow(ax, (1.35, 2.7), (1.35, 3.1))
        box(ax, "own softmax(q k_pᵀ/√hd) v_p\n× gate tanh(g_h), one per head\n门控 g = 0 at start", 0.05, 3.1,
            2.6, TRAINED, h=1.05, size=7)
        arrow(ax, (2.65, 3.85), (X, 3.85))
        ax.text(0.05, 4.35, "added to the attention\noutput, before W_o", fontsize=6.5)


def draw(method: str, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6.8, 5.6), dpi=100)
    ax.set_xlim(0, 10)
    ax.set_ylim(0, 10.9)
    ax.axis("off")
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=0.95)
    ax.set_title(METHODS[method], fontsize=9)
    draw_base(ax, method)
    draw_method(ax, method)
    for x, color, label in ((0.1, FROZEN, "frozen 冻结"), (1.9, TRAINED, "trained 训练")):
        ax.add_patch(Rectangle((x, 10.35), 0.35, 0.3, facecolor=color, edgecolor=EDGE))
        ax.text(x + 0.45, 10.5, label, fontsize=7, va="center")
    ax.plot([3.7, 4.2], [10.5, 10.5], color=RESIDUAL, linewidth=1.1)
    ax.text(4.3, 10.5, "residual path 残差连接", fontsize=7, va="center")
    fig.savefig(path, dpi=100, metadata={"Software": None})
    plt.close(fig)


def draw_all(folder: Path) -> None:
    with plt.rc_context({"font.family": load_fonts()}):          # only these figures; the caller's rcParams stay
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
