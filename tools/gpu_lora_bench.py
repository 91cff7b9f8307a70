"""LoRA fine-tuning throughput of a LLaMA-7B-shaped model with random weights: tokens/s, peak memory, MFU.

    python tools/gpu_lora_bench.py                          # 7B shape on cuda (tools/gpu_check.sh)
    python tools/gpu_lora_bench.py --preset tiny --device cpu   # the same code path, tiny

The model is built on the meta device and materialised directly on the target device with random weights
(no 7B copy ever exists in float32), the frozen base in bf16 (fp16 for the fp16 phase); LoRA (r=8 on wq, wv)
is trained in float32 master weights under autocast, with gradient checkpointing, AdamW, random token batches.

FLOPs per trained token (stated; "model FLOPs", recomputation not counted):

    LoRA, frozen base:  4 * N_matmul  +  6 * N_lora  +  12 * L * T * d
        4 N_matmul      forward (2 N) + backward through the frozen matrices to the activations (2 N); the
                        frozen weights get no gradient, so the 2 N of weight gradients in "6 N" is not spent
        6 N_lora        forward, activation and weight gradients of the LoRA matrices
        12 L T d        attention scores and weighted values, forward 4 L T d + backward 8 L T d per token
                        (sequence length T, full T x T counted as in the PaLM paper's convention)
    N_matmul = all parameters except the token embedding (a lookup, not a matmul); the output head counts.
    With gradient checkpointing the hardware also redoes the forward (2 N_matmul + 4 L T d more): reported as
    "hardware FLOPs" (HFU) beside MFU. The usual full fine-tuning figure 6 * N_total is printed for comparison.
    MFU = FLOPs per token * tokens/s / peak, peak = 989 TFLOP/s (bf16 dense, H100 SXM and H200).
"""

from __future__ import annotations

import argparse
import math
import sys
import time

import torch
import torch.nn.functional as F

from minipeft import cli_types as T
from minipeft.cli_errors import run_main
from minipeft.config import ModelConfig
from minipeft.model import Transformer
from minipeft.peft import LoRAConfig, apply_peft

PEAK_BF16_TFLOPS = 989.0


def build_lora_model(cfg: ModelConfig, device: torch.device, base_dtype: torch.dtype, rank: int, targets):
    """Meta-device build, random init on `device` in `base_dtype`, LoRA with float32 A/B."""
    with torch.device("meta"):
        base = Transformer(cfg)
    base = base.to_empty(device=device)
    base.init_weights()                                       # N(0, 0.02), ones for norms: in place on device
    base = base.to(base_dtype)
    model = apply_peft(base, LoRAConfig(rank=rank, alpha=2 * rank, targets=tuple(targets)))
    for _, p in model.named_parameters():
        if p.requires_grad:
            p.data = p.data.float()                           # master weights of the trained matrices in fp32
    model.gradient_checkpointing = True
    return model.train()


