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
and, optional, what the tools know of it (a method without them still trains; the tools then ask for what they
would have read, e.g. "--lr: method 'x' has no default learning rate ...; give --lr"):
    title           its name in tables and plots ("LoRA"); default: the name
    learning_rates  LearningRates(real_base=, tiny_base=, comparison=): tuned default peak rates, each for what
                    it was tuned on (learning_rates.py holds the built-in numbers and says what each is for)
    sweep_grid      the rates tools/compare_methods.py --sweep tries
    reference_7b    model_cfg -> the method's config at 7B scale (the comparison's computed 7B tables)
    closed_form     (model_cfg, config) -> trainable parameters from a formula (an independent check of the
                    count apply_peft gives; memory.py holds the formulas)
    family_targets  Family -> what the config's default `targets` mean in that family (LoRA's wq, wv: a fused
                    wqkv on BLOOM); the training command line applies it (train/config.py peft_for_family)

The config contract, checked by register(): a dataclass whose class attribute `method` is the name; its
fields take plain JSON values (they are saved in adapter_config.json and the resume identity). An optional
field `extra_trainable` (a tuple of EXTRA_TRAINABLE_MODULES) trains whole base modules beside the method
(--trainable-embeddings); a config without it cannot take that flag.

Adding a method: write its file (config dataclass, modules with adapter_params(), install) and
`register(PeftMethod(...))` it, here for the built-in ones or from your own code; a module outside the package
reaches the tools with --plugin MODULE or MINIPEFT_PLUGINS (minipeft/plugins.py).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable, Dict, Optional, Tuple

from .. import cli_types as T
from .. import memory
from . import adapter, dora, ia3, llama_adapter, lora, prefix, qlora, soft_prompt
from ..family_registry import get_family
from .config import (GATE_KINDS, LORA_INITS, PROMPT_INITS, AdapterConfig, DoRAConfig, FullConfig, IA3Config,
                     LlamaAdapterConfig, LoRAConfig, PeftConfigError, PrefixConfig, PromptConfig, QLoRAConfig)
from .learning_rates import REAL_BASE_LR, SWEEP_GRID, TINY_COMPARISON_LR, TINY_MODEL_LR


@dataclass(frozen=True)
class Flag:
    """One command-line flag of a method: --name sets config field `field`."""
    name: str                                   # "--lora-rank"
    field: str                                  # "rank"
    help: str
    parse: Callable = str                       # argparse's type=: str, or a validated minipeft.cli_types type
    choices: Optional[Tuple] = None
    switch: bool = False                        # a flag without a value that sets the field to True

    @property
    def dest(self) -> str:
        return self.name.lstrip("-").replace("-", "_")


def _same_config(config):
    return config


@dataclass(frozen=True)
class LearningRates:
    """A method's default peak learning rates, one per kind of run (None: not tuned for it, give --lr)."""
    real_base: Optional[float] = None       # a real 7B base (finetune.py --model ...)
    tiny_base: Optional[float] = None       # the shipped tiny base, the main job's budget (finetune.py alone)
    comparison: Optional[float] = None      # the shipped tiny bases, compare_methods.py's default budget


RATE_KINDS = {"real_base": "a real base", "tiny_base": "the shipped tiny base",
              "comparison": "compare_methods.py's budget"}


@dataclass(frozen=True)
class PeftMethod:
    name: str
    config_class: type
    install: Callable[..., dict]
    loading_config: Callable = _same_config
    flags: Tuple[Flag, ...] = field(default_factory=tuple)
    trains_base: bool = False
    title: Optional[str] = None
    learning_rates: LearningRates = LearningRates()
    sweep_grid: Tuple[float, ...] = ()
    reference_7b: Optional[Callable] = None                 # model_cfg -> config
    closed_form: Optional[Callable] = None                  # (model_cfg, config) -> int
    family_targets: Optional[Callable] = None               # Family -> the default targets there

    @property
    def display_title(self) -> str:
        return self.title or self.name

    def learning_rate(self, kind: str, flag: str = "--lr") -> float:
        """The tuned default rate for `kind` (a RATE_KINDS key); PeftConfigError naming `flag` if there is none."""
        rate = getattr(self.learning_rates, kind)
        if rate is None:
            raise PeftConfigError(f"{flag}: method {self.name!r} has no default learning rate for "
                                  f"{RATE_KINDS[kind]}; give {flag}")
        return rate


METHODS: Dict[str, PeftMethod] = {}


def check_config_contract(method: PeftMethod) -> None:
    """What register() asks of a method's config class (the module docstring); PeftConfigError saying what is
    missing."""
    cls, name = method.config_class, method.name
    if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
        raise PeftConfigError(f"register({name!r}): config_class must be a dataclass, got {cls!r}")
    if getattr(cls, "method", None) != name:
        raise PeftConfigError(f"register({name!r}): {cls.__name__} needs the class attribute method = {name!r} "
                              f"(it has {getattr(cls, 'method', None)!r})")
    try:
        cls()
    except TypeError as err:
        raise PeftConfigError(f"register({name!r}): {cls.__name__}() must work with no arguments (every field "
                              f"needs a default: the method's defaults): {err}") from None
    if not callable(method.install):
        raise PeftConfigError(f"register({name!r}): install must be a function install(model, config, **_) -> dict")
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = [flag.field for flag in method.flags if flag.field not in fields]
    if unknown:
        raise PeftConfigError(f"register({name!r}): flags set fields {unknown} that {cls.__name__} does not have")
    if method.family_targets is not None and "targets" not in fields:
        raise PeftConfigError(f"register({name!r}): family_targets needs a `targets` field on {cls.__name__}")


