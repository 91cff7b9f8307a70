"""Memory formulas for training a decoder with Adam in mixed precision: model states, ZeRO, activations.

Pure functions, numbers in and numbers out (bytes). Lesson 07 derives each one and checks it against
measurements (a real Adam step, saved-tensor hooks) and against DeepSpeed's own estimators;
tools/compare_methods.py uses them for its computed LLaMA-7B table.

Model states (mixed-precision Adam), Psi = all parameters, Psi_t = trainable ones:
    16-bit weight 2 Psi + 16-bit gradient 2 Psi_t + fp32 master, Adam m, v 12 Psi_t  = 2 Psi + 14 Psi_t
ZeRO on N GPUs: stage 1 divides the 12 Psi_t by N, stage 2 also the 2 Psi_t, stage 3 also the 2 Psi;
CPU offload moves gradients + optimizer (14 Psi_t) and, at stage 3, the weights (2 Psi) to the CPU.
Activations per token per decoder block (16-bit, fused attention), d = dim, f = FFN width, H = heads:
    trainable block 26 d + 8 f + 4 H + 8,   frozen block that gradients pass through 16 d + 6 f + 4 H + 8.
    (derived for the LLaMA block; BLOOM's LayerNorm/GELU block is not covered by these two)

Parameters Psi by family (V vocab, L layers, d, f, H heads, kv = G * hd), `parameter_count`:
    llama  V d (embedding) + V d (output) + L (2 d H hd + 2 d kv + 3 d f + 2 d) + d
    bloom  V d (embedding, also the tied output) + 2 d (embedding LayerNorm)
           + L (3 d^2 + 3 d + d^2 + d + 2 d f + f + d + 4 d) + 2 d
    bloom-7b1: 1,027,604,480 + 8,192 + 30 x 201,379,840 + 8,192 = 7,069,016,064, the vocabulary (250,880 x
    4096) 14.5 % of all weights; and its logits, V numbers per token, are 61x wider than the hidden state.
"""

from __future__ import annotations

import torch

from .config import ModelConfig
from .family_registry import build_model, get_family

WEIGHT_16 = 2    # bytes: the bf16/fp16 copy of every parameter, used in forward and backward
GRAD_16 = 2      # bytes: the 16-bit gradient of a trainable parameter
ADAM_32 = 12     # bytes: fp32 master weight (4) + Adam momentum m (4) + variance v (4), per trainable parameter


# ---- model states ----------------------------------------------------------------------------------
def model_state_bytes(total_params: int, trainable_params: int) -> dict:
    """Mixed-precision Adam on one device, in bytes.

    Every parameter (frozen or not) has a 16-bit weight; each trainable one also a 16-bit gradient and
    12 bytes of fp32 optimizer state: 2 + 2 + 12 = 16 bytes per trainable parameter, 2 per frozen one.
    Returns {"weights", "gradients", "optimizer", "total"}."""
    parts = {"weights": WEIGHT_16 * total_params,
             "gradients": GRAD_16 * trainable_params,
             "optimizer": ADAM_32 * trainable_params}
    parts["total"] = sum(parts.values())
    return parts


def zero_bytes_per_gpu(total_params: int, trainable_params: int, n_gpus: int, stage: int,
                       offload_optimizer: bool = False, offload_params: bool = False) -> dict:
    """Model-state bytes per GPU and on the node's CPU under ZeRO (the ZeRO paper's 2 + 2 + 12 accounting).

    stage 0: nothing partitioned (plain data parallel); stage 1: optimizer states split over n_gpus;
    stage 2: also the gradients; stage 3: also the 16-bit weights.
    offload_optimizer (ZeRO-Offload, stages 1-3): gradients and optimizer states live in CPU memory and the
    Adam step runs on the CPU; the GPU keeps its 16-bit weights. offload_params (stage 3 only): the 16-bit
    weights live on the CPU too and are fetched layer by layer (the working buffer is not counted here).
    Returns {"gpu": bytes per GPU, "cpu": bytes for the whole node}."""
    if stage not in (0, 1, 2, 3):
        raise ValueError(f"ZeRO stage must be 0, 1, 2 or 3, got {stage}")
    if offload_params and stage != 3:
        raise ValueError("offload_params needs ZeRO stage 3 (only stage 3 partitions the weights)")
    if offload_optimizer and stage == 0:
        raise ValueError("offload_optimizer needs ZeRO stage 1, 2 or 3")
    weights = WEIGHT_16 * total_params / (n_gpus if stage >= 3 else 1)
    gradients = GRAD_16 * trainable_params / (n_gpus if stage >= 2 else 1)
    optimizer = ADAM_32 * trainable_params / (n_gpus if stage >= 1 else 1)
    gpu, cpu = weights + gradients + optimizer, 0.0
    if offload_optimizer:                                    # every rank's share ends up on the same CPU
        gpu -= gradients + optimizer
        cpu += (GRAD_16 + ADAM_32) * trainable_params
    if offload_params:
        gpu -= weights
        cpu += WEIGHT_16 * total_params
    return {"gpu": gpu, "cpu": cpu}


