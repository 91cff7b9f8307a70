"""Lesson 10: check the tables that tools/compare_methods.py --bases wrote into lessons/10_comparison/.

Run from the repository root:
    PYTHONPATH=. python lessons/10_comparison/1_check_tables.py [FOLDER]      (default: this lesson's folder)

1. The computed 7B tables (LLaMA-7B, Chinese-LLaMA-7B, ChatGLM-6B, BLOOM-7B1), against lesson 07's formulas
   written out here by hand: each base's parameter count Psi from its shape; trainable counts from apply_peft on
   the meta device; Adam's 12 bytes per trainable parameter; ZeRO-3 with the optimizer and the parameters
   offloaded leaves no model states on the GPU and 2 Psi + 14 Psi_t on the CPU; activations of 26d + 8f + 4H + 8
   bytes per token in a trainable block and 16d + 6f + 4H + 8 in a frozen one (a GELU MLP: 4f and 2f).
2. The trained table of each tiny base: each method's trainable count equals apply_peft's on that base (built on
   the meta device from its config.json), every base and method ran the same steps, the best validation loss is
   the lowest point of its curve, exact match is the record-weighted mean of the per-task scores, and the row is
   in results.md.
3. The lesson README's side-by-side answers and its 150- vs 600-step table against results.json and the
   repository README.
4. The numbers the note's verdicts quote: the final-loss table, the CJK share of the answers to the Chinese
   records, the mean answer lengths (S5), the per-GPU savings and the recomputation split of table 2.
5. lessons/README.md's "trainable at 7B" column against the closed forms.
"""

import dataclasses
import json
import math
import sys
from pathlib import Path

import torch

from minipeft.config import ModelConfig
from minipeft.families import build_model
from minipeft.peft import PEFT_CONFIGS, AdapterConfig, FullConfig, LlamaAdapterConfig, LoRAConfig, PrefixConfig, PromptConfig
from minipeft.peft import apply_peft, closed_form_trainable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # lessons/, for checks.py
from checks import check, check_equal, check_quoted, check_true  # noqa: E402

HERE = Path(__file__).resolve().parent
FOLDER = Path(sys.argv[1]) if len(sys.argv) > 1 else HERE
ROOT = HERE.parents[1]
GiB = 2 ** 30

results = json.loads((FOLDER / "results.json").read_text(encoding="utf-8"))
markdown = (FOLDER / "results.md").read_text(encoding="utf-8")


def peft_config(method, hyper):
    return PEFT_CONFIGS[method](**{k: tuple(v) if isinstance(v, list) else v for k, v in hyper.items()})


def psi(cfg: ModelConfig) -> int:
    """Parameters of a base, written out per family (biases and norms included)."""
    d, L, f, V, kv = cfg.dim, cfg.n_layers, cfg.ffn_hidden_dim, cfg.vocab_size, cfg.kv_dim
    if cfg.family == "llama":        # untied embedding and output, 2 RMSNorms per block + the final one
        return 2 * V * d + d + L * (2 * d * d + 2 * d * kv + 3 * d * f + 2 * d)
    block = 4 * d + 3 * d * d + 3 * d + d * d + d + 2 * d * f + f + d      # 2 LayerNorms, wqkv, wo, w1, w2 (biases)
    extra = 2 * d if cfg.family == "bloom" else 0                           # BLOOM's embedding LayerNorm
    return V * d + 2 * d + extra + L * block                               # tied output, final LayerNorm


