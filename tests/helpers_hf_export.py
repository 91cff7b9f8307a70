"""Test helpers for the Hugging Face export / import tests: a tiny random model of each family (2 layers, dim 64;
biases and norm gains randomised too, so a name-table slip between two of them cannot hide), exported with
export_model_to_hf and loaded by transformers (the peer), and the greedy-token comparison."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from minipeft import ModelConfig
from minipeft.checkpoint import export_model_to_hf
from minipeft.families import build_model
from minipeft.generate import generate

VOCAB = 120
CONFIGS = {
    "llama": dict(family="llama", n_kv_heads=2, ffn_hidden_dim=96),
    "bloom": dict(family="bloom"),
    "chatglm2": dict(family="chatglm2", n_kv_heads=2, ffn_hidden_dim=96, qkv_bias=True, rotary_fraction=0.5),
    "chatglm": dict(family="chatglm", ffn_hidden_dim=96, qkv_bias=True, mask_id=100, gmask_id=101, sop_id=102),
}


def random_model(family: str, seed: int = 0, vocab: int = VOCAB):
    """A float32 model of `family` in eval mode: weights N(0, 0.2^2), norm gains 1 + N(0, 0.1^2), biases N(0, 0.1^2)."""
    cfg = ModelConfig(dim=64, n_layers=2, n_heads=4, vocab_size=vocab, norm_eps=1e-5, max_seq_len=128,
                      **CONFIGS[family])
    torch.manual_seed(seed)
    model = build_model(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.2)
            else:
                p.copy_((1.0 if name.endswith("norm.weight") else 0.0) + 0.1 * torch.randn_like(p))
    return model


def export_and_load(model, folder):
    """export_model_to_hf, then transformers' AutoModelForCausalLM.from_pretrained (eager attention)."""
    from transformers import AutoModelForCausalLM
    export_model_to_hf(model, folder)
    return AutoModelForCausalLM.from_pretrained(str(folder), attn_implementation="eager").eval()


def tokens(batch: int = 2, length: int = 9, seed: int = 1, low: int = 4) -> torch.Tensor:
    return torch.randint(low, VOCAB - 20, (batch, length), generator=torch.Generator().manual_seed(seed))


def greedy_pair(ours, theirs, prompt: torch.Tensor, new: int = 8):
    """(our generate()'s greedy tokens, the peer's generate()'s) for one prompt (1-D)."""
    mine = generate(ours, [prompt.tolist()], max_new_tokens=new)[0]
    with torch.no_grad():
        out = theirs.generate(input_ids=prompt[None], attention_mask=torch.ones_like(prompt[None]), do_sample=False,
                              max_new_tokens=new, min_new_tokens=new, pad_token_id=0)
    return mine, out[0, -new:].tolist()
