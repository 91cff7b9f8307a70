"""The key/value cache every decoder family shares: one (k, v) pair per layer, each (B, G, S, hd).

Keys are stored as the attention uses them (LLaMA: after rotation), so whatever is placed in the cache, a
real earlier token or a prefix-tuning prefix, is used exactly as stored. A family's attention calls
`append_kv` to put the new keys/values behind the past ones, and its model calls `cache_length` for S_past:
these two functions are the one place that knows how the cache is held.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch

KVCache = List[Tuple[torch.Tensor, torch.Tensor]]


def cache_length(past_key_values: Optional[Sequence]) -> int:
    """S_past: how many positions the cache holds (0 for no cache)."""
    if past_key_values is None:
        return 0
    return past_key_values[0][0].shape[2]


def append_kv(past_kv: Optional[Tuple[torch.Tensor, torch.Tensor]], k: torch.Tensor, v: torch.Tensor):
    """One layer: past (k, v) (B, G, S_past, hd) + new k, v (B, G, T, hd) -> (B, G, S_past + T, hd) each."""
    if past_kv is None:
        return k, v
    k = torch.cat([past_kv[0].to(k.dtype), k], dim=2)
    v = torch.cat([past_kv[1].to(v.dtype), v], dim=2)
    return k, v
