"""The static KV cache (kv_cache.StaticCache) that generate() decodes with: appending writes in place, and
generation on it gives the same tokens as the previous concatenating path (written out below as it was:
full logits, torch.cat of the cache each step) for every method, greedy and sampled, on a left-padded batch."""

from __future__ import annotations

import pytest
import torch

from minipeft.generate import generate, next_token_probs
from minipeft.kv_cache import StaticCache, append_kv, cache_length
from minipeft.model import Transformer
from minipeft.peft import apply_peft
from tests.test_peft_generation import METHOD_CONFIGS

PROMPTS = [[5, 17, 42, 8, 3, 60], [11, 29], [7, 7, 1, 90]]     # left-padded to 6


def test_static_layer_appends_in_place_and_equals_concatenation():
    g = torch.Generator().manual_seed(0)
    k0, v0 = torch.randn(2, 3, 4, 8, generator=g), torch.randn(2, 3, 4, 8, generator=g)
    cache = StaticCache.from_cache([(k0, v0)], extra=3)
    buffer = cache[0].k.data_ptr()
    past = (k0, v0)
    for _ in range(3):
        k, v = torch.randn(2, 3, 1, 8, generator=g), torch.randn(2, 3, 1, 8, generator=g)
        k_static, v_static = append_kv(cache[0], k, v)
        past = append_kv(past, k, v)                                             # the concatenating path
        assert torch.equal(k_static, past[0]) and torch.equal(v_static, past[1])
        assert k_static.data_ptr() == buffer                                     # a view of the buffer, no copy
    assert cache_length(cache) == 7 and cache_length([past]) == 7
    assert torch.equal(cache[0][0], past[0]) and cache[0][1].shape == (2, 3, 7, 8)
    with pytest.raises(ValueError, match="overflow"):
        append_kv(cache[0], k, v)


@torch.no_grad()
def generate_concatenating(model, prompts, max_new_tokens, temperature=0.0, top_k=None, top_p=None, seed=None):
    """generate() as it was before the static cache: list caches grown by torch.cat, full logits each call."""
    longest = max(len(p) for p in prompts)
    tokens = torch.zeros(len(prompts), longest, dtype=torch.long)
    mask = torch.zeros(len(prompts), longest, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        tokens[row, longest - len(prompt):] = torch.tensor(prompt)
        mask[row, longest - len(prompt):] = 1
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    out, cache = [[] for _ in prompts], None
    for _ in range(max_new_tokens):
        logits, cache = model(tokens, past_key_values=cache, position_ids=positions, attention_mask=mask,
                              use_cache=True)
        if temperature == 0:
            nxt = logits[:, -1].argmax(-1)
        else:
            nxt = torch.multinomial(next_token_probs(logits[:, -1], temperature, top_k, top_p), 1,
                                    generator=generator)[:, 0]
        for row, t in enumerate(nxt.tolist()):
            out[row].append(t)
        tokens, positions = nxt[:, None], positions[:, -1:] + 1
        mask = torch.cat([mask, mask.new_ones(len(prompts), 1)], dim=1)
    return out


@pytest.mark.parametrize("method", list(METHOD_CONFIGS))
def test_static_cache_generation_equals_concatenating_generation(small_cfg, method):
    torch.manual_seed(0)
    base = Transformer(small_cfg).eval()
    base.init_weights(std=0.1)
    model = apply_peft(base, METHOD_CONFIGS[method], generator=torch.Generator().manual_seed(1)).eval()
    with torch.no_grad():                          # trained-looking method parameters
        g = torch.Generator().manual_seed(2)
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.add_((1.0 if name.endswith("adapter_gate") else 0.1) * torch.randn(p.shape, generator=g))
    assert generate(model, PROMPTS, 8) == generate_concatenating(model, PROMPTS, 8)
    sampled = dict(temperature=0.9, top_k=20, top_p=0.9, seed=5)
    assert generate(model, PROMPTS, 8, **sampled) == generate_concatenating(model, PROMPTS, 8, **sampled)
