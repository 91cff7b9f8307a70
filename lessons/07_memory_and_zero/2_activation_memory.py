"""Lesson 07, step 2: activation memory (激活值显存) per layer, and what recomputation (重计算, gradient
checkpointing) saves. The formula is checked against the bytes torch actually keeps for backward, counted
with saved-tensor hooks on a tiny bf16 model, then evaluated for LLaMA-7B at batch 4 x sequence 512.

Run from the repository root:
    PYTHONPATH=. python lessons/07_memory_and_zero/2_activation_memory.py
"""

import torch

from minipeft.config import ModelConfig
from minipeft.memory import (block_activation_bytes_per_token, head_bytes_per_token, model_activation_bytes,
                             rope_table_bytes_per_token)
from minipeft.model import Transformer, rope_cos_sin
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # lessons/, for checks.py
from checks import check, check_quoted  # noqa: E402

README = (Path(__file__).resolve().parent / "README.md").read_text(encoding="utf-8")

GiB = 2 ** 30


# ================================================================================================
# The reusable formulas live in minipeft/memory.py (imported above): block_activation_bytes_per_token,
# rope_table_bytes_per_token, head_bytes_per_token, model_activation_bytes. This script checks them.
# ================================================================================================
# ================================================================================================
# Measuring: count the distinct storages autograd saves for backward
# ================================================================================================
def saved_bytes(run, parameters) -> int:
    """Run `run()` under saved-tensor hooks and return the bytes of distinct tensors it saves for backward,
    leaving out the parameters themselves (they are model states, not activations)."""
    parameter_ptrs = {p.data_ptr() for p in parameters}
    storages = {}

    def pack(tensor):
        if tensor.data_ptr() not in parameter_ptrs:
            storage = tensor.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        run()
    return sum(storages.values())


torch.manual_seed(0)
cfg = ModelConfig(dim=64, n_layers=3, n_heads=4, n_kv_heads=2, vocab_size=100, multiple_of=16)
model = Transformer(cfg).to(torch.bfloat16).train()
B, T = 2, 16
tokens = B * T
print(f"tiny bf16 model: d={cfg.dim}, f={cfg.ffn_hidden_dim}, H={cfg.n_heads}, G={cfg.n_kv_heads}, "
      f"L={cfg.n_layers}; batch {B} x seq {T}")

# ------------------------------------------------------------------------------------------------
print("1. One block, all weights trainable: 26 d + 8 f + 4 H + 8 bytes per token (+ 4 hd for cos/sin)")
block = model.layers[0]
hidden = torch.randn(B, T, cfg.dim, dtype=torch.bfloat16, requires_grad=True)
rotation = rope_cos_sin(torch.arange(T).expand(B, T), cfg.head_dim, cfg.rope_theta)   # (cos, sin)
measured = saved_bytes(lambda: block(hidden, rotation, None), block.parameters()) / tokens
formula = block_activation_bytes_per_token(cfg) + rope_table_bytes_per_token(cfg)
print(f"   measured {measured:.0f} bytes per token, formula {formula}")
check("measured / formula within 10%", measured / formula, 1.0, 0.10)

print("2. The same block frozen (PEFT: gradients pass through, no weight gradients): 16 d + 6 f + 4 H + 8")
for p in block.parameters():
    p.requires_grad_(False)
measured_frozen = saved_bytes(lambda: block(hidden, rotation, None), block.parameters()) / tokens
formula_frozen = block_activation_bytes_per_token(cfg, trainable_weights=False) + rope_table_bytes_per_token(cfg)
print(f"   measured {measured_frozen:.0f} bytes per token, formula {formula_frozen}")
check("measured / formula within 10%", measured_frozen / formula_frozen, 1.0, 0.10)
check_quoted("the README's measured and formula bytes, trainable and frozen block", README,
             "measured {} bytes per token, formula {}; frozen {} vs {}", [measured, formula, measured_frozen,
                                                                          formula_frozen], 0.5)
for p in block.parameters():
    p.requires_grad_(True)

