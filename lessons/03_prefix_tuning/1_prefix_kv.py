"""Lesson 03: prefix tuning (前缀微调). A prefix is P trainable key/value pairs in every layer, used exactly
like P earlier tokens already in the KV cache; trained through an MLP reparameterisation that is folded
away afterwards.

Run from the repository root:
    PYTHONPATH=. python lessons/03_prefix_tuning/1_prefix_kv.py

Library: minipeft.peft.PrefixKV (prefix_tensors, fold), apply_peft(model, PrefixConfig(prefix_len, reparam_hidden)).
"""

import copy
import math

import torch

from minipeft.config import ModelConfig
from minipeft.model import Transformer, rope_cos_sin
from minipeft.peft import PrefixConfig, PrefixKV, apply_peft
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # lessons/, for checks.py
from checks import check, check_equal  # noqa: E402


torch.manual_seed(0)
cfg = ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=50, multiple_of=16)
L, G, hd, kv_dim = cfg.n_layers, cfg.n_kv_heads, cfg.head_dim, cfg.kv_dim
base = Transformer(cfg).eval()
base.init_weights(std=0.3)
frozen_copy = copy.deepcopy(base)
tokens = torch.randint(0, cfg.vocab_size, (1, 5))                   # (B=1, n=5)
P = 3

# ------------------------------------------------------------------------------------------------
print("1. One head, float64: attention over [prefix ; real] keys splits into two softmaxes mixed by lambda")
# softmax(q [K_p ; K]^T / sqrt(hd)) [V_p ; V] = lam * softmax(q K_p^T) V_p + (1 - lam) * softmax(q K^T) V
#   lam = sum_j exp(q.k_p_j / sqrt hd) / (sum_j exp(q.k_p_j / sqrt hd) + sum_s exp(q.k_s / sqrt hd))
q = torch.randn(hd, dtype=torch.float64)
K_p, V_p = torch.randn(P, hd, dtype=torch.float64), torch.randn(P, hd, dtype=torch.float64)
K, V = torch.randn(4, hd, dtype=torch.float64), torch.randn(4, hd, dtype=torch.float64)
joint = torch.softmax(torch.cat([K_p, K]) @ q / math.sqrt(hd), 0) @ torch.cat([V_p, V])
prefix_mass = torch.exp(K_p @ q / math.sqrt(hd)).sum()
lam = prefix_mass / (prefix_mass + torch.exp(K @ q / math.sqrt(hd)).sum())
split = lam * torch.softmax(K_p @ q / math.sqrt(hd), 0) @ V_p + (1 - lam) * torch.softmax(K @ q / math.sqrt(hd), 0) @ V
print(f"   lambda (the attention mass on the prefix) = {lam:.4f}")
check("one softmax over P + S keys == lam * prefix term + (1 - lam) * original attention", joint, split, 1e-12)

# ------------------------------------------------------------------------------------------------
print("2. A prefix == the cached keys/values of P earlier tokens: prefix tuning = a longer sequence")
context = torch.randint(0, cfg.vocab_size, (1, P))                  # P real tokens we will "compress"
_, context_cache = frozen_copy(context, use_cache=True)              # per layer (k, v), each (1, G, P, hd)
longer = frozen_copy(torch.cat([context, tokens], dim=1))           # the base on [context ; tokens]
model = apply_peft(copy.deepcopy(base), PrefixConfig(prefix_len=P, reparam_hidden=None))
with torch.no_grad():                                                # set the prefix to that cache
    model.prefix.prefix_keys.copy_(torch.stack([k[0] for k, _ in context_cache]))      # (L, G, P, hd)
    model.prefix.prefix_values.copy_(torch.stack([v[0] for _, v in context_cache]))
check("prefix model(tokens) == base([context ; tokens]) at the n real positions", model(tokens), longer[:, P:], 5e-5)
print("   (so every soft prompt is some prefix: a prefix can do what prompt tuning does, and more, because")
print("    its keys and values in each layer are free instead of computed from the layer below)")

