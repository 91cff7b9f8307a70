"""generate(): the cached, left-padded batch path against independent references.

- greedy with the cache == greedy by recomputing the whole sequence each step (a plain loop here), for a
  batch of prompts of different lengths, and each row == that prompt generated alone;
- greedy == transformers' LlamaForCausalLM.generate(do_sample=False) on the same (converted) weights;
- eos ends a row (and the loop once every row has ended); top_k=1 sampling == greedy; a seed makes
  sampling reproducible; the top-k / top-p filters and the sampling distribution against hand computations;
- a PeftModel (LoRA, prefix, prompt tuning) through the same calls == recomputing with it;
- tools/generate.py prints what generate() returns, with and without an adapter and the Alpaca template.
"""

import importlib.util
import math
from pathlib import Path

import pytest
import torch

from helpers_tokenizer import train_tiny_sentencepiece
from minipeft.checkpoint import hf_tensor_to_ours, save_model
from minipeft.config import ModelConfig
from minipeft.data import format_prompt
from minipeft.generate import GenerationError, generate, next_token_probs, top_k_filter, top_p_filter
from minipeft.model import Transformer
from minipeft.peft import LoRAConfig, PrefixConfig, PromptConfig, apply_peft, save_adapter
from minipeft.tokenizer import Tokenizer
from helpers_generate import greedy_without_cache  # noqa: E402

PROMPTS = [[1, 5, 9, 13, 2, 40, 41], [1, 77], [1, 30, 31, 32, 33], [1, 8, 8, 8]]
MAX_NEW = 8


def random_model(vocab_size=97, seed=0):
    cfg = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=vocab_size, multiple_of=16,
                      norm_eps=1e-5, max_seq_len=64)
    torch.manual_seed(seed)
    model = Transformer(cfg).eval()
    model.init_weights(std=0.2)       # larger than the default: well-separated logits, peaked attention
    return model


@pytest.fixture(scope="module")
def model():
    return random_model()


class CountingModel(torch.nn.Module):
    """Wraps a model and counts forward calls (to see that generation stops early)."""

    def __init__(self, model):
        super().__init__()
        self.model, self.calls = model, 0

    def forward(self, *args, **kwargs):
        self.calls += 1
        return self.model(*args, **kwargs)


def test_greedy_batch_equals_recomputing_each_prompt_alone(model):
    reference = [greedy_without_cache(model, p, MAX_NEW) for p in PROMPTS]
    batched = generate(model, PROMPTS, MAX_NEW, pad_id=0)
    assert batched == reference
    for prompt, expected in zip(PROMPTS, reference):
        assert generate(model, [prompt], MAX_NEW) == [expected]
    # The pad id must not matter: padding is masked out.
    assert generate(model, PROMPTS, MAX_NEW, pad_id=50) == reference
    assert len({tuple(r) for r in reference}) > 1                                   # not a degenerate model


def test_greedy_equals_transformers_generate():
    import transformers   # a test-only peer (the [dev] extra)
    hf_config = transformers.LlamaConfig(
        vocab_size=97, hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=64,
        initializer_range=0.2, tie_word_embeddings=False, bos_token_id=1, eos_token_id=None, pad_token_id=0)
    torch.manual_seed(1)
    hf_model = transformers.LlamaForCausalLM(hf_config).eval()
    cfg = ModelConfig.from_hf_config(hf_config.to_dict())
    ours = Transformer(cfg).eval()
    ours.load_state_dict(dict(hf_tensor_to_ours(k, v, cfg) for k, v in hf_model.state_dict().items()))

    hf_rows = []
    for prompt in PROMPTS:
        hf_out = hf_model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                   max_new_tokens=MAX_NEW, do_sample=False, eos_token_id=None, pad_token_id=0)
        hf_rows.append(hf_out[0, len(prompt):].tolist())
        assert len(hf_rows[-1]) == MAX_NEW
        assert generate(ours, [prompt], MAX_NEW) == [hf_rows[-1]]                   # alone
    assert generate(ours, PROMPTS, MAX_NEW) == hf_rows                              # and batched


