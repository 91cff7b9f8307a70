"""Lesson 04: the Houlsby bottleneck adapter (适配器): its formula, its parameter count 2 d m + d + m, why a
zero-initialised up-projection makes it the identity, the first step's gradients, and where it sits.

Run from the repository root:
    PYTHONPATH=. python lessons/04_adapter/1_bottleneck_adapter.py

Library: minipeft.peft.BottleneckAdapter, apply_peft(model, AdapterConfig(bottleneck)).
"""

import copy
import math

import torch

from minipeft.config import ModelConfig
from minipeft.model import Transformer
from minipeft.peft import AdapterConfig, BottleneckAdapter, apply_peft
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # lessons/, for checks.py
from checks import check, check_equal, check_quoted, check_true  # noqa: E402


def gelu_float64(z: torch.Tensor) -> torch.Tensor:
    """GELU(z) = z * Phi(z) = 0.5 z (1 + erf(z / sqrt 2))."""
    return 0.5 * z * (1 + torch.erf(z / math.sqrt(2)))


def adapter_float64(h, W_down, b_down, W_up, b_up):
    """adapter(h) = h + W_up GELU(W_down h + b_down) + b_up, h (..., d)."""
    return h + gelu_float64(h @ W_down.T + b_down) @ W_up.T + b_up


torch.manual_seed(0)
d, m = 16, 4

# ------------------------------------------------------------------------------------------------
print("1. adapter(h) = h + W_up GELU(W_down h + b_down) + b_up   (d -> m -> d, m << d)")
check("hand example GELU(1) = Phi(1) = 0.841345", gelu_float64(torch.tensor(1.0, dtype=torch.float64)),
      0.8413447460685429, 1e-12)
adapter = BottleneckAdapter(d, m)
with torch.no_grad():                                                # pretend it has been trained
    adapter.up.weight.normal_(0, 0.5)
    adapter.up.bias.normal_(0, 0.5)
weights = [t.detach().double() for t in (adapter.down.weight, adapter.down.bias, adapter.up.weight, adapter.up.bias)]
h = torch.randn(5, d, dtype=torch.float64)                           # (tokens, d)
check("BottleneckAdapter == float64 formula", adapter(h.float()), adapter_float64(h, *weights), 1e-5)

# ------------------------------------------------------------------------------------------------
print("2. Parameters per adapter: W_down (m d) + b_down (m) + W_up (d m) + b_up (d) = 2 d m + d + m")
count = sum(p.numel() for p in adapter.parameters())
check_equal("d = 16, m = 4: 2*16*4 + 16 + 4", count, 2 * d * m + d + m)
check_equal("LLaMA-7B, m = 64: 2*4096*64 + 4096 + 64", 2 * 4096 * 64 + 4096 + 64, 528_448)
check("... that is ~ 2m/d = 3.1% of one 4096 x 4096 matrix", 528_448 / 4096 ** 2, 2 * 64 / 4096, 3e-4)

# ------------------------------------------------------------------------------------------------
print("3. W_up = 0 and b_up = 0 at init: adapter(h) = h + 0 = h, the identity")
fresh = BottleneckAdapter(d, m)
check("W_up == 0 and b_up == 0", torch.cat([fresh.up.weight.flatten(), fresh.up.bias]), torch.zeros(d * m + d), 0)
check("fresh adapter(h) == h exactly", fresh(h.float()), h.float(), 0)
# First-step gradients for L = sum(G * adapter(h)), G = dL/d(output):
#   z = W_down h + b_down, a = GELU(z)
#   dL/dW_up = G^T a,  dL/db_up = sum_t G_t           nonzero
#   dL/dW_down = ((G W_up) * GELU'(z))^T h = 0        because W_up = 0 (and so dL/db_down = 0)
G = torch.randn(5, d, dtype=torch.float64)
(fresh(h.float()) * G.float()).sum().backward()
z = h @ fresh.down.weight.detach().double().T + fresh.down.bias.detach().double()
check("dL/dW_up == G^T GELU(W_down h + b_down)", fresh.up.weight.grad, G.T @ gelu_float64(z), 1e-5)
check("dL/db_up == sum over tokens of G", fresh.up.bias.grad, G.sum(0), 1e-5)
check("dL/dW_down == 0 at the first step", fresh.down.weight.grad, torch.zeros(m, d), 0)
check("dL/db_down == 0 at the first step", fresh.down.bias.grad, torch.zeros(m), 0)
print("   What if W_down = 0 too? b_down is still random (nn.Linear's init), so a = GELU(b_down) != 0:")
zero_down = BottleneckAdapter(d, m)
with torch.no_grad():
    zero_down.down.weight.zero_()
