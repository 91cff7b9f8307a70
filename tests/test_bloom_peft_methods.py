"""Every PEFT method on BLOOM: zero-init exactness, a frozen base bit-identical after an optimizer step,
save/reload, cached generation == uncached, the fingerprint's family, and LLaMA-Adapter's prompt term with
no position bias checked against a float64 computation written out here."""

import copy
import math

import pytest
import torch

from minipeft import ModelConfig, build_model
from minipeft.generate import generate
from minipeft.peft import (AdapterConfig, FullConfig, LlamaAdapterConfig, LoRAConfig, PeftConfigError,
                           PrefixConfig, PromptConfig, apply_peft, load_adapter, save_adapter)
from helpers_bloom import left_padded
from helpers_generate import greedy_without_cache  # noqa: E402

CFG = ModelConfig(family="bloom", dim=48, n_layers=3, n_heads=6, vocab_size=120, norm_eps=1e-5)
CONFIGS = {
    "full": FullConfig(),
    "lora": LoRAConfig(rank=4, alpha=8, targets=("wqkv", "wo", "w1", "w2")),
    "prompt": PromptConfig(prompt_len=4, init="vocab"),
    "prefix": PrefixConfig(prefix_len=3, reparam_hidden=16),
    "adapter": AdapterConfig(bottleneck=8),
    "llama_adapter": LlamaAdapterConfig(prompt_len=4, adapter_layers=2),
}
ZERO_INIT = ("full", "lora", "adapter", "llama_adapter")     # identical to the base before training


def base_model(seed=0):
    torch.manual_seed(seed)
    model = build_model(CFG).eval()
    with torch.no_grad():                      # non-trivial LayerNorms and biases
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    return model


def wrapped(method, seed=0):
    model = apply_peft(base_model(seed), CONFIGS[method], generator=torch.Generator().manual_seed(1)).eval()
    return model


def train_one_step(model, tokens, mask):
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    labels = tokens.masked_fill(mask == 0, -100)
    model.loss(tokens, labels, attention_mask=mask).backward()
    optimizer.step()
    return model.eval()


@pytest.mark.parametrize("method", ZERO_INIT)
def test_zero_init_is_the_base_model(method):
    tokens, mask = left_padded()
    with torch.no_grad():
        assert torch.equal(wrapped(method)(tokens, attention_mask=mask), base_model()(tokens, attention_mask=mask))


@pytest.mark.parametrize("method", sorted(CONFIGS))
def test_frozen_base_is_bit_identical_after_a_step(method):
    model = wrapped(method)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train_one_step(model, *left_padded())
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert changed and changed <= trainable
    if method != "full":
        assert not any(n.startswith("base.") and n in trainable and not _is_method_param(n) for n in trainable)


def _is_method_param(name):
    return any(part in name for part in ("lora_", "adapter", "prefix", "soft_prompt"))


@pytest.mark.parametrize("method", sorted(CONFIGS))
def test_save_reload_and_cached_generation(method, tmp_path):
    tokens, mask = left_padded()
    model = train_one_step(wrapped(method), tokens, mask)
    if method == "llama_adapter":                 # make the gate matter
        with torch.no_grad():
            for block in model.base.layers[-2:]:
                block.attention.adapter_gate.fill_(0.5)
    save_adapter(model, tmp_path / "adapter")
    reloaded = load_adapter(base_model(), tmp_path / "adapter").eval()
    with torch.no_grad():
        expected = model(tokens, attention_mask=mask)
        got = reloaded(tokens, attention_mask=mask)
    assert (got - expected)[mask.bool()].abs().max() < 1e-6
    # generation with the cache == recomputing everything each step
    prompt = [5, 17, 33, 8]
    cached = generate(reloaded, [prompt], max_new_tokens=6)[0]
    assert cached == greedy_without_cache(reloaded, prompt, 6)


