"""Import an adapter folder written by Hugging Face peft (trained elsewhere) into a minipeft base model.

    model = load_hf_peft_adapter(load_model("ckpt/llama-7b"), "downloads/some-lora")   # a PeftModel
    # load_adapter(base, folder) does the same when the folder's adapter_config.json has a "peft_type"

The base must hold the weights the adapter was trained on (converted from that Hugging Face model, e.g. by
tools/convert_checkpoint.py); every tensor's shape is checked against it. The inverse of hf_export.py, with the
family's name table read the other way (record.hf_names.hf_to_modules):

    LORA            base_model.model.<HF module>.lora_A.weight (r_m, d_in), lora_B.weight (d_out, r_m), scaling
                    s_m = alpha_m / r_m (alpha_m / sqrt(r_m) with use_rslora; rank_pattern / alpha_pattern give
                    per-module values). Our LoRA has one rank R = max r_m and one scaling s = alpha / R, so each
                    module's A is padded with zero rows to R and its B with zero columns and scaled by s_m / s:
                    s B' A' = s_m B A, the same update. An HF module that holds several of ours (THUDM ChatGLM2's
                    query_key_value = [q ; k ; v], dense_h_to_4h = [gate ; up]; GLM's gate_up_proj) gives each
                    part its rows of B and the same A. Modules the adapter leaves out (layers_to_transform) get
                    B = 0: no update. modules_to_save embed_tokens / lm_head become extra_trainable.
    PROMPT_TUNING   prompt_embeddings (P, d) -> the soft prompt.
    PREFIX_TUNING   prompt_embeddings (P, L * 2 * G * hd) [layer][k/v][head][hd] (peft saves it folded) -> the
                    folded prefix (L, G, P, hd), keys back from the HF head layout.
    ADAPTION_PROMPT adaption_prompt (1, K, d), adaption_gate (1,) per top layer -> LLaMA-Adapter, plain gate
                    (peft's), the scalar on every head.

Anything else (DoRA, LoRA biases, other peft types, embedding LoRA) is refused in one line naming the field.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn as nn

from ..family_registry import get_family, is_decoder
from ..fileio import read_json
from .api import apply_peft, lora_modules
from .config import LlamaAdapterConfig, LoRAConfig, PeftConfigError, PrefixConfig, PromptConfig
from .peft_model import PeftModel

PREFIX = "base_model.model."
FULL_MODULES = {"embed_tokens": "tok_embeddings", "lm_head": "output", "word_embeddings": "tok_embeddings",
                "output_layer": "output"}


def read_hf_peft_folder(folder) -> tuple:
    """(adapter_config.json dict, {key: tensor}) of a peft adapter folder; PeftConfigError naming the file."""
    folder = Path(folder)
    config = read_json(folder / "adapter_config.json", PeftConfigError)
    if "peft_type" not in config:
        raise PeftConfigError(f"{folder / 'adapter_config.json'}: no 'peft_type': not a Hugging Face peft adapter")
    weights = folder / "adapter_model.safetensors"
    if weights.is_file():
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        try:
            return config, load_file(str(weights))
        except (SafetensorError, OSError) as e:
            raise PeftConfigError(f"{weights}: not a readable safetensors file ({e})") from None
    weights = folder / "adapter_model.bin"
    if not weights.is_file():
        raise PeftConfigError(f"{folder}: neither adapter_model.safetensors nor adapter_model.bin")
    try:
        return config, torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - a pickle weights_only refuses, or a corrupt file: one line
        raise PeftConfigError(f"{weights}: not a readable tensor file ({str(e).splitlines()[0]})") from None


def _require_field(config: dict, key: str, allowed, source: str) -> None:
    if config.get(key, allowed[0]) not in allowed:
        raise PeftConfigError(f"{source}: {key} is {config[key]!r}; minipeft imports only {allowed!r}")


def _pattern(config: dict, field: str, hf_module: str, default):
    """peft's rank_pattern / alpha_pattern value for a module (keys name the module or a suffix of it)."""
    for key, value in (config.get(field) or {}).items():
        if hf_module == key or hf_module.endswith("." + key):
            return value
    return default


