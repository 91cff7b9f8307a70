"""PeftModel: a base decoder with one PEFT method installed, called exactly like the base.

    model = apply_peft(base, LoRAConfig(rank=8, alpha=16, targets=("wq", "wv")))
    logits = model(tokens)                  # (B, T) -> (B, T, V), as base(tokens)
    loss = model.loss(tokens, labels)       # next-token cross-entropy over the labels that count
    print(model.report)                     # trainable vs total parameters

The calling contract (the virtual tokens of prompt and prefix tuning are the wrapper's own business):
- `tokens`, `attention_mask` and `position_ids` describe the caller's real tokens only, numbered as the base
  numbers them without virtual tokens (LLaMA: 0, 1, ...; ChatGLM-6B: its 2-D (B, 2, T) ids, which the wrapper
  derives from the tokens, as the base would, when none are given). The wrapper puts P ones in front of the
  attention mask and numbers the virtual tokens by the base family's rules (below).
- The returned logits are aligned with the given tokens (a soft prompt's P positions are dropped).
- `past_key_values` given back to it is the cache it returned (prefix / prompt keys already in front).
- `prompt_position_ids` / `next_position_ids` are the base's (generate.py reads them), so cached generation
  works through the wrapper with the base's own position rules.

Where the P virtual tokens sit is the base family's decision, read from three optional members of its class
(a family without them counts positions, as LLaMA does here and Hugging Face peft does):
    cache_prefix_shifts_positions  do real tokens after P prefix cache slots move up by P?  default True
                                   (peft's prefix tuning: real tokens at P..P+n-1; ChatGLM-6B: False, as
                                   its own P-tuning v2 numbers them as without the prefix)
    front_position_ids(B, P, dev)  positions of P embeddings in front (prompt tuning)      default 0..P-1
    shift_position_ids(pos, P)     real positions after P tokens in front                  default pos + P
Prompt tuning always shifts (the virtual tokens are real inputs the model reads first); prefix tuning shifts
only where the family says so.

Modules a method attaches beside the base (what its install() returns: {attribute name: module}) say what they
put in front of the real tokens, by this small protocol (PeftModel finds them by it, not by their names):
    num_virtual_tokens          P, the positions the module puts in front of the real tokens
    prepend_embeddings(embeds)  (B, T, d) -> (B, P + T, d): P embeddings in front of the input (prompt tuning)
 or past_key_values(batch)      per layer (k, v), each (B, G, P, hd): P key/value slots in front (prefix tuning)
A module with neither would train but never reach the output, so apply_peft refuses it (check_attached). One
module of each role at most, and not both at once (their positions would need a rule of their own).

Which parameters train is read from the modules themselves (replace.adapter_parameters: every module with
adapter_params()), plus the base modules named in the config's `extra_trainable` (if it has that field), or
everything for a method with trains_base (full fine-tuning).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional

import torch
import torch.nn as nn

from ..distributed import full_numel
from ..kv_cache import cache_length
from ..loss import label_only_loss
from .config import PeftConfigError
from .replace import adapter_lr_scales, adapter_parameters, adapter_saved_tensors


def cache_prefix_shifts_positions(base) -> bool:
    """Whether real tokens after a prefix of cache slots take positions P.. (see the module docstring)."""
    return getattr(base, "cache_prefix_shifts_positions", True)


def front_position_ids(base, batch: int, count: int, device) -> torch.Tensor:
    """Positions of `count` embeddings put in front of the input: the family's rule, else (B, P) 0..P-1."""
    own_rule = getattr(base, "front_position_ids", None)
    if own_rule is not None:
        return own_rule(batch, count, device)
    return torch.arange(count, device=device).expand(batch, count)


def shift_position_ids(base, position_ids: torch.Tensor, offset: int) -> torch.Tensor:
    """Real positions after `offset` tokens in front: the family's rule, else position_ids + offset."""
    own_rule = getattr(base, "shift_position_ids", None)
    return own_rule(position_ids, offset) if own_rule is not None else position_ids + offset


