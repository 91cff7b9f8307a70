"""Every PEFT method through apply_peft, with trained-looking (perturbed) parameters: greedy decoding with the
KV cache (minipeft.generate.generate, batched with left padding) equals greedy decoding that recomputes the
whole sequence without a cache at every step, one prompt at a time."""

from __future__ import annotations

import pytest
import torch

from minipeft.generate import generate
from minipeft.model import Transformer
from minipeft.peft import (AdapterConfig, FullConfig, LlamaAdapterConfig, LoRAConfig, PrefixConfig, PromptConfig,
                           apply_peft)
from helpers_generate import greedy_without_cache  # noqa: E402

METHOD_CONFIGS = {
    "full": FullConfig(),
    "lora": LoRAConfig(rank=4, alpha=8, targets=("wq", "wk", "wv", "wo")),
    "prompt": PromptConfig(prompt_len=3, init="random"),
    "prefix": PrefixConfig(prefix_len=3, reparam_hidden=16),
    "adapter": AdapterConfig(bottleneck=8),
    "llama_adapter": LlamaAdapterConfig(prompt_len=4, adapter_layers=1),
}

PROMPTS = [[5, 17, 42, 8, 3, 60], [11, 29]]      # different lengths: the batch is left-padded
NEW_TOKENS = 5


@pytest.mark.parametrize("method", list(METHOD_CONFIGS))
def test_cached_greedy_decoding_equals_recomputation(small_cfg, method):
    torch.manual_seed(0)
    base = Transformer(small_cfg).eval()
    base.init_weights(std=0.1)                     # sharper attention and logits than the 0.02 default
    probe = torch.tensor([PROMPTS[0]])
    with torch.no_grad():
        base_logits = base(probe)
        base_tokens = [greedy_without_cache(base, prompt, NEW_TOKENS) for prompt in PROMPTS]
    model = apply_peft(base, METHOD_CONFIGS[method], generator=torch.Generator().manual_seed(1)).eval()
    with torch.no_grad():                          # make the method's parameters look trained
        generator = torch.Generator().manual_seed(2)
        for name, p in model.named_parameters():
            if p.requires_grad:
                scale = 1.0 if name.endswith("adapter_gate") else 0.1         # open LLaMA-Adapter gates wide
                p.add_(scale * torch.randn(p.shape, generator=generator))
        assert (model(probe) - base_logits).abs().max() > 1e-3, "the method must change the output"

        expected = [greedy_without_cache(model, prompt, NEW_TOKENS) for prompt in PROMPTS]
        assert expected != base_tokens, "the method must change what is generated"
        assert generate(model, PROMPTS[:1], NEW_TOKENS) == expected[:1]
        assert generate(model, PROMPTS, NEW_TOKENS) == expected
