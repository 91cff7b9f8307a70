"""A PEFT method that lives outside the package, as a user's plugin would (tests/test_plugins.py loads it into the
tools with --plugin and MINIPEFT_PLUGINS). No package file knows it.

"output_scale": every attention.wo output is multiplied by a trainable per-feature scale s (init `init`, 1 by
default, so the model starts as the base):  y = s * (W x),  s (d,).  It has no tuned learning rate, so the
tools ask for --lr.
"""

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from minipeft.peft import Flag, PeftConfigError, PeftMethod, register
from minipeft.peft.replace import replace_module


@dataclass
class OutputScaleConfig:
    init: float = 1.0
    method = "output_scale"

    def __post_init__(self):
        if not self.init > 0:
            raise PeftConfigError(f"OutputScaleConfig.init must be > 0, got {self.init!r}")


class ScaledLinear(nn.Linear):
    def adapter_params(self):
        return {"scale": self.scale}

    def forward(self, x):
        return F.linear(x, self.weight, self.bias) * self.scale.to(x.dtype)


def install(model, config, **_):
    for name, module in list(model.named_modules()):
        if name.endswith("attention.wo"):
            scaled = ScaledLinear(module.in_features, module.out_features, bias=module.bias is not None, device="meta")
            scaled.weight, scaled.bias = module.weight, module.bias
            scaled.scale = nn.Parameter(torch.full((module.out_features,), float(config.init)))
            replace_module(model, name, scaled)
    return {}


register(PeftMethod("output_scale", OutputScaleConfig, install,
                    flags=(Flag("--scale-init", "init", "initial value of the output scale", float),)))