def flops_per_token(cfg: ModelConfig, n_total: int, n_lora: int, seq_len: int) -> dict:
    n_embed = cfg.vocab_size * cfg.dim
    n_matmul = n_total - n_lora - n_embed
    attention = 12 * cfg.n_layers * seq_len * cfg.dim
    model_flops = 4 * n_matmul + 6 * n_lora + attention
    hardware_flops = model_flops + 2 * n_matmul + 4 * cfg.n_layers * seq_len * cfg.dim   # + recomputed forward
    return {"model": model_flops, "hardware": hardware_flops, "six_n": 6 * n_total, "n_matmul": n_matmul}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_phase(model, cfg, device, precision, steps, warmup, batch_size, seq_len, lr, seed):
    """`warmup` untimed + `steps` timed optimizer steps. Returns (tokens/s, losses, skipped steps, peak bytes)."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=lr)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    generator = torch.Generator(device="cpu").manual_seed(seed)
    losses, skipped = [], 0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for i in range(warmup + steps):
        if i == warmup:
            synchronize(device)
            started = time.perf_counter()
        tokens = torch.randint(0, cfg.vocab_size, (batch_size, seq_len + 1), generator=generator).to(device)
        with torch.autocast(device_type=device.type, dtype=dtype):
            logits = model(tokens[:, :-1])                                            # (B, T, V)
        loss = F.cross_entropy(logits.float().reshape(-1, cfg.vocab_size), tokens[:, 1:].reshape(-1))
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        scale_before = scaler.get_scale()
        scaler.step(optimizer)
        scaler.update()
        skipped += int(scaler.is_enabled() and scaler.get_scale() < scale_before)
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    synchronize(device)
    elapsed = time.perf_counter() - started
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
    return steps * batch_size * seq_len / elapsed, losses, skipped, peak


def build_parser() -> argparse.ArgumentParser:
    parser = T.ArgumentParser(prog="gpu_lora_bench.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=("7b", "tiny"), default="7b", help="LLaMA-7B shape, or a tiny one for CPU")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--steps", type=T.positive_int, default=20, help="timed bf16 steps")
    parser.add_argument("--fp16-steps", type=T.non_negative_int, default=5, help="timed fp16 + GradScaler steps (0: skip)")
    parser.add_argument("--warmup", type=T.non_negative_int, default=2, help="untimed steps before each phase")
    parser.add_argument("--batch-size", type=T.batch_size, default=4)
    parser.add_argument("--seq-len", type=T.seq_len, default=512)
    parser.add_argument("--lora-rank", type=T.dim, default=8)
    parser.add_argument("--lora-targets", type=T.names, default=("wq", "wv"))
    parser.add_argument("--lr", type=T.positive_float, default=1e-4)
    parser.add_argument("--peak-tflops", type=T.positive_float, default=PEAK_BF16_TFLOPS, help="bf16 dense peak of the GPU")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)

    device = torch.device(args.device)
    if args.preset == "7b":
        cfg = ModelConfig.from_name("llama-7b")
    else:
        cfg = ModelConfig(dim=64, n_layers=2, n_heads=4, vocab_size=256, multiple_of=16, max_seq_len=64)
        args.seq_len = min(args.seq_len, 32)
    targets = list(args.lora_targets)
    print(f"device {device}" + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "")
          + f"; torch {torch.__version__}; shape {args.preset}: dim {cfg.dim}, {cfg.n_layers} layers, vocab "
          f"{cfg.vocab_size}; batch {args.batch_size} x seq {args.seq_len}; LoRA r={args.lora_rank} on {targets}; "
          "gradient checkpointing on")

    results = {}
    for precision, steps, base_dtype in (("bf16", args.steps, torch.bfloat16),
                                         ("fp16", args.fp16_steps, torch.float16)):
        if steps <= 0:
            continue
        started = time.perf_counter()
        torch.manual_seed(0)
        model = build_lora_model(cfg, device, base_dtype, args.lora_rank, targets)
        n_total = sum(p.numel() for p in model.parameters())
        n_lora = sum(p.numel() for p in model.parameters() if p.requires_grad)
        built = time.perf_counter() - started
        tokens_per_s, losses, skipped, peak = run_phase(model, cfg, device, precision, steps, args.warmup,
                                                        args.batch_size, args.seq_len, args.lr, seed=1)
        flops = flops_per_token(cfg, n_total, n_lora, args.seq_len)
        peak_flops = args.peak_tflops * 1e12
        mfu = flops["model"] * tokens_per_s / peak_flops
        hfu = flops["hardware"] * tokens_per_s / peak_flops
        results[precision] = tokens_per_s
        print(f"[{precision}] params {n_total:,} (LoRA {n_lora:,}); built in {built:.1f} s; {steps} steps: "
              f"{tokens_per_s:,.0f} tokens/s; loss {losses[0]:.3f} -> {losses[-1]:.3f}"
              + (f"; skipped (overflow) steps {skipped}" if precision == "fp16" else "")
              + (f"; peak GPU memory {peak / 2**30:.2f} GiB" if device.type == "cuda" else ""))
        print(f"[{precision}] FLOPs/token: model {flops['model']:.4g} (4*N_matmul + 6*N_lora + 12*L*T*d), "
              f"hardware {flops['hardware']:.4g} (+ recomputed forward), 6*N_total {flops['six_n']:.4g}; "
              f"MFU {100 * mfu:.1f}%, HFU {100 * hfu:.1f}% of {args.peak_tflops:g} TFLOP/s"
              + ("" if precision == "bf16" else " (fp16 dense peak is the same on H100/H200)"))
        if not all(math.isfinite(x) for x in losses if precision == "bf16"):
            print(f"[{precision}] non-finite loss", file=sys.stderr)
            return 1
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main, "gpu_lora_bench.py"))
