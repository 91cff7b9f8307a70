"""Lesson 09, BLOOM: ALiBi slopes, the bias m_h (j - i), and why a cached or prefixed key needs no rotation.

    PYTHONPATH=. python lessons/09_other_bases/1_bloom_alibi.py

Every number is checked against a float64 computation written out here (not the model computing itself).
"""

import math
import sys
from pathlib import Path

import torch

from minipeft import ModelConfig, build_model
from minipeft.bloom import alibi_slopes
from minipeft.generate import generate

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # lessons/
from checks import check, check_equal  # noqa: E402

torch.manual_seed(0)

print("1. The slopes: a geometric series per head")
# H a power of two: m_h = 2^(-8h/H), h = 1..H. bloom-7b1 (H = 32): 2^-0.25, 2^-0.5, ..., 2^-8.
check("32 heads: m_h = 2^(-h/4)", alibi_slopes(32), [2.0 ** (-h / 4) for h in range(1, 33)], 1e-7)
check_equal("32 heads: ratio m_(h+1)/m_h is the first slope", round(float(alibi_slopes(32)[1] / alibi_slopes(32)[0]), 6),
            round(2.0 ** -0.25, 6))
# H not a power of two: c = 2^floor(log2 H) heads from the c-head series, the other H - c from the odd terms of
# the 2c-head series (every other one: they fall between the slopes already taken).
H, c = 6, 4
by_hand = [2.0 ** (-8 * h / c) for h in range(1, c + 1)] + [2.0 ** (-8 * h / (2 * c)) for h in range(1, 2 * (H - c), 2)]
check("6 heads: 2^-2, 2^-4, 2^-6, 2^-8, then 2^-1, 2^-3", alibi_slopes(6), by_hand, 0.0)
check("12 heads: 8 of the 8-head series + 4 odd terms of the 16-head one", alibi_slopes(12),
      [2.0 ** (-h) for h in range(1, 9)] + [2.0 ** (-h / 2) for h in (1, 3, 5, 7)], 1e-7)

print("2. The bias m (j - i) and the bias m j give the same attention")
# softmax over keys j of a row i is unchanged by adding one constant to the row; m i is that constant.
scores = torch.randn(5, 5, dtype=torch.float64)
i, j = torch.arange(5)[:, None].double(), torch.arange(5)[None, :].double()
causal = j <= i
m = 0.25
relative = torch.softmax((scores + m * (j - i)).masked_fill(~causal, -math.inf), dim=-1)
absolute = torch.softmax((scores + m * j).masked_fill(~causal, -math.inf), dim=-1)
check("softmax(s + m(j - i)) == softmax(s + m j)", relative, absolute, 1e-15)
check("a key d places back is penalised by m d: e^(-m d) between two equal scores", relative[4, 2] / relative[4, 4],
      math.exp(-m * 2) * math.exp(scores[4, 2] - scores[4, 4]), 1e-12)

print("3. Positions are counted over the attention mask (left padding)")
cfg = ModelConfig(family="bloom", dim=48, n_layers=2, n_heads=6, vocab_size=64)
model = build_model(cfg).eval()
mask = torch.tensor([[0, 0, 1, 1, 1]])
bias = model.alibi_bias(1, 5, 0, mask, "cpu")[0]                                    # (H, T, S)
pos = torch.tensor([0, 0, 0, 1, 2]).double()                                        # padding, then 0, 1, 2
expected = alibi_slopes(6).double()[:, None, None] * (pos[None, :] - pos[:, None])[None]
visible = torch.tensor([[s <= t and (mask[0, s] == 1 or s == t) for s in range(5)] for t in range(5)])
check("visible entries: m_h (pos_j - pos_i), the padding's position 0", bias[:, visible], expected[:, visible], 1e-7)
check_equal("hidden keys: how many are not -inf", int((~torch.isinf(bias[:, ~visible])).sum()), 0)
tokens = torch.randint(0, 64, (1, 5))
with torch.no_grad():
    padded = model(tokens, attention_mask=mask)[0, 2:]
    alone = model(tokens[:, 2:])[0]
check("a left-padded row computes what its tokens compute alone", padded, alone, 1e-6)

print("4. A cached key carries no position, so it is stored as projected and never rotated")
with torch.no_grad():
    _, cache = model(tokens, use_cache=True)
    x = model.layers[0].attention_norm(model.embed_norm(model.tok_embeddings(tokens)))   # layer 0's input
    fused = x.double() @ model.layers[0].attention.wqkv.weight.double().T + model.layers[0].attention.wqkv.bias.double()
    k_by_hand = fused.view(1, 5, 6, 3, cfg.head_dim)[:, :, :, 1].transpose(1, 2)       # per head [q, k, v]
check("cached layer-0 keys == the k slice of wqkv(x), no position applied", cache[0][0], k_by_hand, 1e-6)
# With RoPE a cached key is rotated at its position and a prefix key must be given a position convention;
# with ALiBi the position lives in the score, m (j - i), decided when the query arrives.
with torch.no_grad():
    step = model(tokens[:, 4:], past_key_values=[(k[:, :, :4], v[:, :, :4]) for k, v in cache])
    full = model(tokens)
check("a step on the cache == the full forward at that position", step[0, -1], full[0, -1], 1e-6)

print("5. A prefix of P slots: prefix keys take positions 0..P-1, real tokens P.. (HF peft's BLOOM semantics)")
P = 3
prefix = [(torch.randn(1, 6, P, cfg.head_dim), torch.randn(1, 6, P, cfg.head_dim)) for _ in range(cfg.n_layers)]
bias = model.alibi_bias(1, 2, P, torch.ones(1, P + 2, dtype=torch.long), "cpu")[0]  # (H, 2, P + 2)
distance = torch.arange(P + 2)[None, :] - torch.arange(P, P + 2)[:, None]          # j - i, i = P, P + 1
check("query at P sees prefix slot j with m (j - P)", bias[:, 0, : P + 1],
      alibi_slopes(6)[:, None] * distance[0, : P + 1].float(), 1e-7)
with torch.no_grad():
    a = model(tokens[:, :2], past_key_values=prefix)
    shifted = model(tokens[:, :2], past_key_values=prefix, attention_mask=torch.ones(1, P + 2, dtype=torch.long))
check("mask over prefix + tokens == no mask (all ones)", a, shifted, 0.0)
new_cached = generate(model, [tokens[0].tolist()], max_new_tokens=6)[0]
ids = tokens[0].tolist()
with torch.no_grad():
    for _ in range(6):
        ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
check_equal("greedy with the cache == greedy recomputing everything", new_cached, ids[5:])

print("all checks passed")
