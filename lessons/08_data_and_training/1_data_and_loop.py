"""Lesson 08: the data and the training loop (数据与训练循环), each piece checked against a hand computation.

The Alpaca template, response-only labels (-100), the next-token shift, padding, AdamW, warm-up +
cosine, gradient clipping, gradient accumulation (梯度累加), and the reference's effective batch
8 x 4 x 4 = 128.

    PYTHONPATH=. python lessons/08_data_and_training/1_data_and_loop.py
"""

import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # lessons/
from checks import check, check_equal, check_true, check_quoted  # noqa: E402

import minipeft
from minipeft.config import ModelConfig
from minipeft.data import AlpacaEncoder, Record, causal_lm_loss, collate, format_prompt
from minipeft.model import Transformer
from minipeft.train import lr_factor

tokenizer = minipeft.Tokenizer(minipeft.assets_dir() / "tiny-llama" / "tokenizer.model")

print("1. The Alpaca template (指令微调的提示模板): instruction, input, then the response")
record = Record(instruction="Write the word in capital letters.", input="train", output="TRAIN")
by_hand = ("Below is an instruction that describes a task, paired with an input that provides further context. "
           "Write a response that appropriately completes the request.\n\n"
           "### Instruction:\nWrite the word in capital letters.\n\n### Input:\ntrain\n\n### Response:\n")
check_equal("format_prompt(instruction, input) == the template written out", format_prompt(record.instruction, record.input),
            by_hand)
check_equal("without an input the '### Input:' block is left out", "### Input:" in format_prompt("Say hi."), False)

print("2. Response-only labels: the prompt's positions get -100, the response and EOS their own ids")
encoder = AlpacaEncoder(tokenizer, max_seq_len=512)
example = encoder.encode(record)
prompt_ids = [tokenizer.bos_id] + tokenizer.encode(by_hand, bos=False)
response_ids = tokenizer.encode("TRAIN", bos=False) + [tokenizer.eos_id]
check_equal("input_ids == [BOS] + prompt + response + [EOS]", example.input_ids, prompt_ids + response_ids)
check_equal("labels == [-100] * len(prompt) + response + [EOS]", example.labels, [-100] * len(prompt_ids) + response_ids)
print(f"   {len(prompt_ids)} prompt tokens carry no loss, {len(response_ids)} response tokens do")
check_quoted("the README's token counts", (Path(__file__).resolve().parent / "README.md").read_text(encoding="utf-8"),
             "(The script: {} prompt tokens without loss, {} response tokens with it", [len(prompt_ids), len(response_ids)], 0)

print("3. The next-token shift: position t is scored on the token at t + 1")
torch.manual_seed(0)
cfg = ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=tokenizer.vocab_size, multiple_of=16)
model = Transformer(cfg)
short = [encoder.encode(Record("Say it.", "", "yes")), encoder.encode(Record("Write the word in capital letters.", "ox", "OX"))]
batch = collate(short, pad_id=0)
logits = model(batch["input_ids"])                                             # (B, T, V)
log_probs = torch.log_softmax(logits.double(), dim=-1)
terms = [-log_probs[b, t, batch["labels"][b, t + 1]] for b in range(2) for t in range(logits.shape[1] - 1)
         if batch["labels"][b, t + 1] != -100]
check("causal_lm_loss == mean over labelled t of -log p(labels[t+1] | tokens <= t)",
      causal_lm_loss(logits, batch["labels"]), torch.stack(terms).mean(), 1e-5)
check_equal("tokens counted == response tokens of both (padding is -100 too)", len(terms),
            sum(len(e.labels) - e.prompt_len for e in short))
check_equal("padding: labels after the shorter example's end", set(batch["labels"][0, len(short[0].input_ids):].tolist()), {-100})

print("4. AdamW, one step by hand (betas 0.9, 0.999, eps 1e-8, decoupled weight decay)")
w = torch.randn(5, dtype=torch.float64, requires_grad=True)
w0, g = w.detach().clone(), torch.randn(5, dtype=torch.float64)
lr, wd = 1e-2, 0.1
w.grad = g.clone()
torch.optim.AdamW([w], lr=lr, weight_decay=wd).step()
m_hat, v_hat = (0.1 * g) / (1 - 0.9), (0.001 * g * g) / (1 - 0.999)           # bias-corrected moments, step 1
check("AdamW step == w (1 - lr wd) - lr m_hat / (sqrt(v_hat) + eps)", w.detach(),
      w0 * (1 - lr * wd) - lr * m_hat / (v_hat.sqrt() + 1e-8), 1e-12)

