"""Writing weights in shards that stream: only the current shard is ever held in memory."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Dict, List, Optional, Tuple, Union

import torch

from .files import INDEX_NAME, WEIGHTS_NAME, CheckpointError


class ShardWriter:
    """Collects tensors and writes a safetensors file whenever the next tensor would pass max_shard_size.
    Only the current shard is held in memory. finish() names the files model-0000N-of-0000M.safetensors
    and writes the index, or a single model.safetensors when everything fit in one shard."""

    def __init__(self, folder: Path, max_shard_size: int, dtype: Optional[torch.dtype]):
        self.folder, self.max_shard_size, self.dtype = folder, max_shard_size, dtype
        self.pending: Dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.written: List[Tuple[Path, List[str]]] = []   # (temporary file, its keys)
        self.total_bytes = 0
        self.num_parameters = 0

    def add(self, key: str, tensor: torch.Tensor) -> None:
        if self.dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(self.dtype)
        tensor = tensor.detach().to("cpu").contiguous()
        size = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + size > self.max_shard_size:
            self._flush()
        self.pending[key] = tensor
        self.pending_bytes += size
        self.total_bytes += size
        self.num_parameters += tensor.numel()

    def _flush(self) -> None:
        from safetensors import SafetensorError
        from safetensors.torch import save_file
        path = self.folder / f"shard-{len(self.written):05d}.tmp"
        try:
            save_file(self.pending, str(path), metadata={"format": "pt"})
        except (SafetensorError, OSError) as e:     # a full disk: the caller's temporary folder is removed
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise CheckpointError(f"{self.folder.parent}: cannot write the weights there ({reason})") from None
        self.written.append((path, list(self.pending)))
        self.pending, self.pending_bytes = {}, 0

    def finish(self) -> None:
        if self.pending or not self.written:
            self._flush()
        if len(self.written) == 1:
            os.replace(self.written[0][0], self.folder / WEIGHTS_NAME)
            return
        count = len(self.written)
        weight_map = {}
        for i, (path, keys) in enumerate(self.written):
            name = f"model-{i + 1:05d}-of-{count:05d}.safetensors"
            os.replace(path, self.folder / name)
            weight_map.update({key: name for key in keys})
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
        (self.folder / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")


def parse_size(size: Union[int, str]) -> int:
    """5000000, "5GB", "200MB", "64KB" -> bytes (powers of 1024)."""
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?i?B?)\s*", size.upper())
    if not match:
        raise CheckpointError(f"max_shard_size {size!r}: expected a number of bytes or e.g. '5GB', '200MB'")
    unit = {"": 1, "B": 1, "K": 1024, "M": 1024**2, "G": 1024**3}[match.group(2)[:1]]
    return int(float(match.group(1)) * unit)


# ================================================================================================
