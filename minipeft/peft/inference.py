"""A base with a trained adapter, ready to use (tools/generate.py), under the one dtype policy of trainable
parameters: they are float32 unless asked otherwise (apply_peft / load_adapter's `trainable_dtype`).

    model = load_model_with_adapter("checkpoints/x", "runs/lora-.../adapter")   # base float32, adapter float32
    with precision_context(model, "cpu"):
        new_tokens = generate(model, prompts, 20)

The base is loaded in float32 by default whatever dtype its folder stores, as finetune.py's --base-dtype auto
loads it for fp32 training, so an adapter gives here exactly the logits of its run's own final evaluation. A half
base (dtype=torch.bfloat16 / float16) beside float32 adapter parameters runs under torch.autocast in the half
dtype, as finetune.py evaluates a --precision bf16 / fp16 run (precision_context).
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch

from .peft_model import PeftModel
from .save_load import load_adapter


def load_model_with_adapter(checkpoint, adapter=None, dtype: torch.dtype = torch.float32, device="cpu"):
    """The base model of `checkpoint` in `dtype` on `device`, with the adapter folder `adapter` installed (its
    parameters float32: load_adapter's rule), in eval mode."""
    from ..checkpoint import load_model
    model = load_model(checkpoint, dtype=dtype, device=device)
    if adapter:
        model = load_adapter(model, adapter).to(device)
    return model.eval()


def precision_context(model, device: Optional[str] = None):
    """torch.autocast in the base's half dtype when float32 adapter parameters sit beside a half base; nothing
    otherwise."""
    frozen = {p.dtype for p in model.parameters() if not p.requires_grad}         # the base's (none for "full")
    half = frozen & {torch.bfloat16, torch.float16}
    if isinstance(model, PeftModel) and half:
        device_type = torch.device(device).type if device else next(model.parameters()).device.type
        return torch.autocast(device_type=device_type, dtype=half.pop())
    return contextlib.nullcontext()
