"""Reading weight files one tensor at a time, and checking each tensor against the model a config describes.
Every error is a CheckpointError that names the file (and the key)."""

from __future__ import annotations

import json
import math
import pickle
import re
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

import torch

from ..config import ModelConfig
from ..family_registry import build_model
from ..fileio import read_json as _read_json_checked

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
TOKENIZER_NAME = "tokenizer.model"          # SentencePiece (LLaMA)
TOKENIZER_JSON_NAME = "tokenizer.json"      # byte-level BPE (BLOOM)
TOKENIZER_NAMES = (TOKENIZER_NAME, TOKENIZER_JSON_NAME)   # a folder's tokenizer: the first one present
DEFAULT_MAX_SHARD_SIZE = 5 * 1024**3   # bytes

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class CheckpointError(ValueError):
    """A checkpoint folder or file that cannot be read; the message names the file and the problem."""


def read_json(path: Path) -> dict:
    return _read_json_checked(path, CheckpointError)


def expected_shapes(cfg: ModelConfig) -> Dict[str, Tuple[int, ...]]:
    """Every parameter name of build_model(cfg) -> its shape (built on the meta device: no memory)."""
    with torch.device("meta"):
        model = build_model(cfg)
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


LAYER_INDEX = re.compile(r"(?:^|\.)(?:layers|h)\.(\d+)\.")     # layers.3. (ours, HF LLaMA, ChatGLM), h.3. (BLOOM)


def check_config_fits_files(cfg: ModelConfig, shapes: Dict[str, Tuple[int, ...]], config_source: str,
                            files: str) -> None:
    """Cheap checks of a config against the tensor names and shapes of its weight files (safetensors headers,
    an index's names), before a model is built from the config: the number of layers, and that the files hold
    at least the embedding's vocab_size x dim numbers. CheckpointError naming the config file otherwise."""
    layers = {int(m.group(1)) for key in shapes if (m := LAYER_INDEX.search(key))}
    if layers and cfg.n_layers != max(layers) + 1:
        raise CheckpointError(f"{config_source}: n_layers is {cfg.n_layers} but the weight files ({files}) hold "
                              f"{max(layers) + 1} layers (0 .. {max(layers)}); the config does not describe them")
    numbers = sum(math.prod(shape) for shape in shapes.values() if shape is not None)
    if numbers and cfg.vocab_size * cfg.dim > numbers:
        raise CheckpointError(f"{config_source}: vocab_size {cfg.vocab_size} x dim {cfg.dim} is more numbers than "
                              f"the weight files ({files}) hold in all ({numbers:,}); the config does not describe them")


class TensorChecker:
    """Checks a stream of (key, tensor, file) against the expected names, shapes and kinds (a floating-point
    weight must come as floating point), one at a time."""

    def __init__(self, cfg: ModelConfig, config_source: str):
        with torch.device("meta"):
            model = build_model(cfg)
        state = model.state_dict()
        self.expected = {name: tuple(t.shape) for name, t in state.items()}
        self.floating = {name for name, t in state.items() if t.is_floating_point()}
        self.config_source = config_source
        self.seen: Dict[str, str] = {}   # key -> file it came from

    def check(self, key: str, tensor: torch.Tensor, source: str) -> None:
        if key not in self.expected:
            raise CheckpointError(f"{source}: unexpected key {key!r}: the model described by "
                                  f"{self.config_source} has no such parameter")
        if key in self.seen:
            raise CheckpointError(f"{source}: key {key!r} appears twice (also in {self.seen[key]})")
        if tuple(tensor.shape) != self.expected[key]:
            raise CheckpointError(f"{source}: {key!r} has shape {tuple(tensor.shape)}, but {self.config_source} "
                                  f"implies {self.expected[key]}")
        if key in self.floating and not tensor.is_floating_point():
            raise CheckpointError(f"{source}: {key!r} has dtype {str(tensor.dtype).removeprefix('torch.')}, "
                                  f"expected a floating-point weight (float32, float16 or bfloat16)")
        self.seen[key] = source

    def finish(self, where: str) -> None:
        missing = [k for k in self.expected if k not in self.seen]
        if missing:
            shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
            raise CheckpointError(f"{where}: missing key(s) {shown} required by {self.config_source}")




def _safetensors_keys(path: Path) -> List[str]:
    from safetensors import safe_open
    try:
        with safe_open(str(path), framework="pt") as f:
            return list(f.keys())
    except Exception as e:  # safetensors raises its own error types for a bad header / truncated file
        raise CheckpointError(f"{path}: not a readable safetensors file (truncated or corrupt?): {e}") from None