ROLES = ("prepend_embeddings", "past_key_values")


def _with_role(modules: Dict[str, nn.Module], role: str):
    found = [module for module in modules.values() if callable(getattr(module, role, None))]
    return found[0] if found else None


def check_attached(attached: Dict[str, nn.Module], method: str) -> None:
    """The attached-module protocol (module docstring); PeftConfigError saying what a module lacks."""
    for name, module in attached.items():
        if not isinstance(module, nn.Module):
            raise PeftConfigError(f"method {method!r}: install() returned {name!r} = {type(module).__name__}, not "
                                  f"an nn.Module to attach beside the base")
        roles = [role for role in ROLES if callable(getattr(module, role, None))]
        if not roles:
            raise PeftConfigError(f"method {method!r}: the attached module {name!r} ({type(module).__name__}) has "
                                  f"neither prepend_embeddings(embeds) nor past_key_values(batch): it would train "
                                  f"but never reach the output (peft/peft_model.py: the attached-module protocol)")
        if not isinstance(getattr(module, "num_virtual_tokens", None), int):
            raise PeftConfigError(f"method {method!r}: the attached module {name!r} needs an int "
                                  f"num_virtual_tokens (the positions it puts in front of the real tokens)")
        if len(roles) > 1:
            raise PeftConfigError(f"method {method!r}: the attached module {name!r} has both roles; give it one")
    for role in ROLES:
        if sum(callable(getattr(m, role, None)) for m in attached.values()) > 1:
            raise PeftConfigError(f"method {method!r}: more than one attached module has {role}(); one at most")
    if all(_with_role(attached, role) is not None for role in ROLES):
        raise PeftConfigError(f"method {method!r}: a soft prompt and a prefix attached together are not supported")


@dataclass
class TrainableReport:
    trainable: int
    total: int

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / self.total if self.total else 0.0

    def __str__(self) -> str:
        return f"trainable {self.trainable:,} / {self.total:,} ({self.percent:.3f}%)"