def test_eos_ends_a_row_and_generation_stops_when_all_rows_ended(model):
    reference = [greedy_without_cache(model, p, MAX_NEW) for p in PROMPTS]
    eos_id = reference[0][2]                                                        # row 0's third token
    expected = [row[:row.index(eos_id) + 1] if eos_id in row else row for row in reference]
    assert len(expected[0]) <= 3
    assert generate(model, PROMPTS, MAX_NEW, eos_id=eos_id) == expected

    counting = CountingModel(model)
    assert generate(counting, [PROMPTS[0]], MAX_NEW, eos_id=eos_id) == [expected[0]]
    assert counting.calls == len(expected[0])                                       # 1 prompt pass + 1 per token
    counting.calls = 0
    generate(counting, PROMPTS, MAX_NEW)
    assert counting.calls == MAX_NEW


def test_top_k_1_sampling_equals_greedy(model):
    greedy = generate(model, PROMPTS, MAX_NEW)
    assert generate(model, PROMPTS, MAX_NEW, temperature=1.0, top_k=1, seed=0) == greedy
    assert generate(model, PROMPTS, MAX_NEW, temperature=5.0, top_p=1e-6, seed=3) == greedy   # nucleus of 1


def test_seeded_sampling_is_reproducible(model):
    first = generate(model, PROMPTS, MAX_NEW, temperature=1.5, top_k=20, top_p=0.95, seed=123)
    second = generate(model, PROMPTS, MAX_NEW, temperature=1.5, top_k=20, top_p=0.95, seed=123)
    other_seed = generate(model, PROMPTS, MAX_NEW, temperature=1.5, top_k=20, top_p=0.95, seed=124)
    assert first == second
    assert first != other_seed                         # 32 tokens from wide distributions: the seed is used
    assert [len(r) for r in first] == [MAX_NEW] * len(PROMPTS)


def test_top_p_keeps_the_smallest_set_reaching_p():
    # Hand computation, probabilities sorted: 0.5, 0.2, 0.15, 0.1, 0.05 (cumulative .5 .7 .85 .95 1).
    probs = torch.tensor([0.1, 0.5, 0.05, 0.2, 0.15], dtype=torch.float64)
    logits = probs.log()[None]                                                      # (1, 5)
    cases = {0.3: {1},                  # 0.5 alone reaches 0.3
             0.6: {1, 3},               # 0.5 < 0.6 <= 0.7
             0.75: {1, 3, 4},           # 0.7 < 0.75 <= 0.85
             0.9: {1, 3, 4, 0},         # 0.85 < 0.9 <= 0.95
             0.99: {0, 1, 2, 3, 4}}
    for top_p, kept in cases.items():
        filtered = top_p_filter(logits, top_p)[0]
        assert {i for i in range(5) if filtered[i] > float("-inf")} == kept, top_p
        expected = torch.zeros(5, dtype=torch.float64)
        expected[list(kept)] = probs[list(kept)] / probs[list(kept)].sum()         # renormalised
        torch.testing.assert_close(filtered.softmax(-1), expected)


def test_top_k_filter_and_temperature_by_hand():
    logits = torch.tensor([[1.0, 3.0, 2.0, -1.0], [0.0, 0.0, 5.0, 4.0]])
    filtered = top_k_filter(logits, 2)
    assert torch.isinf(filtered).tolist() == [[True, False, False, True], [True, True, False, False]]
    # temperature 2 and top_k 2 on row 0: softmax of (3/2, 2/2) over tokens 1 and 2.
    probs = next_token_probs(logits, temperature=2.0, top_k=2)
    e1, e2 = math.exp(1.5), math.exp(1.0)
    torch.testing.assert_close(probs[0], torch.tensor([0.0, e1 / (e1 + e2), e2 / (e1 + e2), 0.0]))


def test_sampled_frequencies_follow_the_filtered_distribution():
    # 20000 rows sampled in one call from the nucleus {0.5, 0.2, 0.15} of a hand-made distribution.
    probs = torch.tensor([0.1, 0.5, 0.05, 0.2, 0.15])
    rows = 20000
    nucleus = next_token_probs(probs.log().expand(rows, 5), temperature=1.0, top_p=0.75)
    generator = torch.Generator().manual_seed(0)
    samples = torch.multinomial(nucleus, 1, generator=generator)[:, 0]
    frequencies = torch.bincount(samples, minlength=5).double() / rows
    expected = torch.tensor([0.0, 0.5, 0.0, 0.2, 0.15], dtype=torch.float64) / 0.85
    assert (frequencies - expected).abs().max() < 0.015                             # ~4 standard errors


