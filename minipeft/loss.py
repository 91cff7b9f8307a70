"""The training loss of every method and family: next-token cross-entropy over the positions whose label counts.

    loss = mean over {t : labels[t+1] != IGNORE_INDEX} of  -log softmax(logits[t])[labels[t+1]]

tokens and labels (B, T) are aligned (labels[:, t] is the label of tokens[:, t]); logits[:, t] predicts the
next token, so the loss pairs logits[:, :-1] with labels[:, 1:] (the next-token shift). Instruction tuning
gives the prompt and the padding the label IGNORE_INDEX, so only the response is learned. Computed in
float32 whatever the model's dtype.

Two ways to compute it, with the same value:

- `causal_lm_loss(logits, labels)`: from the full logits (B, T, V), as a reader would write it.
- `label_only_loss(model, tokens, labels)`: the one training and evaluation use. The output layer is the
  most expensive part of a small model and the largest tensor of a big one, yet only N of the B (T-1)
  positions count (the response: 5.6 % of the shipped demo data's tokens, 10-30 % in Alpaca-style data).
  So the model returns the last block's output h_L (B, T, d) (`return_hidden=True`), the N rows whose next
  label counts are gathered, h_sel (N, d), and only they go through `model.head` (final norm + output
  layer) and the softmax:

      logits_sel = head(h_sel)        (N, V)   instead of (B, T, V)
      loss       = cross_entropy(logits_sel, labels_sel)

  Per-token work and memory do not depend on which positions we skip (norm and head act row by row), so
  the value is the same; only the rows that would be multiplied by zero in the backward are never made.

  Cost model (d model width, V vocabulary, N counted positions, M = B T all positions):
      output layer      3 * 2 N d V flops (forward, grad of h, grad of W)   instead of 3 * 2 M d V
      softmax           ~ 5 N V                                              instead of ~ 5 M V
      memory            one chunk of C rows: C V floats for logits + grads   instead of ~3 M V floats
                        (logits, their float32 copy, the log-softmax saved for backward)
  At 7B (d 4096, V 32000) with 4 x 512 tokens of which 20 % count, the output layer drops from 0.8 to
  0.16 TFLOP a step and the 262 MB fp32 logits (+ their gradient) to one 64 MB chunk.

  Chunks: the N rows are processed C at a time (C V <= CHUNK_ELEMENTS). For each chunk the forward pass
  already computes the gradient of its loss with respect to h_sel and to the trainable parameters the
  head uses (torch.autograd.grad inside an autograd.Function, `_ChunkedHeadLoss`), keeps those (N d and
  the parameters' size) and frees the chunk's logits; backward only scales them by the incoming gradient.
  Nothing is recomputed, so it costs the same flops as one pass over the N rows, and the (B, T, V) float32
  tensor never exists. Where nothing needs a gradient the chunks go through plain autograd instead: the
  same value, the logits of the N rows kept for backward.

  Under DeepSpeed ZeRO-3 (partitioned parameters) the loss is computed from the full logits instead
  (causal_lm_loss): a partitioned weight is gathered only inside its own module's forward, and a tied head
  (BLOOM, ChatGLM-6B: the output layer is the embedding matrix) reads it outside that module, after the
  model's forward has returned. ZeRO-0/1/2 and plain runs keep the label-only path.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .distributed import is_partitioned

IGNORE_INDEX = -100       # label of positions that do not count in the loss (prompt, padding, virtual tokens)
CHUNK_ELEMENTS = 2 ** 24  # logits per chunk of label_only_loss: 64 MB in float32 (524 rows at V = 32000)


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


def label_only_loss(model, tokens: torch.Tensor, labels: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                    reduction: str = "mean", chunk_elements: int = CHUNK_ELEMENTS) -> torch.Tensor:
    """The loss above, with the output layer applied only where the next label counts (module docstring).

    model: anything called as `model(tokens, attention_mask=..., return_hidden=True) -> h_L (B, T, d)` whose
    `head(h)` gives the logits (a Transformer, a ChatGLM, a PeftModel, or a DeepSpeed engine around one).
    tokens, labels (B, T) aligned. reduction "mean" (over the counted tokens) or "sum"."""
    if labels.shape != tokens.shape:
        raise ValueError(f"labels has shape {tuple(labels.shape)}, expected the tokens' {tuple(tokens.shape)}")
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    if any(is_partitioned(p) for p in model.parameters()):                           # ZeRO-3: see the docstring
        return causal_lm_loss(model(tokens, attention_mask=attention_mask), labels, reduction=reduction)
    hidden = model(tokens, attention_mask=attention_mask, return_hidden=True)        # (B, T, d)
    targets = labels[:, 1:].to(hidden.device)                                         # (B, T-1)
    counted = targets != IGNORE_INDEX                                                 # (B, T-1)
    hidden_sel = hidden[:, :-1][counted]                                              # (N, d)
    targets_sel = targets[counted]                                                    # (N,)
    inner = getattr(model, "module", model)                                           # a DeepSpeed engine's module
    vocab = getattr(getattr(inner, "config", None), "vocab_size", None)
    total = head_loss_sum(inner.head, hidden_sel, targets_sel, [p for p in model.parameters() if p.requires_grad],
                          chunk_elements, vocab)
    return total if reduction == "sum" else total / targets_sel.shape[0]


def head_loss_sum(head, hidden_sel: torch.Tensor, targets_sel: torch.Tensor, trainable: list,
                  chunk_elements: int = CHUNK_ELEMENTS, vocab: Optional[int] = None) -> torch.Tensor:
    """sum over rows of cross_entropy(head(hidden_sel).float(), targets_sel), chunk by chunk. hidden_sel
    (N, d), targets_sel (N,); trainable: the parameters that may need a gradient (those head uses get one);
    vocab: V (found from one row's logits when not given)."""
    vocab = vocab or _vocab_size(head, hidden_sel)
    rows = max(1, chunk_elements // vocab)
    needs_grad = torch.is_grad_enabled() and (hidden_sel.requires_grad or len(trainable) > 0)
    if needs_grad:
        return _ChunkedHeadLoss.apply(head, rows, hidden_sel, targets_sel, *trainable)
    total = hidden_sel.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden_sel.shape[0], rows):
        logits = head(hidden_sel[start:start + rows]).float()                         # (C, V)
        total = total + F.cross_entropy(logits, targets_sel[start:start + rows], reduction="sum")
    return total


def _vocab_size(head, hidden_sel: torch.Tensor) -> int:
    """V, from one row's logits (cheap: one row of the output layer), without knowing the family."""
    with torch.no_grad():
        return head(hidden_sel[:1] if hidden_sel.shape[0] else hidden_sel.new_zeros(1, hidden_sel.shape[-1])).shape[-1]


class _ChunkedHeadLoss(torch.autograd.Function):
    """forward: the summed loss of the chunks, computing each chunk's gradients on the way (see the module
    docstring); backward: those gradients times the incoming one. Inputs: head, rows per chunk, hidden_sel
    (N, d), targets_sel (N,), then the trainable parameters (the ones head does not use get None)."""

    @staticmethod
    def forward(ctx, head, rows, hidden_sel, targets_sel, *params):
        grad_hidden = torch.zeros_like(hidden_sel) if hidden_sel.requires_grad else None   # (N, d)
        grad_params = [None] * len(params)
        total = hidden_sel.new_zeros((), dtype=torch.float32)
        with torch.enable_grad():
            for start in range(0, hidden_sel.shape[0], rows):
                x = hidden_sel[start:start + rows].detach().requires_grad_(hidden_sel.requires_grad)  # (C, d)
                logits = head(x).float()                                                           # (C, V)
                loss = F.cross_entropy(logits, targets_sel[start:start + rows], reduction="sum")
                wrt = ([x] if x.requires_grad else []) + list(params)
                grads = torch.autograd.grad(loss, wrt, allow_unused=True)
                if x.requires_grad:
                    grad_hidden[start:start + rows] = grads[0]
                    grads = grads[1:]
                for i, g in enumerate(grads):
                    if g is not None:
                        grad_params[i] = g if grad_params[i] is None else grad_params[i].add_(g)
                total = total + loss.detach()
        ctx.used = [g is not None for g in grad_params]
        ctx.has_grad_hidden = grad_hidden is not None
        ctx.save_for_backward(*([grad_hidden] if grad_hidden is not None else []),
                              *[g for g in grad_params if g is not None])
        return total

    @staticmethod
    def backward(ctx, grad_total):
        saved = list(ctx.saved_tensors)
        grad_hidden = saved.pop(0) * grad_total if ctx.has_grad_hidden else None
        grad_params = [saved.pop(0) * grad_total if used else None for used in ctx.used]
        return (None, None, grad_hidden, None, *grad_params)
