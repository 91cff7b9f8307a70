"""The key/value cache every decoder family shares: one (k, v) pair per layer, each (B, G, S, hd).

Keys are stored as the attention uses them (LLaMA: after rotation), so whatever is placed in the cache, a
real earlier token or a prefix-tuning prefix, is used exactly as stored. A family's attention calls
`append_kv` to put the new keys/values behind the past ones, and its model calls `cache_length` for S_past:
these two functions are the one place that knows how the cache is held. It is held one of two ways:

- a list of (k, v) tensor pairs (what a forward with use_cache=True returns, and what prefix tuning puts
  in front): appending concatenates, so a step costs a copy of the whole cache, O(S) per token;
- a `StaticCache` (what generate() decodes with): per layer, buffers (B, G, capacity, hd) allocated once,
  the first `length` positions filled. Appending writes the T new positions in place and returns views of
  the filled part, so a step copies only its own keys/values:

      buffer k   (B, G, capacity, hd)   [ filled 0 .. length-1 | new length .. length+T-1 | free ... ]
      returned   k[:, :, :length + T]   a view, no copy

  `StaticCache.from_cache(cache, extra)` copies a list cache (a prompt's, prefix in front) into buffers with
  room for `extra` more positions. A StaticLayer also answers [0] / [1] with its filled views, so code that
  reads `past[0][0].shape[2]` keeps working.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch

KVCache = List[Tuple[torch.Tensor, torch.Tensor]]


class StaticLayer:
    """One layer's preallocated keys and values, k and v (B, G, capacity, hd), the first `length` filled."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor, capacity: int):
        B, G, S, hd = k.shape
        if capacity < S:
            raise ValueError(f"capacity {capacity} is smaller than the {S} positions given")
        self.k = k.new_empty(B, G, capacity, hd)
        self.v = v.new_empty(B, v.shape[1], capacity, v.shape[3])
        self.k[:, :, :S] = k
        self.v[:, :, :S] = v
        self.length = S

    @property
    def capacity(self) -> int:
        return self.k.shape[2]

    def append(self, k: torch.Tensor, v: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, G, T, hd) at positions length .. length+T-1; -> the filled views (B, G, length+T, hd)."""
        start, end = self.length, self.length + k.shape[2]
        if end > self.capacity:
            raise ValueError(f"the static cache holds {self.capacity} positions; appending {k.shape[2]} to "
                             f"{start} would overflow it (allocate it with more room)")
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        self.length = end
        return self.k[:, :, :end].to(k.dtype), self.v[:, :, :end].to(v.dtype)

    def __getitem__(self, index: int) -> torch.Tensor:
        return (self.k, self.v)[index][:, :, :self.length]

    def __len__(self) -> int:
        return 2


class StaticCache(list):
    """A list of StaticLayer, one per layer: pass it as past_key_values and every forward appends in place."""

    @classmethod
    def from_cache(cls, cache: Sequence, extra: int) -> "StaticCache":
        """cache: per layer (k, v) (B, G, S, hd) -> a StaticCache holding them, with room for `extra` more."""
        return cls(StaticLayer(k, v, k.shape[2] + extra) for k, v in cache)


def cache_length(past_key_values: Optional[Sequence]) -> int:
    """S_past: how many positions the cache holds (0 for no cache)."""
    if past_key_values is None:
        return 0
    first = past_key_values[0]
    if isinstance(first, StaticLayer):
        return first.length
    return first[0].shape[2]


def append_kv(past_kv, k: torch.Tensor, v: torch.Tensor):
    """One layer: past (k, v) (B, G, S_past, hd) or a StaticLayer, + new k, v (B, G, T, hd) ->
    (B, G, S_past + T, hd) each (a StaticLayer writes them in place and returns views)."""
    if past_kv is None:
        return k, v
    if isinstance(past_kv, StaticLayer):
        return past_kv.append(k, v)
    k = torch.cat([past_kv[0].to(k.dtype), k], dim=2)
    v = torch.cat([past_kv[1].to(v.dtype), v], dim=2)
    return k, v
