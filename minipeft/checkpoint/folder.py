"""Our checkpoint folder: save_model, load_model (any family, any supported format), the checked tensor
stream, and streamed conversion of foreign folders into ours."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Dict, Iterator, Optional, Tuple, Union

import torch
import torch.nn as nn

from ..config import ModelConfig
from ..family_registry import build_model, get_family
from ..fileio import atomic_folder
from .files import (CONFIG_NAME, DEFAULT_MAX_SHARD_SIZE, CheckpointError, TensorChecker, check_tokenizer_fits,
                    tokenizer_file_name)
from .readers import open_checkpoint
from .writer import ShardWriter, parse_size


def save_model(model_or_state_dict: Union[nn.Module, Dict[str, torch.Tensor]], cfg: ModelConfig, folder,
               tokenizer_path=None, dtype: Optional[torch.dtype] = None,
               max_shard_size: Union[int, str] = DEFAULT_MAX_SHARD_SIZE, overwrite: bool = False,
               inputs=()) -> Path:
    """Write our checkpoint folder (config.json + model.safetensors or shards [+ tokenizer.model, or
    tokenizer.json for a .json tokenizer]). An existing folder is refused (CheckpointError) unless
    `overwrite`; then it is replaced as a whole, and only once the new one is completely written, unless the
    tokenizer file or one of `inputs` (what the caller read the model from) lies in it (fileio.atomic_folder)."""
    folder = Path(folder)
    with atomic_folder(folder, overwrite=overwrite, error=CheckpointError, inputs=[tokenizer_path, *inputs]) as tmp:
        write_model_files(model_or_state_dict, cfg, tmp, tokenizer_path, dtype, max_shard_size)
    return folder


def write_model_files(model_or_state_dict, cfg: ModelConfig, folder: Path, tokenizer_path=None,
                      dtype: Optional[torch.dtype] = None,
                      max_shard_size: Union[int, str] = DEFAULT_MAX_SHARD_SIZE) -> None:
    """The files of our checkpoint folder, written into the (temporary) folder `folder`, after every key and
    shape was checked against `cfg` (CheckpointError otherwise)."""
    state = model_or_state_dict.state_dict() if isinstance(model_or_state_dict, nn.Module) else model_or_state_dict
    checker = TensorChecker(cfg, "the given ModelConfig")
    for key, tensor in state.items():
        checker.check(key, tensor, "state dict to save")
    checker.finish("state dict to save")
    if tokenizer_path is not None:
        _check_tokenizer_file(Path(tokenizer_path), cfg)
    writer = ShardWriter(folder, parse_size(max_shard_size), dtype)
    for key, tensor in state.items():
        writer.add(key, tensor)
    writer.finish()
    cfg.save(folder / CONFIG_NAME)
    if tokenizer_path is not None:
        shutil.copyfile(tokenizer_path, folder / tokenizer_file_name(Path(tokenizer_path)))


def _check_tokenizer_file(path: Path, cfg: ModelConfig) -> None:
    if not path.is_file():
        raise CheckpointError(f"{path}: tokenizer file not found")
    check_tokenizer_fits(path, cfg.vocab_size, "the given ModelConfig",
                         allow_extra_model_rows=get_family(cfg.family).tokenizer_may_be_smaller)


def iter_checkpoint_tensors(folder, dtype: Optional[torch.dtype] = None) -> Iterator[Tuple[str, torch.Tensor]]:
    """(our key, tensor) for every weight of a checkpoint folder (ours, Meta or Hugging Face), one tensor in
    memory at a time. Each key and shape is checked against the folder's config as it comes (CheckpointError
    naming the file); a missing key raises after the last tensor. Floating tensors are converted to `dtype`
    (None keeps the stored dtype)."""
    reader = open_checkpoint(folder)
    cfg = reader.config()
    checker = TensorChecker(cfg, str(Path(folder) / reader.config_file))
    for key, tensor, source in reader.tensors(cfg):
        checker.check(key, tensor, source)
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        yield key, tensor
    checker.finish(str(folder))


def load_model(folder, dtype: Optional[torch.dtype] = None, device="cpu"):
    """Read a checkpoint folder (ours; Meta and Hugging Face folders work too) into a Transformer in eval mode.

    The model is built on the meta device, so no memory is spent on a random init; each tensor is checked,
    converted to `dtype` (None keeps the stored dtype) and moved to `device` (iter_checkpoint_tensors), then
    attached with load_state_dict(assign=True): the weights exist once."""
    cfg = open_checkpoint(folder).config()
    state = {key: tensor.to(device) for key, tensor in iter_checkpoint_tensors(folder, dtype)}
    with torch.device("meta"):
        model = build_model(cfg)
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()


def convert_checkpoint(src, out, dtype: Optional[torch.dtype] = None,
                       max_shard_size: Union[int, str] = DEFAULT_MAX_SHARD_SIZE, overwrite: bool = False) -> dict:
    """Convert a Meta or Hugging Face LLaMA folder (or one of ours) into our folder format, tensor by tensor.

    Returns a summary: format, num_parameters, dtype, out. `out` must not exist yet (or be empty) unless
    `overwrite` (and not even then when `src` lies in it); on any failure it is not created (or left as it was)."""
    if Path(out).resolve() == Path(src).resolve():
        raise CheckpointError(f"{out}: the converted checkpoint must go to a new folder, not over its source")
    reader = open_checkpoint(src)
    cfg = reader.config()
    checker = TensorChecker(cfg, str(Path(src) / reader.config_file))
    dtypes_seen = set()
    with atomic_folder(Path(out), overwrite=overwrite, error=CheckpointError, inputs=[src]) as tmp:
        writer = ShardWriter(tmp, parse_size(max_shard_size), dtype)
        for key, tensor, source in reader.tensors(cfg):
            checker.check(key, tensor, source)
            dtypes_seen.add(str(dtype or tensor.dtype).removeprefix("torch."))
            writer.add(key, tensor)
            del tensor
        checker.finish(str(src))
        writer.finish()
        cfg.save(tmp / CONFIG_NAME)
        if reader.tokenizer_path is not None:
            shutil.copyfile(reader.tokenizer_path, tmp / tokenizer_file_name(reader.tokenizer_path))
    return {"format": reader.format, "num_parameters": writer.num_parameters,
            "dtype": ",".join(sorted(dtypes_seen)), "out": str(out), "config": cfg,
            "tokenizer": tokenizer_file_name(reader.tokenizer_path) if reader.tokenizer_path is not None else None}
