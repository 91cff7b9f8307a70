"""Hugging Face LLaMA <-> our (Meta's) names, and the rotary permutation between the two layouts: the one
home of this table, used in both directions (reading HF folders; exporting LoRA to HF peft).

transformers stores the rows of q_proj / k_proj permuted for its half-split rotary: per head, HF row
c*(hd/2)+i holds Meta row 2i+c (transformers' convert_llama_weights_to_hf.py applies `permute_for_hf`).
"""

from __future__ import annotations

import torch

from ..config import ModelConfig

# our module name inside a block -> transformers LlamaForCausalLM's
HF_BLOCK_MODULES = {"attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj",
                    "attention.wv": "self_attn.v_proj", "attention.wo": "self_attn.o_proj",
                    "feed_forward.w1": "mlp.gate_proj", "feed_forward.w2": "mlp.down_proj",
                    "feed_forward.w3": "mlp.up_proj", "attention_norm": "input_layernorm",
                    "ffn_norm": "post_attention_layernorm"}
# our top-level module -> transformers'
HF_TOP_MODULES = {"tok_embeddings": "model.embed_tokens", "norm": "model.norm", "output": "lm_head"}


def ours_module_to_hf(name: str) -> str:
    """layers.3.attention.wq -> model.layers.3.self_attn.q_proj; output -> lm_head."""
    if name in HF_TOP_MODULES:
        return HF_TOP_MODULES[name]
    layer, index, rest = name.split(".", 2)
    if layer != "layers" or rest not in HF_BLOCK_MODULES:
        raise KeyError(name)
    return f"model.layers.{index}.{HF_BLOCK_MODULES[rest]}"


def hf_key_to_ours(key: str) -> str:
    """Hugging Face LLaMA parameter name -> ours (Meta's names), e.g.
    model.layers.0.self_attn.q_proj.weight -> layers.0.attention.wq.weight (the "model." prefix is optional)."""
    module, _, param = key.removeprefix("model.").rpartition(".")
    for ours, theirs in HF_TOP_MODULES.items():
        if module == theirs.removeprefix("model."):
            return f"{ours}.{param}"
    parts = module.split(".", 2)                     # layers, i, rest
    if len(parts) == 3 and parts[0] == "layers":
        for ours, theirs in HF_BLOCK_MODULES.items():
            if parts[2] == theirs:
                return f"layers.{parts[1]}.{ours}.{param}"
    raise KeyError(key)


def unpermute_hf_rotary(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo transformers' q/k permutation (half-split rotary -> Meta's adjacent pairs).
    Per head, HF row c*(hd/2)+i holds Meta row 2i+c. w: (n_heads*hd, d_in)."""
    dim1, dim2 = w.shape
    return w.view(n_heads, 2, dim1 // n_heads // 2, dim2).transpose(1, 2).reshape(dim1, dim2)


def permute_for_hf(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Meta's adjacent-pair rows -> transformers' half-split layout (the inverse of unpermute_hf_rotary)."""
    dim1, dim2 = w.shape
    return w.view(n_heads, dim1 // n_heads // 2, 2, dim2).transpose(1, 2).reshape(dim1, dim2)


def hf_tensor_to_ours(hf_key: str, tensor: torch.Tensor, cfg: ModelConfig):
    """One HF tensor -> (our key, our tensor), undoing the rotary permutation on q and k."""
    key = hf_key_to_ours(hf_key)
    if key.endswith("attention.wq.weight"):
        tensor = unpermute_hf_rotary(tensor, cfg.n_heads)
    elif key.endswith("attention.wk.weight"):
        tensor = unpermute_hf_rotary(tensor, cfg.n_kv_heads)
    return key, tensor


def lora_b_to_hf(name: str, lora_B: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """A LoRA B (d_out, r) in transformers' row order: Delta W_hf = Perm s B A = s (Perm B) A, so the rows of a
    q / k projection's B are permuted like its weight (n_heads for q, n_kv_heads for k); A never is."""
    if name.endswith("attention.wq"):
        return permute_for_hf(lora_B, cfg.n_heads)
    if name.endswith("attention.wk"):
        return permute_for_hf(lora_B, cfg.n_kv_heads)
    return lora_B


def ours_tensor_to_hf(key: str, tensor: torch.Tensor, cfg: ModelConfig):
    """One of our tensors -> (HF key, tensor): the inverse of hf_tensor_to_ours (q / k rows permuted for HF)."""
    module, _, param = key.rpartition(".")
    if module.endswith("attention.wq"):
        tensor = permute_for_hf(tensor, cfg.n_heads)
    elif module.endswith("attention.wk"):
        tensor = permute_for_hf(tensor, cfg.n_kv_heads)
    return f"{ours_module_to_hf(module)}.{param}", tensor


def hf_module_to_ours(hf_module: str, cfg: ModelConfig):
    """model.layers.0.self_attn.q_proj -> [("layers.0.attention.wq", n rows)] (the inverse of ours_module_to_hf,
    in the form every family's table gives: the modules of ours that one HF module's rows hold, in order)."""
    return [(hf_key_to_ours(f"{hf_module}.weight").removesuffix(".weight"), None)]


def lora_b_from_hf(name: str, lora_B: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """The inverse of lora_b_to_hf: a q / k projection's B rows back to Meta's order."""
    if name.endswith("attention.wq"):
        return unpermute_hf_rotary(lora_B, cfg.n_heads)
    if name.endswith("attention.wk"):
        return unpermute_hf_rotary(lora_B, cfg.n_kv_heads)
    return lora_B


def key_vectors_to_hf(keys: torch.Tensor) -> torch.Tensor:
    """Key head vectors (..., hd) in Meta's adjacent-pair order -> transformers' half-split order (a prefix key
    meets HF's permuted queries: per head, HF index c*(hd/2)+i holds Meta index 2i+c)."""
    return keys.unflatten(-1, (-1, 2)).transpose(-1, -2).flatten(-2)


def key_vectors_from_hf(keys: torch.Tensor) -> torch.Tensor:
    """The inverse of key_vectors_to_hf."""
    return keys.unflatten(-1, (2, -1)).transpose(-1, -2).flatten(-2)
