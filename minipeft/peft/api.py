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
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import torch.nn as nn

from ..model import Transformer


# ---- one config per method ---------------------------------------------------------------------
@dataclass
class FullConfig:
    """Full fine-tuning: every parameter trainable (the baseline)."""
    method = "full"


@dataclass
class LoRAConfig:
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: Tuple[str, ...] = ("wq", "wv")
    method = "lora"


@dataclass
class PromptConfig:
    prompt_len: int = 20
    init: str = "vocab"                 # "random" | "vocab" (embeddings of sampled ids) | "text"
    init_text: Optional[str] = None     # token ids of this text (init="text"); needs a tokenizer
    method = "prompt"


@dataclass
class PrefixConfig:
    prefix_len: int = 10
    reparam_hidden: Optional[int] = 512  # MLP width of the reparameterisation; None trains the prefix directly
    method = "prefix"


@dataclass
class AdapterConfig:
    bottleneck: int = 64
    method = "adapter"


@dataclass
class LlamaAdapterConfig:
    prompt_len: int = 10                 # K
    adapter_layers: Optional[int] = None # L, the top layers that get a prompt; None = min(30, n_layers)
    gate: str = "tanh"                   # "tanh" (LLaMA-Adapter paper) | "plain" (lit-llama / peft)
    method = "llama_adapter"


PEFT_CONFIGS = {c.method: c for c in (FullConfig, LoRAConfig, PromptConfig, PrefixConfig, AdapterConfig,
                                      LlamaAdapterConfig)}
