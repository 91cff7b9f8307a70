"""The training loss of every method and family: next-token cross-entropy over the positions whose label counts.

    loss = mean over {t : labels[t+1] != IGNORE_INDEX} of  -log softmax(logits[t])[labels[t+1]]

tokens and labels (B, T) are aligned (labels[:, t] is the label of tokens[:, t]); logits[:, t] predicts the
next token, so the loss pairs logits[:, :-1] with labels[:, 1:] (the next-token shift). Instruction tuning
gives the prompt and the padding the label IGNORE_INDEX, so only the response is learned. Computed in
float32 whatever the model's dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100   # label of positions that do not count in the loss (prompt, padding, virtual tokens)


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """logits (B, T, V), labels (B, T) aligned with the inputs -> the loss above. reduction "mean" (over the
    counted tokens) or "sum"."""
    if labels.shape != logits.shape[:2]:
        raise ValueError(f"labels has shape {tuple(labels.shape)}, expected the logits' (B, T) "
                         f"{tuple(logits.shape[:2])}")
    shifted_logits = logits[:, :-1].float()                                          # (B, T-1, V)
    shifted_labels = labels[:, 1:]                                                    # (B, T-1)
    return F.cross_entropy(shifted_logits.reshape(-1, shifted_logits.shape[-1]), shifted_labels.reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction=reduction)


def count_label_tokens(labels: torch.Tensor) -> int:
    """How many positions the loss counts: labels[:, 1:] != IGNORE_INDEX."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())
