"""Every PEFT method on a tiny ChatGLM2 (model.py with qkv_bias and half rotary): loss falls, the base stays
bit-identical, zero-init methods start as the base model, adapters save and reload exactly, cached generation
equals greedy decoding without a cache. (ChatGLM-6B: tests/test_chatglm_peft.py.)"""

import pytest
import torch

from minipeft import ModelConfig
from minipeft.families import build_model
from minipeft.generate import generate
from minipeft.peft import (AdapterConfig, FullConfig, LlamaAdapterConfig, LoRAConfig, PrefixConfig, PromptConfig,
                           apply_peft, load_adapter, save_adapter)
from helpers_generate import greedy_without_cache  # noqa: E402

CFG = ModelConfig(family="chatglm2", dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=100, ffn_hidden_dim=96,
                  qkv_bias=True, rotary_fraction=0.5)
METHODS = {"full": FullConfig(), "lora": LoRAConfig(rank=4, alpha=8, targets=("wq", "wk", "wv", "wo", "w1", "w2", "w3")),
           "prompt": PromptConfig(prompt_len=3, init="random"), "prefix": PrefixConfig(prefix_len=3, reparam_hidden=16),
           "adapter": AdapterConfig(bottleneck=8), "llama_adapter": LlamaAdapterConfig(prompt_len=3, adapter_layers=2)}
STARTS_AS_BASE = ("lora", "adapter", "llama_adapter")


def base_model():
    torch.manual_seed(0)
    model = build_model(CFG)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.normal_(0, 0.1)                         # the QKV biases must matter
    return model.eval()


@pytest.mark.parametrize("method", list(METHODS))
def test_method_on_chatglm2(method, tmp_path):
    base = base_model()
    tokens = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        base_logits = base(tokens)
    frozen = {k: v.clone() for k, v in base.state_dict().items()}
    model = apply_peft(base, METHODS[method])
    if method in STARTS_AS_BASE:
        with torch.no_grad():
            assert torch.equal(model(tokens), base_logits)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    losses = []
    for _ in range(10):
        loss = model.loss(tokens, tokens)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.01, losses
    model.eval()
    if method != "full":
        base_now = {k: v for k, v in model.state_dict().items() if k in frozen or k.replace("base_model.", "") in frozen}
        changed = [k for k in frozen if k in base_now and not torch.equal(base_now[k], frozen[k])]
        assert not changed, changed
        save_adapter(model, tmp_path / "adapter")
        reloaded = load_adapter(base_model(), tmp_path / "adapter").eval()
        with torch.no_grad():
            assert torch.equal(reloaded(tokens), model(tokens))

    prompts = [[5, 6, 7, 8], [9, 10]]
    cached = generate(model, prompts, max_new_tokens=5)
    for prompt, new in zip(prompts, cached):
        assert new == greedy_without_cache(model, prompt, 5)