def register(method: PeftMethod) -> PeftMethod:
    """Add a method to the table (its name must be new; its config must keep the contract above)."""
    if method.name in METHODS:
        raise PeftConfigError(f"a PEFT method named {method.name!r} is already registered")
    check_config_contract(method)
    METHODS[method.name] = method
    return method


def closed_form_trainable(model_cfg, config) -> int:
    """The method's trainable-parameter count of `config` on `model_cfg` from its formula (memory.py)."""
    method = method_of(config)
    if method.closed_form is None:
        raise PeftConfigError(f"method {method.name!r} has no closed form for its trainable parameters")
    return method.closed_form(model_cfg, config)


def default_learning_rate(name: str, kind: str, flag: str = "--lr") -> float:
    """The tuned default rate of method `name` for `kind` (RATE_KINDS); PeftConfigError naming `flag` if none."""
    return get_method(name, source="--method").learning_rate(kind, flag)


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
_hidden_or_none = T.int_range(0, T.MAX_DIM, then=lambda width: width or None)     # 0: train the prefix directly


def _install_nothing(model, config, **_) -> dict:
    return {}


def _rates(name: str) -> LearningRates:
    return LearningRates(real_base=REAL_BASE_LR[name], tiny_base=TINY_MODEL_LR[name], comparison=TINY_COMPARISON_LR[name])


# The usual settings at 7B (lesson 07, the comparison's computed tables): LoRA r 8 on q, v (the family's fused
# wqkv where it has one), 20 prompt / 10 prefix tokens, bottleneck 64, LLaMA-Adapter on the top 30 layers.
def _lora_7b(cfg) -> LoRAConfig:
    return LoRAConfig(rank=8, alpha=16, targets=get_family(cfg.family).default_lora_targets)


register(PeftMethod("full", FullConfig, _install_nothing, trains_base=True, title="full fine-tuning",
                    learning_rates=_rates("full"), sweep_grid=SWEEP_GRID["full"], reference_7b=lambda cfg: FullConfig(),
                    closed_form=lambda cfg, c: memory.full_trainable(cfg)))
def _lora_family_targets(family) -> Tuple[str, ...]:
    return family.default_lora_targets


def _ia3_family_targets(family) -> Tuple[str, ...]:
    """(IA)^3's k, v and MLP vectors in a family: a fused wqkv is scaled whole, as HF peft does (ia3.py)."""
    return ("wqkv", "w2") if family.qkv_layout.fused else IA3Config().targets


_lr_ratio = T.float_range(0.0, 1024.0, low_open=True)      # LoRA+: a multiple of the rate, never astronomic
LORA_FLAGS = (    # LoRA's and DoRA's (a flag shared by two methods is one command-line flag)
    Flag("--lora-rank", "rank", "LoRA rank r", T.dim),
    Flag("--lora-alpha", "alpha", "LoRA scale numerator (scale = alpha / r)", T.positive_float),
    Flag("--lora-dropout", "dropout", "dropout on the LoRA branch input", T.fraction),
    Flag("--lora-targets", "targets", "comma-separated projections that get LoRA (wq,wk,wv,wo,w1,w2,w3; wqkv "
         "where the family fuses them)", T.names),
    Flag("--lora-rslora", "rslora", "rsLoRA: scale alpha / sqrt(r) instead of alpha / r", switch=True),
    Flag("--lora-init", "init", "A, B init: kaiming (B = 0) or pissa (W0's top-r singular vectors; the "
         "targets' base weights become the residual)", str, choices=LORA_INITS),
    Flag("--lora-plus-ratio", "lora_plus_ratio", "LoRA+: B's learning rate = this x --lr (1: plain LoRA; the "
         "paper suggests 16)", _lr_ratio),
)
register(PeftMethod("lora", LoRAConfig, lora.install, title="LoRA", learning_rates=_rates("lora"),
                    sweep_grid=SWEEP_GRID["lora"], reference_7b=_lora_7b, family_targets=_lora_family_targets,
                    closed_form=lambda cfg, c: memory.lora_trainable(cfg, c.rank, c.targets), flags=LORA_FLAGS))
