"""The reference for every cached-generation test: greedy decoding with no cache, no padding and no batch, the
whole sequence through the model at every step (positions and masks derived from the ids alone)."""

from __future__ import annotations

import torch


def greedy_without_cache(model, prompt, max_new_tokens: int) -> list:
    """The max_new_tokens ids greedy decoding appends to `prompt`, recomputing the full sequence each step."""
    sequence = list(prompt)
    with torch.no_grad():
        for _ in range(max_new_tokens):
            logits = model(torch.tensor([sequence]))                                # (1, len, V)
            sequence.append(int(logits[0, -1].argmax()))
    return sequence[len(prompt):]
