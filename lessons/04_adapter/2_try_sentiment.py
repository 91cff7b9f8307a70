"""Lesson 04, try this: the note's sentiment example (情感分类), with adapters on the shipped tiny model.

The note illustrates adapters with a sentiment task: freeze the model, train only the small adapters,
and the model learns to answer "positive / negative". The demo data has that task in English and in
Chinese (积极 / 消极 / 中立). Train Houlsby adapters (m = 64, two per layer) on 160 sentiment records
for 60 steps and report the per-task accuracy (准确率) on the 52 held-out sentiment records.

    PYTHONPATH=. python lessons/04_adapter/2_try_sentiment.py
Try STEPS = 300, or FullConfig() instead of AdapterConfig: does anything beat the majority answer?
"""

import math
import sys
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # lessons/
from checks import check_equal, check_quoted, check_true  # noqa: E402
from tiny_training import demo_examples, load_tiny, per_task_accuracy, train_steps  # noqa: E402

from minipeft.peft import AdapterConfig, apply_peft

STEPS, LR, BOTTLENECK, MAX_LEN = 60, 1e-2, 64, 256
LABELS = {"Classify the sentiment of the review as positive, negative or neutral.": {"positive", "negative", "neutral"},
          "判断这条评论的情感：积极、消极或中立。": {"积极", "消极", "中立"}}

base, tokenizer = load_tiny()
records, examples = demo_examples(tokenizer, "train", max_seq_len=MAX_LEN)
train_examples = [e for e, r in zip(examples, records) if r.instruction in LABELS][:160]
heldout, _ = demo_examples(tokenizer, "heldout", max_seq_len=MAX_LEN)
heldout = [r for r in heldout if r.instruction in LABELS]
check_equal("held-out sentiment records", len(heldout), 52)

torch.manual_seed(0)                                                   # W_down's init: the same run every time
model = apply_peft(base, AdapterConfig(bottleneck=BOTTLENECK))
d, m, L = base.config.dim, BOTTLENECK, base.config.n_layers
check_equal("trainable == 2 L (2 d m + d + m), the adapters only", model.report.trainable, 2 * L * (2 * d * m + d + m))
before, _ = per_task_accuracy(model, tokenizer, heldout, max_new_tokens=4)
losses = train_steps(model, train_examples, STEPS, LR)
after, answers = per_task_accuracy(model, tokenizer, heldout, max_new_tokens=4)
print(f"{STEPS} steps at lr {LR}: training loss {losses[0]:.3f} -> {losses[-1]:.3f}")
for task, (correct, total) in after.items():
    majority = Counter(r.output for r in heldout if r.instruction == task).most_common(1)[0]
    print(f"  {task}\n    accuracy before {before[task][0]}/{total}, after {correct}/{total} = {correct / total:.0%};"
          f" always answering the most common label ({majority[0]}) would get {majority[1]}/{total}")

check_true("training loss on the answer tokens", losses[-1], f"< ln 3 + 0.5 = {math.log(3) + 0.5:.3f}",
           losses[-1] < math.log(3) + 0.5)
in_label_set = sum(a in LABELS[r.instruction] for a, r in zip(answers, heldout))
check_true("answers that are one of their task's three labels (the format is learned)", in_label_set,
           f"== {len(heldout)}", in_label_set == len(heldout))
en, zh = (next(t for t in after if t.startswith(start)) for start in ("Classify", "判断"))
majority = {t: Counter(r.output for r in heldout if r.instruction == t).most_common(1)[0][1] for t in (en, zh)}
check_quoted("the README's accuracies (English, Chinese) and majority answers", (Path(__file__).resolve().parent /
             "README.md").read_text(encoding="utf-8"), "accuracy is {}/28 (English) and {}/24 (Chinese), below always "
             "answering the most common label ({}/28, {}/24)", [after[en][0], after[zh][0], majority[en], majority[zh]], 0)
below = after[en][0] < majority[en] and after[zh][0] < majority[zh]
check_true("both below the majority answer", f"{after[en][0]}, {after[zh][0]}", f"< {majority[en]}, {majority[zh]}", below)
print("   The adapters learned the task's form (three labels, in the task's language) but at this budget")
print("   not the sentiment itself (below the majority answer): a 3.2 M model pretrained on Shakespeare and poems has little idea of")
print("   what 'amazing' means. The note's example assumes a base that already understands the review.")
print("all checks passed")
