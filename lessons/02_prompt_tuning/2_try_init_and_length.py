"""Lesson 02, try this: the note's 5 x 768 prompt tensor (提示张量), then soft-prompt init and length.

The note walks through a prompt tensor of 5 virtual tokens x 768 (a BERT/GPT-2-sized width): 3,840
trainable numbers in front of the input. The shipped tiny model's default prompt, P = 20 rows of
d = 192, has exactly the same 3,840 numbers. Follow its shapes through the model, then train prompts
of length 5 and 20 from three initialisations for the same 15 steps and compare the held-out loss.

    PYTHONPATH=. python lessons/02_prompt_tuning/2_try_init_and_length.py
Try LENGTHS = (1, 50) or INIT_TEXT = "Answer:".
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # lessons/
from checks import check_equal, check_quoted, check_true  # noqa: E402
from tiny_training import demo_examples, load_tiny, train_steps, val_loss  # noqa: E402

from minipeft.peft import PromptConfig, SoftPrompt, apply_peft

LENGTHS, INITS, STEPS, LR = (5, 20), ("random", "vocab", "text"), 15, 0.1
INIT_TEXT = "Follow the instruction and write only the answer."

print("1. The note's prompt tensor: 5 x 768 there, 20 x 192 here")
base, tokenizer = load_tiny()
model = apply_peft(base, PromptConfig(prompt_len=20, init="vocab"))
prompt = next(m for m in model.modules() if isinstance(m, SoftPrompt)).weight
check_equal("prompt tensor shape (P, d)", tuple(prompt.shape), (20, base.config.dim))
check_equal("its numbers == the note's 5 x 768", prompt.numel(), 5 * 768)
check_equal("trainable parameters of the whole model", model.report.trainable, 3_840)
_, heldout = demo_examples(tokenizer, "heldout", n=32)
ids = torch.tensor([heldout[0].input_ids])                                      # (1, n)
n = ids.shape[1]
embeds = base.tok_embeddings(ids)                                               # (1, n, d)
joined = torch.cat([prompt[None], embeds], dim=1)                               # (1, P + n, d)
check_equal("token embeddings (1, n, d)", tuple(embeds.shape), (1, n, 192))
check_equal("[prompt ; embeddings] (1, P + n, d): every layer sees 20 more positions", tuple(joined.shape),
            (1, 20 + n, 192))
check_equal("logits the wrapper returns (1, n, V): the prompt positions are dropped", tuple(model(ids).shape),
            (1, n, base.config.vocab_size))

print(f"2. Init x length, {STEPS} AdamW steps at lr {LR}")
_, train_examples = demo_examples(tokenizer, "train", n=96)
base_loss = val_loss(base, heldout)
print(f"   base model: held-out loss {base_loss:.3f}")
results = {}
for length in LENGTHS:
    for init in INITS:
        base, _ = load_tiny()
        generator = torch.Generator().manual_seed(0)
        model = apply_peft(base, PromptConfig(prompt_len=length, init=init, init_text=INIT_TEXT),
                           tokenizer=tokenizer, generator=generator)
        start = val_loss(model, heldout)
        train_steps(model, train_examples, STEPS, LR)
        results[length, init] = (start, val_loss(model, heldout))
        print(f"   P = {length:2d}, init {init:6s}: held-out loss {start:.3f} -> {results[length, init][1]:.3f}")

for key, (start, end) in results.items():
    check_true(f"P = {key[0]}, {key[1]}: training lowers the held-out loss", end, f"< {start:.3f}", end < start)
worst_start = max(start for start, _ in results.values())
check_true("no init ruins the start: worst held-out loss before training", worst_start,
           f"< base {base_loss:.3f} + 1", worst_start < base_loss + 1)
best_20 = min(results[20, init][1] for init in INITS)
best_5 = min(results[5, init][1] for init in INITS)
check_true("a longer prompt trains further: best P = 20 loss", best_20, f"< best P = 5 loss {best_5:.3f}",
           best_20 < best_5)
ends = {key: end for key, (_, end) in results.items()}
for length in LENGTHS:
    best = min(INITS, key=lambda init: ends[length, init])
    check_equal(f"P = {length}: the best init", best, "text")
spread = max(max(ends[length, i] for i in INITS) - min(ends[length, i] for i in INITS) for length in LENGTHS)
check_true("the initialisations differ by less than 0.5 at either length", spread, "< 0.5", spread < 0.5)
README = (Path(__file__).resolve().parent / "README.md").read_text(encoding="utf-8")
check_quoted("the README's best losses", README, "P = 20 beats P = 5 (best {} vs {})", [best_20, best_5], 0.005)
check_quoted("the README's random vs vocab at P = 20", README, "random beats vocab at P = 20 ({} vs {}) though not at",
             [ends[20, "random"], ends[20, "vocab"]], 0.005)
check_quoted("... and in section 4", README, "but random beats vocab at P = 20 ({} vs {} after 15 steps)",
             [ends[20, "random"], ends[20, "vocab"]], 0.005)
check_true("... and not at P = 5", f"{ends[5, 'random']:.3f} vs {ends[5, 'vocab']:.3f}", "random > vocab",
           ends[5, "random"] > ends[5, "vocab"])
print("all checks passed")
