"""The BLOOM decoder against transformers' BloomForCausalLM (the peer): logits on plain and left-padded
batches, greedy generation, ALiBi slopes against the formula written out by hand, the 7B parameter count,
cached generation equal to uncached, and the input_embeds path."""

import math

import pytest
import torch

from minipeft import ModelConfig, build_model, load_model
from minipeft.bloom import Bloom, alibi_slopes
from minipeft.checkpoint import convert_checkpoint
from minipeft.generate import generate
from helpers_bloom import make_hf_bloom
from helpers_generate import greedy_without_cache

VOCAB = 120


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """(hf model, our model converted from its save_pretrained folder)."""
    folder = tmp_path_factory.mktemp("bloom")
    hf = make_hf_bloom(vocab=VOCAB)
    hf.save_pretrained(folder / "hf")
    convert_checkpoint(folder / "hf", folder / "ours")
    return hf, load_model(folder / "ours")


def left_padded_batch():
    torch.manual_seed(1)
    tokens = torch.randint(4, VOCAB, (3, 11))
    mask = torch.ones(3, 11, dtype=torch.long)
    mask[1, :4] = 0
    mask[2, :9] = 0
    tokens[mask == 0] = 3
    return tokens, mask


def test_slopes_match_the_formula_written_out():
    # 32 heads (a power of two): m_h = 2^(-8h/32) = 2^(-h/4), h = 1..32
    assert torch.allclose(alibi_slopes(32).double(), torch.tensor([2.0 ** (-h / 4) for h in range(1, 33)],
                                                                  dtype=torch.float64), rtol=1e-6, atol=0)
    # 6 heads: the 4-head series 2^-2, 2^-4, 2^-6, 2^-8, then the odd terms 2^-1, 2^-3 of the 8-head series
    expected = [2.0 ** -2, 2.0 ** -4, 2.0 ** -6, 2.0 ** -8, 2.0 ** -1, 2.0 ** -3]
    assert alibi_slopes(6).tolist() == expected
    from transformers.models.bloom.modeling_bloom import build_alibi_tensor
    for heads in (1, 5, 6, 12, 32, 40):
        peer = build_alibi_tensor(torch.ones(1, 2), heads, torch.float32).view(heads, 2)[:, 1]   # m_h * 1
        assert torch.allclose(alibi_slopes(heads), peer, rtol=1e-6, atol=0), heads


def test_bloom_7b1_parameter_count_on_meta():
    cfg = ModelConfig.from_name("bloom-7b1")
    with torch.device("meta"):
        model = build_model(cfg)
    assert isinstance(model, Bloom) and cfg.family == "bloom"
    assert model.num_parameters() == 7_069_016_064
    assert cfg.fingerprint()["family"] == "bloom"


def test_logits_equal_transformers_plain_and_left_padded(pair):
    hf, ours = pair
    tokens, mask = left_padded_batch()
    with torch.no_grad():
        plain = (ours(tokens) - hf(tokens).logits).abs().max().item()
        padded = (ours(tokens, attention_mask=mask) - hf(tokens, attention_mask=mask).logits)[mask.bool()]
    assert plain < 1e-5 and padded.abs().max().item() < 1e-5, (plain, padded.abs().max().item())
    # a left-padded row computes what its real tokens compute alone
    with torch.no_grad():
        alone = ours(tokens[2:, 9:])
        assert (ours(tokens, attention_mask=mask)[2:, 9:] - alone).abs().max() < 1e-5


def test_logits_equal_transformers_in_float64(pair):
    """float64 on the plain batch (transformers' float64 padding rows become NaN: -min - min overflows)."""
    hf, ours = pair
    tokens, _ = left_padded_batch()
    hf64, ours64 = make_hf_bloom(vocab=VOCAB).double(), build_model(ours.config).double().eval()
    ours64.load_state_dict({k: v.double() for k, v in ours.state_dict().items()})
    with torch.no_grad():
        diff = ours64(tokens) - hf64(tokens).logits
    assert diff.abs().max().item() < 1e-8   # transformers rounds sqrt(2/pi) to 0.79788456 in its GELU


