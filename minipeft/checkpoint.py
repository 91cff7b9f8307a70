"""Checkpoints: our folder format, Meta and Hugging Face LLaMA readers, conversion.

Our folder (what `save_model` writes and `load_model` reads):

    config.json                       ModelConfig.to_dict()
    model.safetensors                 every tensor under our (Meta) names, e.g. layers.0.attention.wq.weight
      or model-00001-of-0000M.safetensors ... + model.safetensors.index.json  above max_shard_size
    tokenizer.model                   SentencePiece model, when one was given

Foreign folders, detected from their contents (`detect_format`):

    Meta          params.json + consolidated.00.pth .. consolidated.{N-1}.pth: N model-parallel shards.
                  Shard i holds rows i*out/N .. of wq/wk/wv/w1/w3/output (joined on dim 0) and columns
                  i*in/N .. of wo/w2/tok_embeddings (joined on dim 1); norms are replicated. Meta's rotary
                  layout is ours, so no permutation. `rope.freqs` is a buffer and is skipped.
    Hugging Face  config.json (model_type "llama") + model.safetensors | pytorch_model.bin, single or sharded
                  with *.index.json. q_proj/k_proj rows are permuted for transformers' half-split rotary:
                  per head, HF row c*(hd/2)+i holds Meta row 2i+c; `hf_tensor_to_ours` undoes it.

Every reader yields (our_key, tensor, source_file) one tensor at a time, so `convert_checkpoint` and
`load_model` hold at most one copy of the weights (a 7B model is never in memory twice): the model is
built on the `meta` device and the tensors are attached with load_state_dict(assign=True).
`iter_checkpoint_tensors` is the checked stream itself (train.py fills a ZeRO-3 partitioned model from it).
Each key and shape is checked against the model the config describes; a bad file is a CheckpointError
naming the file and the key. Output folders are written under a temporary name next to the target and
renamed at the end, so a failure leaves nothing half-written.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple, Union

import torch
import torch.nn as nn

from .config import ConfigError, ModelConfig

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
TOKENIZER_NAME = "tokenizer.model"
DEFAULT_MAX_SHARD_SIZE = 5 * 1024**3   # bytes

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class CheckpointError(ValueError):
    """A checkpoint folder or file that cannot be read; the message names the file and the problem."""


# ================================================================================================
# Hugging Face key mapping and rotary permutation
# ================================================================================================

def hf_key_to_ours(key: str) -> str:
    """Hugging Face LLaMA parameter name -> ours (Meta's names)."""
    key = key.removeprefix("model.")
    fixed = {"embed_tokens.weight": "tok_embeddings.weight", "norm.weight": "norm.weight",
             "lm_head.weight": "output.weight"}
    if key in fixed:
        return fixed[key]
    for hf, ours in (("self_attn.q_proj", "attention.wq"), ("self_attn.k_proj", "attention.wk"),
                     ("self_attn.v_proj", "attention.wv"), ("self_attn.o_proj", "attention.wo"),
                     ("mlp.gate_proj", "feed_forward.w1"), ("mlp.down_proj", "feed_forward.w2"),
                     ("mlp.up_proj", "feed_forward.w3"), ("input_layernorm", "attention_norm"),
                     ("post_attention_layernorm", "ffn_norm")):
        if f".{hf}." in key:
            return key.replace(hf, ours)
    raise KeyError(key)


def unpermute_hf_rotary(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo transformers' q/k permutation (half-split rotary -> Meta's adjacent pairs).
    Per head, HF row c*(hd/2)+i holds Meta row 2i+c. w: (n_heads*hd, d_in)."""
    dim1, dim2 = w.shape
    return w.view(n_heads, 2, dim1 // n_heads // 2, dim2).transpose(1, 2).reshape(dim1, dim2)


def permute_for_hf(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Meta's adjacent-pair rows -> transformers' half-split layout (the inverse of unpermute_hf_rotary)."""
    dim1, dim2 = w.shape
    return w.view(n_heads, dim1 // n_heads // 2, 2, dim2).transpose(1, 2).reshape(dim1, dim2)


def hf_tensor_to_ours(hf_key: str, tensor: torch.Tensor, cfg: ModelConfig):
    """One HF tensor -> (our key, our tensor), undoing the rotary permutation on q and k."""
    key = hf_key_to_ours(hf_key)
    if key.endswith("attention.wq.weight"):
        tensor = unpermute_hf_rotary(tensor, cfg.n_heads)
    elif key.endswith("attention.wk.weight"):
        tensor = unpermute_hf_rotary(tensor, cfg.n_kv_heads)
    return key, tensor


# ================================================================================================
# Checking tensors against the model a config describes
# ================================================================================================

def expected_shapes(cfg: ModelConfig) -> Dict[str, Tuple[int, ...]]:
    """Every parameter name of Transformer(cfg) -> its shape (built on the meta device: no memory)."""
    from .model import Transformer
    with torch.device("meta"):
        model = Transformer(cfg)
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


class _TensorChecker:
    """Checks a stream of (key, tensor, file) against the expected names and shapes, one at a time."""

    def __init__(self, cfg: ModelConfig, config_source: str):
        self.expected = expected_shapes(cfg)
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
        self.seen[key] = source

    def finish(self, where: str) -> None:
        missing = [k for k in self.expected if k not in self.seen]
        if missing:
            shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
            raise CheckpointError(f"{where}: missing key(s) {shown} required by {self.config_source}")


# ================================================================================================
# Low-level file readers (each error names the file)
# ================================================================================================

def _safetensors_keys(path: Path) -> List[str]:
    from safetensors import safe_open
    try:
        with safe_open(str(path), framework="pt") as f:
            return list(f.keys())
    except Exception as e:  # safetensors raises its own error types for a bad header / truncated file
        raise CheckpointError(f"{path}: not a readable safetensors file (truncated or corrupt?): {e}") from None


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


def _torch_load(path: Path) -> dict:
    """A .pth/.bin state dict, memory-mapped (tensors are paged in from disk only when used)."""
    try:
        state = torch.load(str(path), map_location="cpu", mmap=True, weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint (truncated or corrupt?): {e}") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: expected a dict of tensors, got {type(state).__name__}")
    return state


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: cannot read JSON: {e}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return data


def tokenizer_vocab_size(path: Path) -> int:
    """Number of pieces in a SentencePiece model file."""
    import sentencepiece as spm
    processor = spm.SentencePieceProcessor()
    try:
        processor.Load(str(path))
    except Exception as e:
        raise CheckpointError(f"{path}: not a readable SentencePiece model: {e}") from None
    return processor.GetPieceSize()


def _weight_files(folder: Path, single: str, index: str) -> Optional[List[Tuple[Path, Optional[List[str]]]]]:
    """[(file, keys to read or None for all)] from an index json or a single file; None if neither is there.
    Every file an index names must exist."""
    index_path = folder / index
    if index_path.is_file():
        weight_map = _read_json(index_path).get("weight_map")
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


def _iter_weight_files(files: List[Tuple[Path, Optional[List[str]]]]) -> Iterator[Tuple[str, torch.Tensor, str]]:
    """(key, tensor, file) from safetensors or torch (.bin/.pth) files."""
    for path, keys in files:
        if path.suffix == ".safetensors":
            for key, tensor in _iter_safetensors(path, keys):
                yield key, tensor, str(path)
        else:
            state = _torch_load(path)
            for key in (keys if keys is not None else list(state)):
                if key not in state:
                    raise CheckpointError(f"{path}: key {key!r} is listed in the index but not in this file")
                yield key, state.pop(key), str(path)


# ================================================================================================
# Format detection and the three readers
# ================================================================================================

META_SHARD = re.compile(r"^consolidated\.(\d+)\.pth$")


def detect_format(folder) -> str:
    """'ours', 'meta' or 'hf', from what the folder contains."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: checkpoint folder not found")
    if (folder / "params.json").is_file():
        return "meta"
    config_path = folder / CONFIG_NAME
    if config_path.is_file():
        config = _read_json(config_path)
        if "model_type" in config:
            return "hf"
        if "dim" in config:
            return "ours"
        raise CheckpointError(f"{config_path}: neither our config (with 'dim') nor a Hugging Face config "
                              f"(with 'model_type')")
    raise CheckpointError(
        f"{folder}: not a checkpoint folder. Expected one of: our format (config.json with 'dim' + "
        f"model.safetensors), Meta (params.json + consolidated.00.pth ...), or Hugging Face "
        f"(config.json with model_type 'llama' + model.safetensors or pytorch_model.bin)")


def _check_tokenizer(folder: Path, cfg: ModelConfig, config_name: str, allow_extra_model_rows: bool = False) -> None:
    """A tokenizer.model next to the weights must fit the model's vocabulary."""
    tokenizer_path = folder / TOKENIZER_NAME
    if not tokenizer_path.is_file():
        return
    pieces = tokenizer_vocab_size(tokenizer_path)
    fits = pieces <= cfg.vocab_size if allow_extra_model_rows else pieces == cfg.vocab_size
    if not fits:
        raise CheckpointError(f"{tokenizer_path}: tokenizer has {pieces} pieces but {folder / config_name} "
                              f"gives the model a vocabulary of {cfg.vocab_size}")


class _Reader:
    """A checkpoint folder: its format, its ModelConfig, and a stream of (our_key, tensor, file)."""
    format: str
    config_file: str

    def __init__(self, folder: Path):
        self.folder = folder

    @property
    def tokenizer_path(self) -> Optional[Path]:
        path = self.folder / TOKENIZER_NAME
        return path if path.is_file() else None

    def config(self) -> ModelConfig:
        raise NotImplementedError

    def tensors(self, cfg: ModelConfig) -> Iterator[Tuple[str, torch.Tensor, str]]:
        raise NotImplementedError


class _OursReader(_Reader):
    format, config_file = "ours", CONFIG_NAME

    def config(self) -> ModelConfig:
        try:
            cfg = ModelConfig.load(self.folder / CONFIG_NAME)
        except (ConfigError, TypeError) as e:
            raise CheckpointError(str(e)) from None
        _check_tokenizer(self.folder, cfg, CONFIG_NAME)
        return cfg

    def tensors(self, cfg):
        files = _weight_files(self.folder, WEIGHTS_NAME, INDEX_NAME)
        if files is None:
            raise CheckpointError(f"{self.folder}: no {WEIGHTS_NAME} or {INDEX_NAME} next to {CONFIG_NAME}")
        yield from _iter_weight_files(files)


class _HFReader(_Reader):
    format, config_file = "hf", CONFIG_NAME

    def config(self) -> ModelConfig:
        try:
            cfg = ModelConfig.from_hf_config(self.folder / CONFIG_NAME)
        except ConfigError as e:
            raise CheckpointError(str(e)) from None
        # transformers folders may give the model more rows than tokenizer.model has pieces (added tokens
        # such as a pad token live in tokenizer.json), so only a tokenizer larger than the model is wrong.
        _check_tokenizer(self.folder, cfg, CONFIG_NAME, allow_extra_model_rows=True)
        return cfg

    def tensors(self, cfg):
        files = (_weight_files(self.folder, "model.safetensors", "model.safetensors.index.json")
                 or _weight_files(self.folder, "pytorch_model.bin", "pytorch_model.bin.index.json"))
        if files is None:
            raise CheckpointError(f"{self.folder}: Hugging Face config.json found but no weights: expected "
                                  f"model.safetensors, pytorch_model.bin, or a sharded *.index.json")
        for hf_key, tensor, source in _iter_weight_files(files):
            if hf_key.endswith("rotary_emb.inv_freq"):     # a recomputable buffer, not a weight
                continue
            try:
                key, tensor = hf_tensor_to_ours(hf_key, tensor, cfg)
            except KeyError:
                raise CheckpointError(f"{source}: unexpected key {hf_key!r} (not a LLaMA parameter)") from None
            yield key, tensor, source


# Which dimension Meta's model-parallel shards split each weight on (None: replicated on every shard).
META_SPLIT_DIM = {"wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0, "output": 0,
                  "wo": 1, "w2": 1, "tok_embeddings": 1,
                  "attention_norm": None, "ffn_norm": None, "norm": None}
META_IGNORED_KEYS = ("rope.freqs",)


def _meta_module_name(key: str) -> str:
    """'layers.3.attention.wq.weight' -> 'wq'; 'tok_embeddings.weight' -> 'tok_embeddings'."""
    return key.removesuffix(".weight").rsplit(".", 1)[-1]


class _MetaReader(_Reader):
    format, config_file = "meta", "params.json"

    def shard_paths(self) -> List[Path]:
        numbers = {}
        for path in self.folder.iterdir():
            match = META_SHARD.match(path.name)
            if match:
                numbers[int(match.group(1))] = path
        if not numbers:
            raise CheckpointError(f"{self.folder}: params.json found but no consolidated.00.pth")
        for i in range(max(numbers) + 1):
            if i not in numbers:
                raise CheckpointError(f"{self.folder}: shard consolidated.{i:02d}.pth is missing (found shards "
                                      f"{sorted(numbers)}; Meta shards are numbered 00 .. N-1 without gaps)")
        return [numbers[i] for i in range(len(numbers))]

    def config(self) -> ModelConfig:
        params_path = self.folder / "params.json"
        params = _read_json(params_path)
        vocab_size = None
        if params.get("vocab_size", -1) in (-1, None):
            if self.tokenizer_path is None:
                raise CheckpointError(f"{params_path}: vocab_size is -1 and there is no {TOKENIZER_NAME} in "
                                      f"{self.folder} to take it from")
            vocab_size = tokenizer_vocab_size(self.tokenizer_path)
        try:
            cfg = ModelConfig.from_params_json(params_path, vocab_size=vocab_size)
        except ConfigError as e:
            raise CheckpointError(str(e)) from None
        _check_tokenizer(self.folder, cfg, "params.json")
        return cfg

    def tensors(self, cfg):
        paths = self.shard_paths()
        shards = [_torch_load(p) for p in paths]
        for path, shard in zip(paths, shards):
            for key in META_IGNORED_KEYS:
                shard.pop(key, None)
        first_path, first = paths[0], shards[0]
        for path, shard in zip(paths[1:], shards[1:]):
            if set(shard) != set(first):
                differing = sorted(set(shard) ^ set(first))[:3]
                raise CheckpointError(f"{path}: keys differ from {first_path.name} (e.g. {differing})")
        names = ", ".join(p.name for p in paths)
        expected = expected_shapes(cfg)
        for key in list(first):
            module = _meta_module_name(key)
            if module not in META_SPLIT_DIM:
                raise CheckpointError(f"{first_path}: unexpected key {key!r} (not a LLaMA parameter)")
            pieces = [shard.pop(key) for shard in shards]
            split_dim = META_SPLIT_DIM[module]
            if split_dim is None:
                for path, piece in zip(paths[1:], pieces[1:]):
                    if not torch.equal(piece, pieces[0]):
                        raise CheckpointError(f"{path}: {key!r} differs from {first_path.name}; norms are "
                                              f"replicated and must agree on every shard")
                tensor = pieces[0]
            else:
                tensor = pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=split_dim)
            want = expected.get(key)
            if want is not None and tuple(tensor.shape) != want:
                raise CheckpointError(
                    f"{self.folder}: joining {key!r} from {len(paths)} shard(s) ({names}) on dim {split_dim} gives "
                    f"shape {tuple(tensor.shape)} but params.json implies {want} (shard shapes "
                    f"{[tuple(p.shape) for p in pieces]}: a shard missing or extra?)")
            yield key, tensor, f"{self.folder}/{{{names}}}"


READERS = {"ours": _OursReader, "meta": _MetaReader, "hf": _HFReader}


def open_checkpoint(folder) -> _Reader:
    """The reader for a folder of any supported format."""
    folder = Path(folder)
    return READERS[detect_format(folder)](folder)


# ================================================================================================
# Writing: temp folder + rename, and a shard writer that streams
# ================================================================================================

@contextmanager
def _atomic_folder(target: Path, replace: bool):
    """Yield a fresh temp folder next to `target`; on success it becomes `target`, on failure it is removed."""
    target = Path(target)
    if target.exists() and not replace:
        raise CheckpointError(f"{target}: output folder already exists; choose a new path or remove it")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
        _default_permissions(tmp)
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.replace(target, old / "previous")
            os.replace(tmp, target)
            shutil.rmtree(old)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _default_permissions(folder: Path) -> None:
    """mkdtemp makes a private (0700) folder; give the finished checkpoint the modes a plain mkdir / open
    would have given it under the current umask."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for path in folder.iterdir():
        if path.is_file():
            path.chmod(0o666 & ~umask)


class _ShardWriter:
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
        from safetensors.torch import save_file
        path = self.folder / f"shard-{len(self.written):05d}.tmp"
        save_file(self.pending, str(path), metadata={"format": "pt"})
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
# Public API
# ================================================================================================

def save_model(model_or_state_dict: Union[nn.Module, Dict[str, torch.Tensor]], cfg: ModelConfig, folder,
               tokenizer_path=None, dtype: Optional[torch.dtype] = None,
               max_shard_size: Union[int, str] = DEFAULT_MAX_SHARD_SIZE) -> Path:
    """Write our checkpoint folder (config.json + model.safetensors or shards [+ tokenizer.model]).
    An existing folder is replaced only once the new one is completely written."""
    folder = Path(folder)
    state = model_or_state_dict.state_dict() if isinstance(model_or_state_dict, nn.Module) else model_or_state_dict
    checker = _TensorChecker(cfg, "the given ModelConfig")
    for key, tensor in state.items():
        checker.check(key, tensor, "state dict to save")
    checker.finish("state dict to save")
    if tokenizer_path is not None:
        _check_tokenizer_file(Path(tokenizer_path), cfg)
    with _atomic_folder(folder, replace=True) as tmp:
        writer = _ShardWriter(tmp, parse_size(max_shard_size), dtype)
        for key, tensor in state.items():
            writer.add(key, tensor)
        writer.finish()
        cfg.save(tmp / CONFIG_NAME)
        if tokenizer_path is not None:
            shutil.copyfile(tokenizer_path, tmp / TOKENIZER_NAME)
    return folder


def _check_tokenizer_file(path: Path, cfg: ModelConfig) -> None:
    if not path.is_file():
        raise CheckpointError(f"{path}: tokenizer file not found")
    pieces = tokenizer_vocab_size(path)
    if pieces != cfg.vocab_size:
        raise CheckpointError(f"{path}: tokenizer has {pieces} pieces but the model's vocabulary is {cfg.vocab_size}")


def iter_checkpoint_tensors(folder, dtype: Optional[torch.dtype] = None) -> Iterator[Tuple[str, torch.Tensor]]:
    """(our key, tensor) for every weight of a checkpoint folder (ours, Meta or Hugging Face), one tensor in
    memory at a time. Each key and shape is checked against the folder's config as it comes (CheckpointError
    naming the file); a missing key raises after the last tensor. Floating tensors are converted to `dtype`
    (None keeps the stored dtype)."""
    reader = open_checkpoint(folder)
    cfg = reader.config()
    checker = _TensorChecker(cfg, str(Path(folder) / reader.config_file))
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
    from .model import Transformer
    cfg = open_checkpoint(folder).config()
    state = {key: tensor.to(device) for key, tensor in iter_checkpoint_tensors(folder, dtype)}
    with torch.device("meta"):
        model = Transformer(cfg)
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()


def convert_checkpoint(src, out, dtype: Optional[torch.dtype] = None,
                       max_shard_size: Union[int, str] = DEFAULT_MAX_SHARD_SIZE) -> dict:
    """Convert a Meta or Hugging Face LLaMA folder (or one of ours) into our folder format, tensor by tensor.

    Returns a summary: format, num_parameters, dtype, out. `out` must not exist yet; on any failure it is
    not created."""
    reader = open_checkpoint(src)
    cfg = reader.config()
    checker = _TensorChecker(cfg, str(Path(src) / reader.config_file))
    dtypes_seen = set()
    with _atomic_folder(Path(out), replace=False) as tmp:
        writer = _ShardWriter(tmp, parse_size(max_shard_size), dtype)
        for key, tensor, source in reader.tensors(cfg):
            checker.check(key, tensor, source)
            dtypes_seen.add(str(dtype or tensor.dtype).removeprefix("torch."))
            writer.add(key, tensor)
            del tensor
        checker.finish(str(src))
        writer.finish()
        cfg.save(tmp / CONFIG_NAME)
        if reader.tokenizer_path is not None:
            shutil.copyfile(reader.tokenizer_path, tmp / TOKENIZER_NAME)
    return {"format": reader.format, "num_parameters": writer.num_parameters,
            "dtype": ",".join(sorted(dtypes_seen)), "out": str(out), "config": cfg,
            "tokenizer": reader.tokenizer_path is not None}
