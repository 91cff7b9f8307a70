"""The checkpoint folders we read, detected from their contents: ours, Meta's and Hugging Face's.
Each reader gives the folder's ModelConfig and a stream of (our_key, tensor, source_file)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import torch

from ..config import ConfigError, ModelConfig
from ..family_registry import get_family, hf_readers
from .files import (CONFIG_NAME, INDEX_NAME, TOKENIZER_NAME, WEIGHTS_NAME, CheckpointError, check_config_fits_files,
                    check_tokenizer_fits, expected_shapes, folder_tokenizer, iter_weight_files, read_json,
                    tokenizer_vocab_size, torch_load, weight_file_shapes, weight_files)
from .hf_bloom import bloom_config_from_hf, hf_bloom_tensor_to_ours
from .hf_chatglm import chatglm_config, chatglm_tensor_to_ours, chatglm_tokenizer_file
from .hf_llama import hf_tensor_to_ours

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
        config = read_json(config_path)
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


def _check_tokenizer(folder: Path, cfg: ModelConfig, config_name: str, allow_extra_model_rows: bool = False,
                     tokenizer_path: Optional[Path] = None) -> None:
    """The tokenizer next to the weights (tokenizer.model or tokenizer.json unless given) must fit the model's
    vocabulary."""
    tokenizer_path = tokenizer_path or folder_tokenizer(folder)
    if tokenizer_path is not None and tokenizer_path.is_file():
        check_tokenizer_fits(tokenizer_path, cfg.vocab_size, str(folder / config_name), allow_extra_model_rows)


class _Reader:
    """A checkpoint folder: its format, its ModelConfig, and a stream of (our_key, tensor, file)."""
    format: str
    config_file: str

    def __init__(self, folder: Path):
        self.folder = folder

    @property
    def tokenizer_path(self) -> Optional[Path]:
        return folder_tokenizer(self.folder)

    def config(self) -> ModelConfig:
        raise NotImplementedError

    def tensors(self, cfg: ModelConfig) -> Iterator[Tuple[str, torch.Tensor, str]]:
        raise NotImplementedError

    def weight_file_list(self) -> Optional[List[Tuple[Path, Optional[List[str]]]]]:
        """The weight files (and the keys an index gives each), None when there are none."""
        return None

    def file_shapes(self) -> Dict[str, Tuple[int, ...]]:
        return weight_file_shapes(self.weight_file_list() or [])

    def check_files(self, cfg: ModelConfig) -> ModelConfig:
        """The config against the weight files' names and shapes (headers only), before a model is built."""
        files = self.weight_file_list()
        if files:
            check_config_fits_files(cfg, self.file_shapes(), str(self.folder / self.config_file),
                                    ", ".join(sorted({path.name for path, _ in files})))
        return cfg


class _OursReader(_Reader):
    format, config_file = "ours", CONFIG_NAME

    def config(self) -> ModelConfig:
        try:
            cfg = ModelConfig.load(self.folder / CONFIG_NAME)
        except (ConfigError, TypeError) as e:
            raise CheckpointError(str(e)) from None
        # ChatGLM's embeddings have more rows than its SentencePiece model has pieces (padding, appended specials)
        _check_tokenizer(self.folder, cfg, CONFIG_NAME,
                         allow_extra_model_rows=get_family(cfg.family).tokenizer_may_be_smaller)
        return self.check_files(cfg)

    def weight_file_list(self):
        return weight_files(self.folder, WEIGHTS_NAME, INDEX_NAME)

    def tensors(self, cfg):
        files = self.weight_file_list()
        if files is None:
            raise CheckpointError(f"{self.folder}: no {WEIGHTS_NAME} or {INDEX_NAME} next to {CONFIG_NAME}")
        yield from iter_weight_files(files)


def _llama_tensor_to_ours(hf_key: str, tensor: torch.Tensor, cfg: ModelConfig):
    if hf_key.endswith("rotary_emb.inv_freq"):     # a recomputable buffer, not a weight
        return None
    return hf_tensor_to_ours(hf_key, tensor, cfg)