def test_bad_arguments_give_clear_errors(model):
    with pytest.raises(GenerationError, match="prompts is empty"):
        generate(model, [], 4)
    with pytest.raises(GenerationError, match=r"prompts\[1\] is empty"):
        generate(model, [[1, 2], []], 4)
    with pytest.raises(GenerationError, match="top_p"):
        generate(model, [[1]], 4, temperature=1.0, top_p=1.5)
    with pytest.raises(GenerationError, match="top_k"):
        generate(model, [[1]], 4, temperature=1.0, top_k=0)
    with pytest.raises(GenerationError, match="temperature"):
        generate(model, [[1]], 4, temperature=-1.0)
    assert generate(model, [[1, 2], [3]], 0) == [[], []]


# ---- a PeftModel goes through the same calls ------------------------------------------------------
def perturbed_peft_model(base, config, seed=3):
    """`config` applied to `base`, every PEFT parameter set to random values (so that a method that starts
    as the identity, like LoRA with B = 0, really changes the output)."""
    peft_model = apply_peft(base, config).eval()
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in peft_model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn_like(p) * 0.3)
    return peft_model


@pytest.mark.parametrize("method", ["lora", "prefix", "prompt"])
def test_peft_model_batch_equals_recomputing(method):
    config = {"lora": LoRAConfig(rank=4, alpha=8, targets=("wq", "wv")),
              "prefix": PrefixConfig(prefix_len=3, reparam_hidden=None),
              "prompt": PromptConfig(prompt_len=3, init="random")}[method]
    peft_model = perturbed_peft_model(random_model(seed=2), config)
    reference = [greedy_without_cache(peft_model, p, MAX_NEW) for p in PROMPTS]
    assert generate(peft_model, PROMPTS, MAX_NEW) == reference
    if method != "lora":                                    # the base is untouched: the virtual tokens count
        assert reference != [greedy_without_cache(peft_model.base, p, MAX_NEW) for p in PROMPTS]


# ---- tools/generate.py ----------------------------------------------------------------------------
def load_generate_tool():
    path = Path(__file__).resolve().parent.parent / "tools" / "generate.py"
    spec = importlib.util.spec_from_file_location("generate_tool", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_generate_tool_prints_what_generate_returns(tmp_path, capsys):
    tokenizer_path = train_tiny_sentencepiece(tmp_path / "sp")
    tokenizer = Tokenizer(tokenizer_path)
    base = random_model(vocab_size=tokenizer.vocab_size, seed=4)
    save_model(base, base.config, tmp_path / "ckpt", tokenizer_path=tokenizer_path)
    tool = load_generate_tool()
    prompts = ["the cat sat", "你好"]

    assert tool.main([str(tmp_path / "ckpt"), "--prompt", prompts[0], "--prompt", prompts[1],
                      "--max-new-tokens", "6"]) == 0
    printed = capsys.readouterr().out
    prompt_ids = [tokenizer.encode(p) for p in prompts]
    outputs = generate(base, prompt_ids, 6, eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id)
    for ids, new in zip(prompt_ids, outputs):
        assert tokenizer.decode(ids + new) + "\n" in printed

    # With a (perturbed) LoRA adapter and the Alpaca template.
    same_base = random_model(vocab_size=tokenizer.vocab_size, seed=4)
    lora_model = perturbed_peft_model(same_base, LoRAConfig(rank=2, alpha=4, targets=("wq", "wv")), seed=5)
    save_adapter(lora_model, tmp_path / "adapter")
    assert tool.main([str(tmp_path / "ckpt"), "--prompt", "say hi", "--alpaca", "--adapter",
                      str(tmp_path / "adapter"), "--max-new-tokens", "5", "--temperature", "0.8", "--seed", "7"]) == 0
    printed = capsys.readouterr().out
    text = format_prompt("say hi")
    expected = generate(lora_model, [tokenizer.encode(text)], 5, temperature=0.8, eos_id=tokenizer.eos_id,
                        seed=7, pad_id=tokenizer.pad_id)[0]
    assert printed == text + tokenizer.decode(expected) + "\n"


def test_generate_tool_reports_a_missing_tokenizer(tmp_path, capsys):
    base = random_model(seed=4)
    save_model(base, base.config, tmp_path / "ckpt")
    assert load_generate_tool().main([str(tmp_path / "ckpt"), "--prompt", "x"]) == 2
    assert "no tokenizer at" in capsys.readouterr().err
