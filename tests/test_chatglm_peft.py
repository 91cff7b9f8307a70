"""Every PEFT method on a tiny ChatGLM-6B (converted from the original's layout): loss falls, the base stays
bit-identical, zero-init methods start as the base exactly, adapters save and reload exactly, cached generation
equals greedy decoding without a cache. Prefix and prompt tuning are placed as documented (chatglm.py,
peft/peft_model.py), checked against the float64 reference written from the formulas (helpers_chatglm.py):
prefix = the original's P-tuning v2 (unrotated slots, real positions unshifted), prompt = P extra context tokens
in front (positions 0..P-1, block 0; real positions + P)."""

import json

import pytest
import torch

from helpers_chatglm import GMASK, PAD, SOP, EOP, chatglm_v1_folder, reference_logits
from minipeft.checkpoint import convert_checkpoint, load_model
from minipeft.checkpoint.hf_chatglm import pairs_to_rotate_half
from minipeft.generate import generate
from minipeft.peft import (AdapterConfig, FullConfig, LlamaAdapterConfig, LoRAConfig, PrefixConfig, PromptConfig,
                           PeftConfigError, apply_peft, export_lora_to_hf_peft, load_adapter, save_adapter)
from helpers_generate import greedy_without_cache  # noqa: E402

METHODS = {"full": FullConfig(), "lora": LoRAConfig(rank=4, alpha=8, targets=("wqkv", "wo", "w1", "w2")),
           "prompt": PromptConfig(prompt_len=3, init="random"), "prefix": PrefixConfig(prefix_len=3, reparam_hidden=16),
           "prefix_plain": PrefixConfig(prefix_len=3, reparam_hidden=None),
           "adapter": AdapterConfig(bottleneck=8), "llama_adapter": LlamaAdapterConfig(prompt_len=3, adapter_layers=2)}
STARTS_AS_BASE = ("lora", "adapter", "llama_adapter")
# context [gMASK] <sop> reply <eop>, right-padded as data.collate pads; the prompt is masked in the labels
ROWS = [([5, 17, 42, 8, GMASK, SOP], [33, 9, 61, EOP]), ([7, 70, GMASK, SOP], [12, 40, EOP])]
PROMPTS = [[5, 17, 42, 8, GMASK, SOP], [7, 70, GMASK, SOP]]


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("chatglm_peft")
    folder, config, state = chatglm_v1_folder(tmp)
    convert_checkpoint(folder, tmp / "ours")
    return tmp / "ours", config, state


def batch():
    T = max(len(p) + len(r) for p, r in ROWS)
    tokens = torch.full((len(ROWS), T), PAD, dtype=torch.long)
    labels = torch.full((len(ROWS), T), -100, dtype=torch.long)
    for i, (prompt, reply) in enumerate(ROWS):
        n = len(prompt) + len(reply)
        tokens[i, :n] = torch.tensor(prompt + reply)
        labels[i, len(prompt):n] = torch.tensor(reply)
    return tokens, labels


