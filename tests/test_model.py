"""The decoder against an independent float64 reference (Meta's complex-number RoPE, per-head loops), the KV
cache against full forwards, positions and padding masks, real-scale shapes, and config readers' errors."""

import json
import math

import pytest
import torch

from minipeft.config import ConfigError, ModelConfig
from minipeft.model import Transformer

MHA_CFG = ModelConfig(dim=48, n_layers=2, n_heads=4, vocab_size=61, multiple_of=16, norm_eps=1e-5)


def random_model(cfg, seed=0):
    torch.manual_seed(seed)
    model = Transformer(cfg).eval()
    with torch.no_grad():                            # norms away from 1 so a missing norm would show
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
    return model


def reference_logits(model, tokens, positions, key_mask=None):
    """float64 forward written from the equations: RoPE as multiplication by e^{i pos theta_j} of the complex
    numbers x[2j] + i x[2j+1] (Meta's form), attention head by head with explicit masks.
    tokens, positions (B, T); key_mask (B, T) of 1 real / 0 padding. Returns (B, T, V) float64."""
    cfg = model.config
    w = {k: v.double() for k, v in model.state_dict().items()}
    B, T = tokens.shape
    H, G, hd = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim

    def rms_norm(x, weight):
        return x / torch.sqrt((x * x).mean(-1, keepdim=True) + cfg.norm_eps) * weight

    freqs = cfg.rope_theta ** (-torch.arange(0, hd, 2, dtype=torch.float64) / hd)      # (hd/2,)
    rotation = torch.polar(torch.ones(B, T, hd // 2, dtype=torch.float64),
                           positions.double()[..., None] * freqs)                       # (B, T, hd/2) complex

    def rope(x):                                                                        # (B, T, heads, hd)
        as_complex = torch.view_as_complex(x.reshape(*x.shape[:-1], hd // 2, 2).contiguous())
        return torch.view_as_real(as_complex * rotation[:, :, None]).reshape(x.shape)

    allowed = torch.ones(T, T).tril().bool()[None].repeat(B, 1, 1)                      # (B, T, T) causal
    if key_mask is not None:
        allowed &= key_mask.bool()[:, None, :]
        allowed |= torch.eye(T, dtype=torch.bool)                                       # a token sees itself
    h = w["tok_embeddings.weight"][tokens]                                              # (B, T, d)
    for i in range(cfg.n_layers):
        p = f"layers.{i}."
        x = rms_norm(h, w[p + "attention_norm.weight"])
        q = rope((x @ w[p + "attention.wq.weight"].T).view(B, T, H, hd))
        k = rope((x @ w[p + "attention.wk.weight"].T).view(B, T, G, hd))
        v = (x @ w[p + "attention.wv.weight"].T).view(B, T, G, hd)
        heads = []
        for head in range(H):
            group = head // (H // G)                                                    # its shared k/v head
            scores = q[:, :, head] @ k[:, :, group].transpose(1, 2) / math.sqrt(hd)     # (B, T, T)
            scores = scores.masked_fill(~allowed, float("-inf"))
            heads.append(scores.softmax(-1) @ v[:, :, group])                           # (B, T, hd)
        h = h + torch.cat(heads, dim=-1) @ w[p + "attention.wo.weight"].T
        x = rms_norm(h, w[p + "ffn_norm.weight"])
        gate = x @ w[p + "feed_forward.w1.weight"].T
        h = h + (gate * torch.sigmoid(gate) * (x @ w[p + "feed_forward.w3.weight"].T)) @ w[p + "feed_forward.w2.weight"].T
    return rms_norm(h, w["norm.weight"]) @ w["output.weight"].T


def relative_error(ours, reference):
    return ((ours.double() - reference).abs().max() / reference.abs().max()).item()


@pytest.fixture(params=["mha", "gqa"])
def model(request, small_cfg):
    return random_model(MHA_CFG if request.param == "mha" else small_cfg)


# ---- forward, cache, positions, padding ---------------------------------------------------------------

def test_forward_matches_float64_reference(model):
    tokens = torch.randint(0, model.config.vocab_size, (2, 11), generator=torch.Generator().manual_seed(3))
    positions = torch.arange(11).expand(2, 11)
    with torch.no_grad():
        assert relative_error(model(tokens), reference_logits(model, tokens, positions)) < 1e-5


def test_kv_cache_token_by_token_equals_full_forward(model):
    tokens = torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        full = model(tokens)                                                      # (2, 12, V)
        # prefill 4 tokens, then one token at a time through the cache
        logits, cache = model(tokens[:, :4], use_cache=True)
        steps = [logits]
        for t in range(4, 12):
            logits, cache = model(tokens[:, t:t + 1], past_key_values=cache, use_cache=True)
            steps.append(logits)
    assert len(cache) == model.config.n_layers
    assert cache[0][0].shape == (2, model.config.n_kv_heads, 12, model.config.head_dim)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)


def test_positions_start_pos_and_position_ids(model):
    tokens = torch.randint(0, model.config.vocab_size, (2, 7), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        shifted = model(tokens, start_pos=9)
        explicit = model(tokens, position_ids=torch.arange(9, 16).expand(2, 7))
        assert torch.equal(shifted, explicit)
        assert relative_error(shifted, reference_logits(model, tokens, torch.arange(9, 16).expand(2, 7))) < 1e-5
        # RoPE scores depend only on position differences: with no past, a shift leaves the logits unchanged
        assert relative_error(shifted, reference_logits(model, tokens, torch.arange(7).expand(2, 7))) < 1e-5
        # with a past, start_pos defaults to the past length; giving it explicitly is the same
        _, cache = model(tokens[:, :3], use_cache=True)
        default = model(tokens[:, 3:], past_key_values=cache)
        assert torch.equal(default, model(tokens[:, 3:], past_key_values=cache, start_pos=3))
        # a wrong start_pos with a past changes relative distances, so the result differs
        assert not torch.allclose(default, model(tokens[:, 3:], past_key_values=cache, start_pos=20), atol=1e-4)


def test_right_padding_rows_equal_unpadded_rows(model):
    g = torch.Generator().manual_seed(6)
    lengths = [8, 5, 2]
    tokens = torch.randint(0, model.config.vocab_size, (3, 8), generator=g)
    mask = torch.tensor([[1] * n + [0] * (8 - n) for n in lengths])
    tokens = tokens.masked_fill(mask == 0, 0)
    with torch.no_grad():
        batch = model(tokens, attention_mask=mask)
        reference = reference_logits(model, tokens, torch.arange(8).expand(3, 8), key_mask=mask)
        for row, n in enumerate(lengths):
            alone = model(tokens[row:row + 1, :n])
            torch.testing.assert_close(batch[row, :n], alone[0], rtol=1e-5, atol=1e-5)
            assert relative_error(batch[row, :n], reference[row, :n]) < 1e-5


def test_left_padding_with_position_ids_then_cached_decoding(model):
    """Left-padded prompts with positions counting real tokens from 0, continued through the cache, give
    each row's unpadded result (this is how batched generation works)."""
    g = torch.Generator().manual_seed(7)
    long_row = torch.randint(0, model.config.vocab_size, (6,), generator=g)
    short_row = torch.randint(0, model.config.vocab_size, (3,), generator=g)
    next_tokens = torch.randint(0, model.config.vocab_size, (2, 1), generator=g)
    tokens = torch.stack([long_row, torch.cat([torch.zeros(3, dtype=torch.long), short_row])])   # (2, 6)
    mask = torch.tensor([[1] * 6, [0, 0, 0, 1, 1, 1]])
    positions = torch.tensor([[0, 1, 2, 3, 4, 5], [0, 0, 0, 0, 1, 2]])
    with torch.no_grad():
        logits, cache = model(tokens, attention_mask=mask, position_ids=positions, use_cache=True)
        step, _ = model(next_tokens, past_key_values=cache, attention_mask=torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], 1),
                        position_ids=torch.tensor([[6], [3]]), use_cache=True)
        long_alone = model(torch.cat([long_row, next_tokens[0]])[None])
        short_alone = model(torch.cat([short_row, next_tokens[1]])[None])
    torch.testing.assert_close(logits[0], long_alone[0, :6], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits[1, 3:], short_alone[0, :3], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(step[0, 0], long_alone[0, 6], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(step[1, 0], short_alone[0, 3], rtol=1e-5, atol=1e-5)


def test_input_embeds_and_gradient_checkpointing(small_cfg):
    model = random_model(small_cfg).train()
    tokens = torch.randint(0, small_cfg.vocab_size, (2, 6), generator=torch.Generator().manual_seed(8))
    assert torch.equal(model(tokens), model(input_embeds=model.tok_embeddings(tokens)))
    model(tokens).square().mean().backward()
    plain = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.gradient_checkpointing = True
    model(tokens).square().mean().backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, plain[name], rtol=1e-5, atol=1e-7, msg=name)


def test_bad_forward_inputs(small_cfg):
    model = random_model(small_cfg)
    tokens = torch.zeros(2, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="exactly one of tokens or input_embeds"):
        model()
    with pytest.raises(ValueError, match=r"attention_mask has shape \(2, 3\), expected \(2, 4\)"):
        model(tokens, attention_mask=torch.ones(2, 3))


# ---- real-scale shapes on the meta device (no memory) ---------------------------------------------------

def meta_param_count(name):
    with torch.device("meta"):
        return Transformer(ModelConfig.from_name(name)).num_parameters()


def test_parameter_counts_at_real_scale():
    llama_7b = 6_738_415_616
    assert meta_param_count("llama-7b") == llama_7b
    assert meta_param_count("llama-13b") == 13_015_864_320
    # Chinese-LLaMA-7B extends the vocabulary 32000 -> 49953: each new id adds one embedding row and one
    # output row of width 4096.
    assert meta_param_count("chinese-llama-7b") == llama_7b + 2 * (49953 - 32000) * 4096


def test_meta_ffn_rule_by_hand():
    # 7B: int(2 * 4 * 4096 / 3) = 10922 -> next multiple of 256 = 43 * 256 = 11008
    # 13B: int(2 * 4 * 5120 / 3) = 13653 -> 54 * 256 = 13824
    assert ModelConfig.from_name("llama-7b").ffn_hidden_dim == 11008
    assert ModelConfig.from_name("llama-13b").ffn_hidden_dim == 13824
    # with a multiplier (LLaMA-2-70B-style): int(1.3 * 10922) = 14198 -> 56 * 256 = 14336
    assert ModelConfig(dim=4096, ffn_dim_multiplier=1.3).ffn_hidden_dim == 14336
    # a Hugging Face intermediate_size is taken as given, not recomputed
    assert ModelConfig(dim=72, n_heads=6, ffn_hidden_dim=100).ffn_hidden_dim == 100


# ---- config readers ------------------------------------------------------------------------------------

PARAMS = {"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "multiple_of": 16, "norm_eps": 1e-5,
          "vocab_size": -1}
HF_CONFIG = {"model_type": "llama", "hidden_size": 72, "num_hidden_layers": 2, "num_attention_heads": 6,
             "num_key_value_heads": 2, "intermediate_size": 100, "vocab_size": 97, "rms_norm_eps": 1e-5}


def test_from_params_json(tmp_path):
    path = tmp_path / "params.json"
    path.write_text(json.dumps(PARAMS))
    cfg = ModelConfig.from_params_json(path, vocab_size=97)
    assert (cfg.dim, cfg.n_kv_heads, cfg.vocab_size, cfg.ffn_hidden_dim) == (64, 2, 97, 176)   # 170 -> 176
    with pytest.raises(ConfigError, match=r"params\.json: vocab_size is -1"):
        ModelConfig.from_params_json(path)
    for key in ("dim", "n_layers", "n_heads", "norm_eps"):
        path.write_text(json.dumps({k: v for k, v in PARAMS.items() if k != key}))
        with pytest.raises(ConfigError, match=rf"params\.json: missing key '{key}'"):
            ModelConfig.from_params_json(path, vocab_size=97)
    path.write_text("{not json")
    with pytest.raises(ConfigError, match=r"params\.json: not valid JSON"):
        ModelConfig.from_params_json(path)
    with pytest.raises(ConfigError, match=r"nope\.json: file not found"):
        ModelConfig.from_params_json(tmp_path / "nope.json")


def test_from_hf_config(tmp_path):
    cfg = ModelConfig.from_hf_config(HF_CONFIG)
    assert (cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.ffn_hidden_dim) == (72, 6, 2, 12, 100)
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size"):
        path = tmp_path / "config.json"
        path.write_text(json.dumps({k: v for k, v in HF_CONFIG.items() if k != key}))
        with pytest.raises(ConfigError, match=rf"config\.json: missing key '{key}'"):
            ModelConfig.from_hf_config(path)
    with pytest.raises(ConfigError, match="model_type is 'mistral', expected 'llama'"):
        ModelConfig.from_hf_config({**HF_CONFIG, "model_type": "mistral"})
    with pytest.raises(ConfigError, match="rope_scaling"):
        ModelConfig.from_hf_config({**HF_CONFIG, "rope_scaling": {"type": "linear", "factor": 2.0}})
    with pytest.raises(ConfigError, match=r"n_heads \(6\) must be a multiple of n_kv_heads \(4\)"):
        ModelConfig.from_hf_config({**HF_CONFIG, "num_key_value_heads": 4})
