"""The computed 7B tables of tools/compare_methods.py: what each method costs at the shape of a 7B base under the
reference recipe (ZeRO-3 + CPU offload of the optimizer and the parameters, 8 GPUs, batch 4 x 512, fp16). Each
method's usual hyper-parameters at 7B are its registry entry's reference_7b(model_cfg); a method without one is
left out of the tables, and a note line under each table says so.
"""

from __future__ import annotations

import dataclasses

import torch

from ..peft import METHODS
from .methods import method_order, ordered, title

# The reference recipe and each method's usual hyper-parameters at 7B (as in lesson 07).
REFERENCE_7B = {"n_gpus": 8, "micro_batch": 4, "seq_len": 512, "zero_stage": 3, "offload_optimizer": True,
                "offload_params": True, "precision": "fp16"}
MODELS_7B = ("llama-7b", "chinese-llama-7b", "chatglm-6b", "bloom-7b1")
GiB = 2 ** 30


def reference_peft_configs(model_cfg) -> dict:
    """{method: its config at 7B} in table order, from the registry (peft/registry.py: LoRA r 8 on q, v, or the
    fused wqkv where a family fuses them, LLaMA-Adapter on the top 30 layers, 20 prompt / 10 prefix tokens,
    bottleneck 64); methods without a reference_7b are not in it."""
    return {m: METHODS[m].reference_7b(model_cfg) for m in method_order() if METHODS[m].reference_7b is not None}


def blocks_the_gradient_passes(model) -> int:
    """How many blocks keep activations for backward: from the lowest block holding a trainable parameter to the
    top, or all of them when a module attached in front of the blocks trains (a soft prompt, a prefix)."""
    n_layers = len(model.base.layers)
    if any(p.requires_grad for module in model.attached_modules().values() for p in module.parameters()):
        return n_layers
    trained = [i for i, layer in enumerate(model.base.layers) if any(p.requires_grad for p in layer.parameters())]
    return n_layers - min(trained, default=n_layers)


def table_7b(model_name: str = "llama-7b") -> dict:
    """Per method at the shape of a 7B preset, under REFERENCE_7B: trainable parameters (apply_peft on the meta
    device), Adam's optimizer state (12 bytes per trainable parameter: fp32 master, m, v), and memory per
    GPU and on the node's CPU under ZeRO-3 with the optimizer and the parameters offloaded:

      per GPU = DeepSpeed's gather buffer for the largest layer (4 bytes x V*d; the persistent model states
                on the GPU are 0 with both offloads) + activations of batch 4 x 512 (lesson 07: 26d+8f+4H+8
                bytes per token per trainable block; 16d+6f+4H+8 per frozen block that the gradient must
                pass through, with a GELU MLP's smaller f terms for BLOOM and ChatGLM-6B, memory.py; blocks below
                the lowest trainable parameter keep nothing) + fp32 logits.
      with recomputation: the activations of model_activation_bytes(recompute=True) instead (full), or for
                PEFT the kept block inputs 2d per token per block + one frozen block being recomputed.
      CPU (node) = 2 Psi (16-bit weights) + 14 Psi_t (16-bit gradients + optimizer state).

    A method registered without a 7B config is named under "left_out" (the key is there only then)."""
    from ..config import ModelConfig
    from ..families import build_model
    from ..memory import (ADAM_32, block_activation_bytes_per_token, head_bytes_per_token, model_activation_bytes,
                          rope_table_bytes_per_token, zero_bytes_per_gpu)
    from ..peft import apply_peft
    cfg = ModelConfig.from_name(model_name)
    r = REFERENCE_7B
    batch, seq, n_gpus = r["micro_batch"], r["seq_len"], r["n_gpus"]
    rows = {}
    for method, peft_config in reference_peft_configs(cfg).items():
        with torch.device("meta"):
            model = apply_peft(build_model(cfg), peft_config)
        report = model.report
        largest_layer = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
        states = zero_bytes_per_gpu(report.total, report.trainable, n_gpus, r["zero_stage"],
                                    offload_optimizer=r["offload_optimizer"], offload_params=r["offload_params"])
        gather_buffer = 4 * largest_layer
        # Embeddings a method puts in front (prompt tuning) lengthen every sequence by their P positions; the
        # gradient stops at the lowest block that holds a trainable parameter (LLaMA-Adapter's top L).
        front = model.soft_prompt_module.num_virtual_tokens if model.soft_prompt_module is not None else 0
        tokens = batch * (seq + front)
        blocks = blocks_the_gradient_passes(model)
        outside = rope_table_bytes_per_token(cfg) + head_bytes_per_token(cfg)
        if METHODS[method].trains_base:
            activations = model_activation_bytes(cfg, batch, seq)
            recomputed = model_activation_bytes(cfg, batch, seq, recompute=True)
        else:
            frozen = block_activation_bytes_per_token(cfg, trainable_weights=False)
            activations = tokens * (blocks * frozen + outside)
            recomputed = tokens * (blocks * 2 * cfg.dim + frozen + outside)
        logits = batch * seq * cfg.vocab_size * 4
        rows[method] = {
            "hyper": dataclasses.asdict(peft_config),
            "trainable": report.trainable, "total": report.total, "trainable_percent": report.percent,
            "optimizer_state_bytes": ADAM_32 * report.trainable,
            "model_states_gpu_bytes": states["gpu"], "gather_buffer_bytes": gather_buffer,
            "activation_bytes": activations, "activation_bytes_recompute": recomputed, "logits_bytes": logits,
            "per_gpu_bytes": states["gpu"] + gather_buffer + activations + logits,
            "per_gpu_bytes_recompute": states["gpu"] + gather_buffer + recomputed + logits,
            "cpu_node_bytes": states["cpu"],
        }
    table = {"model": model_name, "recipe": dict(REFERENCE_7B), "rows": rows}
    left_out = [m for m in method_order() if METHODS[m].reference_7b is None]
    if left_out:
        table["left_out"] = left_out
    return table


def table_7b_markdown(table: dict) -> str:
    lines = ["| method | trainable | % | optimizer state (CPU) | per GPU: gather buffer + activations + logits "
             "| per GPU with recomputation | CPU of the node |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for method in ordered(table["rows"]):
        r = table["rows"][method]
        lines.append(
            f"| {title(method)} | {r['trainable']:,} | {r['trainable_percent']:.3f} | "
            f"{r['optimizer_state_bytes'] / GiB:.3f} GiB | {r['gather_buffer_bytes'] / GiB:.2f} + "
            f"{r['activation_bytes'] / GiB:.2f} + {r['logits_bytes'] / GiB:.2f} = {r['per_gpu_bytes'] / GiB:.2f} GiB | "
            f"{r['per_gpu_bytes_recompute'] / GiB:.2f} GiB | {r['cpu_node_bytes'] / GiB:.2f} GiB |")
    if table.get("left_out"):
        lines.append(f"\nNot in this table (no 7B reference config in the PEFT registry): "
                     f"{', '.join(title(m) for m in table['left_out'])}")
    return "\n".join(lines)