# ------------------------------------------------------------------------------------------------
print("3. The whole model, without and with recomputation (gradient checkpointing)")
ids = torch.randint(0, cfg.vocab_size, (B, T))
model.gradient_checkpointing = False
measured_full = saved_bytes(lambda: model(ids), model.parameters())
model.gradient_checkpointing = True
measured_recompute = saved_bytes(lambda: model(ids), model.parameters())
model.gradient_checkpointing = False
formula_full = model_activation_bytes(cfg, B, T)
# What stays saved through the forward pass: the formula without the + 1 block of the recompute peak.
formula_kept = model_activation_bytes(cfg, B, T, recompute=True) - tokens * block_activation_bytes_per_token(cfg)
print(f"   no recomputation: measured {measured_full} bytes, formula {formula_full}")
print(f"   recomputation:    measured {measured_recompute} bytes kept, formula L * 2d + rest = {formula_kept}")
check("no recomputation: measured / formula within 10%", measured_full / formula_full, 1.0, 0.10)
check("recomputation: measured / formula within 10%", measured_recompute / formula_kept, 1.0, 0.10)

# ------------------------------------------------------------------------------------------------
print("4. LLaMA-7B, batch 4 x sequence 512, bf16")
big = ModelConfig.from_name("llama-7b")
per_token = block_activation_bytes_per_token(big)
check("per block per token: 26*4096 + 8*11008 + 4*32 + 8 = 194,696 bytes", per_token,
      26 * 4096 + 8 * 11008 + 4 * 32 + 8, 0)
per_layer = 4 * 512 * per_token
all_layers = big.n_layers * per_layer
print(f"   one block: {per_layer / 2**20:.0f} MiB; 32 blocks: {all_layers / GiB:.2f} GiB")
check("32 blocks of activations: 11.88 GiB", all_layers / GiB, 11.88, 0.005)
full = model_activation_bytes(big, 4, 512)
recompute = model_activation_bytes(big, 4, 512, recompute=True)
print(f"   whole model: {full / GiB:.2f} GiB; with recomputation {recompute / GiB:.2f} GiB "
      f"(32 block inputs {32 * 2 * 4096 * 2048 / GiB:.2f} GiB + one block being recomputed)")
check("recomputation keeps 32 * 2d * 2048 tokens + one block", recompute,
      4 * 512 * (32 * 2 * 4096 + per_token + rope_table_bytes_per_token(big) + head_bytes_per_token(big)), 0)
outside = (rope_table_bytes_per_token(big) + head_bytes_per_token(big)) * 4 * 512
check_quoted("the README's split of the recomputation figure (GiB)", README,
             "7B: 32 · 8192 · 2048 = {} GiB + {} GiB + {} GiB = {} GiB instead of {} GiB",
             [32 * 2 * 4096 * 2048 / GiB, per_layer / GiB, outside / GiB, recompute / GiB, full / GiB], 0.005)
check_quoted("the README's whole-model figure (GiB)", README, "32 blocks: {} GiB;  + {} GiB outside the blocks",
             [all_layers / GiB, outside / GiB], 0.005)
check("blocks + outside == the whole model", all_layers + outside, full, 0)
check("recomputation saves ~ 92% of the activation memory", 1 - recompute / full, 0.92, 0.01)
frozen = block_activation_bytes_per_token(big, trainable_weights=False)
print(f"   a frozen block keeps {frozen:,} bytes per token, {100 * frozen / per_token:.0f}% of a trainable one")
check("frozen block / trainable block ~ 68%", frozen / per_token, 0.68, 0.01)
check("32 frozen blocks at 2048 tokens: 8.04 GiB", 32 * frozen * 2048 / GiB, 8.04, 0.01)
logits_bytes = 4 * 512 * big.vocab_size * 4                      # fp32 logits for the loss, not in the formula
print(f"   (plus the fp32 logits for the loss: 4 * 512 * 32000 * 4 bytes = {logits_bytes / GiB:.2f} GiB)")
check("fp32 logits B * T * V * 4 = 0.24 GiB", logits_bytes / GiB, 0.244, 0.001)
# Compute: a training step is about 3 forward passes' worth (forward + backward twice the forward's cost);
# recomputation runs each block's forward once more: 4/3, about 33% more compute.
check("recomputation costs 1 extra forward in 3: +33% compute", (1 + 2 + 1) / (1 + 2) - 1, 1 / 3, 1e-12)

print("all checks passed")
