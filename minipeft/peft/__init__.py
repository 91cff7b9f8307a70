"""Parameter-efficient fine-tuning methods for the minipeft decoders, and the API that installs them.

    from minipeft.peft import LoRAConfig, apply_peft, save_adapter, load_adapter, merge_lora
    model = apply_peft(base, LoRAConfig(rank=8, alpha=16, targets=("wq", "wv")))

The files, bottom up (each imports only those above it):
    config.py          PeftConfigError and one validated config dataclass per method
    replace.py         replace a sub-module by name; collect what the method modules declare they train
    lora.py, soft_prompt.py, prefix.py, adapter.py, llama_adapter.py, dora.py, ia3.py
                       one method each: its modules + install() (LoRA's rsLoRA, PiSSA, LoRA+ are LoRAConfig options)
    qlora.py           LoRA on a base stored in 4-bit NormalFloat (minipeft/quant)
    learning_rates.py  the built-in methods' tuned default learning rates and sweep grid
    registry.py        the table of methods (PeftMethod): what apply_peft, save/load, the CLI and the tools read
    peft_model.py      PeftModel: the calling contract, virtual tokens, the trainable-parameter report
    api.py             apply_peft, merge_lora
    save_load.py       save_adapter, load_adapter (adapter folders with a base fingerprint)
    hf_export.py       export_adapter_to_hf_peft (and export_lora_to_hf_peft): adapters out to Hugging Face peft
    hf_import.py       load_hf_peft_adapter: a Hugging Face peft adapter folder in (load_adapter calls it)
"""

from .adapter import BottleneckAdapter, LinearWithAdapter
from .api import apply_peft, merge_lora, peft_configs
from .config import (EXTRA_TRAINABLE_MODULES, AdapterConfig, DoRAConfig, FullConfig, IA3Config, LlamaAdapterConfig,
                     LoRAConfig, PeftConfigError, PrefixConfig, PromptConfig, QLoRAConfig)
from .dora import DoRALinear
from .hf_export import export_adapter_to_hf_peft, export_lora_to_hf_peft
from .hf_import import load_hf_peft_adapter
from .ia3 import IA3Linear
from .llama_adapter import GatedAdapterPrompt
from .lora import LoRALinear
from .peft_model import PeftModel, TrainableReport
from .prefix import PrefixKV
from .qlora import QLoRALinear
from .registry import (METHODS, Flag, LearningRates, PeftMethod, closed_form_trainable, default_learning_rate,
                       get_method, register, unregister)
from .save_load import load_adapter, save_adapter
from .soft_prompt import SoftPrompt

PEFT_CONFIGS = peft_configs()     # method name -> config class of the built-in methods (see registry.METHODS)

__all__ = [
    "PEFT_CONFIGS", "METHODS", "PeftMethod", "Flag", "LearningRates", "register", "unregister", "get_method",
    "closed_form_trainable", "default_learning_rate",
    "FullConfig", "LoRAConfig", "PromptConfig", "PrefixConfig", "AdapterConfig", "LlamaAdapterConfig",
    "DoRAConfig", "IA3Config",
    "EXTRA_TRAINABLE_MODULES", "PeftConfigError", "PeftModel", "TrainableReport", "apply_peft", "save_adapter",
    "load_adapter", "merge_lora", "export_lora_to_hf_peft",
    "export_adapter_to_hf_peft", "load_hf_peft_adapter", "QLoRAConfig", "QLoRALinear",
    "LoRALinear", "DoRALinear", "IA3Linear", "BottleneckAdapter", "LinearWithAdapter", "SoftPrompt", "PrefixKV",
    "GatedAdapterPrompt",
]