def deepspeed_cold_estimate(total_params: int, largest_layer_params: int, gpus_per_node: int, stage: int,
                            offload_optimizer: bool, offload_params: bool = False,
                            buffer_factor: float = 1.5) -> dict:
    """DeepSpeed's own accounting (its *_all_cold estimators, zero_init=1, one node), written out term by term.

    DeepSpeed keeps, per parameter, 16 bytes in the partitioned optimizer: an fp32 gradient (4), the fp32
    master weight (4) and Adam's m and v (8). Stage 2 adds a 16-bit gradient partition (2) and the replicated
    16-bit weights (2, not divided); stage 3 partitions the 16-bit weights (2) and counts no separate 16-bit
    gradient (it is reduce-scattered straight out of a bucket). Stage 3 also gathers one layer at a time
    into a 4-byte-per-parameter buffer (the largest layer). CPU figures carry a 1.5 safety factor; a
    process that first builds an fp32 model on the CPU needs 4 bytes per parameter per GPU process.
    Returns {"gpu": bytes per GPU, "cpu": bytes per node}."""
    n = gpus_per_node
    fp32_grad, fp32_master, adam_m_v = 4, 4, 8
    partitioned = fp32_grad + fp32_master + adam_m_v                                  # 16
    if stage == 3:
        gather_buffer = 4 * largest_layer_params
        if offload_optimizer and offload_params:
            return {"gpu": gather_buffer, "cpu": (WEIGHT_16 + partitioned) * total_params * buffer_factor}
        if offload_optimizer:
            return {"gpu": gather_buffer + WEIGHT_16 * total_params // n,
                    "cpu": partitioned * total_params * buffer_factor}
        return {"gpu": gather_buffer + (WEIGHT_16 + partitioned) * total_params // n,
                "cpu": 4 * largest_layer_params * n * buffer_factor}
    if stage == 2:
        if offload_optimizer:
            return {"gpu": WEIGHT_16 * total_params, "cpu": max(4 * n, partitioned) * total_params * buffer_factor}
        return {"gpu": WEIGHT_16 * total_params + (GRAD_16 + partitioned) * total_params // n,
                "cpu": 4 * total_params * n * buffer_factor}
    raise ValueError("DeepSpeed's estimators cover stages 2 and 3")


def parameter_count(cfg: ModelConfig) -> dict:
    """Psi from the family's formula (below), by part: {"embedding", "output", "blocks", "norms", "total"} (the
    embedding LayerNorm and the final norm are in "norms"; BLOOM's tied output counts 0)."""
    formulas = get_family(cfg.family).formulas
    if formulas is None or formulas.parameter_count is None:
        raise ValueError(f"parameter_count has no formula for family {cfg.family!r}")
    parts = dict(formulas.parameter_count(cfg))
    parts["total"] = sum(parts.values())
    return parts


