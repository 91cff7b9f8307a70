"""ChatGLM's own Hugging Face folders (config.json model_type "chatglm", `trust_remote_code` layout) -> ours.

Two versions share model_type "chatglm" and are told apart by their config fields:

    ChatGLM-6B  (v1)  inner_hidden_size, vocab_size, position_encoding_2d (must be true), gmask_token_id ...
    ChatGLM2-6B (v2)  padded_vocab_size, ffn_hidden_size, kv_channels, multi_query_attention ...

Name tables (the "transformer." prefix dropped; i = layer):

    v1 word_embeddings                     -> tok_embeddings
       layers.i.input_layernorm            -> layers.i.attention_norm       (weight, bias)
       layers.i.attention.query_key_value  -> layers.i.attention.wqkv       per head [q, k, v]; q/k rows permuted
       layers.i.attention.dense            -> layers.i.attention.wo
       layers.i.post_attention_layernorm   -> layers.i.ffn_norm
       layers.i.mlp.dense_h_to_4h / 4h_to_h-> layers.i.feed_forward.w1 / w2
       final_layernorm                     -> norm;   lm_head is tied to the embedding (skipped)
    v2 embedding.word_embeddings           -> tok_embeddings;  output_layer -> output
       encoder.layers.i.input_layernorm / post_attention_layernorm -> attention_norm / ffn_norm (RMSNorm)
       encoder.layers.i.self_attention.query_key_value -> split into wq (H hd rows), wk, wv (G hd rows each), bias too
       encoder.layers.i.self_attention.dense -> wo
       encoder.layers.i.mlp.dense_h_to_4h  -> split into w1 (gate: first F rows) and w3 (up: last F rows)
       encoder.layers.i.mlp.dense_4h_to_h  -> w2;   encoder.final_layernorm -> norm
    `rotary_emb.inv_freq` / `rotary_pos_emb.inv_freq` are recomputable buffers (skipped).

Rotary layouts: v2 already turns adjacent pairs (of the first hd/2 dims), as we do: no permutation. v1 turns each
half of a head (hd/2 dims) in rotate-half form, pairing dims (i, i + hd/4); per half, the original's row
c * (hd/4) + i holds our row 2 i + c (`rotate_half_to_pairs`), for q and k rows and their biases.
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional, Tuple

import torch

from ..config import ConfigError, ModelConfig
from ..fileio import read_json

V1_NAMES = {"input_layernorm": "attention_norm", "attention.query_key_value": "attention.wqkv",
            "attention.dense": "attention.wo", "post_attention_layernorm": "ffn_norm",
            "mlp.dense_h_to_4h": "feed_forward.w1", "mlp.dense_4h_to_h": "feed_forward.w2"}
V2_NAMES = {"input_layernorm": "attention_norm", "self_attention.dense": "attention.wo",
            "post_attention_layernorm": "ffn_norm", "mlp.dense_4h_to_h": "feed_forward.w2"}


def _require(hf: dict, source: str, keys) -> None:
    for key in keys:
        if key not in hf:
            raise ConfigError(f"{source}: missing key {key!r}")


def chatglm_version(hf: dict, source: str) -> int:
    """1 (ChatGLM-6B) or 2 (ChatGLM2-6B) from the fields of a model_type "chatglm" config."""
    if any(k in hf for k in ("padded_vocab_size", "multi_query_attention", "kv_channels", "ffn_hidden_size")):
        return 2
    if any(k in hf for k in ("inner_hidden_size", "gmask_token_id", "position_encoding_2d")):
        return 1
    raise ConfigError(f"{source}: a model_type 'chatglm' config with neither ChatGLM-6B fields (inner_hidden_size, "
                      f"position_encoding_2d) nor ChatGLM2-6B fields (padded_vocab_size, kv_channels)")


def chatglm_config(path_or_dict) -> ModelConfig:
    """A ChatGLM / ChatGLM2 config.json -> our ModelConfig (ConfigError naming the file and field if unfit)."""
    hf, source = (path_or_dict, "ChatGLM config") if isinstance(path_or_dict, dict) else \
        (read_json(path_or_dict, ConfigError), str(path_or_dict))
    if hf.get("model_type") != "chatglm":
        raise ConfigError(f"{source}: model_type is {hf.get('model_type')!r}, expected 'chatglm'")
    if hf.get("quantization_bit"):
        raise ConfigError(f"{source}: quantization_bit is {hf['quantization_bit']}: quantized (int4/int8) ChatGLM "
                          f"checkpoints are not read here; convert the fp16 checkpoint")
    if hf.get("pre_seq_len") is not None:
        raise ConfigError(f"{source}: pre_seq_len is {hf['pre_seq_len']}: a P-tuning v2 checkpoint; convert the base "
                          f"model and train the prefix with minipeft.peft")
    version = chatglm_version(hf, source)
    if version == 1:
        if "position_encoding_2d" not in hf:
            raise ConfigError(f"{source}: ChatGLM-6B config without 'position_encoding_2d': expected true (2D "
                              f"rotary positions); older GLM configs are not supported")
        if hf["position_encoding_2d"] is not True:
            raise ConfigError(f"{source}: position_encoding_2d is {hf['position_encoding_2d']!r}: only true (ChatGLM-6B's "
                              f"2D rotary) is supported")
        _require(hf, source, ("hidden_size", "num_layers", "num_attention_heads", "vocab_size", "inner_hidden_size",
                              "mask_token_id", "gmask_token_id", "bos_token_id"))
        return ModelConfig(family="chatglm", dim=hf["hidden_size"], n_layers=hf["num_layers"],
                           n_heads=hf["num_attention_heads"], vocab_size=hf["vocab_size"],
                           ffn_hidden_dim=hf["inner_hidden_size"], norm_eps=hf.get("layernorm_epsilon", 1e-5),
                           max_seq_len=hf.get("max_sequence_length", 2048), qkv_bias=True,
                           mask_id=hf["mask_token_id"], gmask_id=hf["gmask_token_id"], sop_id=hf["bos_token_id"])
    _require(hf, source, ("hidden_size", "num_layers", "num_attention_heads", "padded_vocab_size", "ffn_hidden_size"))
    expected = {"rmsnorm": True, "add_bias_linear": False, "apply_residual_connection_post_layernorm": False,
                "post_layer_norm": True}
    for key, want in expected.items():
        if key in hf and hf[key] != want:
            raise ConfigError(f"{source}: {key} is {hf[key]!r}; ChatGLM2 here needs {want!r}")
    head_dim = hf["hidden_size"] // hf["num_attention_heads"]
    if hf.get("kv_channels", head_dim) != head_dim:
        raise ConfigError(f"{source}: kv_channels {hf['kv_channels']} != hidden_size / num_attention_heads ({head_dim})")
    groups = hf.get("multi_query_group_num", 1) if hf.get("multi_query_attention") else hf["num_attention_heads"]
    return ModelConfig(family="chatglm2", dim=hf["hidden_size"], n_layers=hf["num_layers"],
                       n_heads=hf["num_attention_heads"], n_kv_heads=groups, vocab_size=hf["padded_vocab_size"],
                       ffn_hidden_dim=hf["ffn_hidden_size"], norm_eps=hf.get("layernorm_epsilon", 1e-5),
                       max_seq_len=hf.get("seq_length", 2048), qkv_bias=bool(hf.get("add_qkv_bias", False)),
                       rotary_fraction=0.5)


def rotate_half_to_pairs(rows: torch.Tensor, n_heads: int) -> torch.Tensor:
    """v1 fused wqkv rows (3 H hd, ...) -> the same with each q/k half-head reordered to adjacent pairs.
    Per head [q, k, v]; per half (hd/2 rows) of q and k, row c * (hd/4) + i moves to 2 i + c. v is untouched."""
    shape = rows.shape
    per_head = rows.reshape(n_heads, 3, 2, 2, shape[0] // n_heads // 12, *shape[1:])   # (H, qkv, half, c, hd/4, ...)
    qk_pairs = per_head[:, :2].transpose(3, 4)                                         # (H, 2, half, hd/4, c, ...)
    v = per_head[:, 2:].reshape(n_heads, 1, *qk_pairs.shape[2:])                        # v keeps its order
    return torch.cat([qk_pairs, v], dim=1).reshape(shape)


def pairs_to_rotate_half(rows: torch.Tensor, n_heads: int) -> torch.Tensor:
    """The inverse of rotate_half_to_pairs (ours -> the original's layout)."""
    shape = rows.shape
    per_head = rows.reshape(n_heads, 3, 2, shape[0] // n_heads // 12, 2, *shape[1:])   # (H, qkv, half, hd/4, c, ...)
    qk_half = per_head[:, :2].transpose(3, 4)
    v = per_head[:, 2:].reshape(n_heads, 1, *qk_half.shape[2:])
    return torch.cat([qk_half, v], dim=1).reshape(shape)


def _split_key(hf_key: str, prefix: str) -> Tuple[Optional[str], str, str]:
    """'layers.3.attention.dense.weight' -> ('3', 'attention.dense', 'weight'); top-level keys give (None, ...)."""
    module, _, param = hf_key.removeprefix("transformer.").rpartition(".")
    if module.startswith(prefix):
        index, _, rest = module[len(prefix):].partition(".")
        return index, rest, param
    return None, module, param


def chatglm_tensor_to_ours(hf_key: str, tensor: torch.Tensor, cfg: ModelConfig):
    """One tensor of a ChatGLM / ChatGLM2 folder -> [(our key, tensor), ...], or None to skip; KeyError if unknown."""
    if hf_key.endswith("inv_freq"):
        return None
    if cfg.family == "chatglm":
        return _v1_tensor(hf_key, tensor, cfg)
    return _v2_tensor(hf_key, tensor, cfg)


def _v1_tensor(hf_key: str, tensor: torch.Tensor, cfg: ModelConfig) -> Optional[List[Tuple[str, torch.Tensor]]]:
    if hf_key == "lm_head.weight":
        return None                                                     # tied to the embedding
    index, rest, param = _split_key(hf_key, "layers.")
    if index is None:
        top = {"word_embeddings": "tok_embeddings", "final_layernorm": "norm"}
        if rest not in top:
            raise KeyError(hf_key)
        return [(f"{top[rest]}.{param}", tensor)]
    if rest not in V1_NAMES:
        raise KeyError(hf_key)
    if rest == "attention.query_key_value":
        tensor = rotate_half_to_pairs(tensor, cfg.n_heads)
    return [(f"layers.{index}.{V1_NAMES[rest]}.{param}", tensor)]


def _v2_tensor(hf_key: str, tensor: torch.Tensor, cfg: ModelConfig) -> Optional[List[Tuple[str, torch.Tensor]]]:
    index, rest, param = _split_key(hf_key, "encoder.layers.")
    if index is None:
        top = {"embedding.word_embeddings": "tok_embeddings", "encoder.final_layernorm": "norm",
               "output_layer": "output"}
        if rest not in top:
            raise KeyError(hf_key)
        return [(f"{top[rest]}.{param}", tensor)]
    layer = f"layers.{index}"
    if rest == "self_attention.query_key_value":
        rows = cfg.n_heads * cfg.head_dim + 2 * cfg.kv_dim
        if tensor.shape[0] != rows:
            raise ValueError(f"{tensor.shape[0]} rows, but {cfg.n_heads} heads and {cfg.n_kv_heads} key/value groups "
                             f"(multi_query_group_num) of {cfg.head_dim} give {rows}")
        q, k, v = tensor.split([cfg.n_heads * cfg.head_dim, cfg.kv_dim, cfg.kv_dim], dim=0)
        return [(f"{layer}.attention.{name}.{param}", t.contiguous()) for name, t in (("wq", q), ("wk", k), ("wv", v))]
    if rest == "mlp.dense_h_to_4h":
        gate, up = tensor.chunk(2, dim=0)
        return [(f"{layer}.feed_forward.w1.{param}", gate.contiguous()), (f"{layer}.feed_forward.w3.{param}", up.contiguous())]
    if rest not in V2_NAMES:
        raise KeyError(hf_key)
    return [(f"{layer}.{V2_NAMES[rest]}.{param}", tensor)]


def chatglm_tokenizer_file(folder: Path) -> Optional[Path]:
    """ChatGLM-6B ships ice_text.model, ChatGLM2-6B tokenizer.model."""
    for name in ("tokenizer.model", "ice_text.model"):
        if (folder / name).is_file():
            return folder / name
    return None


# ---- ours -> the original's layout (export), and the original's module names (peft adapters in and out) ------
V1_TOP = {"tok_embeddings": "transformer.word_embeddings", "norm": "transformer.final_layernorm"}


def chatglm_v1_state_from_ours(state: dict, cfg: ModelConfig) -> dict:
    """Our ChatGLM-6B state dict -> THUDM/chatglm-6b's (the inverse of _v1_tensor): q/k rows back to rotate-half
    order, lm_head.weight written as the embedding (the original stores it), and each layer's rotary
    `inv_freq` buffer as the original computes it (10000^(-2i/(hd/2)), rounded to float16)."""
    ours_to_v1 = {ours: theirs for theirs, ours in V1_NAMES.items()}
    out = {}
    for key, tensor in state.items():
        module, _, param = key.rpartition(".")
        if module in V1_TOP:
            out[f"{V1_TOP[module]}.{param}"] = tensor
            continue
        _, index, rest = module.split(".", 2)
        if rest == "attention.wqkv":
            tensor = pairs_to_rotate_half(tensor, cfg.n_heads)
        out[f"transformer.layers.{index}.{ours_to_v1[rest]}.{param}"] = tensor
    out["lm_head.weight"] = state["tok_embeddings.weight"].clone()              # its own tensor in the file
    half = cfg.head_dim // 2
    inv_freq = (1.0 / 10000 ** (torch.arange(0, half, 2, dtype=torch.float32) / half)).half()
    for i in range(cfg.n_layers):
        out[f"transformer.layers.{i}.attention.rotary_emb.inv_freq"] = inv_freq.clone()
    return out


def chatglm_v1_module_to_hf(name: str) -> str:
    """layers.0.attention.wqkv -> transformer.layers.0.attention.query_key_value (peft's names on the original)."""
    if name in V1_TOP:
        return V1_TOP[name]
    ours_to_v1 = {ours: theirs for theirs, ours in V1_NAMES.items()}
    parts = name.split(".", 2)
    if len(parts) != 3 or parts[0] != "layers" or parts[2] not in ours_to_v1:
        raise KeyError(name)
    return f"transformer.layers.{parts[1]}.{ours_to_v1[parts[2]]}"


def chatglm_v1_module_to_ours(hf_module: str, cfg: ModelConfig):
    """The inverse of chatglm_v1_module_to_hf, as [(our module, None)] (hf_llama.hf_module_to_ours's form)."""
    index, rest, _ = _split_key(f"{hf_module}.weight", "layers.")
    if index is None:
        top = {theirs.removeprefix("transformer."): ours for ours, theirs in V1_TOP.items()}
        if rest not in top:
            raise KeyError(hf_module)
        return [(top[rest], None)]
    if rest not in V1_NAMES:
        raise KeyError(hf_module)
    return [(f"layers.{index}.{V1_NAMES[rest]}", None)]


def chatglm_v1_lora_b(name: str, lora_B: torch.Tensor, cfg: ModelConfig, to_hf: bool = True) -> torch.Tensor:
    """A LoRA B (3 H hd, r) on the fused wqkv, rows reordered like the weight's (Delta W = Perm B A)."""
    if not name.endswith("attention.wqkv"):
        return lora_B
    return pairs_to_rotate_half(lora_B, cfg.n_heads) if to_hf else rotate_half_to_pairs(lora_B, cfg.n_heads)


def chatglm2_thudm_module_to_ours(hf_module: str, cfg: ModelConfig):
    """THUDM/chatglm2-6b's module names (peft adapters trained on the original code) -> our modules and the rows of
    the original's module each holds: query_key_value = [wq (H hd) ; wk (G hd) ; wv (G hd)], dense_h_to_4h =
    [w1 (F) ; w3 (F)]."""
    index, rest, _ = _split_key(f"{hf_module}.weight", "encoder.layers.")
    if index is None:
        top = {"embedding.word_embeddings": "tok_embeddings", "output_layer": "output"}
        if rest not in top:
            raise KeyError(hf_module)
        return [(top[rest], None)]
    layer = f"layers.{index}"
    if rest == "self_attention.query_key_value":
        return [(f"{layer}.attention.wq", cfg.n_heads * cfg.head_dim), (f"{layer}.attention.wk", cfg.kv_dim),
                (f"{layer}.attention.wv", cfg.kv_dim)]
    if rest == "mlp.dense_h_to_4h":
        return [(f"{layer}.feed_forward.w1", cfg.ffn_hidden_dim), (f"{layer}.feed_forward.w3", cfg.ffn_hidden_dim)]
    if rest not in V2_NAMES:
        raise KeyError(hf_module)
    return [(f"{layer}.{V2_NAMES[rest]}", None)]