def weight_file_shapes(files: List[Tuple[Path, Optional[List[str]]]]) -> Dict[str, Tuple[int, ...]]:
    """key -> shape of every tensor of the weight files, from the safetensors headers (no tensor is read) or a
    memory-mapped .bin/.pth (no tensor is paged in)."""
    from safetensors import safe_open
    shapes: Dict[str, Tuple[int, ...]] = {}
    for path, _ in files:
        if path.suffix == ".safetensors":
            try:
                with safe_open(str(path), framework="pt") as f:
                    shapes.update({key: tuple(f.get_slice(key).get_shape()) for key in f.keys()})
            except Exception as e:  # noqa: BLE001 - safetensors' own error types for a bad header
                raise CheckpointError(f"{path}: not a readable safetensors file (truncated or corrupt?): "
                                      f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
        else:
            shapes.update({key: tuple(t.shape) if isinstance(t, torch.Tensor) else None
                           for key, t in torch_load(path).items()})
    return shapes


def _iter_safetensors(path: Path, keys: Optional[List[str]] = None) -> Iterator[Tuple[str, torch.Tensor]]:
    """Yield (key, tensor) from one safetensors file, one tensor in memory at a time."""
    from safetensors import safe_open
    try:
        handle = safe_open(str(path), framework="pt")
    except Exception as e:
        raise CheckpointError(f"{path}: not a readable safetensors file (truncated or corrupt?): {e}") from None
    with handle as f:
        available = set(f.keys())
        for key in (keys if keys is not None else list(f.keys())):
            if key not in available:
                raise CheckpointError(f"{path}: key {key!r} is listed in the index but not in this file")
            try:
                tensor = f.get_tensor(key)
            except Exception as e:
                raise CheckpointError(f"{path}: cannot read tensor {key!r} (truncated or corrupt?): {e}") from None
            yield key, tensor


def torch_load(path: Path) -> dict:
    """A .pth/.bin state dict, memory-mapped (tensors are paged in from disk only when used)."""
    try:
        state = torch.load(str(path), map_location="cpu", mmap=True, weights_only=True)
    except pickle.UnpicklingError as e:          # weights_only=True met a global: code, never run
        found = [line for line in str(e).splitlines() if "GLOBAL" in line]
        raise CheckpointError(f"{path}: refused: it holds more than tensors and plain data (loading it could run "
                              f"code){': ' + found[0].strip() if found else ''}") from None
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint (truncated or corrupt?): {first}") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: expected a dict of tensors, got {type(state).__name__}")
    return state


def tokenizer_vocab_size(path: Path) -> int:
    """Number of pieces in a SentencePiece model file, or of ids in a tokenizer.json (with added tokens)."""
    if Path(path).suffix == ".json":
        from ..tokenizer import TokenizerError, tokenizer_json_size
        try:
            return tokenizer_json_size(Path(path))
        except TokenizerError as e:
            raise CheckpointError(str(e)) from None
    import sentencepiece as spm
    processor = spm.SentencePieceProcessor()
    try:
        processor.Load(str(path))
    except Exception as e:
        raise CheckpointError(f"{path}: not a readable SentencePiece model: {e}") from None
    return processor.GetPieceSize()


def folder_tokenizer(folder: Path) -> Optional[Path]:
    """The tokenizer file a checkpoint folder carries (tokenizer.model, else tokenizer.json), or None."""
    for name in TOKENIZER_NAMES:
        if (Path(folder) / name).is_file():
            return Path(folder) / name
    return None


def tokenizer_file_name(path: Path) -> str:
    """The name a tokenizer file gets in our folder: tokenizer.json for a .json file, else tokenizer.model."""
    return TOKENIZER_JSON_NAME if Path(path).suffix == ".json" else TOKENIZER_NAME


def check_tokenizer_fits(path: Path, vocab_size: int, where: str, allow_extra_model_rows: bool = False) -> None:
    """A tokenizer must not produce ids the model has no row for. A SentencePiece model must match the
    vocabulary exactly (unless allow_extra_model_rows); a tokenizer.json may be smaller than the model
    (BLOOM: 250,680 tokens, 250,880 rows)."""
    pieces = tokenizer_vocab_size(path)
    if Path(path).suffix == ".json":
        allow_extra_model_rows = True
    fits = pieces <= vocab_size if allow_extra_model_rows else pieces == vocab_size
    if not fits:
        raise CheckpointError(f"{path}: tokenizer has {pieces} pieces but the model's vocabulary is not that "
                              f"size: {where} gives it a vocabulary of {vocab_size}")


def check_tokenizer_family(tokenizer, family: str, path) -> None:
    """A tokenizer made for `family` (family_registry.tokenizer_for) must be that family's kind: LLaMA's Tokenizer
    reads a tokenizer.json as BLOOM's byte-level BPE, which a LLaMA model cannot use (CheckpointError)."""
    from ..family_registry import get_family
    made_by = get_family(family).tokenizer
    if isinstance(made_by, type) and type(tokenizer) is not made_by and getattr(tokenizer, "family", family) != family:
        raise CheckpointError(f"{path}: a {tokenizer.family} tokenizer ({type(tokenizer).__name__}), but the model is "
                              f"a {family} model, whose tokenizer is a {made_by.__name__}")


def weight_files(folder: Path, single: str, index: str) -> Optional[List[Tuple[Path, Optional[List[str]]]]]:
    """[(file, keys to read or None for all)] from an index json or a single file; None if neither is there.
    Every file an index names must exist."""
    index_path = folder / index
    if index_path.is_file():
        weight_map = read_json(index_path).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index_path}: no 'weight_map' (key -> file) in the index")
        keys_by_file: Dict[str, List[str]] = {}
        for key, filename in weight_map.items():
            keys_by_file.setdefault(filename, []).append(key)
        for filename in keys_by_file:
            if not (folder / filename).is_file():
                raise CheckpointError(f"{index_path}: names shard {filename!r}, which is missing from {folder}")
        return [(folder / filename, keys) for filename, keys in keys_by_file.items()]
    if (folder / single).is_file():
        return [(folder / single, None)]
    return None


def iter_weight_files(files: List[Tuple[Path, Optional[List[str]]]]) -> Iterator[Tuple[str, torch.Tensor, str]]:
    """(key, tensor, file) from safetensors or torch (.bin/.pth) files."""
    for path, keys in files:
        if path.suffix == ".safetensors":
            for key, tensor in _iter_safetensors(path, keys):
                yield key, tensor, str(path)
        else:
            state = torch_load(path)
            for key in (keys if keys is not None else list(state)):
                if key not in state:
                    raise CheckpointError(f"{path}: key {key!r} is listed in the index but not in this file")
                yield key, state.pop(key), str(path)