print("5. Warm-up + cosine (预热 + 余弦衰减): lr_factor(s) for 100 steps, 5 of them warm-up")
total, warmup = 100, 5
by_hand = [(s + 1) / warmup if s < warmup else 0.5 * (1 + math.cos(math.pi * (s - warmup) / (total - warmup)))
           for s in range(total)]
check("lr_factor == (s+1)/5, then (1 + cos(pi (s-5)/95)) / 2", [lr_factor(s, total, warmup) for s in range(total)],
      by_hand, 1e-12)
check("peak at the last warm-up step", lr_factor(warmup - 1, total, warmup), 1.0, 0)
check("the last step's factor is near 0 (the rate has decayed away)", lr_factor(total - 1, total, warmup), 0.0, 1e-3)

print("6. Clipping (梯度裁剪): g <- g * min(1, c / ||g||)")
params = [torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(4))]
grads = [torch.tensor([3.0, 0.0, 0.0]), torch.tensor([0.0, 4.0, 0.0, 0.0])]   # ||g|| = 5 over both
for p, gr in zip(params, grads):
    p.grad = gr.clone()
norm = torch.nn.utils.clip_grad_norm_(params, max_norm=1.0)
check("returned norm == sqrt(3^2 + 4^2) = 5", norm, 5.0, 1e-6)
check("clipped gradients == g / 5 (norm 1)", torch.cat([p.grad for p in params]), torch.cat(grads) / 5, 1e-6)

print("7. Gradient accumulation: 4 micro-batches of loss / 4 == one batch 4x as large, when the counts agree")
words = ("cat", "dog", "sun", "map", "tree", "bird", "rain", "fish", "stone", "river")
candidates = [encoder.encode(Record("Write the word in capital letters.", w, w.upper())) for w in words]
by_count = {}
for e in candidates:                                   # group by the number of response tokens (labels != -100)
    by_count.setdefault(sum(t != -100 for t in e.labels), []).append(e)
examples = max(by_count.values(), key=len)[:4]
check_equal("four micro-batches with the same number of response tokens", len(examples), 4)


def gradient(loss_fn):
    model.zero_grad()
    loss_fn().backward()
    return torch.cat([p.grad.flatten() for p in model.parameters()])


def batch_mean(group):
    b = collate(group, pad_id=0)
    return causal_lm_loss(model(b["input_ids"]), b["labels"])


one_batch = gradient(lambda: batch_mean(examples))
model.zero_grad()
for e in examples:                                     # what the Trainer does: backward of loss / A, A times
    (batch_mean([e]) / 4).backward()
accumulated = torch.cat([p.grad.flatten() for p in model.parameters()])
check("accumulated gradient == big-batch gradient (all parameters)", accumulated, one_batch, 1e-6)
mixed = [max(by_count.values(), key=len)[0], min(by_count.values(), key=len)[0]]
if len(by_count) > 1:                                  # unequal counts: mean of means != mean over tokens
    mean_of_means = gradient(lambda: (batch_mean(mixed[:1]) + batch_mean(mixed[1:])) / 2)
    token_mean = gradient(lambda: batch_mean(mixed))
    gap = (mean_of_means - token_mean).abs().max().item()
    check_true("unequal counts: |mean of micro-batch means - token mean| (largest gradient entry)", gap, "> 0", gap > 0)
print("   With unequal counts the mean of micro-batch means weights the tokens of short answers more; the")
print("   Trainer, like DeepSpeed and Hugging Face, accepts that difference.")

print("8. The reference's effective batch (有效批量): 8 GPUs x 4 per GPU x 4 accumulation")
gpus, per_gpu, accumulation = 8, 4, 4
check_equal("examples per optimizer step", gpus * per_gpu * accumulation, 128)
check_equal("tokens per step at sequence length 512 (at most)", 128 * 512, 65_536)
check_equal("steps for 3 epochs of 50,000 records (ceil per epoch)", 3 * math.ceil(50_000 / 128), 1_173)
print("all checks passed")
