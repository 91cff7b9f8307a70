"""What the "Try this" experiments share: the shipped tiny model, the demo tasks, a short training loop.

    model, tokenizer = load_tiny()                      3.2 M parameters, dim 192, 4 layers, vocab 4096
    records, examples = demo_examples(tokenizer, "train", n=64)
    losses = train_steps(model, examples, steps=30, lr=1e-2)    AdamW, constant lr, batches of 8
    val_loss(model, examples)                           mean loss over the response tokens
    per_task_accuracy(model, tokenizer, records)        {instruction: share of exact answers} (greedy)

The loop is the plain one of lesson 08 without its schedule (few steps, so a constant rate): forward,
next-token loss on the response tokens, backward, clip at 1.0, step. Everything is seeded, so a run
repeats exactly on one machine.
"""

import json
from collections import defaultdict

import torch

import minipeft
from minipeft.data import AlpacaEncoder, causal_lm_loss, collate, format_prompt, parse_records
from minipeft.generate import generate

TINY = minipeft.assets_dir() / "tiny-llama"
DEMO = minipeft.assets_dir() / "demo_data"


def load_tiny():
    """(model in fp32 train mode, tokenizer) of the shipped tiny LLaMA."""
    model = minipeft.load_model(TINY).float().train()
    return model, minipeft.Tokenizer(TINY / "tokenizer.model")


def demo_examples(tokenizer, split: str, n: int = None, instruction_contains: str = None, max_seq_len: int = 128):
    """The first n records of demo_data/<split>.json (optionally only one task) and their encoded examples."""
    records, _ = parse_records(json.loads((DEMO / f"{split}.json").read_text(encoding="utf-8")))
    if instruction_contains is not None:
        records = [r for r in records if instruction_contains in r.instruction]
    records = records[:n]
    encoder = AlpacaEncoder(tokenizer, max_seq_len)
    examples = [encoder.encode(r) for r in records]
    return records, examples


def train_steps(model, examples, steps: int, lr: float, batch_size: int = 8, weight_decay: float = 0.0,
                on_step=None):
    """`steps` AdamW steps on the trainable parameters over `examples` in order (wrapping around); a PEFT
    model's own optimizer groups (PeftModel.param_groups: LoRA+ trains B at a multiple of lr).
    on_step(step, model) is called after each step. Returns the loss of every step."""
    torch.manual_seed(0)
    params = [p for p in model.parameters() if p.requires_grad]
    # a PEFT model's groups (one per learning-rate multiple: LoRA+'s B), as the training loop builds them
    groups = model.param_groups(lr) if hasattr(model, "param_groups") else params
    optimizer = torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay)
    model.train()
    losses = []
    for step in range(steps):
        start = (step * batch_size) % len(examples)
        batch = collate((examples + examples)[start:start + batch_size], pad_id=0)
        loss = causal_lm_loss(model(batch["input_ids"]), batch["labels"])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        losses.append(loss.item())
        if on_step is not None:
            on_step(step, model)
    return losses


@torch.no_grad()
def val_loss(model, examples, batch_size: int = 16) -> float:
    """Mean next-token loss over every response token of `examples` (token-weighted)."""
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(examples), batch_size):
        batch = collate(examples[start:start + batch_size], pad_id=0)
        total += causal_lm_loss(model(batch["input_ids"]), batch["labels"], reduction="sum").item()
        count += int((batch["labels"][:, 1:] != -100).sum())
    model.train()
    return total / count


@torch.no_grad()
def per_task_accuracy(model, tokenizer, records, max_new_tokens: int = 6, batch_size: int = 16):
    """Greedy answers; {instruction: (correct, total)} and the generated texts."""
    model.eval()
    texts = []
    for start in range(0, len(records), batch_size):
        chunk = records[start:start + batch_size]
        prompts = [tokenizer.encode(format_prompt(r.instruction, r.input), bos=True) for r in chunk]   # Alpaca (LLaMA)
        for ids in generate(model, prompts, max_new_tokens, eos_id=tokenizer.eos_id, pad_id=0):
            ids = ids[:ids.index(tokenizer.eos_id)] if tokenizer.eos_id in ids else ids
            texts.append(tokenizer.decode(ids).strip())
    model.train()
    scores = defaultdict(lambda: [0, 0])
    for text, record in zip(texts, records):
        scores[record.instruction][0] += int(text == record.output.strip())
        scores[record.instruction][1] += 1
    return dict(scores), texts
