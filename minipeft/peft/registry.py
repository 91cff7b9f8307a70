"""The methods minipeft knows, each declared once. apply_peft, save/load, the report, the training command
line and the resume check all read this table; none keeps its own list of methods.

A method is (see PeftMethod):
    name            "lora": PeftConfig.method, finetune.py's --method, an adapter folder's "method"
    config_class    its validated dataclass (peft/config.py)
    install         install(model, config, tokenizer=None, generator=None) -> {attribute: module}: changes the
                    base in place (LoRA, adapters, LLaMA-Adapter replace sub-modules) and returns the modules
                    to attach beside it on the PeftModel (prompt tuning's `soft_prompt`, prefix tuning's
                    `prefix`); the new modules declare their trainable parameters with adapter_params()
    loading_config  the config to install before an adapter folder's tensors are copied in (a soft prompt
                    needs no tokenizer for its init then; a prefix is saved folded, so it is built without MLP)
    flags           the command-line flags of its hyper-parameters: Flag("--lora-rank", "rank", ...)
    trains_base     True only for full fine-tuning: every base parameter trains

Adding a method: write its file (config dataclass, modules with adapter_params(), install) and
`register(PeftMethod(...))` it, here for the built-in ones or from your own code.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable, Dict, Optional, Tuple

from . import adapter, llama_adapter, lora, prefix, soft_prompt
from .config import (GATE_KINDS, PROMPT_INITS, AdapterConfig, FullConfig, LlamaAdapterConfig, LoRAConfig,
                     PeftConfigError, PrefixConfig, PromptConfig)


@dataclass(frozen=True)
class Flag:
    """One command-line flag of a method: --name sets config field `field`."""
    name: str                                   # "--lora-rank"
    field: str                                  # "rank"
    help: str
    parse: Callable = str                       # argparse's type= (the text -> the field's value)
    choices: Optional[Tuple] = None

    @property
    def dest(self) -> str:
        return self.name.lstrip("-").replace("-", "_")


def _same_config(config):
    return config


@dataclass(frozen=True)
class PeftMethod:
    name: str
    config_class: type
    install: Callable[..., dict]
    loading_config: Callable = _same_config
    flags: Tuple[Flag, ...] = field(default_factory=tuple)
    trains_base: bool = False


METHODS: Dict[str, PeftMethod] = {}


def register(method: PeftMethod) -> PeftMethod:
    """Add a method to the table (its name must be new and equal to its config's `method`)."""
    if method.name in METHODS:
        raise PeftConfigError(f"a PEFT method named {method.name!r} is already registered")
    if getattr(method.config_class, "method", None) != method.name:
        raise PeftConfigError(f"{method.config_class.__name__}.method must be {method.name!r} to register it")
    METHODS[method.name] = method
    return method


def unregister(name: str) -> None:
    """Remove a method (for tests that register a toy one)."""
    METHODS.pop(name, None)


def get_method(name: str, source: str = "method") -> PeftMethod:
    if name not in METHODS:
        raise PeftConfigError(f"{source} {name!r}: expected one of {', '.join(METHODS)}")
    return METHODS[name]


def method_of(config) -> PeftMethod:
    """The registered method whose config class `config` is an instance of."""
    for method in METHODS.values():
        if type(config) is method.config_class:
            return method
    raise PeftConfigError(f"expected one of {[m.config_class.__name__ for m in METHODS.values()]}, "
                          f"got {type(config).__name__}")


# ---- the built-in methods -----------------------------------------------------------------------
def _targets(text: str) -> Tuple[str, ...]:
    return tuple(t.strip() for t in text.split(",") if t.strip())


def _hidden_or_none(text: str) -> Optional[int]:
    return int(text) or None        # 0: train the prefix directly


def _install_nothing(model, config, **_) -> dict:
    return {}


register(PeftMethod("full", FullConfig, _install_nothing, trains_base=True))
register(PeftMethod("lora", LoRAConfig, lora.install, flags=(
    Flag("--lora-rank", "rank", "LoRA rank r", int),
    Flag("--lora-alpha", "alpha", "LoRA scale numerator (scale = alpha / r)", float),
    Flag("--lora-dropout", "dropout", "dropout on the LoRA branch input", float),
    Flag("--lora-targets", "targets", "comma-separated projections that get LoRA (wq,wk,wv,wo,w1,w2,w3; wqkv "
         "where the family fuses them)", _targets),
)))
register(PeftMethod("prompt", PromptConfig, soft_prompt.install,
                    loading_config=lambda c: dataclasses.replace(c, init="random", init_text=None), flags=(
    Flag("--prompt-len", "prompt_len", "soft prompt length P", int),
    Flag("--prompt-init", "init", "soft prompt init", str, choices=PROMPT_INITS),
    Flag("--prompt-init-text", "init_text", "text whose token embeddings start the soft prompt (--prompt-init text)"),
)))
register(PeftMethod("prefix", PrefixConfig, prefix.install,
                    loading_config=lambda c: dataclasses.replace(c, reparam_hidden=None), flags=(
    Flag("--prefix-len", "prefix_len", "prefix length P per layer", int),
    Flag("--prefix-hidden", "reparam_hidden", "width of the prefix reparameterisation MLP (0: train the prefix "
         "directly)", _hidden_or_none),
)))
register(PeftMethod("adapter", AdapterConfig, adapter.install, flags=(
    Flag("--adapter-bottleneck", "bottleneck", "Houlsby adapter bottleneck m", int),
)))
register(PeftMethod("llama_adapter", LlamaAdapterConfig, llama_adapter.install, flags=(
    Flag("--llama-adapter-len", "prompt_len", "LLaMA-Adapter prompt length K", int),
    Flag("--llama-adapter-layers", "adapter_layers", "top layers L that get the adapter prompt (default: "
         "min(30, n_layers))", int),
    Flag("--llama-adapter-gate", "gate", "gate form: tanh(g) (paper) or plain g (lit-llama / peft)", str,
         choices=GATE_KINDS),
)))
