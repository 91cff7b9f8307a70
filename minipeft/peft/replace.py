"""The one helper that swaps a sub-module for another by its dotted name (LoRA, adapters and LLaMA-Adapter
all install themselves this way), and the walk that finds every method's trainable parameters.

A method's modules declare what they train (torchtune's `adapter_params()` idea): any module with an
`adapter_params()` method returns {name relative to the module: Parameter}, and may define
`saved_tensors()` (what an adapter folder stores; default: the adapter params) and `lr_scales()` ({name:
learning-rate multiple} for params that do not train at the base rate: LoRA+'s B). Nothing else in the package
keeps a list of parameter names.
"""

from __future__ import annotations

from typing import Dict

import torch
import torch.nn as nn


def replace_module(root: nn.Module, name: str, new: nn.Module) -> None:
    """root's sub-module at dotted `name` (e.g. "layers.3.attention.wq") becomes `new`."""
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def adapter_parameters(root: nn.Module) -> Dict[str, nn.Parameter]:
    """Every parameter a method module declares (adapter_params()), under its full name in `root`."""
    found = {}
    for module_name, module in root.named_modules():
        if hasattr(module, "adapter_params"):
            for name, param in module.adapter_params().items():
                found[_join(module_name, name)] = param
    return found


def adapter_saved_tensors(root: nn.Module) -> Dict[str, torch.Tensor]:
    """What an adapter folder stores for each method module (saved_tensors(), else its adapter params),
    detached, under full names in `root`."""
    found = {}
    for module_name, module in root.named_modules():
        if hasattr(module, "adapter_params"):
            tensors = module.saved_tensors() if hasattr(module, "saved_tensors") else module.adapter_params()
            for name, tensor in tensors.items():
                found[_join(module_name, name)] = tensor.detach()
    return found


def adapter_lr_scales(root: nn.Module) -> Dict[str, float]:
    """{full name in `root`: learning-rate multiple} of the adapter params whose module asks for one (lr_scales())."""
    found = {}
    for module_name, module in root.named_modules():
        if hasattr(module, "adapter_params") and hasattr(module, "lr_scales"):
            for name, scale in module.lr_scales().items():
                found[_join(module_name, name)] = scale
    return found
