"""apply_peft / PeftModel / save_adapter / load_adapter / export: frozen base weights under AdamW for every
method, the virtual-token wrapper (KV cache, left padding), the loss against a float64 reference,
adapter round trips and their errors, and LoRA parity with Hugging Face peft (both directions)."""

import copy
import json
import math
import shutil

import pytest
import torch

from minipeft.checkpoint import unpermute_hf_rotary
from minipeft.model import Transformer
from minipeft.peft import (AdapterConfig, FullConfig, LlamaAdapterConfig, LoRAConfig, LoRALinear, PeftConfigError,
                           PrefixConfig, PromptConfig, apply_peft, export_lora_to_hf_peft, load_adapter,
                           save_adapter)

METHOD_CONFIGS = {
    "lora": lambda: LoRAConfig(rank=4, alpha=8, targets=("wq", "wk", "wv", "wo", "w1", "w2", "w3", "output")),
    "adapter": lambda: AdapterConfig(bottleneck=8),
    "prompt": lambda: PromptConfig(prompt_len=3, init="vocab"),
    "prefix": lambda: PrefixConfig(prefix_len=3, reparam_hidden=16),
    "prefix_direct": lambda: PrefixConfig(prefix_len=3, reparam_hidden=None),
    "llama_adapter": lambda: LlamaAdapterConfig(prompt_len=4, adapter_layers=2, gate="tanh"),
}


def make_tokens(cfg, shape=(2, 8), seed=0):
    return torch.randint(0, cfg.vocab_size, shape, generator=torch.Generator().manual_seed(seed))


