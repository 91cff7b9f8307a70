"""Lesson 05: LLaMA-Adapter's zero-initialised gated attention (零初始化门控注意力).

Run from the repository root:
    PYTHONPATH=. python lessons/05_llama_adapter/1_gated_prompt.py

A float64 re-implementation of one adapted attention layer, written here from the README's formula,
is compared with minipeft.peft.GatedAdapterPrompt (values and gradients), then the whole model is
checked through apply_peft(model, LlamaAdapterConfig(prompt_len, adapter_layers, gate)).
"""

import copy
import math

import torch

from minipeft.config import ModelConfig
from minipeft.families import build_model
from minipeft.model import Transformer, rope_cos_sin
from minipeft.peft import GatedAdapterPrompt, LlamaAdapterConfig, apply_peft
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # lessons/, for checks.py
from checks import check, check_equal, check_quoted, check_true  # noqa: E402


torch.manual_seed(0)
cfg = ModelConfig(dim=32, n_layers=3, n_heads=4, n_kv_heads=2, vocab_size=50, multiple_of=16)
H, G, hd, K = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, 4          # K = prompt length
base = Transformer(cfg).eval()
base.init_weights(std=0.3)
frozen_copy = copy.deepcopy(base)
tokens = torch.randint(0, cfg.vocab_size, (2, 6))
base_logits = frozen_copy(tokens)


