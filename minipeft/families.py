"""Model families: which decoder class a ModelConfig builds.

    model = build_model(ModelConfig.from_name("tiny"))        # the class of cfg.family, randomly initialised
    with torch.device("meta"): model = build_model(cfg)       # shapes only, no memory (load_model does this)

Every family's model has the same forward signature as model.Transformer (tokens or input_embeds,
past_key_values, start_pos, position_ids, attention_mask, use_cache), the same cache layout per layer ((k, v),
each (B, G, S, hd)), `config`, `gradient_checkpointing`, and blocks under `layers.{i}` whose `attention`
exposes `project` / `attend`, so every PEFT method, `generate` and the trainer work on all of them. A family that
does not number tokens 0, 1, ... adds `prompt_position_ids` / `next_position_ids` (generate.py) and says where
PEFT's virtual tokens sit (`cache_prefix_shifts_positions`, `front_position_ids`, `shift_position_ids`: see
peft/peft_model.py; ChatGLM-6B in chatglm.py).
Adding a family = its model file + one entry in FAMILY_CLASSES (+ its name in config.FAMILIES).
"""

from __future__ import annotations

from typing import Dict, Tuple

import torch.nn as nn

from .config import ModelConfig
from .bloom import Bloom
from .chatglm import ChatGLM
from .model import Transformer

FAMILY_CLASSES: Dict[str, type] = {
    "llama": Transformer,
    "chatglm2": Transformer,     # model.py with cfg.qkv_bias and cfg.rotary_fraction 0.5
    "chatglm": ChatGLM,
    "bloom": Bloom,
}


def build_model(cfg: ModelConfig) -> nn.Module:
    """The decoder of cfg.family, built from cfg (on the current default device)."""
    return FAMILY_CLASSES[cfg.family](cfg)


def decoder_classes() -> Tuple[type, ...]:
    """The classes a model built by build_model can have (for isinstance checks)."""
    return tuple(dict.fromkeys(FAMILY_CLASSES.values()))


def is_decoder(model) -> bool:
    return isinstance(model, decoder_classes())


def tokenizer_for(family: str, model_path):
    """The tokenizer of a model family ("llama", "chatglm", "chatglm2" on its SentencePiece file; "bloom" on
    its tokenizer.json)."""
    from .tokenizer import ByteLevelBPETokenizer, Tokenizer, TokenizerError
    from .tokenizer_chatglm import ChatGLM2Tokenizer, ChatGLMTokenizer
    classes = {"llama": Tokenizer, "chatglm": ChatGLMTokenizer, "chatglm2": ChatGLM2Tokenizer,
               "bloom": ByteLevelBPETokenizer}
    if family not in classes:
        raise TokenizerError(f"no tokenizer for family {family!r}; expected one of {sorted(classes)}")
    return classes[family](model_path)
