"""ChatGLM2-6B in transformers' own layout: GlmForCausalLM (model_type "glm"), our names <-> its names.

transformers has no ChatGLM2 class, but its GLM(-4) decoder computes exactly what ChatGLM2-6B computes:
RMSNorm, q/k/v with biases (attention_bias), grouped keys/values (num_key_value_heads = multi_query_group_num),
RoPE on the first half of each head turning adjacent pairs (partial_rotary_factor 0.5, as ours), SwiGLU with the
gate and up projections fused in one `gate_up_proj` ([gate ; up] rows, like ChatGLM2's dense_h_to_4h), an untied
output layer. tests/test_chatglm2.py checks a converted ChatGLM2 against it. So no permutation; one fusion:

    ours                                 GlmForCausalLM
    tok_embeddings                       model.embed_tokens
    layers.i.attention.{wq,wk,wv,wo}     model.layers.i.self_attn.{q,k,v,o}_proj      (hf_llama's table)
    layers.i.attention_norm / ffn_norm   model.layers.i.input_layernorm / post_attention_layernorm
    layers.i.feed_forward.w1 ; w3        model.layers.i.mlp.gate_up_proj  (2F, d): rows [w1 (F) ; w3 (F)]
    layers.i.feed_forward.w2             model.layers.i.mlp.down_proj
    norm / output                        model.norm / lm_head
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch

from ..config import ModelConfig
from .hf_chatglm import chatglm2_thudm_module_to_ours
from .hf_llama import HF_BLOCK_MODULES, HF_TOP_MODULES

GATE_UP = "mlp.gate_up_proj"
FUSED_MLP = ("feed_forward.w1", "feed_forward.w3")             # its rows, in order
GLM_BLOCK_MODULES = {**{k: v for k, v in HF_BLOCK_MODULES.items() if k not in FUSED_MLP},
                     **{name: GATE_UP for name in FUSED_MLP}}


def glm_module_to_hf(name: str) -> str:
    """layers.3.feed_forward.w3 -> model.layers.3.mlp.gate_up_proj (of which it is the second half of the rows)."""
    if name in HF_TOP_MODULES:
        return HF_TOP_MODULES[name]
    parts = name.split(".", 2)
    if len(parts) != 3 or parts[0] != "layers" or parts[2] not in GLM_BLOCK_MODULES:
        raise KeyError(name)
    return f"model.layers.{parts[1]}.{GLM_BLOCK_MODULES[parts[2]]}"


def hf_glm_module_to_ours(hf_module: str, cfg: ModelConfig) -> List[Tuple[str, Optional[int]]]:
    """model.layers.0.mlp.gate_up_proj -> [("layers.0.feed_forward.w1", F), ("layers.0.feed_forward.w3", F)]: our
    modules whose rows the HF module holds, in order (None: all of them). KeyError for a name that is not GLM's."""
    for ours, theirs in HF_TOP_MODULES.items():
        if hf_module in (theirs, theirs.removeprefix("model.")):
            return [(ours, None)]
    parts = hf_module.removeprefix("model.").split(".", 2)
    if len(parts) != 3 or parts[0] != "layers" or not parts[1].isdigit():
        raise KeyError(hf_module)
    found = [ours for ours, theirs in GLM_BLOCK_MODULES.items() if theirs == parts[2]]
    if not found:
        raise KeyError(hf_module)
    rows = cfg.ffn_hidden_dim if len(found) > 1 else None
    return [(f"layers.{parts[1]}.{ours}", rows) for ours in found]


def chatglm2_hf_module_to_ours(hf_module: str, cfg: ModelConfig) -> List[Tuple[str, Optional[int]]]:
    """A ChatGLM2 adapter names GlmForCausalLM's modules (our export) or THUDM/chatglm2-6b's (peft on the original
    code: transformer.encoder.layers.i.self_attention.query_key_value, ...): either, to ours."""
    if hf_module.startswith(("transformer.", "encoder.", "embedding.", "output_layer")):
        return chatglm2_thudm_module_to_ours(hf_module, cfg)
    return hf_glm_module_to_ours(hf_module, cfg)


def glm_state_from_ours(state: Dict[str, torch.Tensor], cfg: ModelConfig) -> Dict[str, torch.Tensor]:
    """Our chatglm2 state dict -> GlmForCausalLM's (w1 and w3 joined into gate_up_proj)."""
    out = {}
    for key, tensor in state.items():
        module, _, param = key.rpartition(".")
        if module.endswith(FUSED_MLP[1]):
            continue                                             # joined with its w1 below
        if module.endswith(FUSED_MLP[0]):
            up = state[f"{module.removesuffix(FUSED_MLP[0])}{FUSED_MLP[1]}.{param}"]
            tensor = torch.cat([tensor, up], dim=0)              # (2F, d)
        out[f"{glm_module_to_hf(module)}.{param}"] = tensor
    return out


def glm_config(cfg: ModelConfig, special_ids: dict) -> dict:
    """A GlmConfig (config.json) that describes our chatglm2 config."""
    return {"architectures": ["GlmForCausalLM"], "model_type": "glm", "vocab_size": cfg.vocab_size,
            "hidden_size": cfg.dim, "intermediate_size": cfg.ffn_hidden_dim, "num_hidden_layers": cfg.n_layers,
            "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim,
            "partial_rotary_factor": cfg.rotary_fraction, "hidden_act": "silu", "rms_norm_eps": cfg.norm_eps,
            "rope_theta": cfg.rope_theta, "max_position_embeddings": cfg.max_seq_len, "attention_bias": cfg.qkv_bias,
            "tie_word_embeddings": False, "use_cache": True, **special_ids}