class PeftModel(nn.Module):
    """A decoder with one PEFT method installed. See the module docstring for the calling contract.

    Attributes: `base` (the decoder, with LoRA / adapter / LLaMA-Adapter modules inside it), `peft_config`,
    `method`, the attached modules under the names their method gave them (`soft_prompt` for prompt tuning,
    `prefix` for prefix tuning), `report`."""

    def __init__(self, base: nn.Module, peft_config, trains_base: bool = False, attached: Optional[dict] = None):
        super().__init__()
        self.base = base
        self.peft_config = peft_config
        self.method = peft_config.method
        self.trains_base = trains_base
        attached = dict(attached or {})
        check_attached(attached, peft_config.method)
        for name, module in attached.items():
            setattr(self, name, module)
        self.attached_names = tuple(attached)

    # -- what the method owns
    @property
    def config(self):
        """The base model's ModelConfig."""
        return self.base.config

    @property
    def gradient_checkpointing(self) -> bool:
        return self.base.gradient_checkpointing

    @gradient_checkpointing.setter
    def gradient_checkpointing(self, value: bool) -> None:
        self.base.gradient_checkpointing = value

    @property
    def prompt_position_ids(self):
        """The base's rule for a prompt's positions (None for a counting family): generate.py reads it."""
        return getattr(self.base, "prompt_position_ids", None)

    @property
    def next_position_ids(self):
        """The base's rule for the next token's positions (None for a counting family)."""
        return getattr(self.base, "next_position_ids", None)

    def attached_modules(self) -> Dict[str, nn.Module]:
        """The modules the method attached beside the base, by name."""
        return {name: getattr(self, name) for name in self.attached_names}

    @property
    def soft_prompt_module(self):
        """The attached module that puts embeddings in front of the input (prompt tuning), or None."""
        return _with_role(self.attached_modules(), "prepend_embeddings")

    @property
    def prefix_module(self):
        """The attached module that supplies key/value slots in front (prefix tuning), or None."""
        return _with_role(self.attached_modules(), "past_key_values")

    @property
    def num_virtual_tokens(self) -> int:
        """P: the positions the attached modules put in front (0 for methods that attach nothing)."""
        return sum(module.num_virtual_tokens for module in self.attached_modules().values())

    def _extra_names(self) -> set:
        return {f"base.{m}.weight" for m in getattr(self.peft_config, "extra_trainable", ())}

    def method_parameters(self) -> Dict[str, nn.Parameter]:
        """name (as in self.named_parameters()) -> parameter, for every parameter the method trains."""
        if self.trains_base:
            return dict(self.named_parameters())
        found = adapter_parameters(self)
        extra = self._extra_names()
        found.update({name: p for name, p in self.named_parameters() if name in extra})
        return found

    def is_method_parameter(self, name: str) -> bool:
        """True for the parameters the method adds and trains (name as in self.named_parameters()), and for
        the weights of the base modules in peft_config.extra_trainable."""
        return name in self.method_parameters()

    def set_trainable(self) -> None:
        """requires_grad = True exactly for the method's parameters (every parameter for "full")."""
        trained = self.method_parameters()
        for name, p in self.named_parameters():
            p.requires_grad_(name in trained)

    def param_groups(self, lr: float) -> list:
        """The trainable parameters as optimizer groups [{"params": [...], "lr": lr * multiple}], one group per
        multiple a method module asks for (lr_scales(): LoRA+'s B); one group at `lr` for every other method."""
        scales = adapter_lr_scales(self)
        groups: Dict[float, list] = {}
        for name, p in self.named_parameters():
            if p.requires_grad:
                groups.setdefault(scales.get(name, 1.0), []).append(p)
        return [{"params": params, "lr": lr * scale} for scale, params in groups.items()]

    def frozen_elsewhere(self) -> int:
        """Frozen base weights held in another form than a Parameter: a module's `quantized_numel` (QLoRA's 4-bit
        layers, quant/nf4_linear.py, keep their weights as buffers of codes). The report counts them as weights."""
        return sum(getattr(module, "quantized_numel", 0) for module in self.base.modules())

    @property
    def report(self) -> TrainableReport:
        params = list(self.parameters())
        return TrainableReport(trainable=sum(full_numel(p) for p in params if p.requires_grad),
                               total=sum(full_numel(p) for p in params) + self.frozen_elsewhere())

    def num_parameters(self, trainable_only: bool = False) -> int:
        held = sum(full_numel(p) for p in self.parameters() if p.requires_grad or not trainable_only)
        return held + (0 if trainable_only else self.frozen_elsewhere())

    def adapter_state_dict(self) -> dict:
        """The method's tensors by name (without the "base." prefix), detached, as an adapter folder stores
        them (each module's saved_tensors(): a prefix folded, `prefix.prefix_keys` / `prefix.prefix_values`
        (L, G, P, hd)). Modules in extra_trainable are included in full (tok_embeddings.weight (V, d), ...)."""
        if self.trains_base:
            tensors = {name: p.detach() for name, p in self.named_parameters()}
        else:
            tensors = adapter_saved_tensors(self)
            extra = self._extra_names()
            tensors.update({name: p.detach() for name, p in self.named_parameters() if name in extra})
        return {name.removeprefix("base."): t for name, t in tensors.items()}

    # -- forward
    def forward(
        self,
        tokens: Optional[torch.Tensor] = None,         # (B, T) int64, real tokens only
        *,
        input_embeds: Optional[torch.Tensor] = None,   # (B, T, d), instead of tokens
        past_key_values=None,                          # the cache this wrapper returned (virtual tokens in front)
        start_pos: Optional[int] = None,               # position of the first real token, counting real tokens
        position_ids: Optional[torch.Tensor] = None,   # (B, T) (ChatGLM-6B (B, 2, T)): real tokens, as without P
        attention_mask: Optional[torch.Tensor] = None, # (B, S_past_real + T) or (B, T) over real tokens
        use_cache: bool = False,
        return_hidden: bool = False,                   # h_L (B, T, d) instead of logits (see base.head)
    ):
        """Same arguments and results as the base's forward; the P virtual tokens are added here."""
        P = self.num_virtual_tokens
        if P == 0:
            return self.base(tokens, input_embeds=input_embeds, past_key_values=past_key_values,
                             start_pos=start_pos, position_ids=position_ids, attention_mask=attention_mask,
                             use_cache=use_cache, return_hidden=return_hidden)
        if (tokens is None) == (input_embeds is None):
            raise ValueError("pass exactly one of tokens or input_embeds")
        given = tokens if tokens is not None else input_embeds
        B, T = given.shape[0], given.shape[1]
        first_call = past_key_values is None
        real_past_len = 0 if first_call else cache_length(past_key_values) - P

        prompt_in_front = self.soft_prompt_module is not None and first_call
        if position_ids is None and first_call and tokens is not None and self.prompt_position_ids is not None:
            # a family whose positions are not a count derives them from the real tokens, as the base would alone
            real_mask = attention_mask[:, -T:] if attention_mask is not None else None
            position_ids = self.prompt_position_ids(tokens, real_mask)                    # e.g. (B, 2, T)
        # Shift the caller's positions past the P virtual tokens (prefix: only where the family says so).
        if self.soft_prompt_module is not None or cache_prefix_shifts_positions(self.base):
            if position_ids is not None:
                position_ids = shift_position_ids(self.base, position_ids, P)            # (B, T) | (B, 2, T)
            elif start_pos is not None:
                start_pos = start_pos + P
        if attention_mask is not None and attention_mask.shape[1] == real_past_len + T:
            ones = attention_mask.new_ones(B, P)                                          # (B, P)
            attention_mask = torch.cat([ones, attention_mask], dim=1)                     # (B, P + S_real + T)
        # (a (B, T) mask with a past is left as it is: the model treats every past key as real)

        if self.prefix_module is not None and first_call:
            past_key_values = self.prefix_module.past_key_values(B)                       # per layer (B, G, P, hd)
        if prompt_in_front:
            embeds = input_embeds if input_embeds is not None else self.base.tok_embeddings(tokens)   # (B, T, d)
            input_embeds = self.soft_prompt_module.prepend_embeddings(embeds)            # (B, P + T, d)
            tokens = None
            if position_ids is not None or start_pos is not None:                         # prompt at 0..P-1
                if position_ids is None:
                    position_ids = torch.arange(start_pos, start_pos + T, device=given.device).expand(B, T)
                prompt_positions = front_position_ids(self.base, B, P, position_ids.device)
                position_ids = torch.cat([prompt_positions, position_ids], dim=-1)       # (B, [2,] P + T)
                start_pos = None

        out = self.base(tokens, input_embeds=input_embeds, past_key_values=past_key_values, start_pos=start_pos,
                        position_ids=position_ids, attention_mask=attention_mask, use_cache=use_cache,
                        return_hidden=return_hidden)
        if prompt_in_front:                                                               # drop the prompt's outputs
            if use_cache:
                return out[0][:, P:], out[1]
            return out[:, P:]
        return out

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """The base's head: h_L (..., d) -> logits (..., V) (forward(return_hidden=True) gives h_L)."""
        return self.base.head(h)

    def loss(self, tokens: torch.Tensor, labels: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
             reduction: str = "mean") -> torch.Tensor:
        """Next-token cross-entropy in float32 (minipeft/loss.py): logits[:, t] predicts labels[:, t+1],
        positions with label -100 are skipped, and the output layer runs only where labels count
        (label_only_loss; a soft prompt's P positions are already dropped by forward). tokens, labels (B, T)."""
        return label_only_loss(self, tokens, labels, attention_mask=attention_mask, reduction=reduction)
