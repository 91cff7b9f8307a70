"""apply_peft and merge_lora: putting a method into a base model, and folding LoRA back out of it.

    model = apply_peft(base, LoRAConfig(rank=8, alpha=16, targets=("wq", "wv")))
    print(model.report)            # trainable vs total parameters

apply_peft looks the config's method up in the registry (registry.py), lets it install itself into `base`
(LoRA, Houlsby adapters and LLaMA-Adapter replace sub-modules; prompt and prefix tuning return a module to
attach beside the base), freezes every other parameter and returns a PeftModel (peft_model.py).

A base built under DeepSpeed ZeRO-3 (train/deepspeed.py) holds only a shard of each weight (shape (0,)): the
methods read sizes from the config and the Linear modules' in/out_features, never from a base weight's
shape; prompt tuning's inits gather the embedding table, and the parameter counts use DeepSpeed's full
sizes (distributed.full_numel). The new parameters are plain ones; deepspeed.initialize shards them.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from ..distributed import is_partitioned
from ..families import is_decoder
from .config import PeftConfigError
from .lora import LoRALinear
from .peft_model import PeftModel
from .registry import METHODS, method_of
from .replace import replace_module


def apply_peft(model: nn.Module, config, *, tokenizer=None, generator: Optional[torch.Generator] = None,
               trainable_dtype: Optional[torch.dtype] = torch.float32) -> PeftModel:
    """Install the method of `config` into `model` (in place) and wrap it. Every base parameter is frozen
    except for "full"; only the method's parameters are trainable. `tokenizer` is needed for
    PromptConfig(init="text"); `generator` makes the soft prompt's init reproducible.

    The method's parameters (PeftModel.method_parameters: everything for "full") are cast once, here, to at least
    `trainable_dtype`: float32 by default beside a bf16 / fp16 base (a method initialises its tensors in the base
    weight's dtype; the cast keeps those values), while a wider base (the float64 checks of the lessons and
    tests) keeps its own dtype: the cast never loses precision. None leaves them in the base's dtype. Every method's forward
    takes float32 parameters beside a float32 base; beside a half-precision base the training loop and
    tools/generate.py run them under torch.autocast. A ZeRO-3 partitioned parameter is left as DeepSpeed
    holds it."""
    method = method_of(config)
    if isinstance(model, PeftModel):
        raise PeftConfigError(f"the model already has a PEFT method ({model.method!r}); apply_peft takes a "
                              "plain decoder")
    if not is_decoder(model):
        raise PeftConfigError(f"apply_peft takes a minipeft decoder (build_model / load_model), got "
                              f"{type(model).__name__}")
    for p in model.parameters():
        p.requires_grad_(False)
    attached = method.install(model, config, tokenizer=tokenizer, generator=generator)
    if not isinstance(attached, dict):
        raise PeftConfigError(f"method {method.name!r}: install() must return a dict {{attribute: module}} of the "
                              f"modules to attach beside the base ({{}} for none), got {type(attached).__name__}")
    peft_model = PeftModel(model, config, trains_base=method.trains_base, attached=attached)
    peft_model.set_trainable()
    if trainable_dtype is not None:
        for p in peft_model.method_parameters().values():
            if p.is_floating_point() and not is_partitioned(p):
                wanted = torch.promote_types(p.dtype, trainable_dtype)             # fp16 -> fp32; fp64 stays
                if p.dtype != wanted:
                    p.data = p.data.to(wanted)
    return peft_model


def peft_configs() -> dict:
    """method name -> its config class, for every registered method."""
    return {name: method.config_class for name, method in METHODS.items()}


def lora_modules(model: PeftModel, what: str):
    """[(name in model.base, LoRALinear)] of a LoRA PeftModel; PeftConfigError for anything else."""
    if not isinstance(model, PeftModel) or model.method != "lora":
        found = model.method if isinstance(model, PeftModel) else type(model).__name__
        raise PeftConfigError(f"{what} needs a PeftModel with LoRA installed, got {found!r}")
    return [(name, m) for name, m in model.base.named_modules() if isinstance(m, LoRALinear)]


def mergeable_modules(model: PeftModel, what: str):
    """[(name in model.base, module)] of the method modules that fold into a plain nn.Linear (to_linear(): LoRA,
    DoRA, (IA)^3); PeftConfigError for a model with none or with other method modules beside them."""
    if not isinstance(model, PeftModel):
        raise PeftConfigError(f"{what} needs a PeftModel, got {type(model).__name__!r}")
    found = [(name, m) for name, m in model.base.named_modules() if hasattr(m, "adapter_params")]
    if not found or model.attached_names or not all(hasattr(m, "to_linear") for _, m in found):
        raise PeftConfigError(f"{what} needs a method that folds into the weights (LoRA, DoRA, (IA)^3), got "
                              f"{model.method!r}")
    return found


def merge_lora(model: PeftModel) -> nn.Module:
    """Fold every LoRA update into its weight (W0 + s B A) -- DoRA's W' and (IA)^3's scaled weights the same way --
    and return the base decoder with plain nn.Linear modules and every parameter trainable again, i.e. an
    ordinary model (checkpoint.save_model writes it as a plain checkpoint). The PeftModel is consumed: its base is
    changed in place."""
    for name, module in mergeable_modules(model, "merge_lora"):
        replace_module(model.base, name, module.to_linear())
    base = model.base
    for p in base.parameters():
        p.requires_grad_(True)
    return base
