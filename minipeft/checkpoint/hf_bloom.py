"""Hugging Face BLOOM <-> our names (both directions, one table) and the reader of BLOOM's config.json.

transformers' BloomForCausalLM keeps its weights under `transformer.` (the hub's bigscience/bloom-7b1 files
leave that prefix out); its `lm_head.weight` is the embedding itself (tied), so it is skipped when present.
No permutation is needed: our fused `attention.wqkv` keeps query_key_value's per-head [q_h, k_h, v_h] rows.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Tuple, Union

import torch

from ..config import ConfigError, ModelConfig
from ..fileio import read_json

# our module name inside a block -> transformers BloomBlock's
HF_BLOOM_BLOCK_MODULES = {"attention_norm": "input_layernorm", "attention.wqkv": "self_attention.query_key_value",
                          "attention.wo": "self_attention.dense", "ffn_norm": "post_attention_layernorm",
                          "feed_forward.w1": "mlp.dense_h_to_4h", "feed_forward.w2": "mlp.dense_4h_to_h"}
# our top-level module -> transformers' (under the "transformer." prefix)
HF_BLOOM_TOP_MODULES = {"tok_embeddings": "word_embeddings", "embed_norm": "word_embeddings_layernorm",
                        "norm": "ln_f"}
HF_BLOOM_PREFIX = "transformer."
TIED_OUTPUT_KEY = "lm_head.weight"


def bloom_module_to_hf(name: str) -> str:
    """layers.3.attention.wqkv -> transformer.h.3.self_attention.query_key_value; norm -> transformer.ln_f."""
    if name in HF_BLOOM_TOP_MODULES:
        return HF_BLOOM_PREFIX + HF_BLOOM_TOP_MODULES[name]
    parts = name.split(".", 2)
    if len(parts) != 3 or parts[0] != "layers" or parts[2] not in HF_BLOOM_BLOCK_MODULES:
        raise KeyError(name)
    return f"{HF_BLOOM_PREFIX}h.{parts[1]}.{HF_BLOOM_BLOCK_MODULES[parts[2]]}"


def hf_bloom_key_to_ours(key: str) -> str:
    """transformer.h.0.self_attention.query_key_value.weight (the prefix is optional) ->
    layers.0.attention.wqkv.weight. KeyError for a name that is not a BLOOM parameter."""
    module, _, param = key.removeprefix(HF_BLOOM_PREFIX).rpartition(".")
    for ours, theirs in HF_BLOOM_TOP_MODULES.items():
        if module == theirs:
            return f"{ours}.{param}"
    parts = module.split(".", 2)                     # h, i, rest
    if len(parts) == 3 and parts[0] == "h" and parts[1].isdigit():
        for ours, theirs in HF_BLOOM_BLOCK_MODULES.items():
            if parts[2] == theirs:
                return f"layers.{parts[1]}.{ours}.{param}"
    raise KeyError(key)


def hf_bloom_tensor_to_ours(hf_key: str, tensor: torch.Tensor, cfg: ModelConfig) -> Optional[Tuple[str, torch.Tensor]]:
    """One HF tensor -> (our key, tensor); None for the tied lm_head.weight (it is tok_embeddings.weight)."""
    if hf_key == TIED_OUTPUT_KEY:
        return None
    return hf_bloom_key_to_ours(hf_key), tensor


def bloom_config_from_hf(path_or_dict: Union[str, Path, dict]) -> ModelConfig:
    """A transformers BloomConfig (config.json) -> our ModelConfig, refusing what bloom.py does not compute."""
    if isinstance(path_or_dict, dict):
        hf, source = path_or_dict, "Hugging Face config"
    else:
        hf, source = read_json(path_or_dict, ConfigError), str(path_or_dict)
    if hf.get("model_type") != "bloom":
        raise ConfigError(f"{source}: model_type is {hf.get('model_type')!r}, expected 'bloom'")
    dim = hf.get("n_embed", hf.get("hidden_size"))            # transformers lets an old n_embed win
    if dim is None:
        raise ConfigError(f"{source}: missing key 'hidden_size' (or 'n_embed')")
    for key in ("n_layer", "n_head", "vocab_size"):
        if key not in hf:
            raise ConfigError(f"{source}: missing key {key!r}")
    if hf.get("slow_but_exact") and hf.get("pretraining_tp", 1) > 1:
        raise ConfigError(f"{source}: slow_but_exact=true with pretraining_tp={hf['pretraining_tp']} (sliced "
                          f"tensor-parallel sums) is not implemented; set slow_but_exact to false")
    if hf.get("apply_residual_connection_post_layernorm"):
        raise ConfigError(f"{source}: apply_residual_connection_post_layernorm=true is not implemented "
                          f"(bloom.py adds the residual before the LayerNorm, as every released BLOOM does)")
    if hf.get("tie_word_embeddings") is False:
        raise ConfigError(f"{source}: tie_word_embeddings=false is not implemented (BLOOM ties the output "
                          f"layer to the embedding)")
    if hf.get("n_inner") not in (None, 4 * dim):
        raise ConfigError(f"{source}: n_inner {hf['n_inner']} is not implemented (BLOOM's MLP is 4 * hidden_size)")
    return ModelConfig(family="bloom", dim=dim, n_layers=hf["n_layer"], n_heads=hf["n_head"],
                       vocab_size=hf["vocab_size"], ffn_hidden_dim=4 * dim,
                       norm_eps=hf.get("layer_norm_epsilon", 1e-5), max_seq_len=hf.get("seq_length", 2048))


def ours_tensor_to_hf_bloom(key: str, tensor: torch.Tensor, cfg: ModelConfig) -> Tuple[str, torch.Tensor]:
    """One of our tensors -> (transformers BloomForCausalLM key, tensor); the inverse of hf_bloom_tensor_to_ours
    (lm_head is not written: transformers ties it to the embedding)."""
    module, _, param = key.rpartition(".")
    return f"{bloom_module_to_hf(module)}.{param}", tensor


def hf_bloom_module_to_ours(hf_module: str, cfg: ModelConfig):
    """transformer.h.0.self_attention.query_key_value -> [("layers.0.attention.wqkv", None)] (hf_llama's form)."""
    return [(hf_bloom_key_to_ours(f"{hf_module}.weight").removesuffix(".weight"), None)]
