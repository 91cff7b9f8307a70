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
    return _train_bpe_on(folder, BPE_TEXTS, vocab_size)


def tiny_bloom_pair(hidden=48, heads=6, layers=2, vocab=120, seed=0):
    """-> (transformers BloomForCausalLM, our Bloom with the same weights), both float32 in eval mode."""
    from minipeft.checkpoint.hf_bloom import bloom_config_from_hf, hf_bloom_tensor_to_ours
    from minipeft.families import build_model
    hf = make_hf_bloom(hidden=hidden, heads=heads, layers=layers, vocab=vocab, seed=seed)
    cfg = bloom_config_from_hf(hf.config.to_dict())
    ours = build_model(cfg).eval()
    state = dict(kv for kv in (hf_bloom_tensor_to_ours(k, v, cfg) for k, v in hf.state_dict().items()) if kv)
    ours.load_state_dict(state, strict=True)
    return hf, ours


def left_padded(vocab=120, seed=1):
    """tokens (3, 9) and their attention mask: row 0 full, rows 1 and 2 left-padded by 3 and 6 (pad id 3)."""
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(4, vocab, (3, 9), generator=generator)
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[1, :3] = 0
    mask[2, :6] = 0
    tokens[mask == 0] = 3
    return tokens, mask


def make_bloom_workspace(folder, seed=1234) -> dict:
    """A tiny random BLOOM saved as our checkpoint folder with a byte-level BPE tokenizer.json trained on the
    training records, plus train.json / val.json (train_helpers' learnable "say A then B" records)."""
    import json
    from minipeft.checkpoint import save_model
    from minipeft.config import ModelConfig
    from minipeft.families import build_model
    from minipeft.tokenizer import Tokenizer
    from train_helpers import INIT_STD, make_records
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    records = make_records(24) + make_records(8, offset=100)
    texts = [f"{r['instruction']} {r['input']} {r['output']}" for r in records] + BPE_TEXTS
    tokenizer_path = _train_bpe_on(folder, texts + ["Below is an instruction that describes a task. Write a "
                                                    "response that appropriately completes the request. "
                                                    "### Instruction: ### Input: ### Response:"] * 5)
    cfg = ModelConfig(family="bloom", dim=32, n_layers=2, n_heads=4, vocab_size=Tokenizer(tokenizer_path).vocab_size,
                      norm_eps=1e-5, max_seq_len=128)
    torch.manual_seed(seed)
    model = build_model(cfg)
    model.init_weights(std=INIT_STD)
    save_model(model, cfg, folder / "model", tokenizer_path=tokenizer_path)
    (folder / "train.json").write_text(json.dumps(make_records(24)))
    (folder / "val.json").write_text(json.dumps(make_records(8, offset=100)))
    return {"tokenizer": str(tokenizer_path), "model": str(folder / "model"), "train": str(folder / "train.json"),
            "val": str(folder / "val.json")}


def _train_bpe_on(folder, texts, vocab_size=400) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(texts, trainer)
    path = Path(folder) / "tokenizer.json"
    tokenizer.save(str(path))
    return path
