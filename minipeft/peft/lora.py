"""LoRA: a frozen linear map plus a trainable low-rank update (Hu et al., 2021).

Shapes: x (..., d_in), W0 (d_out, d_in) frozen, A (r, d_in), B (d_out, r), r << min(d_in, d_out).

    y = x W0^T + s * dropout(x) A^T B^T,        s = alpha / r          (..., d_out)

which is the linear map with weight W0 + Delta W, Delta W = s * B A (d_out, d_in), when dropout is off.

Init: A is Kaiming-uniform (a = sqrt(5), the same rule nn.Linear uses for its own weight), B is zero, so
Delta W = 0 and the model starts exactly as the base model. At the first step the gradient of A is
exactly zero (it is multiplied by B = 0) and only B moves.

Trainable parameters per replaced linear: r * (d_in + d_out). For LLaMA-7B (d = 4096, 32 layers), r = 8
on wq and wv: 32 * 2 * 8 * (4096 + 4096) = 4,194,304.

`merge()` folds Delta W into W0 (inference at the base model's cost); `unmerge()` subtracts it again.
LoRALinear subclasses nn.Linear, so the frozen weight keeps its name `weight` and a checkpoint of the base
loads into a LoRA model unchanged.

Three variants, as LoRAConfig options (lessons/11_beyond_the_note):
- rsLoRA (`rslora=True`, Kalajdzievski 2023): s = alpha / sqrt(r). With alpha / r the update's size shrinks
  like 1/sqrt(r) as r grows at a fixed rate (the paper's "rank-stabilised" analysis), so large ranks learn slowly.
- PiSSA (`init="pissa"`, Meng et al. 2024): W0 = U diag(S) V^T (SVD, U (d_out, k), V^T (k, d_in)). A and B start
  as the top-r principal part and W0 is replaced by the residual, so W0' + s B A = W0 at the start:
      A = diag(sqrt(S_r / s)) V^T_r   (r, d_in)      B = U_r diag(sqrt(S_r / s))   (d_out, r)
      W0' = W0 - s B A                (d_out, d_in), the frozen weight from then on
  exactly HF peft's init_lora_weights="pissa" (the SVD in float32, or float64 for a float64 base). The base
  weights of the targets CHANGE at install (to the residual): the logits at init equal the base's to rounding
  (~1e-7 relative), not bit for bit, and afterwards the residual stays frozen (bit-identical over training).
  An adapter folder holds A and B only: loading recomputes the residual from the original base (the top-r part
  of W0 does not depend on the SVD's signs, so the same residual comes back; on one machine, the same bits).
- LoRA+ (`lora_plus_ratio`, Hayou et al. 2024): B trains at lora_plus_ratio x the learning rate, A at 1x (the
  paper suggests 16). The module declares it with lr_scales(); PeftModel.param_groups turns it into optimizer
  groups, so the training loop knows nothing of LoRA.
"""

from __future__ import annotations

import math
from typing import Dict

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..distributed import is_partitioned
from .config import LORA_TARGETS, LoRAConfig, PeftConfigError  # noqa: F401  (LORA_TARGETS: the target names)
from .replace import replace_module