def llama_parameter_count(cfg: ModelConfig) -> dict:
    """LLaMA (and ChatGLM2, with its q, k, v biases): untied embedding and output, RMSNorms of d."""
    d, f, V, L, H, hd, kv = cfg.dim, cfg.ffn_hidden_dim, cfg.vocab_size, cfg.n_layers, cfg.n_heads, cfg.head_dim, cfg.kv_dim
    qkv_bias = (H * hd + 2 * kv) if cfg.qkv_bias else 0                          # ChatGLM2's q, k, v biases
    return {"embedding": V * d, "output": V * d, "norms": d,
            "blocks": L * (2 * d * H * hd + 2 * d * kv + qkv_bias + 3 * d * f + 2 * d)}


def bloom_parameter_count(cfg: ModelConfig) -> dict:
    """BLOOM: the embedding (also the tied output), its LayerNorm, biases everywhere, LayerNorms of 2 d."""
    d, f, V, L = cfg.dim, cfg.ffn_hidden_dim, cfg.vocab_size, cfg.n_layers
    attention = (3 * d * d + 3 * d) + (d * d + d)                 # wqkv, wo (with biases)
    feed_forward = (d * f + f) + (f * d + d)                      # w1, w2 (with biases)
    return {"embedding": V * d, "output": 0, "norms": 2 * d + 2 * d,
            "blocks": L * (attention + feed_forward + 2 * 2 * d)}    # two LayerNorms of 2 d per block


def vocabulary_share(cfg: ModelConfig) -> float:
    """The fraction of all parameters that are vocabulary rows (embedding + an untied output layer)."""
    parts = parameter_count(cfg)
    return (parts["embedding"] + parts["output"]) / parts["total"]


def logits_bytes_per_token(cfg: ModelConfig) -> int:
    """The output layer's activations per token that the loss sees: 16-bit logits (2 V) and the float32 copy
    the cross-entropy works on (4 V). For bloom-7b1 6 x 250,880 = 1.5 MB per token, against 8 KB for one
    16-bit hidden state: why loss.py computes the logits only where a label counts, in chunks."""
    return 6 * cfg.vocab_size


# the Linear modules LoRA may target: name -> (d_in, d_out), the family's formulas.linear_shapes
def lora_target_shapes(cfg: ModelConfig) -> dict:
    formulas = get_family(cfg.family).formulas
    if formulas is None:
        raise ValueError(f"family {cfg.family!r} has no closed forms (its record's formulas)")
    return formulas.linear_shapes(cfg)


def separate_qkv_linear_shapes(cfg: ModelConfig) -> dict:
    """LLaMA's wq, wk, wv, wo and the SwiGLU MLP's w1, w2, w3."""
    d, f, kv, q = cfg.dim, cfg.ffn_hidden_dim, cfg.kv_dim, cfg.n_heads * cfg.head_dim
    return {"wq": (d, q), "wk": (d, kv), "wv": (d, kv), "wo": (q, d), "w1": (d, f), "w2": (f, d), "w3": (d, f)}


def fused_qkv_linear_shapes(cfg: ModelConfig) -> dict:
    """A fused wqkv (BLOOM, ChatGLM-6B: plain multi-head attention), wo and a GELU MLP's w1, w2."""
    d, f, q = cfg.dim, cfg.ffn_hidden_dim, cfg.n_heads * cfg.head_dim
    return {"wqkv": (d, 3 * q), "wo": (q, d), "w1": (d, f), "w2": (f, d)}


# ---- trainable parameters of each method (the PEFT registry's `closed_form` entries call these) ----------
# The formulas of lessons 02-06; LoRA adds no biases.
def full_trainable(cfg: ModelConfig) -> int:
    """Full fine-tuning trains everything: Psi (parameter_count), or, for a family with no formula written,
    the count of a model built on the meta device."""
    formulas = get_family(cfg.family).formulas
    if formulas is not None and formulas.parameter_count is not None:
        return parameter_count(cfg)["total"]
    with torch.device("meta"):
        return build_model(cfg).num_parameters()


def lora_trainable(cfg: ModelConfig, rank: int, targets) -> int:
    """n_layers * sum over targets of rank * (d_in + d_out)."""
    shapes = lora_target_shapes(cfg)
    return cfg.n_layers * sum(rank * (shapes[t][0] + shapes[t][1]) for t in targets)