register(PeftMethod("prompt", PromptConfig, soft_prompt.install,
                    loading_config=lambda c: dataclasses.replace(c, init="random", init_text=None),
                    title="prompt tuning", learning_rates=_rates("prompt"), sweep_grid=SWEEP_GRID["prompt"],
                    reference_7b=lambda cfg: PromptConfig(prompt_len=20, init="random"),
                    closed_form=lambda cfg, c: memory.prompt_trainable(cfg, c.prompt_len), flags=(
    Flag("--prompt-len", "prompt_len", "soft prompt length P", T.seq_len),
    Flag("--prompt-init", "init", "soft prompt init", str, choices=PROMPT_INITS),
    Flag("--prompt-init-text", "init_text", "text whose token embeddings start the soft prompt (--prompt-init text)"),
)))
register(PeftMethod("prefix", PrefixConfig, prefix.install,
                    loading_config=lambda c: dataclasses.replace(c, reparam_hidden=None),
                    title="prefix tuning", learning_rates=_rates("prefix"), sweep_grid=SWEEP_GRID["prefix"],
                    reference_7b=lambda cfg: PrefixConfig(prefix_len=10, reparam_hidden=512),
                    closed_form=lambda cfg, c: memory.prefix_trainable(cfg, c.prefix_len, c.reparam_hidden), flags=(
    Flag("--prefix-len", "prefix_len", "prefix length P per layer", T.seq_len),
    Flag("--prefix-hidden", "reparam_hidden", "width of the prefix reparameterisation MLP (0: train the prefix "
         "directly)", _hidden_or_none),
)))
register(PeftMethod("adapter", AdapterConfig, adapter.install, title="adapter (Houlsby)",
                    learning_rates=_rates("adapter"), sweep_grid=SWEEP_GRID["adapter"],
                    reference_7b=lambda cfg: AdapterConfig(bottleneck=64),
                    closed_form=lambda cfg, c: memory.adapter_trainable(cfg, c.bottleneck), flags=(
    Flag("--adapter-bottleneck", "bottleneck", "Houlsby adapter bottleneck m", T.dim),
)))
register(PeftMethod("llama_adapter", LlamaAdapterConfig, llama_adapter.install, title="LLaMA-Adapter",
                    learning_rates=_rates("llama_adapter"), sweep_grid=SWEEP_GRID["llama_adapter"],
                    reference_7b=lambda cfg: LlamaAdapterConfig(prompt_len=10, adapter_layers=min(30, cfg.n_layers)),
                    closed_form=lambda cfg, c: memory.llama_adapter_trainable(
                        cfg, c.prompt_len, c.adapter_layers or min(30, cfg.n_layers)), flags=(
    Flag("--llama-adapter-len", "prompt_len", "LLaMA-Adapter prompt length K", T.seq_len),
    Flag("--llama-adapter-layers", "adapter_layers", "top layers L that get the adapter prompt (default: "
         "min(30, n_layers))", T.layers),
    Flag("--llama-adapter-gate", "gate", "gate form: tanh(g) (paper) or plain g (lit-llama / peft)", str,
         choices=GATE_KINDS),
)))
register(PeftMethod("dora", DoRAConfig, dora.install, title="DoRA", learning_rates=_rates("dora"),
                    sweep_grid=SWEEP_GRID["dora"], family_targets=_lora_family_targets,
                    reference_7b=lambda cfg: DoRAConfig(rank=8, alpha=16, targets=_lora_7b(cfg).targets),
                    closed_form=lambda cfg, c: memory.dora_trainable(cfg, c.rank, c.targets), flags=LORA_FLAGS))
register(PeftMethod("ia3", IA3Config, ia3.install, title="(IA)^3", learning_rates=_rates("ia3"),
                    sweep_grid=SWEEP_GRID["ia3"], family_targets=_ia3_family_targets,
                    reference_7b=lambda cfg: IA3Config(targets=_ia3_family_targets(get_family(cfg.family))),
                    closed_form=lambda cfg, c: memory.ia3_trainable(cfg, c.targets, c.feedforward), flags=(
    Flag("--ia3-targets", "targets", "comma-separated projections that get a vector (default wk,wv,w2; wqkv,w2 "
         "where the family fuses q, k, v)", T.names),
    Flag("--ia3-feedforward", "feedforward", "of those, the ones whose input is scaled (the MLP's inner "
         "activation: w2)", T.names),
)))


# QLoRA (peft/qlora.py) takes LoRA's flags (the same fields) and two of its own. It has no 7B entry in the
# comparison's ZeRO-3 tables: a partitioned base cannot be quantised (its 7B memory is memory.qlora_base_bytes).
def _on_or_off(text: str) -> bool:
    choice = text.strip().lower()
    if choice not in ("on", "off"):
        raise ValueError(text)
    return choice == "on"


_on_off = T.ArgType("switch", "on or off", _on_or_off)

register(PeftMethod("qlora", QLoRAConfig, qlora.install, title="QLoRA (NF4 base)", learning_rates=_rates("qlora"),
                    sweep_grid=SWEEP_GRID["qlora"], family_targets=_lora_family_targets,
                    closed_form=lambda cfg, c: memory.lora_trainable(cfg, c.rank, c.targets),
                    flags=METHODS["lora"].flags + (
    Flag("--qlora-block-size", "block_size", "NF4 block size: weights per absmax constant (even)", T.int_range(2, 4096)),
    Flag("--qlora-double-quant", "double_quant", "quantise the absmax constants too (on / off)", _on_off),
)))
