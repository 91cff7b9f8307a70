"""One config per method, apply_peft(), the PeftModel wrapper, trainable-parameter report.

    model = apply_peft(base, LoRAConfig(rank=8, alpha=16, targets=("wq", "wv")))
    print(model.report)            # trainable vs total parameters

apply_peft installs the method into `base` (LoRA, Houlsby adapters and LLaMA-Adapter replace sub-modules;
prompt and prefix tuning add a module beside the base), freezes every other parameter and returns a
PeftModel. A PeftModel is called exactly like a Transformer (same arguments, same cache format), and
its virtual tokens are its own business:

- `tokens`, `attention_mask` and `position_ids` describe the caller's real tokens only. Positions count
  real tokens from 0; a soft prompt or prefix of length P shifts them to P, P+1, ... and the wrapper puts
  P ones in front of the attention mask.
- The returned logits are aligned with the given tokens (a soft prompt's P positions are dropped).
- `past_key_values` given back to it is the cache it returned (prefix / prompt keys already in front).

`PeftModel.loss(tokens, labels)` is the mean next-token cross-entropy in float32: logits[:, t] predicts
labels[:, t+1] (labels aligned with tokens), labels of -100 are skipped.

Adapter folders (`save_adapter` / `load_adapter`):

    adapter_config.json   {"method", "config": the dataclass fields, "base_config": ModelConfig.fingerprint(),
                           "minipeft_version"}
    adapter.safetensors   only the method's tensors, under the base model's names without a prefix
                          (layers.0.attention.wq.lora_A, ...; soft_prompt.weight; prefix.prefix_keys /
                          prefix.prefix_values (L, G, P, hd), a prefix always saved folded), plus the full
                          weights of the base modules named in the config's `extra_trainable`
                          (tok_embeddings.weight, output.weight: (V, d) each, e.g. after a vocabulary extension)

"full" writes the whole model with checkpoint.save_model (config.json + model.safetensors) beside its
adapter_config.json. Loading checks the fingerprint field by field, so an adapter never lands on another base.
`export_lora_to_hf_peft` writes Hugging Face peft's layout instead (see its docstring).

A base built under DeepSpeed ZeRO-3 (train.load_base_partitioned) holds only a shard of each weight
(shape (0,)): the methods read sizes from the config and the Linear modules' in/out_features, never from a
base weight's shape; prompt tuning's inits gather the embedding table (`gathered`), and the parameter counts
use DeepSpeed's full sizes (`full_numel`). The new parameters are plain ones; deepspeed.initialize shards them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Tuple

import torch
import torch.nn as nn

from ..model import Transformer


# ---- one config per method ---------------------------------------------------------------------
@dataclass
class FullConfig:
    """Full fine-tuning: every parameter trainable (the baseline)."""
    extra_trainable: Tuple[str, ...] = ()   # of EXTRA_TRAINABLE_MODULES, trained in full beside the method
    method = "full"


@dataclass
class LoRAConfig:
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: Tuple[str, ...] = ("wq", "wv")
    extra_trainable: Tuple[str, ...] = ()   # of EXTRA_TRAINABLE_MODULES, trained in full beside the method
    method = "lora"


@dataclass
class PromptConfig:
    prompt_len: int = 20
    init: str = "vocab"                 # "random" | "vocab" (embeddings of sampled ids) | "text"
    init_text: Optional[str] = None     # token ids of this text (init="text"); needs a tokenizer
    extra_trainable: Tuple[str, ...] = ()   # of EXTRA_TRAINABLE_MODULES, trained in full beside the method
    method = "prompt"


@dataclass
class PrefixConfig:
    prefix_len: int = 10
    reparam_hidden: Optional[int] = 512  # MLP width of the reparameterisation; None trains the prefix directly
    extra_trainable: Tuple[str, ...] = ()   # of EXTRA_TRAINABLE_MODULES, trained in full beside the method
    method = "prefix"


@dataclass
class AdapterConfig:
    bottleneck: int = 64
    extra_trainable: Tuple[str, ...] = ()   # of EXTRA_TRAINABLE_MODULES, trained in full beside the method
    method = "adapter"


@dataclass
class LlamaAdapterConfig:
    prompt_len: int = 10                 # K
    adapter_layers: Optional[int] = None # L, the top layers that get a prompt; None = min(30, n_layers)
    gate: str = "tanh"                   # "tanh" (LLaMA-Adapter paper) | "plain" (lit-llama / peft)
    extra_trainable: Tuple[str, ...] = ()   # of EXTRA_TRAINABLE_MODULES, trained in full beside the method
    method = "llama_adapter"


# Base modules a config may also train (`extra_trainable`), e.g. after extending the vocabulary: the new rows
# of the embedding and the output layer must be learned. They are trained, saved and counted in full.
EXTRA_TRAINABLE_MODULES = ("tok_embeddings", "output")

PEFT_CONFIGS = {c.method: c for c in (FullConfig, LoRAConfig, PromptConfig, PrefixConfig, AdapterConfig,
                                      LlamaAdapterConfig)}


class PeftConfigError(ValueError):
    """A PEFT config, adapter folder or base model that does not fit; the message names the field or file."""


# ---- trainable-parameter report -----------------------------------------------------------------
@dataclass
class TrainableReport:
    trainable: int
    total: int

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / self.total if self.total else 0.0

    def __str__(self) -> str:
        return f"trainable {self.trainable:,} / {self.total:,} ({self.percent:.3f}%)"


# ---- the wrapper ---------------------------------------------------------------------------------
VIRTUAL_TOKEN_METHODS = ("prompt", "prefix")


class PeftModel(nn.Module):
    """A Transformer with one PEFT method installed. See the module docstring for the calling contract.

    Attributes: `base` (the Transformer, with LoRA / adapter / LLaMA-Adapter modules inside it),
    `peft_config`, `method`, `soft_prompt` (prompt tuning) or `prefix` (prefix tuning), `report`."""

    def __init__(self, base: Transformer, peft_config, llama_adapter_names: Tuple[str, ...] = ()):
        super().__init__()
        self.base = base
        self.peft_config = peft_config
        self.method = peft_config.method
        self._llama_adapter_names = tuple(llama_adapter_names)   # names inside `base`

    # -- what the method owns
    @property
    def config(self):
        """The base model's ModelConfig."""
        return self.base.config

    @property
    def gradient_checkpointing(self) -> bool:
        return self.base.gradient_checkpointing

    @gradient_checkpointing.setter
    def gradient_checkpointing(self, value: bool) -> None:
        self.base.gradient_checkpointing = value

    @property
    def num_virtual_tokens(self) -> int:
        """P: the soft prompt's or the prefix's length (0 for the other methods)."""
        if self.method == "prompt":
            return self.soft_prompt.prompt_len
        if self.method == "prefix":
            return self.prefix.prefix_len
        return 0

    def is_method_parameter(self, name: str) -> bool:
        """True for the parameters the method adds and trains (name as in self.named_parameters()), and for
        the weights of the base modules in peft_config.extra_trainable."""
        if name.removeprefix("base.") in {f"{m}.weight" for m in self.peft_config.extra_trainable}:
            return True
        if self.method == "full":
            return True
        if self.method == "lora":
            return name.endswith(".lora_A") or name.endswith(".lora_B")
        if self.method == "adapter":
            return ".adapter." in name
        if self.method == "llama_adapter":
            return name.removeprefix("base.") in self._llama_adapter_names
        if self.method == "prompt":
            return name.startswith("soft_prompt.")
        if self.method == "prefix":
            return name.startswith("prefix.")
        raise PeftConfigError(f"unknown PEFT method {self.method!r}")

    def set_trainable(self) -> None:
        """requires_grad = True exactly for the method's parameters (every parameter for "full")."""
        for name, p in self.named_parameters():
            p.requires_grad_(self.is_method_parameter(name))

    @property
    def report(self) -> TrainableReport:
        params = list(self.parameters())
        return TrainableReport(trainable=sum(full_numel(p) for p in params if p.requires_grad),
                               total=sum(full_numel(p) for p in params))

    def num_parameters(self, trainable_only: bool = False) -> int:
        return sum(full_numel(p) for p in self.parameters() if p.requires_grad or not trainable_only)

    def adapter_state_dict(self) -> dict:
        """The method's tensors by name (without the "base." prefix), detached. A prefix is given folded:
        `prefix.prefix_keys` / `prefix.prefix_values` (L, G, P, hd), whether or not it was trained with the MLP.
        Modules in extra_trainable are included in full (tok_embeddings.weight (V, d), output.weight (V, d))."""
        if self.method == "prefix":
            keys, values = self.prefix.prefix_tensors()                                  # (L, G, P, hd)
            extra = {f"{m}.weight": self.base.get_submodule(m).weight.detach()
                     for m in self.peft_config.extra_trainable}
            return {"prefix.prefix_keys": keys.detach().contiguous().clone(),
                    "prefix.prefix_values": values.detach().contiguous().clone(), **extra}
        return {name.removeprefix("base."): p.detach() for name, p in self.named_parameters()
                if self.is_method_parameter(name)}

    # -- forward
    def forward(
        self,
        tokens: Optional[torch.Tensor] = None,         # (B, T) int64, real tokens only
        *,
        input_embeds: Optional[torch.Tensor] = None,   # (B, T, d), instead of tokens
        past_key_values=None,                          # the cache this wrapper returned (virtual tokens in front)
        start_pos: Optional[int] = None,               # position of the first real token, counting real tokens
        position_ids: Optional[torch.Tensor] = None,   # (B, T) positions counting real tokens from 0
        attention_mask: Optional[torch.Tensor] = None, # (B, S_past_real + T) or (B, T) over real tokens
        use_cache: bool = False,
    ):
        """Same arguments and results as Transformer.forward; the P virtual tokens are added here."""
        if self.method not in VIRTUAL_TOKEN_METHODS:
            return self.base(tokens, input_embeds=input_embeds, past_key_values=past_key_values,
                             start_pos=start_pos, position_ids=position_ids, attention_mask=attention_mask,
                             use_cache=use_cache)
        if (tokens is None) == (input_embeds is None):
            raise ValueError("pass exactly one of tokens or input_embeds")
        given = tokens if tokens is not None else input_embeds
        B, T = given.shape[0], given.shape[1]
        P = self.num_virtual_tokens
        first_call = past_key_values is None
        real_past_len = 0 if first_call else past_key_values[0][0].shape[2] - P

        # Shift the caller's positions past the P virtual tokens.
        if position_ids is not None:
            position_ids = position_ids + P                                               # (B, T)
        elif start_pos is not None:
            start_pos = start_pos + P
        if attention_mask is not None and attention_mask.shape[1] == real_past_len + T:
            ones = attention_mask.new_ones(B, P)                                          # (B, P)
            attention_mask = torch.cat([ones, attention_mask], dim=1)                     # (B, P + S_real + T)
        # (a (B, T) mask with a past is left as it is: the model treats every past key as real)

        if self.method == "prefix" and first_call:
            past_key_values = self.prefix(B)                                              # per layer (B, G, P, hd)
        if self.method == "prompt" and first_call:
            embeds = input_embeds if input_embeds is not None else self.base.tok_embeddings(tokens)   # (B, T, d)
            input_embeds, _, _ = self.soft_prompt.prepend(embeds)                         # (B, P + T, d)
            tokens = None
            if position_ids is not None or start_pos is not None:                         # prompt at 0..P-1
                if position_ids is None:
                    position_ids = torch.arange(start_pos, start_pos + T, device=given.device).expand(B, T)
                prompt_positions = torch.arange(P, device=position_ids.device).expand(B, P)
                position_ids = torch.cat([prompt_positions, position_ids], dim=1)        # (B, P + T)
                start_pos = None

        out = self.base(tokens, input_embeds=input_embeds, past_key_values=past_key_values, start_pos=start_pos,
                        position_ids=position_ids, attention_mask=attention_mask, use_cache=use_cache)
        if self.method == "prompt" and first_call:                                        # drop the prompt's logits
            if use_cache:
                return out[0][:, P:], out[1]
            return out[:, P:]
        return out

    def loss(self, tokens: torch.Tensor, labels: torch.Tensor,
             attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Mean next-token cross-entropy in float32: logits[:, t] predicts labels[:, t+1], positions with
        label -100 are skipped. tokens, labels (B, T) aligned (labels[:, t] is the label of tokens[:, t])."""
        if labels.shape != tokens.shape:
            raise ValueError(f"labels has shape {tuple(labels.shape)}, expected the tokens' {tuple(tokens.shape)}")
        logits = self(tokens, attention_mask=attention_mask)                              # (B, T, V)
        predicted = logits[:, :-1].float()                                                # (B, T-1, V)
        targets = labels[:, 1:]                                                           # (B, T-1)
        return torch.nn.functional.cross_entropy(predicted.reshape(-1, predicted.shape[-1]),
                                                 targets.reshape(-1), ignore_index=-100)


# ---- apply ---------------------------------------------------------------------------------------
def full_numel(p: torch.Tensor) -> int:
    """Elements of a parameter, also when DeepSpeed ZeRO-3 has partitioned it (then p.numel() is 0)."""
    return getattr(p, "ds_numel", p.numel())


def gathered(param: torch.Tensor):
    """A context in which `param` is complete on every rank: DeepSpeed's GatheredParameters for a ZeRO-3
    partitioned parameter (one built under deepspeed.zero.Init, which holds only a shard and has a ds_id),
    nothing for a plain one. A collective for a partitioned parameter: every rank must enter it."""
    if not hasattr(param, "ds_id"):
        return contextlib.nullcontext()
    import deepspeed
    return deepspeed.zero.GatheredParameters([param], modifier_rank=None)


def _check_config(config) -> None:
    if type(config) not in PEFT_CONFIGS.values():
        raise PeftConfigError(f"expected one of {[c.__name__ for c in PEFT_CONFIGS.values()]}, "
                              f"got {type(config).__name__}")
    extra = config.extra_trainable
    if not isinstance(extra, (tuple, list)) or not all(name in EXTRA_TRAINABLE_MODULES for name in extra):
        raise PeftConfigError(f"{type(config).__name__}.extra_trainable is {extra!r}; expected a tuple of names "
                              f"from {EXTRA_TRAINABLE_MODULES}")


def apply_peft(model: Transformer, config, *, tokenizer=None, generator: Optional[torch.Generator] = None
               ) -> PeftModel:
    """Install the method of `config` into `model` (in place) and wrap it. Every base parameter is frozen
    except for "full"; only the method's parameters are trainable. `tokenizer` is needed for
    PromptConfig(init="text"); `generator` makes the soft prompt's init reproducible."""
    _check_config(config)
    if isinstance(model, PeftModel):
        raise PeftConfigError(f"the model already has a PEFT method ({model.method!r}); apply_peft takes a "
                              "plain Transformer")
    if not isinstance(model, Transformer):
        raise PeftConfigError(f"apply_peft takes a minipeft Transformer, got {type(model).__name__}")
    for p in model.parameters():
        p.requires_grad_(False)

    llama_adapter_names: Tuple[str, ...] = ()
    extra = {}
    if config.method == "lora":
        from .lora import install_lora
        install_lora(model, config)
    elif config.method == "adapter":
        from .adapter import install_adapters
        install_adapters(model, config)
    elif config.method == "llama_adapter":
        from .llama_adapter import install_llama_adapter
        llama_adapter_names = tuple(install_llama_adapter(model, config))
    elif config.method == "prompt":
        from .soft_prompt import SoftPrompt, initial_weight
        with gathered(model.tok_embeddings.weight):                # every init reads the embedding table
            weight = initial_weight(config, model.tok_embeddings, tokenizer=tokenizer, generator=generator)
        extra["soft_prompt"] = SoftPrompt(config.prompt_len, model.config.dim, weight)
    elif config.method == "prefix":
        from .prefix import PrefixKV
        embedding = model.tok_embeddings.weight
        extra["prefix"] = PrefixKV(model.config, config.prefix_len, config.reparam_hidden).to(
            device=embedding.device, dtype=embedding.dtype)

    peft_model = PeftModel(model, config, llama_adapter_names)
    for name, module in extra.items():
        setattr(peft_model, name, module)
    peft_model.set_trainable()
    return peft_model


# ---- save / load ---------------------------------------------------------------------------------
ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter.safetensors"


def _minipeft_version() -> str:
    from importlib import metadata
    try:
        return metadata.version("minipeft")
    except metadata.PackageNotFoundError:
        import minipeft
        return getattr(minipeft, "__version__", "unknown")


def _write_atomic(path: Path, write) -> None:
    """write(tmp_path) then rename to path, so a failure never leaves a half-written file."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _write_json(path: Path, data: dict) -> None:
    _write_atomic(path, lambda tmp: tmp.write_text(json.dumps(data, indent=2) + "\n"))


def _write_safetensors(path: Path, tensors: dict, metadata: Optional[dict] = None) -> None:
    from safetensors.torch import save_file
    cpu = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    _write_atomic(path, lambda tmp: save_file(cpu, str(tmp), metadata=metadata or {"format": "pt"}))


def save_adapter(model: PeftModel, folder) -> Path:
    """Write `folder`/adapter_config.json (method, hyper-parameters, base fingerprint, version) and
    `folder`/adapter.safetensors (only the method's tensors; a prefix folded to plain tensors). For "full",
    the whole model is written with checkpoint.save_model (config.json + model.safetensors) instead."""
    if not isinstance(model, PeftModel):
        raise PeftConfigError(f"save_adapter takes a PeftModel (from apply_peft), got {type(model).__name__}")
    folder = Path(folder)
    if model.method == "full":
        from ..checkpoint import save_model
        save_model(model.base, model.base.config, folder)
    else:
        folder.mkdir(parents=True, exist_ok=True)
        _write_safetensors(folder / ADAPTER_WEIGHTS_NAME, model.adapter_state_dict())
    description = {
        "method": model.method,
        "config": dataclasses.asdict(model.peft_config),
        "base_config": model.base.config.fingerprint(),
        "minipeft_version": _minipeft_version(),
    }
    if model.method == "prefix":
        description["saved_folded"] = True
    _write_json(folder / ADAPTER_CONFIG_NAME, description)
    return folder


def _read_adapter_config(folder: Path) -> dict:
    path = folder / ADAPTER_CONFIG_NAME
    if not folder.is_dir():
        raise PeftConfigError(f"{folder}: adapter folder not found")
    if not path.is_file():
        raise PeftConfigError(f"{path}: file not found (an adapter folder holds {ADAPTER_CONFIG_NAME} and "
                              f"{ADAPTER_WEIGHTS_NAME}, written by save_adapter)")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise PeftConfigError(f"{path}: not valid JSON ({e})") from None
    for key in ("method", "config", "base_config"):
        if not isinstance(data, dict) or key not in data:
            raise PeftConfigError(f"{path}: missing key {key!r}")
    return data


def _config_from_dict(method: str, fields: dict, source: str):
    if method not in PEFT_CONFIGS:
        raise PeftConfigError(f"{source}: method is {method!r}, expected one of {sorted(PEFT_CONFIGS)}")
    cls = PEFT_CONFIGS[method]
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise PeftConfigError(f"{source}: config has unknown keys {unknown} for {cls.__name__}; expected some "
                              f"of {sorted(known)}")
    if method == "lora" and "targets" in fields:
        fields = {**fields, "targets": tuple(fields["targets"])}
    if "extra_trainable" in fields:
        fields = {**fields, "extra_trainable": tuple(fields["extra_trainable"])}
    return cls(**fields)


def _check_fingerprint(saved: dict, base_config, source: str) -> None:
    current = base_config.fingerprint()
    for key in sorted(set(saved) | set(current)):
        if saved.get(key, "<missing>") != current.get(key, "<missing>"):
            raise PeftConfigError(
                f"{source}: base_config.{key} is {saved.get(key, '<missing>')!r} but the base model given has "
                f"{key} = {current.get(key, '<missing>')!r}; this adapter was trained on another base model")


def load_adapter(base_model: Transformer, folder, method: Optional[str] = None) -> PeftModel:
    """Install the adapter saved in `folder` into `base_model` (in place) and return the PeftModel.
    Errors (PeftConfigError) for a missing file, keys or shapes that are not the method's, or a base model
    whose config fingerprint differs from the one the adapter was trained on. `method`, when given, is the
    method the caller expects."""
    folder = Path(folder)
    data = _read_adapter_config(folder)
    source = str(folder / ADAPTER_CONFIG_NAME)
    if method is not None and data["method"] != method:
        raise PeftConfigError(f"{source}: the adapter's method is {data['method']!r}, expected {method!r}")
    config = _config_from_dict(data["method"], data["config"], source)
    if not isinstance(base_model, Transformer):
        raise PeftConfigError(f"load_adapter takes a plain minipeft Transformer, got {type(base_model).__name__}")
    _check_fingerprint(data["base_config"], base_model.config, source)

    if config.method == "full":
        from ..checkpoint import load_model
        trained = load_model(folder)
        base_model.load_state_dict(trained.state_dict())
        return apply_peft(base_model, config)

    weights_path = folder / ADAPTER_WEIGHTS_NAME
    if not weights_path.is_file():
        raise PeftConfigError(f"{weights_path}: file not found")
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    try:
        tensors = load_file(str(weights_path))
    except (SafetensorError, OSError) as e:
        raise PeftConfigError(f"{weights_path}: not a readable safetensors file ({e})") from None

    build_config = config
    if config.method == "prompt":      # the saved prompt replaces the init, so no tokenizer is needed
        build_config = dataclasses.replace(config, init="random")
    if config.method == "prefix":      # saved folded: plain prefix tensors, no MLP
        build_config = dataclasses.replace(config, reparam_hidden=None)
    peft_model = apply_peft(base_model, build_config)
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


# ---- LoRA: merge and export ----------------------------------------------------------------------
def _lora_modules(model: PeftModel, what: str):
    from .lora import LoRALinear
    if not isinstance(model, PeftModel) or model.method != "lora":
        found = model.method if isinstance(model, PeftModel) else type(model).__name__
        raise PeftConfigError(f"{what} needs a PeftModel with LoRA installed, got {found!r}")
    return [(name, m) for name, m in model.base.named_modules() if isinstance(m, LoRALinear)]


def merge_lora(model: PeftModel) -> Transformer:
    """Fold every LoRA update into its weight (W0 + s B A) and return the base Transformer with plain
    nn.Linear modules and every parameter trainable again, i.e. an ordinary model (checkpoint.save_model
    writes it as a plain checkpoint). The PeftModel is consumed: its base is changed in place."""
    for name, lora in _lora_modules(model, "merge_lora"):
        parent_name, _, child = name.rpartition(".")
        parent = model.base.get_submodule(parent_name) if parent_name else model.base
        setattr(parent, child, lora.to_linear())
    base = model.base
    for p in base.parameters():
        p.requires_grad_(True)
    return base


# Our module names -> transformers LlamaForCausalLM's.
_HF_MODULE_NAMES = {"attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj",
                    "attention.wv": "self_attn.v_proj", "attention.wo": "self_attn.o_proj",
                    "feed_forward.w1": "mlp.gate_proj", "feed_forward.w2": "mlp.down_proj",
                    "feed_forward.w3": "mlp.up_proj"}


def _hf_module_name(name: str) -> str:
    """layers.3.attention.wq -> model.layers.3.self_attn.q_proj; output -> lm_head."""
    if name == "output":
        return "lm_head"
    layer, index, rest = name.split(".", 2)
    return f"model.{layer}.{index}.{_HF_MODULE_NAMES[rest]}"


def export_lora_to_hf_peft(model: PeftModel, folder) -> Path:
    """Write `folder`/adapter_config.json + adapter_model.safetensors in Hugging Face peft's LoRA layout for a
    transformers LlamaForCausalLM of the same weights (`peft.PeftModel.from_pretrained(hf_model, folder)`).

    transformers stores q/k rows permuted for its half-split rotary (W_hf = Perm W_meta). The update of a
    q/k projection is Delta W_hf = Perm s B A = s (Perm B) A, so lora_B's rows are permuted (with n_heads
    for q, n_kv_heads for k) and lora_A is unchanged."""
    from ..checkpoint import permute_for_hf
    modules = _lora_modules(model, "export_lora_to_hf_peft")
    cfg = model.base.config
    tensors = {}
    target_modules = set()
    for name, lora in modules:
        if lora.merged:
            raise PeftConfigError(f"{name} is merged; unmerge() it before exporting (the export holds A and B "
                                  "for the unmerged base weights)")
        lora_B = lora.lora_B.detach()                                                  # (d_out, r)
        if name.endswith("attention.wq"):
            lora_B = permute_for_hf(lora_B, cfg.n_heads)
        elif name.endswith("attention.wk"):
            lora_B = permute_for_hf(lora_B, cfg.n_kv_heads)
        hf_name = _hf_module_name(name)
        target_modules.add(hf_name.rsplit(".", 1)[-1])
        tensors[f"base_model.model.{hf_name}.lora_A.weight"] = lora.lora_A.detach()   # (r, d_in)
        tensors[f"base_model.model.{hf_name}.lora_B.weight"] = lora_B
    config = model.peft_config
    hf_config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": None,
        "r": config.rank,
        "lora_alpha": config.alpha,
        "lora_dropout": config.dropout,
        "target_modules": sorted(target_modules),
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
        "layers_to_transform": None,
        "rank_pattern": {},
        "alpha_pattern": {},
    }
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    _write_safetensors(folder / "adapter_model.safetensors", tensors)
    _write_json(folder / "adapter_config.json", hf_config)
    return folder