def dora_trainable(cfg: ModelConfig, rank: int, targets) -> int:
    """LoRA's count plus one magnitude per output row: n_layers * sum over targets of (r (d_in + d_out) + d_out)."""
    shapes = lora_target_shapes(cfg)
    return lora_trainable(cfg, rank, targets) + cfg.n_layers * sum(shapes[t][1] for t in targets)


def ia3_trainable(cfg: ModelConfig, targets, feedforward) -> int:
    """n_layers * (d_out of each output target + d_in of each feed-forward target)."""
    shapes = lora_target_shapes(cfg)
    return cfg.n_layers * sum(shapes[t][0] if t in feedforward else shapes[t][1] for t in targets)


def prompt_trainable(cfg: ModelConfig, prompt_len: int) -> int:
    """P * d."""
    return prompt_len * cfg.dim


def prefix_trainable(cfg: ModelConfig, prefix_len: int, reparam_hidden) -> int:
    """L * 2 * P * kv_dim trained directly; with the MLP P*d + (d*h + h) + (h*L*2*kv_dim + L*2*kv_dim)."""
    d, L, kv, P, h = cfg.dim, cfg.n_layers, cfg.kv_dim, prefix_len, reparam_hidden
    if h is None:
        return L * 2 * P * kv
    return P * d + (d * h + h) + (h * L * 2 * kv + L * 2 * kv)


def adapter_trainable(cfg: ModelConfig, bottleneck: int) -> int:
    """2 adapters per layer of (2 d m + d + m)."""
    d, m = cfg.dim, bottleneck
    return cfg.n_layers * 2 * (2 * d * m + d + m)


def llama_adapter_trainable(cfg: ModelConfig, prompt_len: int, adapter_layers: int) -> int:
    """L_top * (K * d + H)."""
    return adapter_layers * (prompt_len * cfg.dim + cfg.n_heads)