(zero_down(h.float()) * G.float()).sum().backward()
a_const = gelu_float64(zero_down.down.bias.detach().double())                  # (m,) the same for every token
check("  W_down = 0: dL/dW_up == (sum_t G_t) GELU(b_down)^T (rank 1, not zero)", zero_down.up.weight.grad,
      torch.outer(G.sum(0), a_const), 1e-5)
norm_up = zero_down.up.weight.grad.norm().item()
check_true("  |dL/dW_up| (Frobenius norm): W_up moves at step one", norm_up, "> 0", norm_up > 0)
check_quoted("  the README's |dL/dW_up|", (Path(__file__).resolve().parent / "README.md").read_text(encoding="utf-8"),
             "measures |∂ℒ/∂W_up| = {} with W_down = 0", norm_up, 0.005)
check("  W_down = 0: dL/dW_down == 0 at the first step (W_up = 0)", zero_down.down.weight.grad, torch.zeros(m, d), 0)
with torch.no_grad():                                                          # one SGD step on W_up
    zero_down.up.weight -= 0.1 * zero_down.up.weight.grad
    zero_down.zero_grad()
(zero_down(h.float()) * G.float()).sum().backward()
W_up1 = zero_down.up.weight.detach().double()
gelu_slope = torch.autograd.functional.jacobian(gelu_float64, zero_down.down.bias.detach().double()).diagonal()
expected = ((G @ W_up1) * gelu_slope).T @ h                                   # ((G W_up) * GELU'(b_down))^T h
check("  after that step: dL/dW_down == ((G W_up) * GELU'(b_down))^T h, nonzero", zero_down.down.weight.grad,
      expected, 1e-5)
norm_down = zero_down.down.weight.grad.norm().item()
check_true("  |dL/dW_down| after that step", norm_down, "> 0", norm_down > 0)
print("   So W_down = 0 only slows the start (step one learns a rank-1 W_up); nothing stays stuck. Only with")
print("   W_down = 0 *and* b_down = 0 would a = 0, and then W_up and W_down both stay zero; b_up alone learns.")

# ------------------------------------------------------------------------------------------------
print("4. In the decoder: after W_o and after the feed-forward's W2, before each residual add")
cfg = ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=50, multiple_of=16)
base = Transformer(cfg).eval()
base.init_weights(std=0.3)
reference = copy.deepcopy(base)
tokens = torch.randint(0, cfg.vocab_size, (2, 6))
base_logits = reference(tokens)
model = apply_peft(base, AdapterConfig(bottleneck=m))
print(f"   {model.report}")
check_equal("trainable == 2 adapters * L * (2 d m + d + m)", model.report.trainable,
            2 * cfg.n_layers * (2 * cfg.dim * m + cfg.dim + m))
check("zero-initialised adapters: logits == the base model's, exactly", model(tokens), base_logits, 0)

with torch.no_grad():                                                # a "trained" state
    for name, p in model.named_parameters():
        if ".adapter.up." in name:
            p.normal_(0, 0.3)
# Independent placement: hook a float64 adapter onto the plain base's wo and w2 outputs.
adapters = {name.removeprefix("base.").removesuffix(".adapter"): module
            for name, module in model.named_modules() if isinstance(module, BottleneckAdapter)}
assert sorted(adapters) == sorted(f"layers.{i}.{place}" for i in range(cfg.n_layers)
                                  for place in ("attention.wo", "feed_forward.w2")), sorted(adapters)
for name, module in adapters.items():
    params = [t.detach().double() for t in (module.down.weight, module.down.bias, module.up.weight, module.up.bias)]
    reference.get_submodule(name).register_forward_hook(
        lambda mod, inputs, out, params=params: adapter_float64(out.double(), *params).float())
check("adapter model == base with h + adapter(W_o ...), h' + adapter(W2 ...) hooked in", model(tokens),
      reference(tokens), 5e-5)
assert (model(tokens) - base_logits).abs().max() > 1e-2, "trained adapters should change the output"

# ------------------------------------------------------------------------------------------------
print("5. LLaMA-7B, m = 64, built on the meta device")
with torch.device("meta"):
    model7 = apply_peft(Transformer(ModelConfig.from_name("llama-7b")), AdapterConfig(bottleneck=64))
print(f"   {model7.report}")
check_equal("2 adapters * 32 layers * 528,448", model7.report.trainable, 64 * 528_448)
check_equal("= 33,820,672", 64 * 528_448, 33_820_672)

print("all checks passed")