def _lora(base: nn.Module, config: dict, tensors: dict, names, source: str) -> PeftModel:
    for key, allowed in (("use_dora", (False, None)), ("bias", ("none",)), ("fan_in_fan_out", (False, None))):
        _require_field(config, key, allowed, source)
    cfg = base.config
    pairs, extra = {}, {}                                           # our module -> (A, B, scaling); extra weights
    for key in tensors:
        if not key.startswith(PREFIX) or not key.endswith((".lora_A.weight", ".lora_B.weight", ".weight")):
            raise PeftConfigError(f"{source}: tensor {key!r} is not a LoRA weight this import knows (lora_A / "
                                  f"lora_B of a Linear, or a modules_to_save weight)")
        if ".lora_embedding_" in key:
            raise PeftConfigError(f"{source}: {key!r}: LoRA on an embedding is not imported")
    for key, tensor in tensors.items():
        module = key[len(PREFIX):].rsplit(".", 2)
        if module[1] not in ("lora_A", "lora_B"):
            short = key[len(PREFIX):].removesuffix(".weight").rsplit(".", 1)[-1]
            if short not in FULL_MODULES:
                raise PeftConfigError(f"{source}: modules_to_save weight {key!r} is neither the embedding nor the "
                                      f"output layer")
            extra[FULL_MODULES[short]] = tensor
            continue
        if module[1] == "lora_B":
            continue
        hf_module = module[0]
        A, B = tensor, tensors.get(f"{PREFIX}{hf_module}.lora_B.weight")
        if B is None:
            raise PeftConfigError(f"{source}: {key!r} has no lora_B beside it")
        rank = _pattern(config, "rank_pattern", hf_module, config["r"])
        alpha = _pattern(config, "alpha_pattern", hf_module, config["lora_alpha"])
        if A.shape[0] != rank or B.shape[1] != rank:
            raise PeftConfigError(f"{source}: {key!r} has rank {A.shape[0]}, the config says {rank}")
        scaling = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
        try:
            parts = names.hf_to_modules(hf_module, cfg)
        except KeyError:
            raise PeftConfigError(f"{source}: {hf_module!r} is not a module of a {cfg.family} model") from None
        sizes = [rows if rows is not None else B.shape[0] for _, rows in parts]
        if sum(sizes) != B.shape[0]:
            raise PeftConfigError(f"{source}: {hf_module}.lora_B has {B.shape[0]} rows; this base's module has "
                                  f"{sum(sizes)}")
        if names.lora_b_from_hf is not None and len(parts) == 1:
            B = names.lora_b_from_hf(parts[0][0], B, cfg)
        for (name, _), part in zip(parts, B.split(sizes)):
            pairs[name] = (A, part, scaling)
    if not pairs:
        raise PeftConfigError(f"{source}: no lora_A / lora_B tensors in the adapter")
    rank = max(A.shape[0] for A, _, _ in pairs.values())
    alpha = float(config["lora_alpha"])
    targets = tuple(sorted({name.rsplit(".", 1)[-1] for name in pairs}))
    peft_model = apply_peft(base, LoRAConfig(rank=rank, alpha=alpha, dropout=float(config.get("lora_dropout", 0.0)),
                                             targets=targets, extra_trainable=tuple(sorted(extra))))
    scaling = alpha / rank
    loras = dict(lora_modules(peft_model, "load_hf_peft_adapter"))
    unknown = sorted(set(pairs) - set(loras))
    if unknown:
        raise PeftConfigError(f"{source}: {unknown[0]} is not a Linear layer LoRA can wrap in this base")
    with torch.no_grad():
        for name, lora in loras.items():
            if name not in pairs:                          # a layer the adapter leaves out: no update
                lora.lora_B.zero_()
                continue
            A, B, module_scaling = pairs[name]
            if A.shape[1] != lora.in_features or B.shape[0] != lora.out_features:
                raise PeftConfigError(f"{source}: LoRA of {name} is ({B.shape[0]} x {A.shape[1]}); the base's "
                                      f"layer is ({lora.out_features} x {lora.in_features})")
            lora.lora_A.zero_()
            lora.lora_B.zero_()
            lora.lora_A[:A.shape[0]].copy_(A)
            lora.lora_B[:, :A.shape[0]].copy_(B.double() * (module_scaling / scaling))
        params = dict(peft_model.base.named_parameters())
        for name, weight in extra.items():
            _copy_checked(params[f"{name}.weight"], weight, f"{source}: modules_to_save {name}")
    return peft_model


def _copy_checked(target: torch.Tensor, tensor: torch.Tensor, what: str) -> None:
    if tuple(target.shape) != tuple(tensor.shape):
        raise PeftConfigError(f"{what} has shape {tuple(tensor.shape)}; this base needs {tuple(target.shape)}")
    target.copy_(tensor)


def _prompt_embeddings(config: dict, tensors: dict, source: str) -> torch.Tensor:
    if set(tensors) != {"prompt_embeddings"}:
        raise PeftConfigError(f"{source}: expected one tensor 'prompt_embeddings', found {sorted(tensors)[:4]}")
    _require_field(config, "num_transformer_submodules", (1, None), source)
    return tensors["prompt_embeddings"]