def adapted_attention_float64(x, W, prompt, gate_values):
    """One adapted attention layer in float64, positions 0..T-1, causal.

    A      = softmax(q k^T / sqrt(hd) + causal) v                  the layer's own attention (RoPE on q, k)
    k_p    = prompt W_k^T, v_p = prompt W_v^T                       (K, G*hd), no RoPE
    A_p    = softmax(q k_p^T / sqrt(hd)) v_p                        a separate softmax over the K prompt slots
    out    = W_o (A + g_h * A_p)                                    g_h = the gate of head h"""
    B, T, d = x.shape

    def rope(t):                                                    # (B, heads, T, hd)
        freq = cfg.rope_theta ** (-torch.arange(0, hd, 2, dtype=torch.float64) / hd)
        angle = torch.arange(T, dtype=torch.float64)[:, None] * freq
        z = torch.view_as_complex(t.reshape(*t.shape[:-1], hd // 2, 2).contiguous())
        return torch.view_as_real(z * torch.polar(torch.ones_like(angle), angle)).flatten(-2)

    q = rope((x @ W["wq"].T).view(B, T, H, hd).transpose(1, 2))                              # (B, H, T, hd)
    k = rope((x @ W["wk"].T).view(B, T, G, hd).transpose(1, 2)).repeat_interleave(H // G, 1)  # (B, H, T, hd)
    v = (x @ W["wv"].T).view(B, T, G, hd).transpose(1, 2).repeat_interleave(H // G, 1)
    causal = torch.ones(T, T, dtype=torch.bool).triu(1)
    A = (q @ k.transpose(-1, -2) / math.sqrt(hd)).masked_fill(causal, float("-inf")).softmax(-1) @ v
    k_p = (prompt @ W["wk"].T).view(K, G, hd).transpose(0, 1).repeat_interleave(H // G, 0)   # (H, K, hd)
    v_p = (prompt @ W["wv"].T).view(K, G, hd).transpose(0, 1).repeat_interleave(H // G, 0)
    A_p = (q @ k_p.transpose(-1, -2) / math.sqrt(hd)).softmax(-1) @ v_p                     # (B, H, T, hd)
    out = A + gate_values.view(1, H, 1, 1) * A_p
    return out.transpose(1, 2).reshape(B, T, H * hd) @ W["wo"].T


# ------------------------------------------------------------------------------------------------
print("1. out = W_o (A + g * softmax(q k_p^T / sqrt hd) v_p): the library vs float64, with a nonzero gate")
layer = GatedAdapterPrompt(copy.deepcopy(base.layers[0].attention), prompt_len=K, gate="tanh")
with torch.no_grad():
    layer.adapter_gate.copy_(torch.tensor([0.5, -1.0, 2.0, 0.1]))
W = {name: getattr(layer, name).weight.detach().double() for name in ("wq", "wk", "wv", "wo")}
x = torch.randn(2, 6, cfg.dim, dtype=torch.float64)
rotation = rope_cos_sin(torch.arange(6).expand(2, 6), hd, cfg.rope_theta)   # (cos, sin)
got, _ = layer(x.float(), rotation, None)
gate = torch.tanh(layer.adapter_gate.detach().double())
check("GatedAdapterPrompt == float64 formula (gate tanh(g))", got,
      adapted_attention_float64(x, W, layer.adapter_prompt.detach().double(), gate), 1e-5)

# ------------------------------------------------------------------------------------------------
print("2. g = 0 at init: A + 0 * A_p = A, the model is exactly the base model")
model = apply_peft(copy.deepcopy(base), LlamaAdapterConfig(prompt_len=K, adapter_layers=2, gate="tanh"))
gates = [p for n, p in model.named_parameters() if n.endswith("adapter_gate")]
check("every gate starts at 0", torch.cat([g.detach() for g in gates]), torch.zeros(2 * H), 0)
check("logits at init == the base model's, exactly", model(tokens), base_logits, 0)

# ------------------------------------------------------------------------------------------------
print("3. The first step moves only g (tanh'(0) = 1); the prompt's gradient is 0 until g != 0")
# L = sum(out * U). With g = 0: dL/dprompt = 0 (the prompt term is multiplied by tanh(0) = 0),
# dL/dg_h = tanh'(0) * <dL/d(A + g A_p)_h, A_p,h> = <..., A_p,h> since tanh'(0) = 1 - tanh(0)^2 = 1.
U = torch.randn(2, 6, cfg.dim, dtype=torch.float64)
grads = {}
for kind in ("tanh", "plain"):
    torch.manual_seed(1)                                            # the same prompt for both gate kinds
    fresh = GatedAdapterPrompt(copy.deepcopy(base.layers[0].attention), prompt_len=K, gate=kind)
    out, _ = fresh(x.float(), rotation, None)
    (out * U.float()).sum().backward()
    grads[kind] = (fresh.adapter_gate.grad.clone(), fresh.adapter_prompt.grad.clone(), fresh)
prompt64 = grads["tanh"][2].adapter_prompt.detach().double().requires_grad_(True)
gate64 = torch.zeros(H, dtype=torch.float64, requires_grad=True)
(adapted_attention_float64(x, W, prompt64, torch.tanh(gate64)) * U).sum().backward()
check("dL/dg == float64 autograd of the formula", grads["tanh"][0], gate64.grad, 1e-4)
check("dL/dprompt == 0 at the first step", grads["tanh"][1], torch.zeros(K, cfg.dim), 0)
check("tanh gate and plain gate have the same first gradient (tanh'(0) = 1)", grads["tanh"][0], grads["plain"][0], 1e-6)
print(f"   dL/dg = {grads['tanh'][0].numpy().round(3)}")
fresh = grads["tanh"][2]
with torch.no_grad():                                               # one SGD step: only g can move
    fresh.adapter_gate -= 0.01 * fresh.adapter_gate.grad
fresh.zero_grad()
out, _ = fresh(x.float(), rotation, None)
(out * U.float()).sum().backward()
prompt64.grad = None
(adapted_attention_float64(x, W, prompt64, torch.tanh(fresh.adapter_gate.detach().double())) * U).sum().backward()
print(f"   after one step g = {fresh.adapter_gate.detach().numpy().round(3)}; |dL/dprompt| = "
      f"{fresh.adapter_prompt.grad.norm():.3f}")
check("second step: dL/dprompt == float64 autograd (now nonzero)", fresh.adapter_prompt.grad, prompt64.grad, 1e-4)
assert fresh.adapter_prompt.grad.abs().max() > 1e-3, "once g != 0 the prompt should get a gradient"

# ------------------------------------------------------------------------------------------------
print("4. The prompt enters keys and values only: queries, real keys and the KV cache are untouched")
with torch.no_grad():
    for g in gates:
        g.copy_(torch.randn(H))                                     # a "trained" state
q_base, k_base, v_base = base.layers[2].attention.project(x.float(), rotation)
q_adap, k_adap, v_adap = model.base.layers[2].attention.project(x.float(), rotation)
check("the adapted layer's queries and real keys/values == the base layer's", torch.cat(
    [q_adap.flatten(), k_adap.flatten(), v_adap.flatten()]), torch.cat([q_base.flatten(), k_base.flatten(),
                                                                        v_base.flatten()]), 0)
full, cache = model(tokens, use_cache=True)
check_equal("cache length per layer == real tokens only (no K prompt slots)", cache[2][0].shape[2], 6)
logits, cache = model(tokens[:, :2], use_cache=True)
steps = [logits]
for t in range(2, 6):
    logits, cache = model(tokens[:, t:t + 1], past_key_values=cache, use_cache=True)
    steps.append(logits)
check("incremental decoding with the cache == full forward (gate != 0)", torch.cat(steps, 1), full, 5e-5)

# ------------------------------------------------------------------------------------------------
print("5. Only the top L_a layers get a prompt: L_a * (K * d + H) parameters")
names = sorted(n for n, p in model.named_parameters() if p.requires_grad)
check_equal("trainable parameters (adapter_layers = 2 of 3)", names,
            [f"base.layers.{i}.attention.adapter_{what}" for i in (1, 2) for what in ("gate", "prompt")])
check_equal("count == 2 * (4 * 32 + 4)", model.report.trainable, 2 * (K * cfg.dim + H))
with torch.device("meta"):
    model7 = apply_peft(Transformer(ModelConfig.from_name("llama-7b")), LlamaAdapterConfig(prompt_len=10,
                                                                                           adapter_layers=30))
print(f"   LLaMA-7B, K = 10, L_a = 30: {model7.report}")
check_equal("30 * (10 * 4096 + 32) = 1,229,760", model7.report.trainable, 30 * (10 * 4096 + 32))

# ------------------------------------------------------------------------------------------------
print("6. Separate softmax vs one softmax over [k_p ; k]: only the separate one starts at the base model")
q1 = torch.randn(hd, dtype=torch.float64)
k_real, v_real = torch.randn(5, hd, dtype=torch.float64), torch.randn(5, hd, dtype=torch.float64)
k_prompt, v_prompt = torch.randn(K, hd, dtype=torch.float64), torch.randn(K, hd, dtype=torch.float64)
A = torch.softmax(k_real @ q1 / math.sqrt(hd), 0) @ v_real
A_p = torch.softmax(k_prompt @ q1 / math.sqrt(hd), 0) @ v_prompt
one_softmax = torch.softmax(torch.cat([k_prompt, k_real]) @ q1 / math.sqrt(hd), 0) @ torch.cat([v_prompt, v_real])
mass = torch.exp(k_prompt @ q1 / math.sqrt(hd)).sum()
lam = mass / (mass + torch.exp(k_real @ q1 / math.sqrt(hd)).sum())
check("one softmax == lam * A_p + (1 - lam) * A (lesson 03's split)", one_softmax, lam * A_p + (1 - lam) * A, 1e-12)
print(f"   one softmax with random prompt keys: lam = {lam:.3f}, |output - A| = {(one_softmax - A).norm():.3f}")
check_quoted("the README's lambda", (Path(__file__).resolve().parent / "README.md").read_text(encoding="utf-8"),
             "({} in the script's example)", lam.item(), 0.005)
assert (one_softmax - A).norm() > 1e-2, "one softmax over [prompt ; real] changes the output at init"
check("separate softmax with g = 0: A + 0 * A_p == A exactly", A + 0.0 * A_p, A, 0)

# ------------------------------------------------------------------------------------------------
print("7. A zero prompt stays at zero only without key/value biases: BLOOM's fused wqkv has them")
# With P = 0 the prompt keys and values are the biases b_k, b_v (not 0). All K keys are equal, so the softmax is
# uniform and A_p = b_v for every query: dL/dg_h = <U_h, b_v,h> != 0, and once g moves, P gets gradient too.
torch.manual_seed(0)
bloom_cfg = ModelConfig(family="bloom", dim=32, n_layers=2, n_heads=4, vocab_size=50)
bloom = build_model(bloom_cfg)
with torch.no_grad():
    for layer in bloom.layers:
        layer.attention.wqkv.bias.normal_()                              # a pretrained layer's biases are not zero
bloom_model = apply_peft(bloom, LlamaAdapterConfig(prompt_len=K, adapter_layers=2))
bloom_layers = [m for m in bloom_model.modules() if isinstance(m, GatedAdapterPrompt)]
with torch.no_grad():
    for layer in bloom_layers:
        layer.adapter_prompt.zero_()
        layer.adapter_gate.fill_(1.0)                                    # only to read A_p off the layer
top = bloom_layers[-1]
q_any = torch.randn(1, bloom_cfg.n_heads, 3, bloom_cfg.head_dim)
b_v = top.wqkv.bias.detach().view(bloom_cfg.n_heads, 3, bloom_cfg.head_dim)[:, 2]      # (H, hd): per head [q, k, v]
check("zero prompt on BLOOM: A_p == tanh(1) * b_v for every query (the prompt values are the bias)",
      top.prompt_attention(q_any), math.tanh(1.0) * b_v[None, :, None, :].expand(1, -1, 3, -1), 1e-6)
with torch.no_grad():
    for layer in bloom_layers:
        layer.adapter_gate.zero_()
tokens = torch.randint(0, bloom_cfg.vocab_size, (2, 6))
bloom_model(tokens).logsumexp(-1).sum().backward()
gate_grad = max(layer.adapter_gate.grad.abs().max().item() for layer in bloom_layers)
check_true("zero prompt and zero gate on BLOOM: largest |dL/dg|", gate_grad, "> 0 (it trains)", gate_grad > 0)

print("all checks passed")
