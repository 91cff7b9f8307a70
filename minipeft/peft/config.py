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
import math
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


def is_positive_number(value) -> bool:
    """A finite number > 0 (not a bool, not inf or nan)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


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


LORA_INITS = ("kaiming", "pissa")        # A Kaiming-uniform and B = 0 (the paper's) | PiSSA (lora.py says how)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_targets(config, known: Tuple[str, ...]) -> None:
    name = type(config).__name__
    config.targets = (config.targets,) if isinstance(config.targets, str) else tuple(config.targets)
    require(len(config.targets) > 0, f"{name}.targets is empty; choose some of {list(known)}")
    unknown = [t for t in config.targets if t not in known]
    require(not unknown, f"{name}.targets: unknown target(s) {unknown}; expected names from {list(known)} (the "
            f"last component of a Linear module's name)")


@dataclass
class LoRAConfig:
    rank: int = 8                           # r
    alpha: float = 16.0                     # the update is scaled by alpha / r (alpha / sqrt(r) with rslora)
    dropout: float = 0.0                    # on the input of the low-rank branch
    targets: Tuple[str, ...] = ("wq", "wv") # Linear modules by the last component of their name
    rslora: bool = False                    # rank-stabilised scale alpha / sqrt(r) (Kalajdzievski, 2023)
    init: str = "kaiming"                   # of LORA_INITS; "pissa" starts A, B from W0's top-r singular vectors
    lora_plus_ratio: float = 1.0            # LoRA+: B trains at this multiple of the learning rate (A at 1x)
    extra_trainable: Tuple[str, ...] = ()
    method = "lora"

    def __post_init__(self):
        name = type(self).__name__             # DoRAConfig shares these checks
        _check_positive_int(self, "rank")
        require(is_positive_number(self.alpha), f"{name}.alpha must be a finite positive number, got {self.alpha!r}")
        require(_is_number(self.dropout) and 0.0 <= self.dropout < 1.0,
                f"{name}.dropout must be in [0, 1), got {self.dropout!r}")
        _check_targets(self, LORA_TARGETS)
        require(isinstance(self.rslora, bool), f"{name}.rslora must be true or false, got {self.rslora!r}")
        require(self.init in LORA_INITS, f"{name}.init must be one of {LORA_INITS}, got {self.init!r}")
        require(is_positive_number(self.lora_plus_ratio),
                f"{name}.lora_plus_ratio must be a finite number > 0 (1: plain LoRA), got {self.lora_plus_ratio!r}")
        _check_extra_trainable(self)

    @property
    def scaling(self) -> float:
        """s: alpha / r, or alpha / sqrt(r) with rslora."""
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)


@dataclass
class DoRAConfig(LoRAConfig):
    """DoRA (dora.py): LoRA's fields, and a trained magnitude per output row of every target."""
    method = "dora"


# IA3's default targets: the key and value projections' outputs and the MLP's inner activation (the input of
# w2); in a family with a fused wqkv they stand for ("wqkv", "w2"), as HF peft's query_key_value (ia3.py).
IA3_TARGETS = ("wk", "wv", "w2")


@dataclass
class IA3Config:
    targets: Tuple[str, ...] = IA3_TARGETS  # Linear modules by the last component of their name
    feedforward: Tuple[str, ...] = ("w2",)  # of the targets: these scale their input, the others their output
    extra_trainable: Tuple[str, ...] = ()
    method = "ia3"

    def __post_init__(self):
        _check_targets(self, LORA_TARGETS)
        self.feedforward = (self.feedforward,) if isinstance(self.feedforward, str) else tuple(self.feedforward)
        outside = [t for t in self.feedforward if t not in self.targets]
        require(not outside, f"IA3Config.feedforward: {outside} are not among the targets {list(self.targets)} "
                f"(a feed-forward target scales its input; it must be a target)")
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
        require(self.init == "kaiming" and self.lora_plus_ratio == 1.0 and not self.rslora,
                f"QLoRAConfig: init {self.init!r}, rslora {self.rslora!r}, lora_plus_ratio {self.lora_plus_ratio!r}: "
                f"QLoRA here trains the paper's LoRA (init 'kaiming', rslora false, lora_plus_ratio 1); PiSSA, "
                f"rsLoRA and LoRA+ are LoRA's options")



def config_fields(config) -> dict:
    """The config's fields as plain JSON values (tuples become lists)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(config).items()}
