"""Test helpers for BLOOM: a random tiny transformers BloomForCausalLM (the peer), saved with save_pretrained,
and a tiny byte-level BPE tokenizer.json trained with `tokenizers` (nothing is downloaded).

The peer's biases and LayerNorm parameters are randomised too (transformers initialises them to 0 and 1),
so a name-table mistake between two biases or two LayerNorms cannot hide."""

from __future__ import annotations

from pathlib import Path

import torch

BPE_TEXTS = ["the cat sat on the mat and the dog sat on the log.", "write a short answer in one line.",
             "你好，我是一个小模型。今天的天气很好。", "emoji 🙂👍 and 数字 42."] * 20
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>"]   # ids 0..3, as in BLOOM's tokenizer.json


def make_hf_bloom(hidden=48, heads=6, layers=2, vocab=120, seed=0, **config):
    """A random float32 BloomForCausalLM in eval mode."""
    from transformers import BloomConfig, BloomForCausalLM
    torch.manual_seed(seed)
    hf_config = BloomConfig(vocab_size=vocab, hidden_size=hidden, n_layer=layers, n_head=heads,
                            layer_norm_epsilon=1e-5, bos_token_id=1, eos_token_id=2, pad_token_id=3, **config)
    model = BloomForCausalLM(hf_config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "layernorm" in name or "ln_f" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


def train_tiny_bpe(folder, vocab_size=300) -> Path:
    """A byte-level BPE tokenizer.json (ByteLevel pre-tokenizer and decoder, like BLOOM's), trained here."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(BPE_TEXTS, trainer)
    path = Path(folder) / "tokenizer.json"
    tokenizer.save(str(path))
    return path
