"""Facts about DeepSpeed / torch.distributed that the model-side code needs, without importing DeepSpeed
unless a parameter really is partitioned.

Under ZeRO-3 a parameter built inside deepspeed.zero.Init holds only this rank's shard: `p.numel()` is 0 and
`p.ds_numel` is the full size, and its values can be read only inside a GatheredParameters context. The
PEFT methods read sizes from configs and Linear in/out_features (never from a base weight's shape), count
parameters with `full_numel`, and read a base weight's values inside `gathered`.
"""

from __future__ import annotations

import contextlib
from typing import Tuple

import torch


def full_numel(p: torch.Tensor) -> int:
    """Elements of a parameter, also when DeepSpeed ZeRO-3 has partitioned it (then p.numel() is 0)."""
    return getattr(p, "ds_numel", p.numel())


def is_partitioned(p: torch.Tensor) -> bool:
    """True for a parameter that DeepSpeed ZeRO-3 partitioned (it has a ds_id)."""
    return hasattr(p, "ds_id")


def gathered(param: torch.Tensor):
    """A context in which `param` is complete on every rank: DeepSpeed's GatheredParameters for a ZeRO-3
    partitioned parameter, nothing for a plain one. A collective for a partitioned parameter: every rank
    must enter it."""
    if not is_partitioned(param):
        return contextlib.nullcontext()
    import deepspeed
    return deepspeed.zero.GatheredParameters([param], modifier_rank=None)


def world_info() -> Tuple[int, int]:
    """(rank, world size) of the process group, (0, 1) without one."""
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1