# The same through the library's attention: P extra keys and values, exactly as given.
layer = base.layers[0].attention
x = torch.randn(1, 5, cfg.dim)
rotation = rope_cos_sin(torch.arange(P, P + 5)[None], hd, cfg.rope_theta)  # real tokens at positions P..P+n-1
q_r, k_r, v_r = layer.project(x, rotation)                           # (1, H, n, hd), (1, G, n, hd) x2
prefix_k, prefix_v = torch.randn(1, G, P, hd), torch.randn(1, G, P, hd)
mask = Transformer.build_mask(1, 5, P, None, x.device)              # every query sees every prefix slot
library = layer.attend(q_r, torch.cat([prefix_k, k_r], 2), torch.cat([prefix_v, v_r], 2), mask)
reps = cfg.n_heads // G
all_k = torch.cat([prefix_k, k_r], 2).double().repeat_interleave(reps, 1)      # (1, H, P+n, hd)
all_v = torch.cat([prefix_v, v_r], 2).double().repeat_interleave(reps, 1)
scores = q_r.double() @ all_k.transpose(-1, -2) / math.sqrt(hd)      # (1, H, n, P+n)
future = torch.ones(5, P + 5, dtype=torch.bool).triu(P + 1)          # real token t sees prefix + real 0..t
reference = scores.masked_fill(future, float("-inf")).softmax(-1) @ all_v
check("Attention.attend with P past slots == float64 softmax over P + n keys", library, reference, 1e-5)

# ------------------------------------------------------------------------------------------------
print("3. Parameters: 2 (k and v) * L * P * kv_dim")
check_equal("trainable == 2 * L * P * kv_dim", model.report.trainable, 2 * L * P * kv_dim)
loss = model.loss(tokens, tokens)
loss.backward()
with_grad = sorted(name for name, p in model.named_parameters() if p.grad is not None)
check_equal("only the prefix gets gradients", with_grad, ["prefix.prefix_keys", "prefix.prefix_values"])

# ------------------------------------------------------------------------------------------------
print("4. Reparameterisation: [K ; V] of all layers = W2 tanh(W1 E + b1) + b2, E (P, d), then fold it away")
h = 16
prefix = PrefixKV(cfg, P, reparam_hidden=h)
E = prefix.prefix_embedding.weight.detach().double()                # (P, d)
W1, b1 = prefix.reparam[0].weight.detach().double(), prefix.reparam[0].bias.detach().double()
W2, b2 = prefix.reparam[2].weight.detach().double(), prefix.reparam[2].bias.detach().double()
flat = torch.tanh(E @ W1.T + b1) @ W2.T + b2                         # (P, L * 2 * kv_dim)
per_slot = flat.view(P, L, 2, G, hd)                                 # ordered [layer][k/v][head][hd]
keys, values = prefix.prefix_tensors()                               # (L, G, P, hd)
check("prefix_tensors keys == MLP output [:, l, 0] as (G, P, hd)", keys, per_slot[:, :, 0].permute(1, 2, 0, 3), 1e-5)
check("prefix_tensors values == MLP output [:, l, 1]", values, per_slot[:, :, 1].permute(1, 2, 0, 3), 1e-5)
count = sum(p.numel() for p in prefix.parameters())
check_equal("MLP parameters: P d + (d h + h) + (h + 1) L 2 kv_dim", count,
            P * cfg.dim + (cfg.dim * h + h) + (h + 1) * L * 2 * kv_dim)

model = apply_peft(copy.deepcopy(base), PrefixConfig(prefix_len=P, reparam_hidden=h))
before = model(tokens)
model.prefix.fold()                                                  # evaluate the MLP once, keep the result
print(f"   after fold(): {model.report}")
check("folded prefix gives the same logits", model(tokens), before, 1e-6)
check_equal("folded trainable == 2 L P kv_dim", model.report.trainable, 2 * L * P * kv_dim)

# ------------------------------------------------------------------------------------------------
print("5. LLaMA-7B, P = 10, on the meta device")
cfg7 = ModelConfig.from_name("llama-7b")
with torch.device("meta"):
    direct = apply_peft(Transformer(cfg7), PrefixConfig(prefix_len=10, reparam_hidden=None))
    with_mlp = apply_peft(Transformer(cfg7), PrefixConfig(prefix_len=10, reparam_hidden=512))
print(f"   direct: {direct.report};  with the MLP (h = 512): {with_mlp.report}")
check_equal("direct: 2 * 32 * 10 * 4096", direct.report.trainable, 2_621_440)
check_equal("MLP: 10*4096 + (4096*512 + 512) + 513 * 32*2*4096", with_mlp.report.trainable,
            10 * 4096 + (4096 * 512 + 512) + 513 * 32 * 2 * 4096)
check_equal("... = 136,618,496 while training, 2,621,440 after fold", with_mlp.report.trainable, 136_618_496)

print("all checks passed")