@dataclass(frozen=True)
class HFFamily:
    """How to read the folders of one transformers `model_type` (a family record's `hf`)."""
    model_type: str                                 # config.json's "model_type"
    config: Callable[[Path], ModelConfig]           # config.json path -> our ModelConfig (ConfigError if unfit)
    tensor_to_ours: Callable                        # (hf_key, tensor, cfg) -> (our_key, tensor) or a list of them
                                                    # (a fused tensor split), None to skip; KeyError for a key that
                                                    # is not one of the family's
    what: str                                       # for messages: "a LLaMA parameter"
    tokenizer_file: Callable[[Path], Optional[Path]] = folder_tokenizer   # tokenizer.model, else tokenizer.json


# The readers of the built-in families (families.py puts each on its record; a new family brings its own and
# its name table beside hf_llama.py).
HF_LLAMA = HFFamily("llama", ModelConfig.from_hf_config, _llama_tensor_to_ours, "a LLaMA parameter")
HF_CHATGLM = HFFamily("chatglm", chatglm_config, chatglm_tensor_to_ours, "a ChatGLM-6B / ChatGLM2-6B parameter",
                      chatglm_tokenizer_file)
HF_BLOOM = HFFamily("bloom", bloom_config_from_hf, hf_bloom_tensor_to_ours, "a BLOOM parameter")


class _HFReader(_Reader):
    format, config_file = "hf", CONFIG_NAME

    @property
    def family(self) -> HFFamily:
        model_type = read_json(self.folder / CONFIG_NAME).get("model_type")
        readers = hf_readers()
        if model_type not in readers:
            raise CheckpointError(f"{self.folder / CONFIG_NAME}: model_type is {model_type!r}, expected one of "
                                  f"{sorted(readers)}")
        return readers[model_type]

    @property
    def tokenizer_path(self) -> Optional[Path]:
        return self.family.tokenizer_file(self.folder)

    def config(self) -> ModelConfig:
        try:
            cfg = self.family.config(self.folder / CONFIG_NAME)
        except ConfigError as e:
            raise CheckpointError(str(e)) from None
        # transformers folders may give the model more rows than tokenizer.model has pieces (added tokens
        # such as a pad token live in tokenizer.json), so only a tokenizer larger than the model is wrong.
        if self.tokenizer_path is not None:
            _check_tokenizer(self.folder, cfg, CONFIG_NAME, allow_extra_model_rows=True,
                             tokenizer_path=self.tokenizer_path)
        return self.check_files(cfg)

    def weight_file_list(self):
        return (weight_files(self.folder, "model.safetensors", "model.safetensors.index.json")
                or weight_files(self.folder, "pytorch_model.bin", "pytorch_model.bin.index.json"))

    def tensors(self, cfg):
        family = self.family
        files = self.weight_file_list()
        if files is None:
            raise CheckpointError(f"{self.folder}: Hugging Face config.json found but no weights: expected "
                                  f"model.safetensors, pytorch_model.bin, or a sharded *.index.json")
        for hf_key, tensor, source in iter_weight_files(files):
            try:
                converted = family.tensor_to_ours(hf_key, tensor, cfg)
            except KeyError:
                raise CheckpointError(f"{source}: unexpected key {hf_key!r} (not {family.what})") from None
            except (RuntimeError, ValueError) as e:    # a split or a view that the config's shapes do not fit
                if isinstance(e, CheckpointError):
                    raise
                raise CheckpointError(f"{source}: {hf_key!r} has shape {tuple(tensor.shape)}, which "
                                      f"{self.folder / CONFIG_NAME} does not fit ({str(e).splitlines()[0]})") from None
            if converted is None:
                continue
            for key, our_tensor in (converted if isinstance(converted, list) else [converted]):
                yield key, our_tensor, source


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
        params = read_json(params_path)
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
        return self.check_files(cfg)

    def weight_file_list(self):
        try:
            return [(self.shard_paths()[0], None)]
        except CheckpointError:       # no shards: tensors() says so
            return None

    def file_shapes(self):            # names only: shard 0 holds a part of each split weight
        return {key: None for key in torch_load(self.shard_paths()[0])}

    def tensors(self, cfg):
        paths = self.shard_paths()
        shards = [torch_load(p) for p in paths]
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


