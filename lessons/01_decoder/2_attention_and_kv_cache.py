"""Lesson 01, step 2: causal attention, grouped-query heads, the whole decoder, and the KV cache (键值缓存).

Run from the repository root:
    PYTHONPATH=. python lessons/01_decoder/2_attention_and_kv_cache.py

A float64 decoder written here from the README's formulas is compared with minipeft.model.Transformer,
then incremental decoding with the cache is compared with one full forward pass.
"""

import math

import torch

from minipeft.config import ModelConfig
from minipeft.model import Transformer, rope_cos_sin
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # lessons/, for checks.py
from checks import check  # noqa: E402


torch.manual_seed(0)
cfg = ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=50, multiple_of=16, norm_eps=1e-6)
H, G, hd = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
model = Transformer(cfg).eval()
model.init_weights(std=0.3)              # larger than the usual 0.02 so that logits are O(1) and errors show
print(f"tiny model: d={cfg.dim}, layers={cfg.n_layers}, H={H} query heads, G={G} key/value heads, hd={hd}")

# ------------------------------------------------------------------------------------------------
print("1. Causal attention for one head: softmax(q k^T / sqrt(hd) + M) v, M[t, s] = -inf for s > t")
# Hand-worked, hd = 1, T = 2: q = k = (1, 2), v = (10, 20).
#   row 0 sees key 0 only                     -> output 10
#   row 1: scores (2*1, 2*2) = (2, 4), softmax = (e^2, e^4) / (e^2 + e^4) -> 10 * 0.1192 + 20 * 0.8808 = 18.808
q1 = torch.tensor([[[[1.0], [2.0]]]])                              # (B=1, heads=1, T=2, hd=1)
v1 = torch.tensor([[[[10.0], [20.0]]]])
out = model.layers[0].attention.attend(q1.expand(1, H, 2, 1), q1.expand(1, G, 2, 1), v1.expand(1, G, 2, 1), None)
p = math.exp(4) / (math.exp(2) + math.exp(4))
check("hand example: outputs (10, 18.808)", out[0, 0, :, 0], [10.0, 10 * (1 - p) + 20 * p], 1e-4)