def test_an_adapter_refuses_a_base_of_another_family(tmp_path):
    model = wrapped("lora")
    save_adapter(model, tmp_path / "adapter")
    llama = build_model(ModelConfig(dim=48, n_layers=3, n_heads=6, vocab_size=120, multiple_of=16))
    with pytest.raises(PeftConfigError, match="family is 'bloom'"):
        load_adapter(llama, tmp_path / "adapter")


def test_lora_targets_are_the_fused_and_the_mlp_linears():
    model = wrapped("lora")
    names = {n.rsplit(".", 1)[0] for n, p in model.named_parameters() if p.requires_grad}
    assert names == {f"base.layers.{i}.{m}" for i in range(3) for m in
                     ("attention.wqkv", "attention.wo", "feed_forward.w1", "feed_forward.w2")}
    d, f = 48, 192
    assert model.report.trainable == 3 * 4 * ((d + 3 * d) + (d + d) + (d + f) + (f + d))
    with pytest.raises(PeftConfigError, match=r"\['wq'\] match no nn.Linear"):
        apply_peft(base_model(), LoRAConfig(targets=("wq",)))


def test_llama_adapter_prompt_keys_carry_no_position_bias():
    """One adapted layer in float64: out = softmax(q k^T/sqrt(hd) + ALiBi + causal) v
    + gate_h softmax(q k_p^T / sqrt(hd)) v_p, with k_p, v_p the k and v slices of wqkv(prompt), no bias term."""
    model = wrapped("llama_adapter").double()
    attention = model.base.layers[-1].attention
    with torch.no_grad():
        attention.adapter_gate.copy_(torch.linspace(-0.8, 0.9, 6, dtype=torch.float64))
        torch.manual_seed(5)
        x = torch.randn(1, 5, 48, dtype=torch.float64)
        bias = model.base.alibi_bias(1, 5, 0, None, "cpu").double()                # (1, H, 5, 5)
        got, _ = attention(x, None, bias)                                         # no rotation: ALiBi
        H, hd = 6, 8
        W, b = attention.wqkv.weight, attention.wqkv.bias
        fused = (x @ W.T + b).view(1, 5, H, 3, hd)
        q, k, v = (fused[:, :, :, i].transpose(1, 2) for i in range(3))            # (1, H, 5, hd)
        i, j = torch.arange(5)[:, None], torch.arange(5)[None, :]
        slopes = torch.tensor([2.0 ** -(8 * h / 4) for h in (1, 2, 3, 4)] + [2.0 ** -1, 2.0 ** -3],
                              dtype=torch.float64)
        scores = q @ k.transpose(-1, -2) / math.sqrt(hd) + slopes[:, None, None] * (j - i)
        real = torch.softmax(scores.masked_fill(j > i, -math.inf), -1) @ v
        pf = (attention.adapter_prompt @ W.T + b).view(4, H, 3, hd)
        k_p, v_p = pf[:, :, 1].transpose(0, 1), pf[:, :, 2].transpose(0, 1)       # (H, K, hd)
        prompt = torch.softmax(q @ k_p.transpose(-1, -2) / math.sqrt(hd), -1) @ v_p
        gate = torch.tanh(attention.adapter_gate)[None, :, None, None]
        out = (real + gate * prompt).transpose(1, 2).reshape(1, 5, 48)
        expected = out @ attention.wo.weight.T + attention.wo.bias
    assert (got - expected).abs().max().item() < 1e-7      # the prompt term is computed in float32 by design
    with torch.no_grad():                                   # and the term is there: without it, far off
        assert (got - (real.transpose(1, 2).reshape(1, 5, 48) @ attention.wo.weight.T + attention.wo.bias)).abs().max() > 1e-2


@pytest.mark.parametrize("method", sorted(CONFIGS))
def test_trainable_counts_equal_the_closed_forms(method):
    from minipeft.peft import closed_form_trainable
    assert wrapped(method).report.trainable == closed_form_trainable(CFG, CONFIGS[method])
