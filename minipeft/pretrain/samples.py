"""How pretraining turns text into samples and scores a held-out text, per family (the layout kind is the
family's entry in family_recipes.py).

A sample is a random window w of the token stream of one file (the file drawn by its weight), laid out as the
family's fine-tuning examples will be, so that pretraining and fine-tuning see the same marks:

    causal (llama, bloom)   reads [bos] + w[:-1]  predicts w                       (|w| = seq_len)
    glm (chatglm)           reads w[:k] [gMASK] <sop> w[k:-1]  predicts w[k:]      (|w| = seq_len - 1)
                            k uniform in 0..|w|-1: GLM's prefix LM with the blank at the end. w[:k] and
                            [gMASK] are the context (seen both ways); labels are -100 (not scored) up to
                            and including [gMASK], so <sop> predicts w[k], the next position w[k+1], ...

Scoring a held-out text (val loss, perplexity) uses consecutive chunks c of the stream, each laid out as a
sample with no context (k = 0 for glm), and counts every scored token:

    nll = sum over chunks and scored positions t of -log softmax(model(inputs))[t, targets[t]]
    perplexity = exp(nll / scored tokens);  nats per character = nll / characters of the text
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F

from .corpus import PretrainError
from .family_recipes import pretrain_family

IGNORE = -100


class SampleLayout:
    """How a window of text ids becomes (inputs, targets) for one family (see the module docstring)."""

    def __init__(self, family: str, seq_len: int, bos_id: int, gmask_id: Optional[int] = None,
                 sop_id: Optional[int] = None):
        self.glm = pretrain_family(family).sample_layout == "glm"
        if self.glm and (gmask_id is None or sop_id is None):
            raise PretrainError("a chatglm tokenizer must have [gMASK] and <sop> pieces")
        self.bos_id, self.gmask_id, self.sop_id = bos_id, gmask_id, sop_id
        self.window = seq_len - 1 if self.glm else seq_len            # text ids per sample

    def layout(self, window: torch.Tensor, context: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
        """window (n,) -> inputs (n + glm,), targets (n + glm,); context = k, the glm prefix length."""
        if not self.glm:
            return torch.cat([torch.tensor([self.bos_id]), window[:-1]]), window
        marks = torch.tensor([self.gmask_id, self.sop_id])
        inputs = torch.cat([window[:context], marks, window[context:-1]])
        targets = torch.cat([torch.full((context + 1,), IGNORE), window[context:]])
        return inputs, targets

    def sample_batch(self, streams, weights, batch_size: int, generator):
        """Pick a stream per row by weight, then a random window: inputs (B, T), targets (B, T)."""
        rows = torch.multinomial(weights, batch_size, replacement=True, generator=generator)   # (B,)
        inputs, targets = [], []
        for s in rows.tolist():
            stream = streams[s]
            start = int(torch.randint(0, len(stream) - self.window + 1, (1,), generator=generator))
            window = stream[start:start + self.window]
            context = int(torch.randint(0, self.window, (1,), generator=generator)) if self.glm else 0
            x, y = self.layout(window, context)
            inputs.append(x)
            targets.append(y)
        return torch.stack(inputs), torch.stack(targets)                                     # (B, T) each

    def chunk_examples(self, ids: torch.Tensor) -> List[Tuple[torch.Tensor, torch.Tensor]]:
        """Consecutive chunks of at most `window` ids, each laid out with no context: [(inputs, targets)], (1, len)."""
        out = []
        for start in range(0, len(ids), self.window):
            x, y = self.layout(ids[start:start + self.window])
            out.append((x[None], y[None]))
        return out


@torch.no_grad()
def total_nll(model, examples) -> Tuple[float, int]:
    """(sum of next-token negative log-likelihoods in nats, number of scored tokens) over the examples."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for inputs, targets in examples:
        logits = model(inputs).float()                                                     # (1, T, V)
        total += F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE, reduction="sum").item()
        count += int((targets != IGNORE).sum())
    model.train(was_training)
    return total, count


def mean_nll(model, examples) -> float:
    """Mean next-token negative log-likelihood (nats) over all scored tokens of the examples."""
    total, count = total_nll(model, examples)
    return total / count
