"""Test helpers for ChatGLM-6B: a random tiny checkpoint in the original's own folder layout, and a float64
reference forward written from the formulas (the original's rotate-half layout, one unpadded row at a time),
independent of minipeft/chatglm.py."""

from __future__ import annotations

import json
import math

import torch

# Special ids of the tiny vocabulary (the real model: 130000, 130001, 130004, 130005, pad 3).
MASK, GMASK, SOP, EOP, PAD = 100, 101, 102, 103, 3
TINY_V1 = dict(hidden_size=64, num_layers=2, num_attention_heads=4, inner_hidden_size=96, vocab_size=120)


def chatglm_v1_folder(tmp_path, seed=0, name="chatglm-hf", **overrides):
    """config.json + pytorch_model.bin named and laid out as THUDM/chatglm-6b. Returns (folder, config, state)."""
    cfg = {**TINY_V1, **overrides}
    d, L, H, F, V = (cfg["hidden_size"], cfg["num_layers"], cfg["num_attention_heads"], cfg["inner_hidden_size"],
                     cfg["vocab_size"])
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=0.2):
        return torch.randn(*shape, generator=gen) * scale

    state = {"transformer.word_embeddings.weight": rand(V, d, scale=1.0),
             "transformer.final_layernorm.weight": 1 + rand(d), "transformer.final_layernorm.bias": rand(d)}
    for i in range(L):
        p = f"transformer.layers.{i}."
        for norm in ("input_layernorm", "post_attention_layernorm"):
            state[p + norm + ".weight"], state[p + norm + ".bias"] = 1 + rand(d), rand(d)
        state[p + "attention.query_key_value.weight"], state[p + "attention.query_key_value.bias"] = rand(3 * d, d), rand(3 * d)
        state[p + "attention.dense.weight"], state[p + "attention.dense.bias"] = rand(d, d), rand(d)
        state[p + "attention.rotary_emb.inv_freq"] = torch.ones(d // H // 4)
        state[p + "mlp.dense_h_to_4h.weight"], state[p + "mlp.dense_h_to_4h.bias"] = rand(F, d), rand(F)
        state[p + "mlp.dense_4h_to_h.weight"], state[p + "mlp.dense_4h_to_h.bias"] = rand(d, F), rand(d)
    state["lm_head.weight"] = state["transformer.word_embeddings.weight"].clone()
    folder = tmp_path / name
    folder.mkdir()
    config = {"model_type": "chatglm", "bos_token_id": SOP, "eos_token_id": EOP, "mask_token_id": MASK,
              "gmask_token_id": GMASK, "pad_token_id": PAD, "layernorm_epsilon": 1e-5, "max_sequence_length": 256,
              "position_encoding_2d": True, "quantization_bit": 0, "pre_seq_len": None, **cfg}
    (folder / "config.json").write_text(json.dumps(config))
    torch.save(state, folder / "pytorch_model.bin")
    return folder, config, state


def _layer_norm(x, w, b, eps=1e-5):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * w + b


def _rotate_half_form(x, angles):
    """x (n, H, m), angles (n, m/2): the original's rotate-half rotation, pairs (i, i + m/2)."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    cos, sin = angles.cos()[:, None], angles.sin()[:, None]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def reference_logits(state, config, ids, prefix_kv=None):
    """float64 logits (n, V) of one unpadded row `ids`, computed from the formulas:
    positions: context 0..ctx-1, from <sop> (index ctx) on the position of [gMASK]; block ids 0 over the context,
    then 1, 2, ...; mask: key s visible to query t iff s <= t or s < ctx (prefix-LM); 2D rotary in rotate-half form
    on each half of a head (first half by position, second by block id), inv_freq_i = 10000^(-2i/(hd/2)) rounded to
    fp16; h' = alpha LN1(h) + Attn(LN1(h)), out = alpha LN2(h') + MLP(LN2(h')), alpha = sqrt(2 * 28) as the
    original code fixes it; tanh-GELU; tied output. prefix_kv: per layer (k, v) each (H, P, hd) (P-tuning v2:
    visible to every token, not rotated, real positions unshifted)."""
    s = {k: v.double() for k, v in state.items()}
    d, H = config["hidden_size"], config["num_attention_heads"]
    hd, n = d // H, len(ids)
    ctx = ids.index(SOP) if SOP in ids else n
    mask_pos = ids.index(GMASK) if GMASK in ids else ids.index(MASK)
    position = torch.tensor([i if i < ctx else mask_pos for i in range(n)], dtype=torch.float64)
    block = torch.tensor([0 if i < ctx else i - ctx + 1 for i in range(n)], dtype=torch.float64)
    visible = torch.tensor([[k <= q or k < ctx for k in range(n)] for q in range(n)])
    inv_freq = (1.0 / (10000 ** (torch.arange(0, hd // 2, 2, dtype=torch.float32) / (hd // 2)))).half().double()
    alpha = math.sqrt(2 * 28)
    h = s["transformer.word_embeddings.weight"][torch.tensor(ids)]
    for i in range(config["num_layers"]):
        p = f"transformer.layers.{i}."
        x = _layer_norm(h, s[p + "input_layernorm.weight"], s[p + "input_layernorm.bias"])
        qkv = (x @ s[p + "attention.query_key_value.weight"].T + s[p + "attention.query_key_value.bias"]).view(n, H, 3 * hd)
        q, k, v = qkv.split(hd, dim=-1)                                               # (n, H, hd) each

        def rotate(t):
            first, second = t.split(hd // 2, dim=-1)
            return torch.cat([_rotate_half_form(first, position[:, None] * inv_freq),
                              _rotate_half_form(second, block[:, None] * inv_freq)], dim=-1)
        q, k = rotate(q).transpose(0, 1), rotate(k).transpose(0, 1)                  # (H, n, hd)
        v = v.transpose(0, 1)
        allowed = visible
        if prefix_kv is not None:
            pk, pv = (t.double() for t in prefix_kv[i])
            k, v = torch.cat([pk, k], dim=1), torch.cat([pv, v], dim=1)
            allowed = torch.cat([torch.ones(n, pk.shape[1], dtype=torch.bool), visible], dim=1)
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(hd)
        attn = scores.masked_fill(~allowed, float("-inf")).softmax(-1) @ v          # (H, n, hd)
        attn = attn.transpose(0, 1).reshape(n, d) @ s[p + "attention.dense.weight"].T + s[p + "attention.dense.bias"]
        h = alpha * x + attn
        x = _layer_norm(h, s[p + "post_attention_layernorm.weight"], s[p + "post_attention_layernorm.bias"])
        up = x @ s[p + "mlp.dense_h_to_4h.weight"].T + s[p + "mlp.dense_h_to_4h.bias"]
        gelu = 0.5 * up * (1 + torch.tanh(math.sqrt(2 / math.pi) * (up + 0.044715 * up ** 3)))
        h = alpha * x + gelu @ s[p + "mlp.dense_4h_to_h.weight"].T + s[p + "mlp.dense_4h_to_h.bias"]
    h = _layer_norm(h, s["transformer.final_layernorm.weight"], s["transformer.final_layernorm.bias"])
    return h @ s["transformer.word_embeddings.weight"].T


def train_chatglm_sentencepiece(out_dir, version: int = 1, with_specials: bool = True) -> str:
    """A tiny SentencePiece model set up like ChatGLM-6B's ice_text.model (version 1: the special tokens, <n>,
    <|tab|> and <|blank_k|> as pieces; with_specials=False leaves them out) or ChatGLM2-6B's tokenizer.model
    (version 2: plain BPE with byte fallback, unk 0, bos 1, eos 2). Returns its path."""
    import os
    from pathlib import Path

    import sentencepiece as spm
    from helpers_tokenizer import TRAINING_LINES

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    prefix = out_dir / f"chatglm_v{version}_sp"
    symbols = []
    if version == 1 and with_specials:
        symbols = (["[MASK]", "[gMASK]", "[sMASK]", "<unused_0>", "<sop>", "<eop>", "<ENC>", "<dBLOCK>", "<pad>",
                    "<n>", "<|tab|>"] + [f"<|blank_{k}|>" for k in range(2, 81)])
    lines = [line.replace("\n", "<n>") for line in TRAINING_LINES] + ["问：你好<n>答：我很好"] * 5
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_prefix=str(prefix), model_type="bpe", vocab_size=500,
        hard_vocab_limit=False, character_coverage=0.98, byte_fallback=True, split_digits=True,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, user_defined_symbols=symbols,
        normalization_rule_name="identity", remove_extra_whitespaces=False, allow_whitespace_only_pieces=True,
        num_threads=1, minloglevel=2)
    os.remove(f"{prefix}.vocab")
    return f"{prefix}.model"
