"""LLaMA-Adapter (GatedAdapterPrompt): zero-gate exactness, first-step gradients, top-L placement, the
separate softmax against a float64 computation written here, closed-form counts, bad input and parity with
HF peft's adaption prompt."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from helpers_peft import assert_logits_close, rope_f64, tiny_hf_pair
from minipeft.config import ModelConfig
from minipeft.model import Attention, Transformer, rope_cos_sin
from minipeft.peft import LlamaAdapterConfig, PeftConfigError, apply_peft
from minipeft.peft.llama_adapter import GatedAdapterPrompt, install_llama_adapter


def three_layer_cfg() -> ModelConfig:
    return ModelConfig(dim=64, n_layers=3, n_heads=4, n_kv_heads=2, vocab_size=97, multiple_of=16,
                       norm_eps=1e-5, max_seq_len=64)


def make_base(seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(three_layer_cfg()).eval()
    with torch.no_grad():                                  # sharper attention than the 0.02 init
        for block in model.layers:
            block.attention.wq.weight.mul_(5)
            block.attention.wk.weight.mul_(5)
    return model


@pytest.mark.parametrize("gate", ["tanh", "plain"])
def test_zero_gate_gives_exactly_the_base_logits_with_and_without_cache(gate):
    base = make_base()
    adapted = copy.deepcopy(base)
    install_llama_adapter(adapted, LlamaAdapterConfig(prompt_len=5, adapter_layers=2, gate=gate))
    tokens = torch.randint(0, 97, (2, 7))
    with torch.no_grad():
        assert torch.equal(adapted(tokens), base(tokens))
        base_logits, base_cache = base(tokens[:, :4], use_cache=True)
        logits, cache = adapted(tokens[:, :4], use_cache=True)
        assert torch.equal(logits, base_logits)
        for (k, v), (base_k, base_v) in zip(cache, base_cache):   # the prompt never enters the cache
            assert k.shape == base_k.shape == (2, 2, 4, 16) and torch.equal(k, base_k) and torch.equal(v, base_v)
        assert torch.equal(adapted(tokens[:, 4:], past_key_values=cache), base(tokens[:, 4:], past_key_values=base_cache))


@pytest.mark.parametrize("gate", ["tanh", "plain"])
def test_first_step_gradient_reaches_only_the_gate(gate):
    model = apply_peft(make_base(), LlamaAdapterConfig(prompt_len=5, adapter_layers=2, gate=gate))
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trainable == sorted(f"base.layers.{i}.attention.{w}" for i in (1, 2)
                               for w in ("adapter_prompt", "adapter_gate"))
    tokens = torch.randint(0, 97, (2, 6))
    logits = model(tokens)
    F.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten()).backward()
    for i in (1, 2):
        attention = model.base.layers[i].attention
        # d tanh(g)/dg = 1 at g = 0, so the gate learns; the prompt's gradient is multiplied by tanh(0) = 0
        assert attention.adapter_gate.grad is not None and torch.all(attention.adapter_gate.grad != 0)
        assert attention.adapter_prompt.grad is not None
        assert torch.count_nonzero(attention.adapter_prompt.grad) == 0
    for name, p in model.named_parameters():
        if not p.requires_grad:
            assert p.grad is None, name


def test_only_the_top_layers_change():
    base = make_base()
    adapted = copy.deepcopy(base)
    originals = [(b.attention.wq, b.attention.wk, b.attention.wv, b.attention.wo) for b in adapted.layers]
    names = install_llama_adapter(adapted, LlamaAdapterConfig(prompt_len=4, adapter_layers=2))
    assert names == [f"layers.{i}.attention.{w}" for i in (1, 2) for w in ("adapter_prompt", "adapter_gate")]
    assert type(adapted.layers[0].attention) is Attention
    for i in (1, 2):
        attention = adapted.layers[i].attention
        assert isinstance(attention, GatedAdapterPrompt)
        assert (attention.wq, attention.wk, attention.wv, attention.wo) == originals[i]    # the same objects
        assert attention.adapter_prompt.shape == (4, 64) and attention.adapter_gate.shape == (4,)
        assert torch.count_nonzero(attention.adapter_gate) == 0
    assert set(adapted.state_dict()) == set(base.state_dict()) | set(names)
    assert LlamaAdapterConfig().adapter_layers is None
    every_layer = copy.deepcopy(base)
    assert len(install_llama_adapter(every_layer, LlamaAdapterConfig())) == 2 * 3     # min(30, n_layers)

    # with open gates, layer 0's output is still the base's, the logits are not
    with torch.no_grad():
        for i in (1, 2):
            adapted.layers[i].attention.adapter_gate.fill_(0.5)
    seen = {}
    adapted.layers[0].register_forward_hook(lambda m, inp, out: seen.__setitem__("adapted", out[0]))
    base.layers[0].register_forward_hook(lambda m, inp, out: seen.__setitem__("base", out[0]))
    tokens = torch.randint(0, 97, (1, 6))
    with torch.no_grad():
        differ = (adapted(tokens) - base(tokens)).abs().max()
    assert torch.equal(seen["adapted"], seen["base"]) and differ > 1e-3


def reference_attention_f64(attention, x, gate_values, positions, theta, joint_softmax=False):
    """One adapted layer in float64 from the raw weights. Separate softmax (the method) or, for contrast,
    one softmax over [prompt keys ; real keys] with no gate."""
    H, G, hd = attention.n_heads, attention.n_kv_heads, attention.head_dim
    B, T, _ = x.shape
    wq, wk, wv, wo = (m.weight.detach().double() for m in (attention.wq, attention.wk, attention.wv, attention.wo))
    prompt = attention.adapter_prompt.detach().double()                          # (K, d)
    K = prompt.shape[0]
    q = rope_f64((x @ wq.T).view(B, T, H, hd).transpose(1, 2), positions, theta)    # (B, H, T, hd)
    k = rope_f64((x @ wk.T).view(B, T, G, hd).transpose(1, 2), positions, theta)    # (B, G, T, hd)
    v = (x @ wv.T).view(B, T, G, hd).transpose(1, 2)
    k, v = k.repeat_interleave(H // G, 1), v.repeat_interleave(H // G, 1)          # (B, H, T, hd)
    prompt_k = (prompt @ wk.T).view(K, G, hd).transpose(0, 1).repeat_interleave(H // G, 0)   # (H, K, hd)
    prompt_v = (prompt @ wv.T).view(K, G, hd).transpose(0, 1).repeat_interleave(H // G, 0)
    causal = torch.tril(torch.ones(T, T, dtype=torch.bool))
    scores = (q @ k.transpose(-1, -2) / math.sqrt(hd)).masked_fill(~causal, float("-inf"))   # (B, H, T, T)
    prompt_scores = q @ prompt_k.transpose(-1, -2) / math.sqrt(hd)                           # (B, H, T, K)
    if joint_softmax:
        probs = torch.cat([prompt_scores, scores], dim=-1).softmax(-1)
        out = probs[..., :K] @ prompt_v + probs[..., K:] @ v
    else:
        out = scores.softmax(-1) @ v + gate_values.view(1, H, 1, 1) * (prompt_scores.softmax(-1) @ prompt_v)
    return out.transpose(1, 2).reshape(B, T, H * hd) @ wo.T


@pytest.mark.parametrize("gate", ["tanh", "plain"])
def test_adapted_layer_matches_float64_separate_softmax(gate):
    cfg = three_layer_cfg()
    torch.manual_seed(7)
    attention = GatedAdapterPrompt(make_base().layers[2].attention, prompt_len=5, gate=gate)
    with torch.no_grad():
        attention.adapter_gate.copy_(torch.tensor([0.7, -0.4, 0.0, 1.3]))      # a different gate per head
    B, T = 2, 6
    x = torch.randn(B, T, cfg.dim)
    positions = torch.arange(T)
    rotation = rope_cos_sin(positions.expand(B, T), cfg.head_dim, cfg.rope_theta)
    with torch.no_grad():
        out, _ = attention(x, rotation, None)
    gate_values = torch.tensor([0.7, -0.4, 0.0, 1.3], dtype=torch.float64)
    if gate == "tanh":
        gate_values = torch.tanh(gate_values)
    expected = reference_attention_f64(attention, x.double(), gate_values, positions, cfg.rope_theta)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)

    # One softmax over the concatenation is a different function: it renormalises the real tokens'
    # probabilities, so even with a closed gate it would not give back the base layer.
    joint = reference_attention_f64(attention, x.double(), gate_values, positions, cfg.rope_theta, joint_softmax=True)
    closed = reference_attention_f64(attention, x.double(), torch.zeros(4, dtype=torch.float64), positions,
                                     cfg.rope_theta)
    assert (joint - expected).abs().max() > 1e-2
    assert (joint - closed).abs().max() > 1e-2
    plain = Attention(cfg)                                                      # the plain layer, same weights
    plain.load_state_dict({k: v for k, v in attention.state_dict().items() if not k.startswith("adapter_")})
    with torch.no_grad():
        base_out, _ = plain(x, rotation, None)
    torch.testing.assert_close(base_out.double(), closed, rtol=1e-5, atol=1e-5)


def test_llama_adapter_count_at_llama7b_shape():
    """K = 10, L = 30, per-head gates: L * (K * d + H) = 30 * (10 * 4096 + 32) = 1,229,760."""
    cfg = ModelConfig.from_name("llama-7b")
    with torch.device("meta"):
        model = apply_peft(Transformer(cfg), LlamaAdapterConfig(prompt_len=10))
    assert model.report.trainable == 30 * (10 * 4096 + 32) == 1_229_760
    assert model.report.total == 6_738_415_616 + 1_229_760
    adapted = [i for i, b in enumerate(model.base.layers) if isinstance(b.attention, GatedAdapterPrompt)]
    assert adapted == list(range(2, 32))


@pytest.mark.parametrize("bad, field", [
    (dict(adapter_layers=4), "adapter_layers"),        # more than the 3 layers
    (dict(adapter_layers=0), "adapter_layers"),
    (dict(prompt_len=0), "prompt_len"),
    (dict(gate="sigmoid"), "gate"),
])
def test_bad_llama_adapter_config_is_a_clear_error(bad, field):
    model = make_base()
    with pytest.raises(PeftConfigError, match=f"LlamaAdapterConfig.{field}"):
        install_llama_adapter(model, LlamaAdapterConfig(**{"prompt_len": 4, "adapter_layers": 2, **bad}))
    assert all(type(b.attention) is Attention for b in model.layers)          # nothing half-installed
    install_llama_adapter(model, LlamaAdapterConfig(prompt_len=4, adapter_layers=2))
    with pytest.raises(PeftConfigError, match="only once"):
        install_llama_adapter(model, LlamaAdapterConfig(prompt_len=4, adapter_layers=2))


# ---- parity with Hugging Face peft ----------------------------------------------------------------
def test_plain_gate_matches_hf_peft_adaption_prompt():
    from peft import AdaptionPromptConfig, get_peft_model
    from peft.tuners.adaption_prompt.layer import AdaptedAttention

    hf, ours, cfg = tiny_hf_pair(n_layers=3)
    K, L = 4, 2
    peft_model = get_peft_model(copy.deepcopy(hf), AdaptionPromptConfig(task_type="CAUSAL_LM", adapter_len=K,
                                                                        adapter_layers=L))
    peft_model.eval()
    adapted = copy.deepcopy(ours)
    install_llama_adapter(adapted, LlamaAdapterConfig(prompt_len=K, adapter_layers=L, gate="plain"))
    wrapped = apply_peft(copy.deepcopy(ours), LlamaAdapterConfig(prompt_len=K, adapter_layers=L, gate="plain"))
    copied = []
    with torch.no_grad():
        for name, module in peft_model.named_modules():
            if isinstance(module, AdaptedAttention):
                layer = int(name.split("layers.")[1].split(".")[0])
                module.adaption_gate.fill_(0.3)                                  # peft's one scalar gate
                for target in (adapted.layers[layer].attention, wrapped.base.layers[layer].attention):
                    target.adapter_prompt.copy_(module.adaption_prompt[0])      # (1, K, d) -> (K, d)
                    target.adapter_gate.fill_(0.3)                              # every head's gate
                copied.append(layer)
    assert sorted(copied) == [1, 2]
    torch.manual_seed(8)
    tokens = torch.randint(0, cfg.vocab_size, (2, 6))
    with torch.no_grad():
        theirs = peft_model(input_ids=tokens, attention_mask=torch.ones_like(tokens)).logits
        assert_logits_close(adapted(tokens), theirs)
        assert_logits_close(wrapped(tokens), theirs)
        assert (ours(tokens) - theirs).abs().max() > 1e-2                     # the open gate matters