def attention_float64(q, k, v):
    """q (B, H, T, hd), k/v (B, G, T, hd) -> (B, H, T, hd); query head h uses key/value head h // (H/G)."""
    k = k.repeat_interleave(H // G, dim=1)                          # (B, H, T, hd)
    v = v.repeat_interleave(H // G, dim=1)
    T = q.shape[2]
    scores = q @ k.transpose(-1, -2) / math.sqrt(hd)                # (B, H, T, T)
    future = torch.ones(T, T, dtype=torch.bool).triu(1)             # s > t
    scores = scores.masked_fill(future, float("-inf"))
    return scores.softmax(-1) @ v


q = torch.randn(2, H, 5, hd, dtype=torch.float64)
k = torch.randn(2, G, 5, hd, dtype=torch.float64)
v = torch.randn(2, G, 5, hd, dtype=torch.float64)
got = model.layers[0].attention.attend(q.float(), k.float(), v.float(), None)
check("Attention.attend (SDPA, GQA) == float64 causal softmax", got, attention_float64(q, k, v), 1e-5)


# ------------------------------------------------------------------------------------------------
print("2. The whole decoder in float64 from the formulas, with minipeft's weights")


def decoder_float64(model: Transformer, tokens: torch.Tensor) -> torch.Tensor:
    """tokens (B, T) -> logits (B, T, V), every step in float64 (independent of minipeft.model's code)."""
    W = {name: p.detach().double() for name, p in model.named_parameters()}
    c = model.config
    B, T = tokens.shape

    def rmsnorm(x, gain):
        return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + c.norm_eps) * gain

    def rope(x):                                                    # x (B, heads, T, hd), positions 0..T-1
        freq = c.rope_theta ** (-torch.arange(0, hd, 2, dtype=torch.float64) / hd)       # (hd/2,)
        angle = torch.arange(T, dtype=torch.float64)[:, None] * freq                     # (T, hd/2)
        z = torch.view_as_complex(x.reshape(*x.shape[:-1], hd // 2, 2).contiguous())
        return torch.view_as_real(z * torch.polar(torch.ones_like(angle), angle)).flatten(-2)

    h = W["tok_embeddings.weight"][tokens]                          # (B, T, d)
    for i in range(c.n_layers):
        L = f"layers.{i}."
        x = rmsnorm(h, W[L + "attention_norm.weight"])
        q = (x @ W[L + "attention.wq.weight"].T).view(B, T, H, hd).transpose(1, 2)      # (B, H, T, hd)
        k = (x @ W[L + "attention.wk.weight"].T).view(B, T, G, hd).transpose(1, 2)      # (B, G, T, hd)
        v = (x @ W[L + "attention.wv.weight"].T).view(B, T, G, hd).transpose(1, 2)
        att = attention_float64(rope(q), rope(k), v).transpose(1, 2).reshape(B, T, H * hd)
        h = h + att @ W[L + "attention.wo.weight"].T
        x = rmsnorm(h, W[L + "ffn_norm.weight"])
        gate, up = x @ W[L + "feed_forward.w1.weight"].T, x @ W[L + "feed_forward.w3.weight"].T
        h = h + (gate * torch.sigmoid(gate) * up) @ W[L + "feed_forward.w2.weight"].T   # SwiGLU
    return rmsnorm(h, W["norm.weight"]) @ W["output.weight"].T


tokens = torch.randint(0, cfg.vocab_size, (2, 7))                   # (B=2, T=7)
full_logits = model(tokens)                                         # (2, 7, V)
print(f"   logits range [{full_logits.min():.2f}, {full_logits.max():.2f}]")
check("Transformer logits == float64 decoder", full_logits, decoder_float64(model, tokens), 1e-4)

changed = tokens.clone()
changed[:, -1] = (changed[:, -1] + 1) % cfg.vocab_size              # change only the last token
check("causal: changing token 6 leaves logits 0..5 unchanged", model(changed)[:, :-1], full_logits[:, :-1], 1e-6)

# ------------------------------------------------------------------------------------------------
print("3. KV cache: keep every layer's (rotated) k and v; each new token only computes its own q, k, v")
logits, cache = model(tokens[:, :3], use_cache=True)                # prefill 3 tokens
steps = [logits]
for t in range(3, 7):                                               # then one token at a time
    logits, cache = model(tokens[:, t:t + 1], past_key_values=cache, use_cache=True)
    steps.append(logits)
incremental = torch.cat(steps, dim=1)                               # (2, 7, V)
check("prefill 3 + 4 single steps with the cache == one full forward", incremental, full_logits, 5e-5)

k0, v0 = cache[0]
layer0 = model.layers[0]
positions = torch.arange(7).expand(2, 7)
rotation = rope_cos_sin(positions, hd, cfg.rope_theta)                 # (cos, sin)
_, rotated_k, plain_v = layer0.attention.project(layer0.attention_norm(model.tok_embeddings(tokens)), rotation)
check("the cache stores keys after RoPE (layer 0: RoPE(W_k RMSNorm(E[tokens])))", k0, rotated_k, 1e-5)
check("... and values as they are", v0, plain_v, 1e-5)
print(f"   cache: {len(cache)} layers, each k and v of shape {tuple(k0.shape)} = (B, G, S, hd)")
assert k0.shape == (2, G, 7, hd) and v0.shape == (2, G, 7, hd), "cache shape should be (B, G, S, hd)"


def kv_cache_bytes(n_layers: int, n_kv_heads: int, head_dim: int, seq_len: int, batch: int, bytes_per: int) -> int:
    """2 (k and v) * layers * G * hd * S * B * bytes per element."""
    return 2 * n_layers * n_kv_heads * head_dim * seq_len * batch * bytes_per


measured = sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in cache)
check("cache bytes == 2 * L * G * hd * S * B * 4 (float32)", measured, kv_cache_bytes(cfg.n_layers, G, hd, 7, 2, 4), 0)

big = ModelConfig.from_name("llama-7b")
per_token = kv_cache_bytes(big.n_layers, big.n_kv_heads, big.head_dim, 1, 1, 2)
print(f"   LLaMA-7B in fp16: {per_token:,} bytes = {per_token / 2**20:.1f} MiB per token; "
      f"2048 tokens = {2048 * per_token / 2**30:.1f} GiB")
check("LLaMA-7B fp16 cache per token = 2*32*4096*2 = 524,288 bytes", per_token, 524_288, 0)

print("all checks passed")
