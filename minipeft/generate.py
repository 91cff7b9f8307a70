"""Text generation with a KV cache: greedy decoding, or temperature + top-k + top-p (nucleus) sampling.

Batching prompts of different lengths (B prompts, longest T tokens): each prompt is *left*-padded to T,

    tokens          (B, T)   pad .. pad p_0 .. p_{n-1}
    attention_mask  (B, T)   0   .. 0   1   .. 1          padding is never attended to
    position_ids    (B, T)   0   .. 0   0   .. n-1        each row's real tokens count from 0

so every row computes exactly what its prompt computes alone. A model that numbers its tokens its own way
(ChatGLM-6B's 2D positions, (B, 2, T)) gives `prompt_position_ids(tokens, attention_mask)` and
`next_position_ids(last)`; without them positions are the 1-D count above and the next is the last + 1. The first call runs the whole padded prompt
and returns the cache (per layer k, v each (B, n_kv_heads, S, head_dim), a prefix's keys in front); it is
copied once into a preallocated `StaticCache` with room for every new token (kv_cache.py), so each later
step, one token per row (B, 1) at position n, n+1, .., writes its keys/values in place instead of
concatenating the whole cache again. The attention mask is allocated at full length once as well, and
each call sees its first S columns. Only the last position goes through the output layer (`head`).

Choosing the next token from the last logits z (B, V):
- temperature 0: greedy, argmax z.
- otherwise z / temperature, then top-k keeps the k largest logits, then top-p keeps the nucleus: with the
  probabilities sorted p_(1) >= p_(2) >= ..., the smallest m such that p_(1) + .. + p_(m) >= top_p; token
  (i) is kept iff the mass before it, p_(1) + .. + p_(i-1), is < top_p (so the top token is always kept).
  The kept probabilities are renormalised and one token is drawn from them.

The model is called only as `model(tokens, past_key_values=..., position_ids=..., attention_mask=...,
use_cache=True, return_hidden=True) -> (h_L, cache)` and `model.head(h_L) -> logits`, so a Transformer, a
ChatGLM and a PeftModel all work (a model without `head` is asked for its logits instead).
"""

from __future__ import annotations

import math
import numbers
from typing import List, Optional, Sequence

import torch

from .kv_cache import StaticCache


class GenerationError(ValueError):
    """Arguments generate() cannot work with; the message names the argument."""


# The cache holds every position a row sees: its virtual tokens (a prefix, a soft prompt), its padded prompt and
# max_new_tokens - 1 new tokens, and it is allocated at full length up front. So max_new_tokens is limited before
# anything is allocated, to CACHE_LIMIT_FACTOR x the model's max_seq_len (positions past max_seq_len were never
# trained; the factor leaves room to try, and stops a typo such as 10**12 from allocating a cache that size).
CACHE_LIMIT_FACTOR = 4


def max_new_tokens_limit(model) -> Optional[int]:
    """The most new tokens generate() makes room for with this model (None: a model without a config)."""
    config = getattr(model, "config", None)
    max_seq_len = getattr(config, "max_seq_len", None)
    return None if max_seq_len is None else CACHE_LIMIT_FACTOR * max_seq_len


def top_k_filter(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """logits (B, V) -> the same with all but the top_k largest of each row set to -inf."""
    if top_k >= logits.shape[-1]:
        return logits
    kth_largest = torch.topk(logits, top_k, dim=-1).values[:, -1:]                  # (B, 1)
    return logits.masked_fill(logits < kth_largest, float("-inf"))


def top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """logits (B, V) -> the same with every token outside the nucleus of mass top_p set to -inf."""
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)               # (B, V)
    sorted_probs = sorted_logits.softmax(dim=-1)
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs                        # (B, V)
    remove_sorted = mass_before >= top_p                                            # never the top token
    remove = remove_sorted.scatter(-1, order, remove_sorted)                        # back to vocab order
    return logits.masked_fill(remove, float("-inf"))


def next_token_probs(logits: torch.Tensor, temperature: float, top_k: Optional[int] = None,
                     top_p: Optional[float] = None) -> torch.Tensor:
    """Sampling distribution (B, V) from the last logits (B, V), for temperature > 0."""
    logits = logits.float() / temperature
    if top_k is not None:
        logits = top_k_filter(logits, top_k)
    if top_p is not None and top_p < 1.0:
        logits = top_p_filter(logits, top_p)
    return logits.softmax(dim=-1)


