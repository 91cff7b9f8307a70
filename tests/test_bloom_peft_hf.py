"""Our PEFT methods on BLOOM against Hugging Face peft on the same tiny BloomForCausalLM: LoRA on
query_key_value (= our fused wqkv) with the same nonzero A and B, prefix tuning with the same prefix, prompt
tuning with the same prompt: logits within 1e-5 (float32) on plain and left-padded batches, greedy tokens
equal to peft's generate(); the LoRA export loads into peft and gives the same logits."""

import copy

import pytest
import torch

from minipeft.generate import generate
from minipeft.peft import (LoRAConfig, PrefixConfig, PromptConfig, apply_peft, export_lora_to_hf_peft,
                           merge_lora)
from helpers_bloom import left_padded, tiny_bloom_pair

TOL = 1e-5
PROMPTS = [[5, 17, 33, 8, 90, 41], [77, 12, 9]]


def max_diff_on_real(ours, theirs, mask):
    return (ours - theirs)[mask.bool()].abs().max().item()


def assert_same_greedy(ours_model, peft_model, max_new_tokens=6):
    ours = generate(ours_model, PROMPTS, max_new_tokens=max_new_tokens, pad_id=3)
    longest = max(len(p) for p in PROMPTS)
    tokens = torch.tensor([[3] * (longest - len(p)) + p for p in PROMPTS])
    mask = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p in PROMPTS])
    with torch.no_grad():
        out = peft_model.generate(input_ids=tokens, attention_mask=mask, max_new_tokens=max_new_tokens,
                                  do_sample=False, eos_token_id=None, pad_token_id=3)
    assert ours == out[:, longest:].tolist()


@pytest.fixture(scope="module")
def lora_pair():
    from peft import LoraConfig, get_peft_model
    hf, ours = tiny_bloom_pair()
    # no target_modules: peft's own default for BLOOM, which is query_key_value, i.e. our wqkv
    peft_model = get_peft_model(copy.deepcopy(hf), LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0)).eval()
    assert peft_model.peft_config["default"].target_modules == {"query_key_value"}
    mine = apply_peft(copy.deepcopy(ours), LoRAConfig(rank=4, alpha=8, targets=("wqkv",))).eval()
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for i, block in enumerate(mine.base.layers):
            theirs = peft_model.base_model.model.transformer.h[i].self_attention.query_key_value
            A = torch.randn(theirs.lora_A["default"].weight.shape, generator=generator) * 0.3
            B = torch.randn(theirs.lora_B["default"].weight.shape, generator=generator) * 0.3
            theirs.lora_A["default"].weight.copy_(A)
            theirs.lora_B["default"].weight.copy_(B)
            block.attention.wqkv.lora_A.copy_(A)
            block.attention.wqkv.lora_B.copy_(B)
    return hf, ours, peft_model, mine


def test_lora_on_query_key_value_matches_peft(lora_pair):
    hf, ours, peft_model, mine = lora_pair
    tokens, mask = left_padded()
    with torch.no_grad():
        theirs = peft_model(input_ids=tokens, attention_mask=mask).logits
        assert max_diff_on_real(mine(tokens, attention_mask=mask), theirs, mask) < TOL
        assert max_diff_on_real(ours(tokens, attention_mask=mask), theirs, mask) > 1e-2   # LoRA does matter
    assert mine.report.trainable == 2 * 4 * (48 + 3 * 48)            # one shared A per layer: r (d + 3d)
    assert_same_greedy(mine, peft_model)


def test_lora_export_and_merge(lora_pair, tmp_path):
    from peft import PeftModel as HFPeftModel
    hf, _, peft_model, mine = lora_pair
    folder = export_lora_to_hf_peft(mine, tmp_path / "hf-lora")
    loaded = HFPeftModel.from_pretrained(copy.deepcopy(hf), folder).eval()
    tokens, mask = left_padded()
    with torch.no_grad():
        theirs = peft_model(input_ids=tokens, attention_mask=mask).logits
        assert max_diff_on_real(loaded(input_ids=tokens, attention_mask=mask).logits, theirs, mask) < TOL
        merged = merge_lora(copy.deepcopy(mine))
        assert max_diff_on_real(merged(tokens, attention_mask=mask), theirs, mask) < TOL


def test_prefix_tuning_matches_peft():
    """peft passes the prefix as past key/values and prepends P ones to the attention mask, so transformers'
    ALiBi gives the prefix slots positions 0..P-1 and the real tokens P..: the same as our prefix in front of
    the cache. BLOOM's keys carry no rotation, so peft's prefix keys are used as they are."""
    from peft import PrefixTuningConfig, get_peft_model
    hf, ours = tiny_bloom_pair()
    P, cfg = 4, ours.config
    peft_model = get_peft_model(copy.deepcopy(hf), PrefixTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=P, prefix_projection=True, encoder_hidden_size=24)).eval()
    with torch.no_grad():
        flat = peft_model.prompt_encoder["default"](torch.arange(P)[None])[0]        # (P, L*2*H*hd)
    per_slot = flat.view(P, cfg.n_layers, 2, cfg.n_heads, cfg.head_dim)              # [layer][k/v][head][hd]
    mine = apply_peft(copy.deepcopy(ours), PrefixConfig(prefix_len=P, reparam_hidden=None)).eval()
    mine.prefix.load_state_dict({"prefix_keys": per_slot[:, :, 0].permute(1, 2, 0, 3).contiguous(),
                                 "prefix_values": per_slot[:, :, 1].permute(1, 2, 0, 3).contiguous()})
    tokens, mask = left_padded()
    with torch.no_grad():
        theirs = peft_model(input_ids=tokens, attention_mask=mask).logits
        assert max_diff_on_real(mine(tokens, attention_mask=mask), theirs, mask) < TOL
        theirs_plain = peft_model(input_ids=tokens[:1]).logits
        assert (mine(tokens[:1]) - theirs_plain).abs().max().item() < TOL
        assert max_diff_on_real(ours(tokens, attention_mask=mask), theirs, mask) > 1e-2
    assert_same_greedy(mine, peft_model)


def test_prompt_tuning_matches_peft():
    """peft prepends the P prompt vectors to inputs_embeds (so BLOOM's embedding LayerNorm applies to them too)
    and P ones to the mask: the prompt takes positions 0..P-1."""
    from peft import PromptTuningConfig, get_peft_model
    hf, ours = tiny_bloom_pair()
    P = 5
    peft_model = get_peft_model(copy.deepcopy(hf), PromptTuningConfig(task_type="CAUSAL_LM",
                                                                       num_virtual_tokens=P)).eval()
    prompt = peft_model.prompt_encoder["default"].embedding.weight.detach().clone()    # (P, d)
    mine = apply_peft(copy.deepcopy(ours), PromptConfig(prompt_len=P, init="random")).eval()
    with torch.no_grad():
        mine.soft_prompt.weight.copy_(prompt)
    tokens, mask = left_padded()
    with torch.no_grad():
        theirs = peft_model(input_ids=tokens, attention_mask=mask).logits[:, P:]
        assert max_diff_on_real(mine(tokens, attention_mask=mask), theirs, mask) < TOL
        assert max_diff_on_real(ours(tokens, attention_mask=mask), theirs, mask) > 1e-2
    assert_same_greedy(mine, peft_model)