@pytest.mark.parametrize("method", list(METHODS))
def test_method_on_chatglm_6b(method, converted, tmp_path):
    folder, _, _ = converted
    base = load_model(folder)
    tokens, labels = batch()
    with torch.no_grad():
        base_logits = base(tokens)
    frozen = {k: v.clone() for k, v in base.state_dict().items()}
    torch.manual_seed(0)
    model = apply_peft(base, METHODS[method])
    if method in STARTS_AS_BASE:
        with torch.no_grad():
            assert torch.equal(model(tokens), base_logits)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    losses = []
    for _ in range(8):
        loss = model.loss(tokens, labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05, losses
    model.eval()
    if method != "full":
        base_now = model.base.state_dict()
        changed = [k for k in frozen if k in base_now and not torch.equal(base_now[k], frozen[k])]
        assert not changed, changed
        save_adapter(model, tmp_path / "adapter")
        reloaded = load_adapter(load_model(folder), tmp_path / "adapter").eval()
        with torch.no_grad():
            assert torch.equal(reloaded(tokens), model(tokens))
    cached = generate(model, PROMPTS, max_new_tokens=5, pad_id=PAD)      # left-padded batch, KV cache
    for prompt, new in zip(PROMPTS, cached):
        assert new == greedy_without_cache(model, prompt, 5)


def original_key_layout(keys):
    """Our prefix keys (H, P, hd) (q/k dims in adjacent-pair order) -> the original's rotate-half order."""
    H, P, hd = keys.shape
    fused = torch.zeros(H, 3, hd, P, dtype=keys.dtype)
    fused[:, 1] = keys.transpose(1, 2)                                   # the k rows of a fused wqkv
    back = pairs_to_rotate_half(fused.reshape(3 * H * hd, P), H).reshape(H, 3, hd, P)
    return back[:, 1].transpose(1, 2).contiguous()


def left_pad(rows):
    T = max(len(r) for r in rows)
    tokens = torch.full((len(rows), T), PAD, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    for i, r in enumerate(rows):
        tokens[i, T - len(r):], mask[i, T - len(r):] = torch.tensor(r), 1
    return tokens, mask


SEQS = [p + r for p, r in ROWS]


def test_prefix_is_the_originals_p_tuning_v2(converted):
    """The prefix = P unrotated key/value slots per layer seen by every token, real tokens numbered as without it:
    the float64 reference with prefix_kv, within 1e-6, one row at a time and as a left-padded batch."""
    folder, config, state = converted
    torch.manual_seed(3)
    model = apply_peft(load_model(folder, dtype=torch.float64), PrefixConfig(prefix_len=3, reparam_hidden=None))
    keys, values = model.prefix.prefix_tensors()                                      # (L, H, P, hd)
    prefix_kv = [(original_key_layout(keys[i].detach()), values[i].detach()) for i in range(keys.shape[0])]
    tokens, mask = left_pad(SEQS)
    with torch.no_grad():
        batched = model(tokens, attention_mask=mask)
        for i, seq in enumerate(SEQS):
            want = reference_logits(state, config, seq, prefix_kv=prefix_kv)
            assert (model(torch.tensor([seq]))[0] - want).abs().max().item() < 1e-6
            assert (batched[i, tokens.shape[1] - len(seq):] - want).abs().max().item() < 1e-6
        # the LLaMA / HF peft placement (real positions shifted by P) computes something else here
        positions = model.base.prompt_position_ids(tokens[:1, -len(SEQS[0]):])
        shifted = model.base(tokens[:1, -len(SEQS[0]):], past_key_values=model.prefix(1),
                             position_ids=positions + 3)
        assert (shifted[0] - reference_logits(state, config, SEQS[0], prefix_kv=prefix_kv)).abs().max() > 1e-3


def test_prompt_tokens_are_context_in_front(converted):
    """A soft prompt equal to the embeddings of ids v_1..v_P computes exactly what the base computes on
    v_1..v_P + ids (context tokens in front: positions 0..P-1, block 0, real positions + P, [gMASK]'s too):
    the float64 reference on the longer row, within 1e-6, one row at a time and as a left-padded batch."""
    folder, config, state = converted
    virtual = [20, 21, 22]
    model = apply_peft(load_model(folder, dtype=torch.float64), PromptConfig(prompt_len=3, init="random"))
    with torch.no_grad():
        model.soft_prompt.weight.copy_(model.base.tok_embeddings.weight[torch.tensor(virtual)])
    tokens, mask = left_pad(SEQS)
    with torch.no_grad():
        batched = model(tokens, attention_mask=mask)
        for i, seq in enumerate(SEQS):
            want = reference_logits(state, config, virtual + seq)[len(virtual):]
            assert (model(torch.tensor([seq]))[0] - want).abs().max().item() < 1e-6
            assert (batched[i, tokens.shape[1] - len(seq):] - want).abs().max().item() < 1e-6


@pytest.mark.parametrize("method", ["prefix", "prompt"])
def test_prefix_and_prompt_generate_with_cache_as_without(method, converted):
    """Longer greedy runs than above: the cached path (generate's 2-D position rules through
    PeftModel) equals the whole-sequence path, where the positions are derived from the ids."""
    folder, _, _ = converted
    torch.manual_seed(5)
    model = apply_peft(load_model(folder), METHODS[method]).eval()
    cached = generate(model, PROMPTS, max_new_tokens=10, pad_id=PAD)
    for prompt, new in zip(PROMPTS, cached):
        assert new == greedy_without_cache(model, prompt, 10)


def test_hf_peft_export_writes_the_originals_names(converted, tmp_path):
    """The HF peft export of a ChatGLM-6B LoRA names the original's modules (query_key_value, with its rows in the
    original's rotate-half order: tests/test_hf_peft_io.py checks the numbers against the float64 reference)."""
    model = apply_peft(load_model(converted[0]), METHODS["lora"])
    export_lora_to_hf_peft(model, tmp_path / "hf")
    assert "query_key_value" in json.loads((tmp_path / "hf" / "adapter_config.json").read_text())["target_modules"]


def test_lora_default_targets_name_chatglms_projections(converted):
    """LLaMA's default targets (wq, wv) do not exist in ChatGLM-6B's fused attention: the error lists what does."""
    with pytest.raises(PeftConfigError, match=r"\['wq', 'wv'\] match no nn.Linear .* \['w1', 'w2', 'wo', 'wqkv'\]"):
        apply_peft(load_model(converted[0]), LoRAConfig())