# ================================================================================================
print("1. The 7B bases, ZeRO-3 + CPU offload of optimizer and parameters, 8 GPUs, batch 4 x 512, fp16")
for name, table in results["tables_7b"].items():
    cfg = ModelConfig.from_name(table["model"])
    d, f, H, L, kv, V = cfg.dim, cfg.ffn_hidden_dim, cfg.n_heads, cfg.n_layers, cfg.kv_dim, cfg.vocab_size
    B, T = table["recipe"]["micro_batch"], table["recipe"]["seq_len"]
    gated = cfg.family == "llama"                                       # SwiGLU keeps three f-wide tensors
    trainable_block = 26 * d + (8 if gated else 4) * f + 4 * H + 8       # lesson 07, step 2
    frozen_block = 16 * d + (6 if gated else 2) * f + 4 * H + 8
    outside = (2 * H if cfg.family == "bloom" else 4 * cfg.head_dim) + 8 + 8 * d + 4   # positions + ids + head input
    print(f" {name} ({cfg.family}): Psi = {psi(cfg):,}")
    got, want = {}, {}
    for method, row in table["rows"].items():
        config = peft_config(method, row["hyper"])
        with torch.device("meta"):
            report = apply_peft(build_model(cfg), config).report
        tokens = B * (T + (config.prompt_len if method == "prompt" else 0))
        blocks = config.adapter_layers if method == "llama_adapter" else L
        activations = B * T * (L * trainable_block + outside) if method == "full" else tokens * (blocks * frozen_block + outside)
        largest = V * d if method != "prefix" else max(V * d, (config.reparam_hidden + 1) * L * 2 * kv)
        got[method] = [row["trainable"], row["total"], row["optimizer_state_bytes"], row["model_states_gpu_bytes"],
                       row["cpu_node_bytes"], row["activation_bytes"], row["logits_bytes"], row["gather_buffer_bytes"],
                       row["per_gpu_bytes"]]
        want[method] = [report.trainable, psi(cfg) + (0 if method == "full" else report.trainable),
                        12 * report.trainable, 0, 2 * got[method][1] + 14 * report.trainable, activations,
                        4 * B * T * V, 4 * largest, 4 * largest + activations + 4 * B * T * V]
        if cfg.family != "chatglm":             # the closed forms of lessons 02-06 (ChatGLM-6B has none written)
            check_equal(f"  {method}: trainable == closed form", row["trainable"], closed_form_trainable(cfg, config))
    check_equal(f"  every method: [trainable, total, Adam state, GPU states, CPU, activations, logits, buffer, per GPU]"
                " == apply_peft and lesson 07's formulas", got, want)
llama = results["tables_7b"]["llama-7b"]["rows"]
check("LLaMA-7B full: 11.95 GiB of activations at batch 4 x 512", round(llama["full"]["activation_bytes"] / GiB, 2), 11.95, 0.005)
check("LLaMA-7B full: 100.41 GiB of model states on the CPU", round(llama["full"]["cpu_node_bytes"] / GiB, 2), 100.41, 0.005)

# ================================================================================================
print("2. The trained table of each tiny base")
records = results["records"]
steps = set()
for label, run in results["bases"].items():
    settings = run["settings"]
    config_path = Path(settings["base"]) / "config.json"
    base_cfg = ModelConfig.load(config_path if config_path.is_absolute() else ROOT / config_path)
    trainable, counted, best, lowest, problems = [], [], [], [], []
    for method, r in run["results"].items():
        with torch.device("meta"):
            report = apply_peft(build_model(base_cfg), peft_config(method, settings["method_hyper"][method])).report
        steps.add(r["steps"])
        trainable.append(r["trainable"])
        counted.append(report.trainable)
        best.append(r["best_val_loss"])
        lowest.append(min(v for _, v in r["curves"]["val"][1:]))
        numbers = [r[k] for k in ("final_train_loss", "best_val_loss", "final_val_loss", "train_val_gap", "exact_match")]
        if not all(map(math.isfinite, numbers)) or f"{r['final_train_loss']:.4f}" not in markdown:
            problems.append(method)
    print(f" {label} ({base_cfg.family}, {settings['base']}), methods {', '.join(run['results'])}:")
    check_equal("  trainable == apply_peft's report on the base", trainable, counted)
    check("  best val loss == lowest point of its curve", best, lowest)
    check_equal("  methods with a non-finite number or no row in results.md", problems, [])
check_equal("every base and method ran the same number of steps", sorted(steps), [next(iter(steps))])

# exact match == record-weighted mean of the per-task scores (the tasks read off the instructions)
from minipeft.demo_data import TASKS  # noqa: E402
task_of = {instruction: task for task, instruction in TASKS.items()}
tasks = [task_of.get(r["instruction"], "other") for r in records]
for label, run in results["bases"].items():
    weighted = {m: sum(r["per_task"][t] * tasks.count(t) for t in r["per_task"]) / len(tasks) for m, r in run["results"].items()}
    check(f"  {label}: exact match == sum over tasks of accuracy x records / {len(tasks)}",
          [run["results"][m]["exact_match"] for m in weighted], list(weighted.values()), 1e-12)

if FOLDER != HERE:            # a rerun or a test folder: the README's tables describe this lesson's own run
    print("all checks passed")
    sys.exit(0)

# ================================================================================================
print("3. The README's answers side by side, and its 150 vs 600 steps table")
readme = (HERE / "README.md").read_text(encoding="utf-8")


