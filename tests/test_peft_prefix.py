"""Prefix tuning (PrefixKV): shapes, the reparameterisation's layout, fold(), the attention it implies
(checked against a float64 computation written here), closed-form counts and parity with HF peft."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from helpers_peft import assert_logits_close, hf_key_layout_to_ours, rope_f64, tiny_hf_pair
from minipeft.config import ModelConfig
from minipeft.model import Transformer, rope_cos_sin
from minipeft.peft import PrefixConfig, apply_peft
from minipeft.peft.prefix import PrefixKV


def small_gqa_cfg() -> ModelConfig:
    return ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=97, multiple_of=16,
                       norm_eps=1e-5, max_seq_len=64)


@pytest.mark.parametrize("n_kv_heads", [4, 2])
@pytest.mark.parametrize("reparam_hidden", [24, None])
def test_prefix_shapes_per_layer(n_kv_heads, reparam_hidden):
    cfg = ModelConfig(dim=64, n_layers=3, n_heads=4, n_kv_heads=n_kv_heads, vocab_size=97, multiple_of=16)
    prefix = PrefixKV(cfg, prefix_len=5, reparam_hidden=reparam_hidden)
    past = prefix(batch_size=2)
    assert len(past) == 3
    for k, v in past:
        assert k.shape == v.shape == (2, n_kv_heads, 5, 16)        # (B, n_kv_heads, P, head_dim)
        assert torch.equal(k[0], k[1]) and torch.equal(v[0], v[1])  # one prefix shared by the batch
    assert prefix.folded == (reparam_hidden is None)


def test_reparam_output_is_ordered_layer_kv_head_headdim():
    """The MLP E -> W2 tanh(W1 E) computed by hand in float64, then read as [layer][k/v][head][head_dim]."""
    cfg = small_gqa_cfg()
    torch.manual_seed(1)
    prefix = PrefixKV(cfg, prefix_len=3, reparam_hidden=8).double()
    E = prefix.prefix_embedding.weight.detach()
    lin1, lin2 = prefix.reparam[0], prefix.reparam[2]
    flat = torch.tanh(E @ lin1.weight.detach().T + lin1.bias.detach()) @ lin2.weight.detach().T + lin2.bias.detach()
    assert flat.shape == (3, cfg.n_layers * 2 * cfg.kv_dim)
    past = prefix(batch_size=1)
    G, hd = cfg.n_kv_heads, cfg.head_dim
    for layer in range(cfg.n_layers):
        for kv_index in range(2):
            for head in range(G):
                start = ((layer * 2 + kv_index) * G + head) * hd
                for slot in range(3):
                    expected = flat[slot, start:start + hd]
                    got = past[layer][kv_index][0, head, slot]
                    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def test_fold_keeps_logits_and_drops_the_mlp(small_model, small_cfg):
    torch.manual_seed(2)
    prefix = PrefixKV(small_cfg, prefix_len=4, reparam_hidden=16)
    tokens = torch.randint(0, small_cfg.vocab_size, (2, 7))
    with torch.no_grad():
        before = small_model(tokens, past_key_values=prefix(2))
        prefix.fold()
        after = small_model(tokens, past_key_values=prefix(2))
    assert prefix.folded
    assert not hasattr(prefix, "reparam") and not hasattr(prefix, "prefix_embedding")
    state = prefix.state_dict()
    assert set(state) == {"prefix_keys", "prefix_values"}
    assert state["prefix_keys"].shape == state["prefix_values"].shape == (2, 2, 4, 16)   # (L, G, P, hd)
    assert (before - after).abs().max().item() <= 1e-6
    # a folded state dict is exactly what a directly trained prefix holds
    plain = PrefixKV(small_cfg, prefix_len=4, reparam_hidden=None)
    plain.load_state_dict(state)
    with torch.no_grad():
        assert torch.equal(small_model(tokens, past_key_values=plain(2)), after)


def test_training_reaches_only_the_prefix(small_model, small_cfg):
    for p in small_model.parameters():
        p.requires_grad_(False)
    prefix = PrefixKV(small_cfg, prefix_len=3, reparam_hidden=8)
    tokens = torch.randint(0, small_cfg.vocab_size, (2, 5))
    logits = small_model(tokens, past_key_values=prefix(2))
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens.flatten()).backward()
    assert all(p.grad is None for p in small_model.parameters())
    for name, p in prefix.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_prefix_as_past_equals_attention_over_prefix_and_real_keys_f64(small_cfg):
    """One attention layer fed the prefix as past_kv == softmax over [unrotated prefix keys ; rotated real
    keys], computed here in float64 from the raw weight matrices. Real tokens sit at positions P..P+T-1."""
    torch.manual_seed(3)
    model = Transformer(small_cfg).double()
    attention = model.layers[0].attention
    B, T, P = 2, 5, 3
    H, G, hd = small_cfg.n_heads, small_cfg.n_kv_heads, small_cfg.head_dim
    x = torch.randn(B, T, small_cfg.dim, dtype=torch.float64)
    prefix_k = torch.randn(B, G, P, hd, dtype=torch.float64)
    prefix_v = torch.randn(B, G, P, hd, dtype=torch.float64)

    positions = torch.arange(P, P + T)
    cos, sin = rope_cos_sin(positions.expand(B, T), hd, small_cfg.rope_theta)
    mask = Transformer.build_mask(B, T, P, None, x.device)
    out, (k_all, v_all) = attention(x, (cos.double(), sin.double()), mask, (prefix_k, prefix_v))
    assert k_all.shape == (B, G, P + T, hd) and torch.equal(k_all[:, :, :P], prefix_k)

    wq, wk, wv, wo = (attention.wq.weight.detach(), attention.wk.weight.detach(),
                      attention.wv.weight.detach(), attention.wo.weight.detach())
    q = rope_f64((x @ wq.T).view(B, T, H, hd).transpose(1, 2), positions, small_cfg.rope_theta)   # (B,H,T,hd)
    k = rope_f64((x @ wk.T).view(B, T, G, hd).transpose(1, 2), positions, small_cfg.rope_theta)   # (B,G,T,hd)
    v = (x @ wv.T).view(B, T, G, hd).transpose(1, 2)
    keys = torch.cat([prefix_k, k], dim=2).repeat_interleave(H // G, dim=1)      # (B, H, P+T, hd)
    values = torch.cat([prefix_v, v], dim=2).repeat_interleave(H // G, dim=1)
    scores = q @ keys.transpose(-1, -2) / math.sqrt(hd)                          # (B, H, T, P+T)
    visible = torch.ones(T, P + T, dtype=torch.bool)
    visible[:, P:] = torch.tril(torch.ones(T, T, dtype=torch.bool))              # every prefix slot, causal rest
    scores = scores.masked_fill(~visible, float("-inf"))
    expected = (scores.softmax(-1) @ values).transpose(1, 2).reshape(B, T, H * hd) @ wo.T
    # the model computes RoPE angles in float32 by design, hence 1e-6 rather than float64 round-off
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)
    rotated_prefix = rope_f64(prefix_k, torch.arange(P), small_cfg.rope_theta)      # what rotating would give
    assert (rotated_prefix - prefix_k).abs().max() > 0.1


def test_folded_prefix_count_at_llama7b_shape():
    """Folded prefix: n_layers * 2 (k and v) * P * kv_dim = 32 * 2 * 10 * 4096 = 2,621,440."""
    cfg = ModelConfig.from_name("llama-7b")
    with torch.device("meta"):
        prefix = PrefixKV(cfg, prefix_len=10, reparam_hidden=512)
        mlp_count = sum(p.numel() for p in prefix.parameters())
        prefix.fold()
    assert mlp_count == 10 * 4096 + (4096 * 512 + 512) + (512 * 32 * 2 * 4096 + 32 * 2 * 4096)
    assert sum(p.numel() for p in prefix.parameters()) == 32 * 2 * 10 * 4096 == 2_621_440


@pytest.mark.parametrize("bad", [dict(prefix_len=0), dict(prefix_len=-2), dict(prefix_len=4, reparam_hidden=0)])
def test_bad_prefix_config_is_a_clear_error(small_cfg, bad):
    with pytest.raises(ValueError, match="PrefixConfig"):
        PrefixKV(small_cfg, **{"reparam_hidden": 8, **bad})


# ---- parity with Hugging Face peft ----------------------------------------------------------------
def peft_prefix_setup(prefix_len=4):
    from peft import PrefixTuningConfig, get_peft_model

    hf, ours, cfg = tiny_hf_pair()
    peft_model = get_peft_model(copy.deepcopy(hf), PrefixTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=prefix_len, prefix_projection=True, encoder_hidden_size=24))
    peft_model.eval()
    with torch.no_grad():
        flat = peft_model.prompt_encoder["default"](torch.arange(prefix_len)[None])[0]   # (P, L*2*kv_dim)
    # peft's layout [layer][k/v][head][head_dim]; keys are in transformers' half-split rotary layout
    per_slot = flat.view(prefix_len, cfg.n_layers, 2, cfg.n_kv_heads, cfg.head_dim)
    keys = hf_key_layout_to_ours(per_slot[:, :, 0]).permute(1, 2, 0, 3)                  # (L, G, P, hd)
    values = per_slot[:, :, 1].permute(1, 2, 0, 3)
    prefix = PrefixKV(cfg, prefix_len, reparam_hidden=24)
    prefix.fold()
    prefix.load_state_dict({"prefix_keys": keys.contiguous(), "prefix_values": values.contiguous()})
    return peft_model, ours, cfg, prefix


def test_prefix_matches_hf_peft_prefix_tuning():
    peft_model, ours, cfg, prefix = peft_prefix_setup()
    torch.manual_seed(4)
    tokens = torch.randint(0, cfg.vocab_size, (2, 6))
    with torch.no_grad():
        theirs = peft_model(input_ids=tokens, attention_mask=torch.ones_like(tokens)).logits
        mine = ours(tokens, past_key_values=prefix(2))
    assert_logits_close(mine, theirs)
    # through apply_peft: the wrapper feeds the prefix and shifts positions itself
    wrapped = apply_peft(copy.deepcopy(ours), PrefixConfig(prefix_len=4, reparam_hidden=None))
    wrapped.prefix.load_state_dict(prefix.state_dict())
    with torch.no_grad():
        assert_logits_close(wrapped(tokens, attention_mask=torch.ones_like(tokens)), theirs)
    # and the prefix does matter: without it the logits are far off
    with torch.no_grad():
        assert (ours(tokens) - theirs).abs().max() > 1e-2
