"""One validated config dataclass per method, and the error every PEFT problem raises.

This module is the bottom of minipeft.peft: it imports nothing from the package, and every other module of
it (the method files, the registry, PeftModel, save/load) imports from here. Each config checks its own
fields in __post_init__, so a value that cannot work is refused where the config is made, with a message
naming the field ("LoRAConfig.rank must be a positive integer, got 0"); the module constructors and the
command line build these configs rather than repeating the checks. What depends on the model (a rank
larger than a layer's width, more adapted layers than the model has) is checked when the method is installed.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional, Tuple


class PeftConfigError(ValueError):
    """A PEFT config, adapter folder or base model that does not fit; the message names the field or file."""


# Base modules a config may also train (`extra_trainable`), e.g. after extending the vocabulary: the new rows
# of the embedding and the output layer must be learned. They are trained, saved and counted in full.
EXTRA_TRAINABLE_MODULES = ("tok_embeddings", "output")

# Names of the Linear modules LoRA may target (the last component of the module's name), over all families:
# LLaMA's wq wk wv wo, w1 (gate) w2 (down) w3 (up), output; fused wqkv where a family has one.
LORA_TARGETS = ("wq", "wk", "wv", "wo", "wqkv", "w1", "w2", "w3", "output")
# LoRAConfig's default targets ("wq", "wv": the query and value projections) stand for a family record's
# default_lora_targets in a family that fuses q, k and v (BLOOM: HF peft's default query_key_value).

PROMPT_INITS = ("random", "vocab", "text")
GATE_KINDS = ("tanh", "plain")


def require(condition: bool, message: str) -> None:
    if not condition:
        raise PeftConfigError(message)


def is_positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _check_positive_int(config, field: str, allow_none: bool = False) -> None:
    value = getattr(config, field)
    if allow_none and value is None:
        return
    require(is_positive_int(value), f"{type(config).__name__}.{field} must be a positive integer"
            f"{' or None' if allow_none else ''}, got {value!r}")


def _check_extra_trainable(config) -> None:
    extra = config.extra_trainable
    if isinstance(extra, list):
        config.extra_trainable = extra = tuple(extra)
    require(isinstance(extra, tuple) and all(name in EXTRA_TRAINABLE_MODULES for name in extra),
            f"{type(config).__name__}.extra_trainable is {extra!r}; expected a tuple of names from "
            f"{EXTRA_TRAINABLE_MODULES}")


@dataclass
class FullConfig:
    """Full fine-tuning: every parameter trainable (the baseline)."""
    extra_trainable: Tuple[str, ...] = ()   # of EXTRA_TRAINABLE_MODULES, trained in full beside the method
    method = "full"

    def __post_init__(self):
        _check_extra_trainable(self)


@dataclass
class LoRAConfig:
    rank: int = 8                           # r
    alpha: float = 16.0                     # the update is scaled by alpha / r
    dropout: float = 0.0                    # on the input of the low-rank branch
    targets: Tuple[str, ...] = ("wq", "wv") # Linear modules by the last component of their name
    extra_trainable: Tuple[str, ...] = ()
    method = "lora"

    def __post_init__(self):
        _check_positive_int(self, "rank")
        require(isinstance(self.alpha, (int, float)) and not isinstance(self.alpha, bool) and self.alpha > 0,
                f"LoRAConfig.alpha must be a positive number, got {self.alpha!r}")
        require(isinstance(self.dropout, (int, float)) and 0.0 <= self.dropout < 1.0,
                f"LoRAConfig.dropout must be in [0, 1), got {self.dropout!r}")
        self.targets = (self.targets,) if isinstance(self.targets, str) else tuple(self.targets)
        require(len(self.targets) > 0, f"LoRAConfig.targets is empty; choose some of {list(LORA_TARGETS)}")
        unknown = [t for t in self.targets if t not in LORA_TARGETS]
        require(not unknown, f"LoRAConfig.targets: unknown target(s) {unknown}; expected names from "
                f"{list(LORA_TARGETS)} (the last component of a Linear module's name)")
        _check_extra_trainable(self)


@dataclass
class PromptConfig:
    prompt_len: int = 20                    # P virtual tokens
    init: str = "vocab"                     # "random" | "vocab" (embeddings of sampled ids) | "text"
    init_text: Optional[str] = None         # token ids of this text (init="text"); needs a tokenizer
    extra_trainable: Tuple[str, ...] = ()
    method = "prompt"

    def __post_init__(self):
        _check_positive_int(self, "prompt_len")
        require(self.init in PROMPT_INITS, f"PromptConfig.init must be one of {PROMPT_INITS}, got {self.init!r}")
        require(self.init != "text" or bool(self.init_text),
                "PromptConfig.init='text' needs PromptConfig.init_text (the text whose token embeddings start "
                "the prompt)")
        _check_extra_trainable(self)


@dataclass
class PrefixConfig:
    prefix_len: int = 10                    # P key/value slots per layer
    reparam_hidden: Optional[int] = 512     # MLP width of the reparameterisation; None trains the prefix directly
    extra_trainable: Tuple[str, ...] = ()
    method = "prefix"

    def __post_init__(self):
        _check_positive_int(self, "prefix_len")
        _check_positive_int(self, "reparam_hidden", allow_none=True)
        _check_extra_trainable(self)


@dataclass
class AdapterConfig:
    bottleneck: int = 64                    # m
    extra_trainable: Tuple[str, ...] = ()
    method = "adapter"

    def __post_init__(self):
        _check_positive_int(self, "bottleneck")
        _check_extra_trainable(self)


@dataclass
class LlamaAdapterConfig:
    prompt_len: int = 10                    # K
    adapter_layers: Optional[int] = None    # L, the top layers that get a prompt; None = min(30, n_layers)
    gate: str = "tanh"                      # "tanh" (LLaMA-Adapter paper) | "plain" (lit-llama / peft)
    extra_trainable: Tuple[str, ...] = ()
    method = "llama_adapter"

    def __post_init__(self):
        _check_positive_int(self, "prompt_len")
        require(self.adapter_layers is None or is_positive_int(self.adapter_layers),
                f"LlamaAdapterConfig.adapter_layers must be between 1 and the model's n_layers, got "
                f"{self.adapter_layers!r}")
        require(self.gate in GATE_KINDS, f"LlamaAdapterConfig.gate must be one of {GATE_KINDS}, got {self.gate!r}")
        _check_extra_trainable(self)


@dataclass
class QLoRAConfig(LoRAConfig):
    """LoRA's fields (rank, alpha, dropout, targets: the same meaning and defaults) on a base whose linear layers
    are stored in 4-bit NormalFloat (peft/qlora.py): every linear layer of the blocks, whatever the targets."""
    block_size: int = 64                    # weights per absmax constant
    double_quant: bool = True               # quantise the absmax constants too (8 bits per block of 64)
    method = "qlora"

    def __post_init__(self):
        super().__post_init__()
        require(is_positive_int(self.block_size) and self.block_size % 2 == 0,
                f"QLoRAConfig.block_size must be an even integer >= 2 (two 4-bit codes share a byte), got "
                f"{self.block_size!r}")
        require(isinstance(self.double_quant, bool), f"QLoRAConfig.double_quant must be true or false, got "
                f"{self.double_quant!r}")

def config_fields(config) -> dict:
    """The config's fields as plain JSON values (tuples become lists)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(config).items()}