@torch.no_grad()
def generate(model, prompts: Sequence[Sequence[int]], max_new_tokens: int, temperature: float = 0.0,
             top_k: Optional[int] = None, top_p: Optional[float] = None, eos_id: Optional[int] = None,
             seed: Optional[int] = None, pad_id: int = 0) -> List[List[int]]:
    """Returns the new tokens of each prompt (a row that emits eos_id ends with it and stops there).
    Greedy when temperature == 0 (top_k / top_p / seed are then unused)."""
    check_generation(model, prompts, max_new_tokens, temperature, top_k, top_p)
    device = next(model.parameters()).device
    batch_size, longest = len(prompts), max(len(p) for p in prompts)

    total = longest + max(max_new_tokens - 1, 0)                                     # every key the last step sees
    tokens = torch.full((batch_size, longest), pad_id, dtype=torch.long)            # (B, T)
    full_mask = torch.ones(batch_size, total, dtype=torch.long)                     # (B, T + new - 1)
    for row, prompt in enumerate(prompts):
        tokens[row, longest - len(prompt):] = torch.tensor(list(prompt), dtype=torch.long)
        full_mask[row, :longest - len(prompt)] = 0
    tokens, full_mask = tokens.to(device), full_mask.to(device)
    attention_mask = full_mask[:, :longest]                                         # (B, T)
    position_ids = prompt_position_ids(model, tokens, attention_mask)               # (B, T) or (B, 2, T)
    head = getattr(model, "head", None)

    generator = None
    if temperature > 0 and seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)

    new_tokens: List[List[int]] = [[] for _ in prompts]
    finished = [False] * batch_size
    cache = None
    for step in range(max_new_tokens):
        if head is not None:
            hidden, returned = model(tokens, past_key_values=cache, position_ids=position_ids,
                                     attention_mask=attention_mask, use_cache=True, return_hidden=True)
            last_logits = head(hidden[:, -1, :])                                    # (B, V)
        else:
            logits, returned = model(tokens, past_key_values=cache, position_ids=position_ids,
                                     attention_mask=attention_mask, use_cache=True)  # (B, T or 1, V)
            last_logits = logits[:, -1, :]                                          # (B, V)
        if cache is None:                                                           # the prompt's cache, once
            cache = StaticCache.from_cache(returned, extra=max_new_tokens - 1)
        if temperature == 0:
            next_tokens = last_logits.argmax(dim=-1)                                # (B,)
        else:
            probs = next_token_probs(last_logits, temperature, top_k, top_p)        # (B, V)
            next_tokens = torch.multinomial(probs, 1, generator=generator)[:, 0]   # (B,)

        for row, token in enumerate(next_tokens.tolist()):
            if not finished[row]:
                new_tokens[row].append(token)
                finished[row] = token == eos_id
        if all(finished):
            break

        tokens = next_tokens[:, None]                                               # (B, 1)
        position_ids = next_position_ids(model, position_ids)                       # (B, 1) or (B, 2, 1)
        attention_mask = full_mask[:, :longest + step + 1]                          # (B, S + 1)
    return new_tokens


def prompt_position_ids(model, tokens: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The prompt's positions: the model's own rule if it has one, else each row's real tokens count from 0."""
    own_rule = getattr(model, "prompt_position_ids", None)
    if own_rule is not None:
        return own_rule(tokens, attention_mask)
    return (attention_mask.cumsum(dim=1) - 1).clamp(min=0)                          # (B, T)


def next_position_ids(model, position_ids: torch.Tensor) -> torch.Tensor:
    """The next token's positions from the last ones: the model's own rule, else the last position + 1."""
    own_rule = getattr(model, "next_position_ids", None)
    if own_rule is not None:
        return own_rule(position_ids)
    return position_ids[:, -1:] + 1                                                 # (B, 1)


def check_generation(model, prompts, max_new_tokens: int, temperature: float = 0.0, top_k: Optional[int] = None,
                     top_p: Optional[float] = None) -> None:
    """What generate() checks before it allocates anything (GenerationError naming the argument): the values,
    the token ids against the embedding rows, max_new_tokens against max_new_tokens_limit."""
    _check_arguments(prompts, max_new_tokens, temperature, top_k, top_p)
    _check_fits_model(model, prompts, max_new_tokens)


def _check_fits_model(model, prompts, max_new_tokens) -> None:
    """Every token id has an embedding row, and max_new_tokens is within max_new_tokens_limit (GenerationError)."""
    config = getattr(model, "config", None)
    rows = getattr(config, "vocab_size", None)
    for i, prompt in enumerate(prompts):
        bad = [t for t in map(int, prompt) if t < 0 or (rows is not None and t >= rows)]
        if bad:
            raise GenerationError(f"prompts[{i}] holds token id {bad[0]}, but the model's embedding has "
                                  f"{rows} rows (ids 0 .. {rows - 1}); is the tokenizer the model's?" if rows is not None
                                  else f"prompts[{i}] holds the negative token id {bad[0]}")
    limit = max_new_tokens_limit(model)
    if limit is not None and max_new_tokens > limit:
        raise GenerationError(f"max_new_tokens {max_new_tokens}: more than this model's limit of {limit} new tokens "
                              f"({CACHE_LIMIT_FACTOR} x its max_seq_len {config.max_seq_len}; the cache is allocated "
                              f"for all of them up front)")


def _check_arguments(prompts, max_new_tokens, temperature, top_k, top_p) -> None:
    if len(prompts) == 0:
        raise GenerationError("prompts is empty; expected a list of token-id lists")
    for i, prompt in enumerate(prompts):
        if len(prompt) == 0:
            raise GenerationError(f"prompts[{i}] is empty; every prompt needs at least one token (e.g. BOS)")
    if not isinstance(max_new_tokens, numbers.Integral) or max_new_tokens < 0:
        raise GenerationError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature >= 0):
        raise GenerationError(f"temperature must be a finite number >= 0, got {temperature}")
    if top_k is not None and top_k < 1:
        raise GenerationError(f"top_k must be >= 1 or None, got {top_k}")
    if top_p is not None and not (0 < top_p <= 1):                                  # nan fails too
        raise GenerationError(f"top_p must be in (0, 1] or None, got {top_p}")
