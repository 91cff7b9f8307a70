"""Prompt tuning: P trainable "virtual token" embeddings prepended to the input embeddings.

Shapes: B batch, T real tokens, P = prompt_len, d = model dim.

    E_prompt                                    (P, d)        the only trainable tensor
    embeds  = [E_prompt ; input_embeds]         (B, P+T, d)   the same prompt for every row
    labels  = [-100 x P ; labels]               (B, P+T)      no loss on the virtual tokens
    mask    = [1 x P ; attention_mask]          (B, P+T)      the prompt is always attended to

The prompt takes RoPE positions 0..P-1 and the real tokens P..P+T-1 (the PeftModel wrapper shifts the
caller's positions by P), so the model sees exactly P earlier tokens whose embeddings are free parameters.
On ChatGLM-6B (2-D positions, prefix-LM mask) the same idea reads: the virtual tokens are P more *context*
tokens in front, positions 0..P-1 with block id 0 (so the context and they see each other both ways, as
context does); the real positions, [gMASK]'s included (the reply takes it), move up by P, and block ids stay
(block 0 marks the context for the mask; the reply's block ids count inside the blank). The family gives
these rules (chatglm.py: front_position_ids, shift_position_ids); PeftModel applies them.

Three initialisations (`initial_weight`):
    "random"  N(0, s^2) with s the standard deviation of the embedding table, so the prompt has the scale
              of real token embeddings
    "vocab"   the embedding rows of P vocabulary ids sampled without replacement (with replacement when
              P > vocab size), as in Lester et al. (2021)
    "text"    the embeddings of the tokens of `init_text` (no BOS/EOS), repeated and cut to length P
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn as nn

from ..distributed import gathered
from ..loss import IGNORE_INDEX
from .config import PeftConfigError, PromptConfig


class SoftPrompt(nn.Module):
    """A (P, d) trainable prompt, `weight`, that `prepend` puts in front of a batch of input embeddings."""

    def __init__(self, prompt_len: int, dim: int, init_weight: torch.Tensor):
        super().__init__()
        PromptConfig(prompt_len=prompt_len, init="random")                # checks prompt_len (PeftConfigError)
        if tuple(init_weight.shape) != (prompt_len, dim):
            raise PeftConfigError(f"SoftPrompt init_weight has shape {tuple(init_weight.shape)}, "
                                f"expected (prompt_len, dim) = ({prompt_len}, {dim})")
        self.prompt_len, self.dim = prompt_len, dim
        self.weight = nn.Parameter(init_weight.detach().clone())                 # (P, d)

    def adapter_params(self) -> dict:
        """What prompt tuning trains: the prompt (P, d)."""
        return {"weight": self.weight}

    # the attached-module protocol (peft_model.py): P embeddings in front of the input
    @property
    def num_virtual_tokens(self) -> int:
        return self.prompt_len

    def prepend_embeddings(self, input_embeds: torch.Tensor) -> torch.Tensor:
        """(B, T, d) -> (B, P + T, d)."""
        return self.prepend(input_embeds)[0]

    def prepend(
        self,
        input_embeds: torch.Tensor,                       # (B, T, d)
        labels: Optional[torch.Tensor] = None,            # (B, T) int64
        attention_mask: Optional[torch.Tensor] = None,    # (B, T) 1 real / 0 padding
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
        """Returns (embeds (B, P+T, d), labels (B, P+T) with -100 in front or None, mask (B, P+T) or None)."""
        if input_embeds.dim() != 3 or input_embeds.shape[-1] != self.dim:
            raise ValueError(f"SoftPrompt.prepend: input_embeds has shape {tuple(input_embeds.shape)}, "
                             f"expected (batch, tokens, {self.dim})")
        B, T, _ = input_embeds.shape
        P = self.prompt_len
        prompt = self.weight.to(input_embeds.dtype).unsqueeze(0).expand(B, P, self.dim)   # (B, P, d)
        embeds = torch.cat([prompt, input_embeds], dim=1)                                  # (B, P+T, d)
        if labels is not None:
            if tuple(labels.shape) != (B, T):
                raise ValueError(f"SoftPrompt.prepend: labels has shape {tuple(labels.shape)}, expected ({B}, {T})")
            ignored = labels.new_full((B, P), IGNORE_INDEX)                                # (B, P)
            labels = torch.cat([ignored, labels], dim=1)                                   # (B, P+T)
        if attention_mask is not None:
            if tuple(attention_mask.shape) != (B, T):
                raise ValueError(f"SoftPrompt.prepend: attention_mask has shape {tuple(attention_mask.shape)}, "
                                 f"expected ({B}, {T})")
            ones = attention_mask.new_ones(B, P)                                           # (B, P)
            attention_mask = torch.cat([ones, attention_mask], dim=1)                      # (B, P+T)
        return embeds, labels, attention_mask

    def extra_repr(self) -> str:
        return f"prompt_len={self.prompt_len}, dim={self.dim}"


def initial_weight(config, embedding: nn.Embedding, tokenizer=None,
                   generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """The (P, d) starting prompt for a PromptConfig, on the embedding's device and dtype.

    `tokenizer` (init="text" only) needs `encode(text, bos=False, eos=False) -> list[int]` (our Tokenizer).
    `generator` (a CPU torch.Generator) makes "random" and "vocab" reproducible."""
    prompt_len = config.prompt_len
    table = embedding.weight                                                       # (V, d)
    vocab_size, dim = table.shape

    if config.init == "random":
        std = table.detach().float().std()                                         # scalar
        noise = torch.randn(prompt_len, dim, generator=generator)                  # (P, d) on the CPU
        return (noise.to(table.device) * std).to(table.dtype)

    if config.init == "vocab":
        if prompt_len <= vocab_size:
            ids = torch.randperm(vocab_size, generator=generator)[:prompt_len]     # (P,) distinct ids
        else:
            ids = torch.randint(0, vocab_size, (prompt_len,), generator=generator)
        return table.detach()[ids.to(table.device)].clone()                        # (P, d)

    if config.init == "text":
        if tokenizer is None:
            raise PeftConfigError('PromptConfig.init="text" needs a tokenizer to turn init_text into token ids; '
                                'pass tokenizer=... (or use init="vocab" / "random")')
        ids = list(tokenizer.encode(config.init_text, bos=False, eos=False))
        if not ids:
            raise PeftConfigError(f"PromptConfig.init_text {config.init_text!r} encodes to no tokens")
        bad = [i for i in ids if not 0 <= i < vocab_size]
        if bad:
            raise PeftConfigError(f"PromptConfig.init_text encodes to ids {bad[:5]} outside the model's "
                                f"vocabulary of {vocab_size}: tokenizer and model do not match")
        ids = (ids * math.ceil(prompt_len / len(ids)))[:prompt_len]                # repeat, then cut to P
        return table.detach()[torch.tensor(ids, device=table.device)].clone()      # (P, d)

    raise PeftConfigError(f'PromptConfig.init must be "random", "vocab" or "text", got {config.init!r}')


def install(model: nn.Module, config: PromptConfig, *, tokenizer=None, generator=None, **_) -> dict:
    """The registry's entry point: a SoftPrompt attached beside the base as `soft_prompt` (PeftModel puts it
    in front of the input embeddings). Every init reads the embedding table, gathered under ZeRO-3."""
    with gathered(model.tok_embeddings.weight):
        weight = initial_weight(config, model.tok_embeddings, tokenizer=tokenizer, generator=generator)
    return {"soft_prompt": SoftPrompt(config.prompt_len, model.config.dim, weight)}