def _prompt(base: nn.Module, config: dict, tensors: dict, names, source: str) -> PeftModel:
    prompt = _prompt_embeddings(config, tensors, source)                                 # (P, d)
    peft_model = apply_peft(base, PromptConfig(prompt_len=prompt.shape[0], init="random"))
    with torch.no_grad():
        _copy_checked(peft_model.soft_prompt_module.weight, prompt, f"{source}: prompt_embeddings")
    return peft_model


def _prefix(base: nn.Module, config: dict, tensors: dict, names, source: str) -> PeftModel:
    cfg = base.config
    flat = _prompt_embeddings(config, tensors, source)                                   # (P, L*2*G*hd)
    if flat.dim() != 2 or flat.shape[1] != cfg.n_layers * 2 * cfg.kv_dim:
        raise PeftConfigError(f"{source}: prompt_embeddings has shape {tuple(flat.shape)}; a folded prefix for this "
                              f"base is (P, n_layers * 2 * kv_dim) = (P, {cfg.n_layers * 2 * cfg.kv_dim}) (a prefix "
                              f"saved with inference_mode and prefix_projection keeps its MLP out of the file)")
    P = flat.shape[0]
    per_slot = flat.view(P, cfg.n_layers, 2, cfg.n_kv_heads, cfg.head_dim).permute(2, 1, 3, 0, 4)  # (2, L, G, P, hd)
    keys, values = per_slot[0], per_slot[1]
    if names.key_vectors_from_hf is not None:
        keys = names.key_vectors_from_hf(keys)
    peft_model = apply_peft(base, PrefixConfig(prefix_len=P, reparam_hidden=None))
    with torch.no_grad():
        peft_model.prefix_module.prefix_keys.copy_(keys)
        peft_model.prefix_module.prefix_values.copy_(values)
    return peft_model


def _adaption_prompt(base: nn.Module, config: dict, tensors: dict, names, source: str) -> PeftModel:
    K, L = config.get("adapter_len"), config.get("adapter_layers")
    peft_model = apply_peft(base, LlamaAdapterConfig(prompt_len=K, adapter_layers=L, gate="plain"))
    found = 0
    with torch.no_grad():
        for name, module in peft_model.base.named_modules():
            if not hasattr(module, "adapter_prompt"):
                continue
            hf_attention = names.module_to_hf(f"{name}.wo").rsplit(".", 1)[0]
            prompt = tensors.get(f"{PREFIX}{hf_attention}.adaption_prompt")
            gate = tensors.get(f"{PREFIX}{hf_attention}.adaption_gate")
            if prompt is None or gate is None or gate.numel() != 1:
                raise PeftConfigError(f"{source}: no adaption_prompt / scalar adaption_gate for {hf_attention}")
            _copy_checked(module.adapter_prompt, prompt[0], f"{source}: {hf_attention}.adaption_prompt")
            module.adapter_gate.fill_(gate.item())
            found += 2
    if found != len(tensors):
        raise PeftConfigError(f"{source}: {len(tensors)} tensors, of which {found} are the top {L} layers' prompts "
                              f"and gates")
    return peft_model


IMPORTERS = {"LORA": _lora, "PROMPT_TUNING": _prompt, "PREFIX_TUNING": _prefix, "ADAPTION_PROMPT": _adaption_prompt}


def load_hf_peft_adapter(base_model: nn.Module, folder) -> PeftModel:
    """Install the Hugging Face peft adapter saved in `folder` into `base_model` (in place) and return the
    PeftModel (module docstring); PeftConfigError naming the file and field for what does not fit."""
    folder = Path(folder)
    source = str(folder / "adapter_config.json")
    if not is_decoder(base_model):
        raise PeftConfigError(f"load_hf_peft_adapter takes a plain minipeft decoder, got {type(base_model).__name__}")
    config, tensors = read_hf_peft_folder(folder)
    peft_type = config["peft_type"]
    if peft_type not in IMPORTERS:
        raise PeftConfigError(f"{source}: peft_type {peft_type!r} is not imported; minipeft reads "
                              f"{', '.join(IMPORTERS)}")
    names = get_family(base_model.config.family).hf_names
    if names is None or names.hf_to_modules is None:
        raise PeftConfigError(f"{source}: the base's family {base_model.config.family!r} has no Hugging Face name "
                              f"table to read peft's names with")
    return IMPORTERS[peft_type](base_model, config, tensors, names, source)