class LoRALinear(nn.Linear):
    """nn.Linear (frozen W0, optional bias) + s * B A on a dropout of the input. See the module docstring."""

    def __init__(self, in_features: int, out_features: int, rank: int, alpha: float, dropout: float = 0.0,
                 bias: bool = False, device=None, dtype=None, rslora: bool = False, lora_plus_ratio: float = 1.0):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._add_lora(rank, alpha, dropout, rslora, lora_plus_ratio)

    def _add_lora(self, rank: int, alpha: float, dropout: float, rslora: bool = False,
                  lora_plus_ratio: float = 1.0) -> None:
        self.rank = rank
        self.alpha = alpha
        self.scaling = alpha / (math.sqrt(rank) if rslora else rank)          # s (rsLoRA: alpha / sqrt(r))
        self.lora_plus_ratio = lora_plus_ratio
        device, dtype = self.weight.device, self.weight.dtype
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, device=device, dtype=dtype))   # (r, d_in)
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, device=device, dtype=dtype))  # (d_out, r)
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False

    @classmethod
    def from_linear(cls, linear: nn.Linear, rank: int, alpha: float, dropout: float = 0.0, rslora: bool = False,
                    lora_plus_ratio: float = 1.0) -> "LoRALinear":
        """Wrap an existing nn.Linear: its weight (and bias) Parameter objects are reused, not copied."""
        lora = cls(linear.in_features, linear.out_features, rank, alpha, dropout,
                   bias=linear.bias is not None, device="meta")          # no memory for a throwaway weight
        lora.weight = linear.weight
        lora.bias = linear.bias
        lora._add_lora(rank, alpha, dropout, rslora, lora_plus_ratio)      # A, B on the weight's device/dtype
        return lora

    def adapter_params(self) -> dict:
        """What LoRA trains in this module: A (r, d_in) and B (d_out, r)."""
        return {"lora_A": self.lora_A, "lora_B": self.lora_B}

    def lr_scales(self) -> dict:
        """LoRA+: the learning-rate multiple of each adapter param that does not train at 1x (B's)."""
        return {"lora_B": self.lora_plus_ratio} if self.lora_plus_ratio != 1.0 else {}

    @torch.no_grad()
    def init_pissa(self) -> None:
        """PiSSA (module docstring): A, B <- the top-r singular triplets of W0 split evenly, W0 <- W0 - s B A."""
        weight = self.weight                                                 # (d_out, d_in)
        if weight.is_meta:                                                   # shapes only (save_load's check)
            return
        work = torch.promote_types(weight.dtype, torch.float32)
        U, S, Vh = torch.linalg.svd(weight.to(work), full_matrices=False)    # W0 = U diag(S) Vh
        root = torch.diag(torch.sqrt(S[:self.rank] / self.scaling))          # (r, r)
        A = root @ Vh[:self.rank]                                            # (r, d_in)
        B = U[:, :self.rank] @ root                                          # (d_out, r)
        self.lora_A.copy_(A)
        self.lora_B.copy_(B)
        weight.copy_((weight.to(work) - self.scaling * B @ A).to(weight.dtype))

    def delta_weight(self) -> torch.Tensor:
        """Delta W = s * B A, (d_out, d_in), computed in float32 and returned in the weight's dtype."""
        delta = self.scaling * (self.lora_B.float() @ self.lora_A.float())   # (d_out, d_in)
        return delta.to(self.weight.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)                              # (..., d_out)
        if self.merged:
            return y
        lora_in = self.lora_dropout(x).to(self.lora_A.dtype)                 # (..., d_in)
        update = F.linear(F.linear(lora_in, self.lora_A), self.lora_B)       # (..., r) -> (..., d_out)
        return y + (self.scaling * update).to(y.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        """W0 <- W0 + s B A; the forward then skips the LoRA path."""
        if not self.merged:
            self.weight.add_(self.delta_weight())
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """W0 <- W0 - s B A (restores W0 up to rounding)."""
        if self.merged:
            self.weight.sub_(self.delta_weight())
            self.merged = False

    def to_linear(self) -> nn.Linear:
        """A plain nn.Linear whose weight is W0 + Delta W (the LoRA parameters are dropped)."""
        with torch.no_grad():
            weight = self.weight if self.merged else self.weight + self.delta_weight()
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        linear.weight = nn.Parameter(weight.detach(), requires_grad=self.weight.requires_grad)
        if self.bias is not None:
            linear.bias = self.bias
        return linear

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}, alpha={self.alpha}, merged={self.merged}"


def choose_targets(model: nn.Module, config, flag: str):
    """[(name, nn.Linear)] of `model` whose last name component is in config.targets (plain Linear modules only,
    not already a method's); PeftConfigError naming the config field and `flag` for a target the model lacks."""
    targets = config.targets
    chosen = [(name, module) for name, module in model.named_modules()
              if isinstance(module, nn.Linear) and not hasattr(module, "adapter_params")
              and name.rsplit(".", 1)[-1] in targets]
    found = {name.rsplit(".", 1)[-1] for name, _ in chosen}
    missing = [t for t in targets if t not in found]
    if missing:
        names = sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, nn.Linear)}
                       & set(LORA_TARGETS))
        raise PeftConfigError(f"{type(config).__name__}.targets ({flag}): {missing} match no nn.Linear module of "
                              f"the model; its projections are {names}")
    return chosen


def install_lora(model: nn.Module, config, module_class=None) -> Dict[str, LoRALinear]:
    """Replace every nn.Linear of `model` whose last name component is in config.targets by a LoRALinear
    (or `module_class`, a subclass: DoRA's) reusing its weight, PiSSA-initialised if config.init says so.
    Returns {module name: module}. Raises PeftConfigError for a target the model does not have or a rank larger
    than a layer's width (the config checked its own fields)."""
    module_class = module_class or LoRALinear
    chosen = choose_targets(model, config, "--lora-targets")
    for name, linear in chosen:
        limit = min(linear.in_features, linear.out_features)
        if config.rank > limit:
            raise PeftConfigError(f"{type(config).__name__}.rank {config.rank} is larger than min(d_in, d_out) = "
                                  f"{limit} of {name} ({linear.in_features} -> {linear.out_features})")
        if config.init == "pissa" and is_partitioned(linear.weight):
            raise PeftConfigError(f"{type(config).__name__}.init 'pissa' (--lora-init) needs the whole weight of "
                                  f"{name} for its SVD; a ZeRO-3 partitioned base has only a shard (use ZeRO-2)")

    installed = {}
    for name, linear in chosen:
        lora = module_class.from_linear(linear, config.rank, config.alpha, config.dropout, rslora=config.rslora,
                                        lora_plus_ratio=config.lora_plus_ratio)
        if config.init == "pissa":
            lora.init_pissa()
        replace_module(model, name, lora)
        installed[name] = lora
    return installed


def install(model: nn.Module, config: LoRAConfig, **_) -> dict:
    """The registry's entry point: LoRA replaces sub-modules, so nothing is attached beside the base."""
    install_lora(model, config)
    return {}
