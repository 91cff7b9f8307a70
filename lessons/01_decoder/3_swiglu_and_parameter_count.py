"""Lesson 01, step 3: the SwiGLU feed-forward, Meta's hidden-size rule, and LLaMA-7B's parameter count.

Run from the repository root:
    PYTHONPATH=. python lessons/01_decoder/3_swiglu_and_parameter_count.py

The 7B model is built on the meta device (shapes only, no memory), so counting it is instant.
"""

import math

import torch

from minipeft.config import ModelConfig, meta_ffn_hidden_dim
from minipeft.model import FeedForward, Transformer
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # lessons/, for checks.py
from checks import check, check_equal  # noqa: E402


torch.manual_seed(0)

# ------------------------------------------------------------------------------------------------
print("1. SwiGLU: FFN(x) = W2 (silu(W1 x) * W3 x), silu(z) = z * sigmoid(z)")
check("hand example silu(1) = 1 / (1 + e^-1) = 0.731059", torch.nn.functional.silu(torch.tensor(1.0)),
      1 / (1 + math.exp(-1)), 1e-6)
cfg = ModelConfig(dim=16, n_layers=1, n_heads=2, vocab_size=10, multiple_of=8)
ffn = FeedForward(cfg)
x = torch.randn(4, cfg.dim, dtype=torch.float64)                   # (tokens, d)
W1, W2, W3 = (ffn.w1.weight.double(), ffn.w2.weight.double(), ffn.w3.weight.double())
gate = x @ W1.T                                                     # (tokens, f)
reference = (gate * torch.sigmoid(gate) * (x @ W3.T)) @ W2.T        # (tokens, d)
check("minipeft FeedForward == float64 SwiGLU", ffn(x.float()), reference, 1e-6)

# ------------------------------------------------------------------------------------------------
print("2. Hidden size: keep ~8 d^2 parameters with 3 matrices -> f = 2/3 * 4d, rounded up to multiple_of")
for name, dim, expected in (("llama-7b", 4096, 11008), ("llama-13b", 5120, 13824)):
    two_thirds = int(2 * 4 * dim / 3)
    rounded = 256 * math.ceil(two_thirds / 256)
    print(f"   {name}: 2*4*{dim}/3 = {2 * 4 * dim / 3:.2f} -> int {two_thirds} -> ceil to 256: {rounded}")
    check_equal(f"{name} hand rule", rounded, expected)
    check_equal(f"{name} ModelConfig.ffn_hidden_dim", ModelConfig.from_name(name).ffn_hidden_dim, expected)
check_equal("meta_ffn_hidden_dim(4096, 256)", meta_ffn_hidden_dim(4096, 256), 11008)
ratio = 3 * 4096 * 11008 / (8 * 4096 ** 2)
print(f"   3 d f / (8 d^2) = {ratio:.4f}: the rounding adds {100 * (ratio - 1):.2f}% to the FFN")

# ------------------------------------------------------------------------------------------------
print("3. Parameters: 2 V d + L (2 d (H hd) + 2 d (G hd) + 3 d f + 2 d) + d")


def count_parameters(cfg: ModelConfig) -> dict:
    """Closed-form parameter count of a LLaMA decoder, by part (no biases anywhere)."""
    d, f, V, L = cfg.dim, cfg.ffn_hidden_dim, cfg.vocab_size, cfg.n_layers
    attention = d * cfg.n_heads * cfg.head_dim * 2 + d * cfg.kv_dim * 2     # wq, wo + wk, wv
    feed_forward = 3 * d * f                                                 # w1, w2, w3
    norms = 2 * d                                                            # attention_norm, ffn_norm
    parts = {"tok_embeddings": V * d, "layers": L * (attention + feed_forward + norms), "norm": d,
             "output": V * d}
    parts["total"] = sum(parts.values())
    return parts


cfg7 = ModelConfig.from_name("llama-7b")
parts = count_parameters(cfg7)
per_layer = 4 * 4096 ** 2 + 3 * 4096 * 11008 + 2 * 4096
print(f"   per layer: 4*4096^2 + 3*4096*11008 + 2*4096 = {4 * 4096 ** 2:,} + {3 * 4096 * 11008:,} + 8,192"
      f" = {per_layer:,}")
print(f"   embeddings + output: 2 * 32000 * 4096 = {2 * 32000 * 4096:,}")
check_equal("LLaMA-7B by hand: 32 * per_layer + 2 * V * d + d", 32 * per_layer + 2 * 32000 * 4096 + 4096,
            6_738_415_616)
check_equal("LLaMA-7B count_parameters()", parts["total"], 6_738_415_616)

with torch.device("meta"):                                          # shapes only: no 27 GB of float32
    model7 = Transformer(cfg7)
check_equal("Transformer(llama-7b) on the meta device: num_parameters()", model7.num_parameters(), 6_738_415_616)
by_prefix = {}
for name, p in model7.named_parameters():
    key = "layers" if name.startswith("layers.") else name.split(".")[0]
    by_prefix[key] = by_prefix.get(key, 0) + p.numel()
for key in ("tok_embeddings", "layers", "norm", "output"):
    check_equal(f"   part {key}", by_prefix[key], parts[key])

share_in_layers = parts["layers"] / parts["total"]
share_ffn_in_layer = 3 * 4096 * 11008 / per_layer
print(f"   {100 * share_in_layers:.1f}% of the parameters are in the blocks, {100 * share_ffn_in_layer:.1f}% of a block"
      " is the feed-forward")
check("share in the blocks ~ 96%", share_in_layers, 0.961, 1e-3)
check("feed-forward share of a block ~ 2/3", share_ffn_in_layer, 0.668, 1e-3)
check_equal("LLaMA-13B count_parameters()", count_parameters(ModelConfig.from_name("llama-13b"))["total"],
            13_015_864_320)

for name in ("llama-13b", "tiny"):
    cfg_other = ModelConfig.from_name(name)
    with torch.device("meta"):
        other = Transformer(cfg_other)
    check_equal(f"{name}: count_parameters() == meta model", count_parameters(cfg_other)["total"],
                other.num_parameters())

print("all checks passed")
