"""Adapter folders: save_adapter / load_adapter.

    adapter_config.json   {"method", "config": the dataclass fields, "base_config": ModelConfig.fingerprint(),
                           "minipeft_version"}
    adapter.safetensors   only the method's tensors (PeftModel.adapter_state_dict), under the base model's names
                          without a prefix (layers.0.attention.wq.lora_A, ...; soft_prompt.weight;
                          prefix.prefix_keys / prefix.prefix_values (L, G, P, hd), a prefix always saved folded),
                          plus the full weights of the base modules named in the config's `extra_trainable`
                          (tok_embeddings.weight, output.weight: (V, d) each, e.g. after a vocabulary extension)

A folder written by Hugging Face peft (its adapter_config.json has "peft_type") is read by hf_import.py instead.

"full" writes the whole model with checkpoint.save_model (config.json + model.safetensors) beside its
adapter_config.json. Loading checks the fingerprint field by field, so an adapter never lands on another
base; the method's registry entry says how to build it before the saved tensors are copied in.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn

from ..families import is_decoder
from ..fileio import atomic_folder, read_json, write_json_atomic, write_safetensors_atomic
from .api import apply_peft
from .config import PeftConfigError, config_fields
from .peft_model import PeftModel
from .registry import get_method

ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter.safetensors"


def minipeft_version() -> str:
    from importlib import metadata
    try:
        return metadata.version("minipeft")
    except metadata.PackageNotFoundError:
        import minipeft
        return getattr(minipeft, "__version__", "unknown")


def save_adapter(model: PeftModel, folder, overwrite: bool = False) -> Path:
    """Write `folder`/adapter_config.json (method, hyper-parameters, base fingerprint, version) and
    `folder`/adapter.safetensors (only the method's tensors; a prefix folded to plain tensors). For "full",
    the whole model is written (checkpoint.write_model_files: config.json + model.safetensors) instead.
    The folder appears whole or not at all (fileio.atomic_folder): an existing non-empty folder is refused
    (PeftConfigError) unless `overwrite`, and then replaced as a whole once the new one is complete."""
    if not isinstance(model, PeftModel):
        raise PeftConfigError(f"save_adapter takes a PeftModel (from apply_peft), got {type(model).__name__}")
    folder = Path(folder)
    description = {
        "method": model.method,
        "config": config_fields(model.peft_config),
        "base_config": model.base.config.fingerprint(),
        "minipeft_version": minipeft_version(),
    }
    with atomic_folder(folder, overwrite=overwrite, error=PeftConfigError) as tmp:
        if model.trains_base:
            from ..checkpoint import write_model_files
            write_model_files(model.base, model.base.config, tmp)
        else:
            write_safetensors_atomic(tmp / ADAPTER_WEIGHTS_NAME, model.adapter_state_dict())
        write_json_atomic(tmp / ADAPTER_CONFIG_NAME, description)
    return folder


def _read_adapter_config(folder: Path) -> dict:
    path = folder / ADAPTER_CONFIG_NAME
    if not folder.is_dir():
        raise PeftConfigError(f"{folder}: adapter folder not found")
    if not path.is_file():
        raise PeftConfigError(f"{path}: file not found (an adapter folder holds {ADAPTER_CONFIG_NAME} and "
                              f"{ADAPTER_WEIGHTS_NAME}, written by save_adapter)")
    data = read_json(path, PeftConfigError)
    if "peft_type" in data:
        return data
    for key in ("method", "config", "base_config"):
        if key not in data:
            raise PeftConfigError(f"{path}: missing key {key!r}")
    return data


def config_from_dict(method: str, fields: dict, source: str):
    """The method's config dataclass from saved fields (lists back to tuples); PeftConfigError naming `source`."""
    cls = get_method(method, source=f"{source}: method").config_class
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise PeftConfigError(f"{source}: config has unknown keys {unknown} for {cls.__name__}; expected some "
                              f"of {sorted(known)}")
    fields = {k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()}
    try:
        return cls(**fields)
    except PeftConfigError as e:
        raise PeftConfigError(f"{source}: {e}") from None


def check_fingerprint(saved: dict, base_config, source: str) -> None:
    """Field by field, the saved base fingerprint against the base model's. An adapter saved before
    ModelConfig had a `family` field was trained on a LLaMA."""
    saved = {"family": "llama", **saved}
    current = base_config.fingerprint()
    for key in sorted(set(saved) | set(current)):
        if saved.get(key, "<missing>") != current.get(key, "<missing>"):
            raise PeftConfigError(
                f"{source}: base_config.{key} is {saved.get(key, '<missing>')!r} but the base model given has "
                f"{key} = {current.get(key, '<missing>')!r}; this adapter was trained on another base model")


# Sizes that count positions in front of the real tokens: never more than the base's context (max_seq_len).
POSITION_FIELDS = ("prompt_len", "prefix_len")


def _check_sizes(base_model: nn.Module, config, tensors: dict, source: str, weights_path: Path) -> None:
    """Before apply_peft allocates the method's parameters: a position count beyond the base's max_seq_len is
    refused, and the shapes the method would make (built on the meta device, no memory) must be those saved."""
    fields = config_fields(config)
    for name in POSITION_FIELDS:
        if isinstance(fields.get(name), int) and fields[name] > base_model.config.max_seq_len:
            raise PeftConfigError(f"{source}: config.{name} is {fields[name]}, more positions than the base model's "
                                  f"max_seq_len {base_model.config.max_seq_len}")
    from ..family_registry import build_model
    try:
        with torch.device("meta"):
            meta_model = apply_peft(build_model(base_model.config), config, trainable_dtype=None)
        expected = {k: tuple(v.shape) for k, v in meta_model.adapter_state_dict().items()}
    except PeftConfigError as e:
        raise PeftConfigError(f"{source}: {e}") from None
    except Exception:  # noqa: BLE001 - a method that cannot be built on the meta device: the real build checks
        return
    for key in sorted(set(expected) & set(tensors)):
        if tuple(tensors[key].shape) != expected[key]:
            raise PeftConfigError(f"{weights_path}: tensor {key} has shape {tuple(tensors[key].shape)}, expected "
                                  f"{expected[key]} (from {ADAPTER_CONFIG_NAME}, on this base)")


def load_adapter(base_model: nn.Module, folder, method: Optional[str] = None,
                 trainable_dtype: Optional[torch.dtype] = torch.float32) -> PeftModel:
    """Install the adapter saved in `folder` into `base_model` (in place) and return the PeftModel.
    Errors (PeftConfigError) for a missing file, keys or shapes that are not the method's, or a base model
    whose config fingerprint differs from the one the adapter was trained on. `method`, when given, is the
    method the caller expects.

    The method's parameters are made in `trainable_dtype` (apply_peft's rule: float32 unless asked otherwise,
    as they were trained) before the saved tensors are copied in, so a float32 adapter reloads exactly even
    onto a base stored in half precision; None: the base's dtype."""
    folder = Path(folder)
    data = _read_adapter_config(folder)
    source = str(folder / ADAPTER_CONFIG_NAME)
    if "peft_type" in data:                                     # written by Hugging Face peft (or exported there)
        from .hf_import import load_hf_peft_adapter
        return load_hf_peft_adapter(base_model, folder)
    if method is not None and data["method"] != method:
        raise PeftConfigError(f"{source}: the adapter's method is {data['method']!r}, expected {method!r}")
    config = config_from_dict(data["method"], data["config"], source)
    if not is_decoder(base_model):
        raise PeftConfigError(f"load_adapter takes a plain minipeft decoder, got {type(base_model).__name__}")
    check_fingerprint(data["base_config"], base_model.config, source)
    entry = get_method(config.method)

    if entry.trains_base:
        from ..checkpoint import load_model
        peft_model = apply_peft(base_model, config, trainable_dtype=trainable_dtype)
        peft_model.base.load_state_dict(load_model(folder).state_dict())     # into the parameters' dtype
        return peft_model

    weights_path = folder / ADAPTER_WEIGHTS_NAME
    if not weights_path.is_file():
        raise PeftConfigError(f"{weights_path}: file not found")
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    try:
        tensors = load_file(str(weights_path))
    except (SafetensorError, OSError) as e:
        raise PeftConfigError(f"{weights_path}: not a readable safetensors file ({e})") from None
    _check_sizes(base_model, entry.loading_config(config), tensors, source, weights_path)

    peft_model = apply_peft(base_model, entry.loading_config(config), trainable_dtype=trainable_dtype)
    peft_model.peft_config = config

    expected = peft_model.adapter_state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise PeftConfigError(
            f"{weights_path}: its tensors are not those of a {config.method!r} adapter with this config "
            f"(from {ADAPTER_CONFIG_NAME}): missing {missing[:4]}{' ...' if len(missing) > 4 else ''}, "
            f"unexpected {unexpected[:4]}{' ...' if len(unexpected) > 4 else ''}")
    for key, tensor in tensors.items():
        if tuple(tensor.shape) != tuple(expected[key].shape):
            raise PeftConfigError(f"{weights_path}: tensor {key} has shape {tuple(tensor.shape)}, expected "
                                  f"{tuple(expected[key].shape)}")
    params = dict(peft_model.named_parameters())
    with torch.no_grad():
        for key, tensor in tensors.items():
            target = params[key] if key in params else params["base." + key]
            target.copy_(tensor)
    return peft_model