def test_greedy_generation_equals_transformers_generate(pair):
    hf, ours = pair
    prompts = [[5, 17, 33, 8, 90, 41], [77, 12]]
    ours_new = generate(ours, prompts, max_new_tokens=8, pad_id=3)
    for prompt, new in zip(prompts, ours_new):
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False, eos_token_id=None,
                          pad_token_id=3)
        assert new == out[0, len(prompt):].tolist()
    # batched with left padding, as transformers pads
    tokens = torch.tensor([prompts[0], [3] * 4 + prompts[1]])
    mask = (torch.arange(6)[None] >= torch.tensor([[0], [4]])).long()
    out = hf.generate(tokens, attention_mask=mask, max_new_tokens=8, do_sample=False, eos_token_id=None,
                      pad_token_id=3)
    assert ours_new == out[:, 6:].tolist()


def test_cached_generation_equals_uncached(pair):
    _, ours = pair
    prompt = [5, 17, 33, 8]
    cached = generate(ours, [prompt], max_new_tokens=10)[0]
    assert cached == greedy_without_cache(ours, prompt, 10)
    tokens = prompt + cached
    # and the logits of a cached step equal the full forward's at that position
    full = torch.tensor([tokens])
    with torch.no_grad():
        _, cache = ours(full[:, :7], use_cache=True)
        step = ours(full[:, 7:9], past_key_values=cache)
        assert (step - ours(full)[:, 7:9]).abs().max() < 1e-5


def test_input_embeds_and_return_hidden(pair):
    _, ours = pair
    tokens, mask = left_padded_batch()
    with torch.no_grad():
        by_tokens = ours(tokens, attention_mask=mask)
        by_embeds = ours(input_embeds=ours.tok_embeddings(tokens), attention_mask=mask)
        hidden = ours(tokens, attention_mask=mask, return_hidden=True)
    assert torch.equal(by_tokens, by_embeds) and torch.equal(ours.head(hidden), by_tokens)
    with pytest.raises(ValueError, match="attention_mask has shape"):
        ours(tokens, attention_mask=mask[:, :5])


def test_gradient_checkpointing_gives_the_same_gradients():
    cfg = ModelConfig(family="bloom", dim=32, n_layers=2, n_heads=4, vocab_size=50)
    torch.manual_seed(0)
    model = build_model(cfg)
    tokens = torch.randint(0, 50, (2, 7))
    grads = []
    for on in (False, True):
        model.zero_grad()
        model.gradient_checkpointing = on
        model.train()
        model(tokens).square().mean().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    assert all(torch.allclose(a, b, atol=1e-7) for a, b in zip(*grads))
    assert math.isclose(cfg.ffn_hidden_dim, 4 * 32)


@pytest.mark.parametrize("name", ["bloom-7b1", "llama-7b", "chinese-llama-7b", "tiny", "chatglm2-6b"])
def test_parameter_formula_equals_the_model(name):
    from minipeft.memory import parameter_count, vocabulary_share
    from minipeft.peft import FullConfig, closed_form_trainable
    cfg = ModelConfig.from_name(name)
    with torch.device("meta"):
        model = build_model(cfg)
    parts = parameter_count(cfg)
    assert parts["total"] == model.num_parameters() == closed_form_trainable(cfg, FullConfig())
    assert parts["embedding"] == model.tok_embeddings.weight.numel()
    if name == "bloom-7b1":
        assert parts["output"] == 0 and parts["embedding"] == 250_880 * 4096
        assert abs(vocabulary_share(cfg) - 1_027_604_480 / 7_069_016_064) < 1e-15
        assert round(vocabulary_share(cfg), 3) == 0.145
