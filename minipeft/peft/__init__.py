"""Parameter-efficient fine-tuning methods for the minipeft Transformer, and the API that installs them.

    from minipeft.peft import LoRAConfig, apply_peft, save_adapter, load_adapter, merge_lora
    model = apply_peft(base, LoRAConfig(rank=8, alpha=16, targets=("wq", "wv")))
"""

from .api import (PEFT_CONFIGS, AdapterConfig, FullConfig, LlamaAdapterConfig, LoRAConfig, PeftConfigError,
                  PeftModel, PrefixConfig, PromptConfig, TrainableReport, apply_peft, export_lora_to_hf_peft,
                  load_adapter, merge_lora, save_adapter)
from .adapter import BottleneckAdapter, LinearWithAdapter
from .llama_adapter import GatedAdapterPrompt
from .lora import LoRALinear
from .prefix import PrefixKV
from .soft_prompt import SoftPrompt

__all__ = [
    "PEFT_CONFIGS", "FullConfig", "LoRAConfig", "PromptConfig", "PrefixConfig", "AdapterConfig",
    "LlamaAdapterConfig", "PeftConfigError", "PeftModel", "TrainableReport", "apply_peft", "save_adapter",
    "load_adapter", "merge_lora", "export_lora_to_hf_peft",
    "LoRALinear", "BottleneckAdapter", "LinearWithAdapter", "SoftPrompt", "PrefixKV", "GatedAdapterPrompt",
]
