"""LoRA: the module's math against a float64 reference, the zero-init invariant, first-step gradients,
merge/unmerge, closed-form parameter counts at LLaMA-7B shape, config errors, merged checkpoints."""

import pytest
import torch

from minipeft.config import ModelConfig
from minipeft.model import Transformer
from minipeft.peft import LoRAConfig, LoRALinear, PeftConfigError, apply_peft, merge_lora
from minipeft.peft.lora import install_lora

ALL_TARGETS = ("wq", "wk", "wv", "wo", "w1", "w2", "w3", "output")


def randomize_lora(model, seed=1, scale=0.3):
    """Give every lora_B random values (it starts at zero), as after some training."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * scale)


def relative_error(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def test_lora_linear_matches_float64_reference():
    torch.manual_seed(0)
    base = torch.nn.Linear(24, 40, bias=True)
    lora = LoRALinear.from_linear(base, rank=4, alpha=12.0)
    assert lora.weight is base.weight and lora.bias is base.bias          # reused, not copied
    assert lora.lora_A.shape == (4, 24) and lora.lora_B.shape == (40, 4)
    assert lora.scaling == 3.0
    torch.nn.init.normal_(lora.lora_B)
    x = torch.randn(3, 5, 24)
    W0, b, A, B = (t.detach().double() for t in (base.weight, base.bias, lora.lora_A, lora.lora_B))
    expected = x.double() @ W0.T + b + 3.0 * (x.double() @ A.T) @ B.T     # y = x W0^T + b + s x A^T B^T
    assert torch.allclose(lora(x).double(), expected, rtol=1e-5, atol=1e-5)
    # parameter count r * (d_in + d_out)
    assert sum(p.numel() for n, p in lora.named_parameters() if "lora_" in n) == 4 * (24 + 40)


def test_lora_a_init_is_kaiming_uniform_like_nn_linear():
    torch.manual_seed(0)
    lora = LoRALinear.from_linear(torch.nn.Linear(300, 200, bias=False), rank=64, alpha=16)
    bound = 1 / 300 ** 0.5                       # kaiming_uniform(a=sqrt(5)): bound = sqrt(6 / ((1 + 5) fan_in))
    assert lora.lora_A.abs().max() <= bound
    assert lora.lora_A.abs().max() > 0.95 * bound
    assert torch.equal(lora.lora_B, torch.zeros(200, 64))


def test_zero_init_gives_exactly_the_base_logits(small_model):
    tokens = torch.randint(0, small_model.config.vocab_size, (2, 7), generator=torch.Generator().manual_seed(0))
    expected = small_model(tokens)
    model = apply_peft(small_model, LoRAConfig(rank=4, alpha=8, targets=ALL_TARGETS))
    assert torch.equal(model(tokens), expected)


def test_first_step_gradient_reaches_only_lora_B(small_model):
    tokens = torch.randint(0, small_model.config.vocab_size, (2, 7), generator=torch.Generator().manual_seed(0))
    model = apply_peft(small_model, LoRAConfig(rank=4, alpha=8, targets=("wq", "wv", "w2")))
    model.loss(tokens, tokens).backward()
    for name, p in model.named_parameters():
        if name.endswith("lora_A"):
            assert torch.equal(p.grad, torch.zeros_like(p)), name              # multiplied by B = 0
        elif name.endswith("lora_B"):
            assert p.grad.abs().max() > 0, name
        else:
            assert p.grad is None and not p.requires_grad, name


def test_merge_equals_unmerged_and_unmerge_restores(small_model):
    tokens = torch.randint(0, small_model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    model = apply_peft(small_model, LoRAConfig(rank=4, alpha=8, targets=("wq", "wk", "wv", "w1")))
    randomize_lora(model)
    originals = {n: m.weight.detach().clone() for n, m in model.base.named_modules() if isinstance(m, LoRALinear)}
    unmerged = model(tokens)
    for m in model.modules():
        if isinstance(m, LoRALinear):
            m.merge()
    for name, m in model.base.named_modules():
        if isinstance(m, LoRALinear):
            expected = originals[name].double() + m.scaling * m.lora_B.double() @ m.lora_A.double()
            assert torch.allclose(m.weight.double(), expected, atol=1e-6), name
    merged = model(tokens)
    assert relative_error(merged, unmerged) < 1e-5
    for name, m in model.base.named_modules():
        if isinstance(m, LoRALinear):
            m.unmerge()
            assert not m.merged
            assert torch.allclose(m.weight, originals[name], atol=1e-6, rtol=0), name
    assert relative_error(model(tokens), unmerged) < 1e-5


def test_lora_count_at_llama_7b_shape():
    with torch.device("meta"):
        base = Transformer(ModelConfig.from_name("llama-7b"))
    model = apply_peft(base, LoRAConfig(rank=8, alpha=16, targets=("wq", "wv")))
    n_layers, d, r = 32, 4096, 8
    formula = n_layers * 2 * r * (d + d)          # 2 targets per layer, each r * (d_in + d_out)
    assert formula == 4_194_304
    assert model.report.trainable == formula
    assert model.report.total == 6_738_415_616 + formula
    assert str(model.report) == "trainable 4,194,304 / 6,742,609,920 (0.062%)"


def test_lora_count_with_gqa_and_all_targets():
    cfg = ModelConfig(dim=64, n_layers=3, n_heads=4, n_kv_heads=2, vocab_size=97, multiple_of=16)
    with torch.device("meta"):
        base = Transformer(cfg)
    model = apply_peft(base, LoRAConfig(rank=2, targets=ALL_TARGETS))
    d, kv, f, V, r = 64, cfg.kv_dim, cfg.ffn_hidden_dim, 97, 2
    per_layer = r * ((d + d) + 2 * (d + kv) + (d + d) + 3 * (d + f))   # wq, wk+wv, wo, w1+w2+w3
    assert model.report.trainable == 3 * per_layer + r * (d + V)       # + output


@pytest.mark.parametrize("fields, message", [
    (dict(targets=("wq", "q_proj")), "unknown target"),
    (dict(rank=0), "rank must be a positive integer"),
    (dict(rank=-2), "rank must be a positive integer"),
    (dict(rank=33, targets=("wk",)), "larger than min"),        # wk: 64 -> kv_dim 32
    (dict(dropout=1.0), "dropout"),
    (dict(targets=()), "targets is empty"),
])
def test_bad_lora_configs_are_clear_errors(small_model, fields, message):
    with pytest.raises(PeftConfigError, match=message):       # refused by the config itself, or when installed
        apply_peft(small_model, LoRAConfig(**fields))


def test_target_that_matches_nothing(small_model):
    with pytest.raises(PeftConfigError, match=r"\['w1'\] match no nn.Linear"):
        install_lora(small_model.layers[0].attention, LoRAConfig(targets=("wq", "w1")))


def test_merge_lora_writes_a_plain_checkpoint(small_model, tmp_path):
    from minipeft.checkpoint import load_model, save_model
    tokens = torch.randint(0, small_model.config.vocab_size, (2, 6), generator=torch.Generator().manual_seed(0))
    plain_keys = set(small_model.state_dict())
    model = apply_peft(small_model, LoRAConfig(rank=4, alpha=8, targets=("wq", "wv", "output")))
    randomize_lora(model)
    with torch.no_grad():
        with_lora = model(tokens)
    merged = merge_lora(model)
    assert isinstance(merged, Transformer)
    assert not any(isinstance(m, LoRALinear) for m in merged.modules())
    assert set(merged.state_dict()) == plain_keys
    save_model(merged, merged.config, tmp_path / "merged")
    reloaded = load_model(tmp_path / "merged")
    with torch.no_grad():
        assert relative_error(reloaded(tokens), with_lora) < 1e-5


def test_merge_lora_refuses_other_methods(small_model):
    from minipeft.peft import AdapterConfig
    with pytest.raises(PeftConfigError, match="LoRA"):
        merge_lora(apply_peft(small_model, AdapterConfig(bottleneck=4)))
