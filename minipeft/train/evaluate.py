"""What a run measures: the loss of a batch, the validation loss over all label tokens, and exact match by
greedy generation. Also the autocast context the loop and the evaluation share.

    val_loss    = sum over every label token of the validation set of -log p(label | prefix) / (label tokens)
                  (token-weighted, not an average of batch means)
    exact_match = share of records whose greedy generation (up to EOS, stripped) equals the expected output;
                  each prompt is rendered in the tokenizer family's own format, as in training (its family record's prompt_format)
"""

from __future__ import annotations

import contextlib
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from ..data import Example, Record, collate, prompt_format_of
from ..loss import count_label_tokens, label_only_loss


def autocast(device: torch.device, precision: str):
    """torch.autocast for bf16 / fp16 (parameters stay in their dtype), nothing for fp32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def batch_loss(model, batch: Dict[str, torch.Tensor], reduction: str = "mean") -> torch.Tensor:
    """Loss of one collated batch, the output layer applied only where labels count (loss.label_only_loss;
    model may be a DeepSpeed engine: its forward passes return_hidden on). The attention mask is not passed:
    padding is on the right, so causal masking already hides every padding key from every real token, and
    padding has label -100."""
    return label_only_loss(model, batch["input_ids"], batch["labels"], reduction=reduction)


@torch.no_grad()
def evaluate_loss(model, examples: Sequence[Example], *, batch_size: int, pad_id: int, device,
                  precision: str = "fp32") -> float:
    """Mean next-token loss over all label tokens of `examples` (token-weighted, not batch-weighted)."""
    device = torch.device(device)
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(examples), batch_size):
        batch = {k: v.to(device) for k, v in collate(examples[start:start + batch_size], pad_id).items()}
        with autocast(device, precision):
            total += batch_loss(model, batch, reduction="sum").item()
        count += count_label_tokens(batch["labels"])
    model.train(was_training)
    return total / max(1, count)


@torch.no_grad()
def exact_match(model, tokenizer, records: Sequence[Record], *, batch_size: int = 16, device="cpu",
                precision: str = "fp32", max_new_tokens: Optional[int] = None) -> Tuple[float, List[str]]:
    """Greedy-generate each record's response from its prompt; accuracy = share of records whose generated
    text (up to EOS, spaces at both ends stripped) equals the expected output (stripped). Returns
    (accuracy, generated texts). max_new_tokens defaults to the longest expected output's tokens + 1."""
    from ..generate import generate
    if not records:
        return 0.0, []
    device = torch.device(device)
    if max_new_tokens is None:
        max_new_tokens = max(len(tokenizer.encode(r.output, bos=False)) for r in records) + 1
    was_training = model.training
    model.eval()
    prompt_format = prompt_format_of(tokenizer)                               # the format the model was trained on
    texts = []
    for start in range(0, len(records), batch_size):
        chunk = records[start:start + batch_size]
        prompts = [tokenizer.encode(prompt_format.render(r.instruction, r.input), bos=True) for r in chunk]
        with autocast(device, precision):
            new = generate(model, prompts, max_new_tokens, eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id)
        for ids in new:
            if tokenizer.eos_id in ids:
                ids = ids[:ids.index(tokenizer.eos_id)]
            texts.append(tokenizer.decode(ids))
    model.train(was_training)
    correct = sum(t.strip() == r.output.strip() for t, r in zip(texts, records))
    return correct / len(records), texts