def cell(text):          # as minipeft/compare/report.answer_cell writes a cell, written out again here
    shown = text.strip().replace("|", "\\|").replace("\n", "⏎") or " "
    return f"`` {shown} ``" if "`" in shown else f"`{shown}`"


shown, missing = 0, []
for i, record in enumerate(records):
    if f"(record {i})" not in readme:
        continue
    for label, run in results["bases"].items():
        row = f"| {label} | " + " | ".join(cell(r["generations"][i]) for r in run["results"].values()) + " |"
        shown += 1
        if row not in readme:
            missing.append((i, label))
check_true("answer rows in the README (each base x record shown)", shown, ">= 8", shown >= 8)
check_equal("rows that differ from results.json's generations", missing, [])
repo_readme = (ROOT / "README.md").read_text(encoding="utf-8")
names = {"full": "full fine-tuning", "adapter": "adapter (Houlsby)", "lora": "LoRA", "prefix": "prefix tuning",
         "llama_adapter": "LLaMA-Adapter", "prompt": "prompt tuning"}
budget_table = readme.split("| method | 150 steps (LLaMA row) | 600 steps (README) |")[1].split("\n\n")[0]
short, long = {}, {}
for method, name in names.items():
    line = next(l for l in budget_table.splitlines() if l.startswith(f"| {name} | "))
    short[method], long[method] = (float(x) for x in line.strip("| ").split(" | ")[1:])
check("150-step column == results.json's LLaMA final val losses", list(short.values()),
      [round(results["bases"]["llama"]["results"][m]["final_val_loss"], 3) for m in names], 0)
check_equal("600-step column == the repository README's table", [f"-> {v:.3f} |" in repo_readme for v in long.values()],
            [True] * len(names))

titles = {"full fine-tuning": "full", "LoRA": "lora", "LLaMA-Adapter": "llama_adapter", "prompt tuning": "prompt",
          "prefix tuning": "prefix", "adapter (Houlsby)": "adapter"}
memory_table = readme.split("| method | LLaMA-7B | Chinese-LLaMA-7B | ChatGLM-6B | BLOOM-7B1 |")[1].split("\n\n")[0]
shown_cells, computed_cells = [], []
for line in memory_table.splitlines():
    cells = [c.strip() for c in line.strip("| ").split(" | ")]
    if cells[0] in titles:
        shown_cells.append(cells[1:])
        computed_cells.append([f"{results['tables_7b'][name]['rows'][titles[cells[0]]]['per_gpu_bytes'] / GiB:.2f} / "
                               f"{results['tables_7b'][name]['rows'][titles[cells[0]]]['cpu_node_bytes'] / GiB:.2f}"
                               for name in ("llama-7b", "chinese-llama-7b", "chatglm-6b", "bloom-7b1")])
check_equal("the README's 7B memory table (per GPU / CPU, GiB) == results.json's tables_7b", shown_cells, computed_cells)

# ================================================================================================
print("4. The numbers the note's verdicts quote")
order = ("full", "lora", "llama_adapter", "prompt", "prefix", "adapter")
runs = {label: run["results"] for label, run in results["bases"].items()}
loss_table = readme.split("the numbers the verdicts use:")[1].split("\n\n")[1]
shown_losses = [[float(x) for x in line.strip("| ").split(" | ")[1:]] for line in loss_table.splitlines()[2:]]
check("the verdicts' final-loss table == results.json (3 decimals)", shown_losses,
      [[round(runs[b][m]["final_val_loss"], 3) for m in order] for b in runs], 0)


def is_cjk(c):
    return "\u4e00" <= c <= "\u9fff"


def cjk_share(texts):         # Chinese characters / non-space characters
    chars = [c for t in texts for c in t if not c.isspace()]
    return sum(map(is_cjk, chars)) / len(chars)


chinese = [i for i, r in enumerate(records) if any(map(is_cjk, r["output"]))]
check_equal("held-out records whose expected answer is Chinese", len(chinese), 70)
check_quoted("CJK share of the expected answers", readme, "(expected answers: {})", cjk_share(
    [records[i]["output"] for i in chinese]), 0.005)
cjk_table = readme.split("| llama: CJK share / broken |")[1].split("\n\n")[0]
shown_cjk = [[tuple(float(v.strip(" %")) for v in c.split(" / ")) for c in line.strip("| ").split(" | ")[-6:]]
             for line in ("|" + cjk_table).splitlines()]
computed_cjk = [[(round(cjk_share([runs[b][m]["generations"][i] for i in chinese]), 2),
                  round(100 * sum("\ufffd" in runs[b][m]["generations"][i] for i in chinese) / len(chinese)))
                 for m in order] for b in runs]