# ---- QLoRA: a base stored in 4-bit NormalFloat (peft/qlora.py, quant/nf4.py) ----------------------------
def nf4_tensor_bytes(numel: int, block_size: int = 64, double_quant: bool = True, scale_block_size: int = 256) -> int:
    """Bytes of one weight of `numel` numbers in NF4, padded to whole blocks of b: n_blocks * b / 2 bytes of codes,
    plus per block a float32 absmax (4 bytes), or with double quantisation an int8 code (1 byte) and per 256
    blocks a float32 scale (4), plus one float32 mean (4)."""
    n_blocks = -(-numel // block_size)
    constants = (n_blocks + 4 * -(-n_blocks // scale_block_size) + 4) if double_quant else 4 * n_blocks
    return n_blocks * block_size // 2 + constants


def nf4_bits_per_weight(block_size: int = 64, double_quant: bool = True, scale_block_size: int = 256) -> float:
    """The paper's figure, padding and the per-tensor mean left out: 4 + 32 / b (4.5 at b = 64), or with
    double quantisation 4 + 8 / b + 32 / (b * 256) = 4.127."""
    if double_quant:
        return 4 + 8 / block_size + 32 / (block_size * scale_block_size)
    return 4 + 32 / block_size


def qlora_base_bytes(cfg: ModelConfig, block_size: int = 64, double_quant: bool = True, other_bytes: int = 2) -> dict:
    """The frozen base under QLoRA: every linear layer of the blocks in NF4 (nf4_tensor_bytes each), everything
    else (embedding, output layer, norms, biases) at `other_bytes` per parameter (2: bf16; 4: fp32).
    Returns {"quantized_params", "quantized", "other_params", "other", "total"} (counts and bytes)."""
    shapes = lora_target_shapes(cfg)
    quantized_params = cfg.n_layers * sum(d_in * d_out for d_in, d_out in shapes.values())
    quantized = cfg.n_layers * sum(nf4_tensor_bytes(d_in * d_out, block_size, double_quant)
                                   for d_in, d_out in shapes.values())
    other_params = parameter_count(cfg)["total"] - quantized_params
    parts = {"quantized_params": quantized_params, "quantized": quantized, "other_params": other_params,
             "other": other_bytes * other_params}
    parts["total"] = parts["quantized"] + parts["other"]
    return parts


def qlora_training_bytes(cfg: ModelConfig, rank: int, targets, block_size: int = 64, double_quant: bool = True,
                         other_bytes: int = 2) -> dict:
    """Model states of a QLoRA run: the base (qlora_base_bytes) + LoRA's A, B in float32 with their float32
    gradients and Adam's m, v: 16 bytes per trainable parameter. Returns {"base", "lora", "total"}."""
    lora = 16 * lora_trainable(cfg, rank, targets)
    base = qlora_base_bytes(cfg, block_size, double_quant, other_bytes)["total"]
    return {"base": base, "lora": lora, "total": base + lora}


# ---- activations (bytes per token, 16-bit activations, fp32 RMSNorm statistics, fused attention) -----
def block_activation_bytes_per_token(cfg: ModelConfig, trainable_weights: bool = True) -> int:
    """Bytes one decoder block keeps for backward, per token, in a bf16/fp16 model.

    trainable_weights=True (full fine-tuning):            26 d + 8 f + 4 H + 8
        each RMSNorm: fp32 input (4d) + 1/rms (4) + normalised x for the gain's gradient (2d)
                      + its output, the next linear's input (2d)                    = 2 x (8d + 4)
        attention: q, k, v (k, v already repeated to H heads) and the output (4 x 2d), log-sum-exp (4H)
        W_o's input (2d); feed-forward: W1 x, silu(W1 x), W3 x, and W2's input (4 x 2f)
    trainable_weights=False (a frozen block that gradients must pass through, as in PEFT): 16 d + 6 f + 4 H + 8
        a frozen linear needs only its weight, not its input, so the 2d/2f inputs and the norms'
        normalised copies are not kept (W2's input, 2f, and W_o's input, 2d, among them).
    Attention through a fused kernel keeps no T x S score matrix; a plain softmax would add 2 H S per token.
    A GELU MLP (BLOOM, ChatGLM-6B) has no W3: it keeps W1 x and W2's input gelu(W1 x) (4 f) when trainable,
    W1 x alone (2 f) when frozen. The norms are counted as RMSNorm's (a LayerNorm keeps 4 bytes more: the mean)."""
    d, f, H = cfg.dim, cfg.ffn_hidden_dim, cfg.n_heads
    gated = get_family(cfg.family).formulas.gated_mlp           # SwiGLU: W2(silu(W1 x) * W3 x)
    if trainable_weights:
        return 26 * d + (8 if gated else 4) * f + 4 * H + 8
    return 16 * d + (6 if gated else 2) * f + 4 * H + 8


def rope_table_bytes_per_token(cfg: ModelConfig) -> int:
    """cos and sin (fp32, hd/2 each), computed once and shared by all layers: 4 * hd bytes per token.
    BLOOM has no rotary table; its ALiBi bias (one 16-bit slope x distance per head and key) is 2 H per token."""
    return get_family(cfg.family).formulas.position_bytes_per_token(cfg)


def rope_bytes_per_token(cfg: ModelConfig) -> int:
    return 4 * cfg.head_dim


def alibi_bytes_per_token(cfg: ModelConfig) -> int:
    return 2 * cfg.n_heads


def head_bytes_per_token(cfg: ModelConfig) -> int:
    """Outside the blocks: the token ids (8, int64) and the final RMSNorm + output projection (8d + 4)."""
    return 8 + 8 * cfg.dim + 4


def model_activation_bytes(cfg: ModelConfig, batch: int, seq: int, recompute: bool = False) -> int:
    """All activations kept for backward in full fine-tuning (logits and loss excluded).

    Without recomputation every block keeps its activations: L * block. With recomputation a block keeps
    only its input (2d per token) and rebuilds the rest in backward, so the peak adds one block's worth
    while that block is recomputed (counted here as + 1 block)."""
    per_layer = 2 * cfg.dim if recompute else block_activation_bytes_per_token(cfg)
    total = cfg.n_layers * per_layer + rope_table_bytes_per_token(cfg) + head_bytes_per_token(cfg)
    if recompute:
        total += block_activation_bytes_per_token(cfg)          # the block being recomputed, at the peak
    return batch * seq * total