def perturb_trainable(model, seed=3, scale=0.2):
    """Move every trainable tensor away from its init (zero-init parts included), as training would."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * scale)


def relative_error(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


# ---- freezing ------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", sorted(METHOD_CONFIGS))
def test_frozen_base_weights_stay_bit_identical_under_adamw(small_model, method):
    before = {k: v.clone() for k, v in small_model.state_dict().items()}
    model = apply_peft(small_model, METHOD_CONFIGS[method]()).train()
    trainable_before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert trainable_before and all(model.is_method_parameter(n) for n in trainable_before)
    # every parameter goes to the optimizer: decoupled weight decay would move any frozen one that got a grad
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    tokens = make_tokens(model.config)
    for _ in range(3):
        optimizer.zero_grad()
        model.loss(tokens, tokens).backward()
        optimizer.step()
    after = model.base.state_dict()
    for key, value in before.items():
        assert torch.equal(after[key], value), f"{method}: base weight {key} changed"
    changed = [n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, trainable_before[n])]
    assert changed, f"{method}: no trainable parameter moved"


def test_full_fine_tuning_trains_everything(small_model):
    model = apply_peft(small_model, FullConfig())
    total = sum(p.numel() for p in small_model.parameters())
    assert model.report.trainable == model.report.total == total
    assert str(model.report) == f"trainable {total:,} / {total:,} (100.000%)"


def test_apply_peft_refuses_a_peft_model_and_other_configs(small_model):
    model = apply_peft(small_model, LoRAConfig())
    with pytest.raises(PeftConfigError, match="already has a PEFT method"):
        apply_peft(model, AdapterConfig())
    with pytest.raises(PeftConfigError, match="expected one of"):
        apply_peft(Transformer(small_model.config), {"rank": 8})


# ---- the virtual-token wrapper -------------------------------------------------------------------
@pytest.mark.parametrize("method", ["prompt", "prefix"])
def test_virtual_tokens_equal_the_base_with_them_spelled_out(small_model, method):
    """The wrapper's logits equal the base model run on the virtual tokens made explicit (embeddings in
    front for prompt tuning, the prefix as past keys/values for prefix tuning)."""
    base = copy.deepcopy(small_model)
    model = apply_peft(small_model, METHOD_CONFIGS[method]())
    perturb_trainable(model)
    tokens = make_tokens(model.config, (2, 6))
    P = 3
    with torch.no_grad():
        if method == "prompt":
            embeds = base.tok_embeddings(tokens)                                             # (B, T, d)
            prompt = model.soft_prompt.weight.expand(2, P, -1)                               # (B, P, d)
            expected = base(input_embeds=torch.cat([prompt, embeds], dim=1))[:, P:]
        else:
            expected = base(tokens, past_key_values=model.prefix(2))                        # positions P..
        assert torch.equal(model(tokens), expected)


@pytest.mark.parametrize("method", ["prompt", "prefix", "lora"])
def test_cache_and_left_padding_give_the_unpadded_logits(small_model, method):
    """Row 1 is left-padded by 2. Its real tokens' logits, and those of two more tokens fed one at a time
    through the returned cache, equal the logits of the row run alone without padding."""
    model = apply_peft(small_model, METHOD_CONFIGS[method]()).eval()
    perturb_trainable(model)
    full = make_tokens(model.config, (2, 8))                              # 6 prompt tokens + 2 continued
    lengths = [6, 4]
    with torch.no_grad():
        alone = [model(full[i:i + 1, 6 - n:]) for i, n in enumerate(lengths)]          # (1, n + 2, V)
        tokens = full[:, :6].clone()
        tokens[1, :2] = 0                                                               # padding ids
        mask = torch.tensor([[1] * 6, [0, 0, 1, 1, 1, 1]])
        positions = torch.tensor([[0, 1, 2, 3, 4, 5], [0, 0, 0, 1, 2, 3]])
        logits, cache = model(tokens, position_ids=positions, attention_mask=mask, use_cache=True)
        assert relative_error(logits[0], alone[0][0, :6]) < 1e-5
        assert relative_error(logits[1, 2:], alone[1][0, :4]) < 1e-5
        for step in range(2):
            next_tokens = full[:, 6 + step:7 + step]                                     # (B, 1)
            mask = torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], dim=1)
            next_positions = torch.tensor([[6 + step], [4 + step]])
            logits, cache = model(next_tokens, position_ids=next_positions, attention_mask=mask,
                                  past_key_values=cache, use_cache=True)
            assert relative_error(logits[0, 0], alone[0][0, 6 + step]) < 1e-5
            assert relative_error(logits[1, 0], alone[1][0, 4 + step]) < 1e-5


@pytest.mark.parametrize("method", ["prompt", "prefix"])
def test_cache_without_explicit_positions(small_model, method):
    """Default positions and no mask: feeding 5 tokens then 3 through the cache equals one call on 8."""
    model = apply_peft(small_model, METHOD_CONFIGS[method]()).eval()
    perturb_trainable(model)
    tokens = make_tokens(model.config, (2, 8))
    with torch.no_grad():
        whole = model(tokens)
        first, cache = model(tokens[:, :5], use_cache=True)
        second = model(tokens[:, 5:], past_key_values=cache)
    assert relative_error(torch.cat([first, second], dim=1), whole) < 1e-5


def test_loss_matches_float64_reference(small_model):
    model = apply_peft(small_model, METHOD_CONFIGS["prompt"]())
    tokens = make_tokens(model.config, (2, 7))
    labels = tokens.clone()
    labels[0, :3] = -100                                                                 # a masked prompt
    labels[1, 5] = -100
    loss = model.loss(tokens, labels)
    logits = model(tokens).detach().double()                                             # (B, T, V)
    log_probs = torch.log_softmax(logits, dim=-1)
    terms = [-log_probs[b, t - 1, labels[b, t]] for b in range(2) for t in range(1, 7) if labels[b, t] != -100]
    expected = sum(terms) / len(terms)                                   # mean over predicted labels
    assert len(terms) == 6 + 6 - 2 - 1
    assert loss.dtype == torch.float32
    assert math.isclose(loss.item(), expected.item(), rel_tol=1e-6)


# ---- save / load ---------------------------------------------------------------------------------
@pytest.mark.parametrize("method", sorted(METHOD_CONFIGS))
def test_save_load_round_trip_gives_identical_logits(small_model, method, tmp_path):
    fresh_base = copy.deepcopy(small_model)
    model = apply_peft(small_model, METHOD_CONFIGS[method]()).eval()
    perturb_trainable(model)
    tokens = make_tokens(model.config)
    with torch.no_grad():
        expected = model(tokens)
    save_adapter(model, tmp_path / "adapter")
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["method"] == model.method and saved["base_config"] == model.config.fingerprint()
    from safetensors.torch import load_file
    stored = load_file(str(tmp_path / "adapter" / "adapter.safetensors"))
    assert sum(t.numel() for t in stored.values()) == (
        2 * 3 * model.config.n_layers * model.config.kv_dim if method.startswith("prefix")   # folded (L,G,P,hd) x2
        else model.report.trainable)
    loaded = load_adapter(fresh_base, tmp_path / "adapter").eval()
    assert loaded.peft_config == model.peft_config
    with torch.no_grad():
        assert torch.equal(loaded(tokens), expected)


def test_full_round_trip(small_model, tmp_path):
    other_base = Transformer(small_model.config)                        # different random weights
    model = apply_peft(small_model, FullConfig())
    tokens = make_tokens(model.config)
    with torch.no_grad():
        expected = model(tokens)
    save_adapter(model, tmp_path / "full")
    loaded = load_adapter(other_base, tmp_path / "full")
    with torch.no_grad():
        assert torch.equal(loaded(tokens), expected)


def test_load_errors_are_clear(small_model, tmp_path):
    lora_dir, adapter_dir = tmp_path / "lora", tmp_path / "adapter"
    save_adapter(apply_peft(copy.deepcopy(small_model), LoRAConfig()), lora_dir)
    save_adapter(apply_peft(copy.deepcopy(small_model), AdapterConfig(bottleneck=4)), adapter_dir)

    (tmp_path / "empty").mkdir()
    with pytest.raises(PeftConfigError, match="adapter_config.json: file not found"):
        load_adapter(copy.deepcopy(small_model), tmp_path / "empty")
    with pytest.raises(PeftConfigError, match="adapter folder not found"):
        load_adapter(copy.deepcopy(small_model), tmp_path / "nowhere")

    no_weights = tmp_path / "no_weights"
    shutil.copytree(lora_dir, no_weights)
    (no_weights / "adapter.safetensors").unlink()
    with pytest.raises(PeftConfigError, match="adapter.safetensors: file not found"):
        load_adapter(copy.deepcopy(small_model), no_weights)

    # an adapter folder whose tensors are another method's
    shutil.copy(lora_dir / "adapter.safetensors", adapter_dir / "adapter.safetensors")
    with pytest.raises(PeftConfigError, match=r"not those of a 'adapter' adapter.*unexpected \['layers.0.attention.wq.lora_A'"):
        load_adapter(copy.deepcopy(small_model), adapter_dir)

    with pytest.raises(PeftConfigError, match="the adapter's method is 'lora', expected 'prefix'"):
        load_adapter(copy.deepcopy(small_model), lora_dir, method="prefix")

    # a base model of another shape
    other = Transformer(type(small_model.config)(**{**small_model.config.to_dict(), "n_layers": 3}))
    with pytest.raises(PeftConfigError, match="base_config.n_layers is 2 but the base model given has n_layers = 3"):
        load_adapter(other, lora_dir)
    other = Transformer(type(small_model.config)(**{**small_model.config.to_dict(), "norm_eps": 1e-6}))
    with pytest.raises(PeftConfigError, match="base_config.norm_eps"):
        load_adapter(other, lora_dir)

    # hand-edited config: a rank that does not fit the stored tensors, an unknown field
    description = json.loads((lora_dir / "adapter_config.json").read_text())
    description["config"]["rank"] = 4
    (lora_dir / "adapter_config.json").write_text(json.dumps(description))
    with pytest.raises(PeftConfigError, match=r"lora_A has shape \(8, 64\), expected \(4, 64\)"):
        load_adapter(copy.deepcopy(small_model), lora_dir)
    description["config"]["rnak"] = 4
    (lora_dir / "adapter_config.json").write_text(json.dumps(description))
    with pytest.raises(PeftConfigError, match=r"unknown keys \['rnak'\]"):
        load_adapter(copy.deepcopy(small_model), lora_dir)


# ---- parity with Hugging Face peft ----------------------------------------------------------------
def test_lora_matches_hf_peft_and_export_loads_into_peft(tmp_path):
    """(1) peft's LoRA on q, k, v with random nonzero A/B, copied into ours by hand (B's q/k rows
    un-permuted), gives peft's logits. (2) Our LoRA on every target, exported, loads into peft and gives
    our logits. GQA (4 query heads, 2 kv heads) so q and k use different permutations."""
    from helpers_peft import tiny_hf_pair
    from peft import LoraConfig, PeftModel, get_peft_model

    hf, ours, cfg = tiny_hf_pair(n_layers=2)
    hf_base = copy.deepcopy(hf)
    tokens = make_tokens(cfg, (2, 9))

    hf_lora = get_peft_model(hf, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                            target_modules=["q_proj", "k_proj", "v_proj"])).eval()
    ours_lora = apply_peft(copy.deepcopy(ours), LoRAConfig(rank=4, alpha=8, targets=("wq", "wk", "wv"))).eval()
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for i in range(cfg.n_layers):
            for hf_name, our_name, heads in (("q_proj", "wq", cfg.n_heads), ("k_proj", "wk", cfg.n_kv_heads),
                                             ("v_proj", "wv", None)):
                hf_module = getattr(hf_lora.base_model.model.model.layers[i].self_attn, hf_name)
                A = torch.randn(hf_module.lora_A["default"].weight.shape, generator=g) * 0.3   # (r, d_in)
                B = torch.randn(hf_module.lora_B["default"].weight.shape, generator=g) * 0.3   # (d_out, r)
                hf_module.lora_A["default"].weight.copy_(A)
                hf_module.lora_B["default"].weight.copy_(B)
                mine = getattr(ours_lora.base.layers[i].attention, our_name)
                mine.lora_A.copy_(A)
                mine.lora_B.copy_(unpermute_hf_rotary(B, heads) if heads else B)
        expected = hf_lora(tokens).logits
        assert relative_error(ours_lora(tokens), expected) < 1e-5
        assert relative_error(ours(tokens), expected) > 1e-2               # LoRA really changed the logits

    every = ("wq", "wk", "wv", "wo", "w1", "w2", "w3", "output")
    ours_all = apply_peft(copy.deepcopy(ours), LoRAConfig(rank=4, alpha=12, targets=every)).eval()
    perturb_trainable(ours_all, seed=7, scale=0.3)
    export_lora_to_hf_peft(ours_all, tmp_path / "hf_lora")
    exported = json.loads((tmp_path / "hf_lora" / "adapter_config.json").read_text())
    assert sorted(exported["target_modules"]) == sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"])
    loaded = PeftModel.from_pretrained(hf_base, str(tmp_path / "hf_lora")).eval()
    with torch.no_grad():
        theirs = loaded(tokens).logits
        mine = ours_all(tokens)
        assert relative_error(mine, theirs) < 1e-5
        assert relative_error(ours(tokens), theirs) > 1e-2


def test_export_refuses_merged_and_non_lora(small_model, tmp_path):
    model = apply_peft(copy.deepcopy(small_model), LoRAConfig())
    model.base.layers[0].attention.wq.merge()
    with pytest.raises(PeftConfigError, match="layers.0.attention.wq is merged"):
        export_lora_to_hf_peft(model, tmp_path / "x")
    with pytest.raises(PeftConfigError, match="needs a PeftModel with LoRA"):
        export_lora_to_hf_peft(apply_peft(small_model, PrefixConfig(prefix_len=2)), tmp_path / "y")
    assert isinstance(model.base.layers[0].attention.wq, LoRALinear)


def test_export_with_trainable_embeddings_matches_hf_peft(tmp_path):
    """A LoRA trained with extra_trainable (after a vocabulary extension) exports its full embedding and output
    as peft's modules_to_save: peft's model gives our logits (without them it would not)."""
    from helpers_peft import tiny_hf_pair
    from peft import PeftModel

    hf, ours, cfg = tiny_hf_pair(n_layers=2)
    tokens = make_tokens(cfg, (2, 9))
    model = apply_peft(copy.deepcopy(ours), LoRAConfig(rank=4, alpha=8, targets=("wq", "wv"),
                                                        extra_trainable=("tok_embeddings", "output"))).eval()
    perturb_trainable(model, seed=3, scale=0.3)
    export_lora_to_hf_peft(model, tmp_path / "hf_lora")
    exported = json.loads((tmp_path / "hf_lora" / "adapter_config.json").read_text())
    assert exported["modules_to_save"] == ["embed_tokens", "lm_head"]
    loaded = PeftModel.from_pretrained(hf, str(tmp_path / "hf_lora")).eval()
    with torch.no_grad():
        theirs = loaded(tokens).logits
        assert relative_error(model(tokens), theirs) < 1e-5
        assert relative_error(ours(tokens), theirs) > 1e-2
    with pytest.raises(PeftConfigError, match="already exists"):
        export_lora_to_hf_peft(model, tmp_path / "hf_lora")
