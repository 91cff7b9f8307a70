"""Houlsby bottleneck adapters: the module's math against a float64 reference, placement after wo and w2,
the identity at init, first-step gradients, closed-form counts at LLaMA-7B shape, config errors."""

import math

import pytest
import torch

from minipeft.config import ModelConfig
from minipeft.model import Transformer
from minipeft.peft import AdapterConfig, BottleneckAdapter, LinearWithAdapter, PeftConfigError, apply_peft


def gelu64(x):
    return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))       # exact GELU, written out


def test_bottleneck_adapter_matches_float64_reference():
    torch.manual_seed(0)
    adapter = BottleneckAdapter(dim=32, bottleneck=6)
    assert torch.equal(adapter.up.weight, torch.zeros(32, 6)) and torch.equal(adapter.up.bias, torch.zeros(32))
    torch.nn.init.normal_(adapter.up.weight)
    torch.nn.init.normal_(adapter.up.bias)
    h = torch.randn(2, 5, 32)
    Wd, bd, Wu, bu = (t.detach().double() for t in (adapter.down.weight, adapter.down.bias,
                                                    adapter.up.weight, adapter.up.bias))
    expected = h.double() + gelu64(h.double() @ Wd.T + bd) @ Wu.T + bu   # h + W_up act(W_down h + b) + b
    assert torch.allclose(adapter(h).double(), expected, rtol=1e-5, atol=1e-5)
    assert sum(p.numel() for p in adapter.parameters()) == 2 * 32 * 6 + 32 + 6


def test_linear_with_adapter_is_adapter_after_linear():
    torch.manual_seed(0)
    linear = torch.nn.Linear(20, 12, bias=False)
    module = LinearWithAdapter.from_linear(linear, bottleneck=3)
    assert module.weight is linear.weight
    torch.nn.init.normal_(module.adapter.up.weight)
    x = torch.randn(4, 20)
    y = x.double() @ linear.weight.detach().double().T                                # the linear's output
    a = module.adapter
    expected = y + gelu64(y @ a.down.weight.detach().double().T + a.down.bias.detach().double()) \
        @ a.up.weight.detach().double().T + a.up.bias.detach().double()
    assert torch.allclose(module(x).double(), expected, rtol=1e-5, atol=1e-5)


def test_placement_after_wo_and_w2_keeps_weight_names(small_model):
    base_keys = set(small_model.state_dict())
    model = apply_peft(small_model, AdapterConfig(bottleneck=8))
    replaced = sorted(n for n, m in model.base.named_modules() if isinstance(m, LinearWithAdapter))
    assert replaced == ["layers.0.attention.wo", "layers.0.feed_forward.w2",
                        "layers.1.attention.wo", "layers.1.feed_forward.w2"]
    new_keys = set(model.base.state_dict())
    assert base_keys <= new_keys
    assert all(".adapter." in k for k in new_keys - base_keys)


def test_zero_init_gives_exactly_the_base_logits(small_model):
    tokens = torch.randint(0, small_model.config.vocab_size, (2, 7), generator=torch.Generator().manual_seed(0))
    expected = small_model(tokens)
    model = apply_peft(small_model, AdapterConfig(bottleneck=8))
    assert torch.equal(model(tokens), expected)


def test_first_step_gradient_reaches_only_the_up_projection(small_model):
    tokens = torch.randint(0, small_model.config.vocab_size, (2, 7), generator=torch.Generator().manual_seed(0))
    model = apply_peft(small_model, AdapterConfig(bottleneck=8))
    model.loss(tokens, tokens).backward()
    for name, p in model.named_parameters():
        if ".adapter.down." in name:
            assert torch.equal(p.grad, torch.zeros_like(p)), name        # multiplied by W_up = 0
        elif ".adapter.up." in name:
            assert p.grad.abs().max() > 0, name
        else:
            assert p.grad is None and not p.requires_grad, name


def test_adapter_count_at_llama_7b_shape():
    with torch.device("meta"):
        base = Transformer(ModelConfig.from_name("llama-7b"))
    model = apply_peft(base, AdapterConfig(bottleneck=64))
    n_layers, d, m = 32, 4096, 64
    formula = n_layers * 2 * (2 * d * m + d + m)     # 2 adapters per layer, each W_down, b_down, W_up, b_up
    assert formula == 33_820_672
    assert model.report.trainable == formula
    assert model.report.total == 6_738_415_616 + formula


@pytest.mark.parametrize("bottleneck", [0, -3, 2.5])
def test_bad_bottleneck_is_a_clear_error(small_model, bottleneck):
    with pytest.raises(PeftConfigError, match="bottleneck must be a positive integer"):
        apply_peft(small_model, AdapterConfig(bottleneck=bottleneck))