check("CJK share / broken answers table == results.json's generations", shown_cjk, computed_cjk, 0)
peft_methods = [m for m in order if m != "full"]
mean_chars = {b: sum(runs[b][m]["answer_chars_mean"] for m in peft_methods) / len(peft_methods) for b in runs}
check_quoted("S5: mean answer length over the five PEFT methods, per base", readme,
             "averaged over the five PEFT methods: ChatGLM {}, the LLaMA {}, Chinese LLaMA {}, BLOOM {}",
             [mean_chars[b] for b in ("chatglm", "llama", "chinese-llama", "bloom")], 0.05)
long_run = json.loads((HERE / "long_12_epochs" / "results.json").read_text(encoding="utf-8"))["results"]
check_quoted("S1: the 12-epoch train/val gaps, LoRA and full", readme,
             "LoRA's train/val gap is {} against full fine-tuning's {}", [long_run["lora"]["train_val_gap"],
                                                                          long_run["full"]["train_val_gap"]], 0.005)
check_quoted("S3: full fine-tuning after 12 epochs, lowest and last validation loss", readme,
             "flat from epoch 9 (lowest {}, {} at the end)", [long_run["full"]["best_val_loss"],
                                                             long_run["full"]["final_val_loss"]], 0.0005)
savings = [1 - row["per_gpu_bytes"] / table["rows"]["full"]["per_gpu_bytes"]
           for table in results["tables_7b"].values() for m, row in table["rows"].items() if m != "full"]
check_quoted("table 2: PEFT's per-GPU saving, smallest and largest (%)", readme, "PEFT saves only {}-{} % per GPU",
             [100 * min(savings), 100 * max(savings)], 0.05)
full_rows = {name: table["rows"]["full"] for name, table in results["tables_7b"].items()}
recompute = [full_rows[n]["per_gpu_bytes_recompute"] / GiB for n in ("llama-7b", "bloom-7b1")]
share = [(full_rows[n]["gather_buffer_bytes"] + full_rows[n]["logits_bytes"]) / full_rows[n]["per_gpu_bytes_recompute"]
         for n in ("llama-7b", "bloom-7b1")]
check_quoted("table 2: full fine-tuning with recomputation, LLaMA-7B and BLOOM (GiB)", readme,
             "Recomputation brings full fine-tuning down to {}-{} GiB", recompute, 0.005)
check_quoted("table 2: gather buffer + logits share of it, LLaMA-7B and BLOOM (%)", readme,
             "are {} % on LLaMA-7B and {} % on BLOOM", [100 * x for x in share], 0.5)
bloom = full_rows["bloom-7b1"]
check_quoted("table 2: BLOOM's buffer + logits of its total (GiB)", readme, "({} + {} of its {} GiB",
             [bloom["gather_buffer_bytes"] / GiB, bloom["logits_bytes"] / GiB, bloom["per_gpu_bytes_recompute"] / GiB], 0.005)

# ================================================================================================
print("5. lessons/README.md's 'trainable at 7B' column == closed_form_trainable")
cfg = ModelConfig.from_name("llama-7b")
index = (ROOT / "lessons" / "README.md").read_text(encoding="utf-8")
rows_7b = {"full fine-tuning": FullConfig(), "LoRA r = 8": LoRAConfig(rank=8, targets=("wq", "wv")),
           "prompt tuning P = 20": PromptConfig(prompt_len=20),
           "prefix tuning P = 10": PrefixConfig(prefix_len=10, reparam_hidden=None),
           "Houlsby adapter m = 64": AdapterConfig(bottleneck=64),
           "LLaMA-Adapter K = 10": LlamaAdapterConfig(prompt_len=10, adapter_layers=30)}
shown, computed = [], []
for label, peft_config in rows_7b.items():
    line = next(l for l in index.splitlines() if l.startswith(f"| {label}"))
    shown.append(int(line.rstrip(" |").split(" | ")[-1].split(" ")[0].replace(",", "")))
    computed.append(closed_form_trainable(cfg, peft_config))
check_equal("six methods at LLaMA-7B", shown, computed)
prefix_line = next(l for l in index.splitlines() if l.startswith("| prefix tuning P = 10"))
check_equal("prefix tuning with its MLP while training", "136,618,496" in prefix_line,
            closed_form_trainable(cfg, PrefixConfig(prefix_len=10, reparam_hidden=512)) == 136_618_496)

print("all checks passed")
