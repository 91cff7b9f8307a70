"""Lesson 07, part 3: BLOOM-7B's parameters, and how much of them (and of the activations) is vocabulary.

    PYTHONPATH=. python lessons/07_memory_and_zero/3_bloom_parameters.py

The closed forms of minipeft/memory.py (parameter_count, vocabulary_share, logits_bytes_per_token) are
checked against the model built on the meta device, and against the terms written out here.
"""

import sys
from pathlib import Path

import torch

from minipeft import ModelConfig, build_model
from minipeft.memory import model_state_bytes, logits_bytes_per_token, parameter_count, vocabulary_share

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # lessons/
from checks import check, check_equal  # noqa: E402

GiB = 1024**3
cfg = ModelConfig.from_name("bloom-7b1")
d, f, V, L = cfg.dim, cfg.ffn_hidden_dim, cfg.vocab_size, cfg.n_layers

print("1. BLOOM-7B parameter count, term by term")
embedding = V * d                                        # tok_embeddings, also the (tied) output layer
block = (3 * d * d + 3 * d) + (d * d + d) + (d * f + f) + (f * d + d) + 2 * 2 * d   # wqkv wo w1 w2 + 2 LayerNorms
check_equal("one block: 12 d^2 + 13 d (f = 4d)", block, 12 * d * d + 13 * d)
total = embedding + 2 * d + L * block + 2 * d            # + embedding LayerNorm + final LayerNorm
check_equal("V d + 2d + L (12 d^2 + 13 d) + 2d", total, 7_069_016_064)
with torch.device("meta"):
    model = build_model(cfg)
check_equal("the model on the meta device", model.num_parameters(), total)
check_equal("memory.parameter_count", parameter_count(cfg)["total"], total)

print("2. The vocabulary's share")
share = vocabulary_share(cfg)
check("embedding / all = 1,027,604,480 / 7,069,016,064", share, embedding / total, 1e-15)
print(f"     BLOOM-7B: {share:.1%} of the weights are vocabulary rows (tied: counted once)")
llama = ModelConfig.from_name("llama-7b")
print(f"     LLaMA-7B: {vocabulary_share(llama):.1%} (32,000 rows, embedding + untied output)")
check_equal("BLOOM's one table is 3.9x LLaMA's embedding + output together", round(embedding / (2 * 32000 * 4096), 1), 3.9)
# the logits: V numbers per token, 16-bit for the model plus a float32 copy for the loss
per_token = logits_bytes_per_token(cfg)
check_equal("logits bytes per token = 6 V", per_token, 6 * V)
tokens = 4 * 512
print(f"     logits of 4 x 512 tokens: {per_token * tokens / GiB:.2f} GiB (LLaMA: "
      f"{logits_bytes_per_token(llama) * tokens / GiB:.2f} GiB), against {2 * d * tokens / GiB:.3f} GiB for one "
      f"16-bit hidden state per token")
check("BLOOM's logits are V/d = 61x a hidden state's width", V / d, 61.25, 0.0)

print("3. Model states of full fine-tuning (2 + 2 + 12 bytes per parameter)")
full = model_state_bytes(total, total)
check_equal("16 bytes per parameter", full["total"], 16 * total)
print(f"     {full['total'] / GiB:.1f} GiB, of which the vocabulary {16 * embedding / GiB:.1f} GiB")
print("all checks passed")
