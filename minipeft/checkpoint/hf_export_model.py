"""A whole model (fully fine-tuned, or LoRA merged) -> a Hugging Face folder that transformers loads.

    export_model_to_hf(model, "out/llama-hf", tokenizer_path="ckpt/tokenizer.model")
    # then transformers.AutoModelForCausalLM.from_pretrained("out/llama-hf")   (no remote code)

Each family's record (family_registry.Family.hf_export) holds its HFModelLayout: the config.json it writes, how
our state dict becomes the folder's (the family's one name table, read in reverse), and its tokenizer files:

    family      folder                                    weights                          tokenizer files
    llama       LlamaForCausalLM (LLaMA, Chinese-LLaMA)   q/k rows permuted (hf_llama)     tokenizer.model + LlamaTokenizer config
    bloom       BloomForCausalLM                          names only (hf_bloom)            tokenizer.json + BloomTokenizerFast config
    chatglm2    GlmForCausalLM, model_type "glm"          w1 ; w3 -> gate_up_proj (hf_glm) tokenizer.model (+ the original's
                                                                                           ChatGLMTokenizer config: its
                                                                                           tokenization_chatglm.py is not
                                                                                           part of transformers)
    chatglm     THUDM/chatglm-6b's own layout             q/k rows to rotate-half order    ice_text.model + its tokenizer config
                (model_type "chatglm", auto_map)          (hf_chatglm), lm_head stored     (the original's code files must be
                                                                                           copied in: transformers has no class)

The weights are written in shards as our own folders are (writer.ShardWriter: model.safetensors, or
model-0000i-of-0000N.safetensors + model.safetensors.index.json, the names transformers reads), in `dtype` when
given. The folder appears whole or not at all, and an existing one is replaced only with `overwrite`
(fileio.atomic_folder). ChatGLM-6B's folder is checked here against a float64 computation from the original's
formulas (tests/helpers_chatglm.py) and by reading it back; the others are loaded by transformers in the tests.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Union

import torch

from ..config import ModelConfig
from ..family_registry import FAMILIES, get_family, is_decoder, tokenizer_for
from ..fileio import atomic_folder, write_json_atomic
from .files import CONFIG_NAME, DEFAULT_MAX_SHARD_SIZE, CheckpointError, TensorChecker, check_tokenizer_fits
from .hf_bloom import ours_tensor_to_hf_bloom
from .hf_chatglm import chatglm_v1_state_from_ours
from .hf_glm import glm_config, glm_state_from_ours
from .hf_llama import ours_tensor_to_hf
from .writer import ShardWriter, parse_size


@dataclass(frozen=True)
class HFModelLayout:
    """How one family's model is written as a Hugging Face folder."""
    what: str                                   # for messages: "transformers LlamaForCausalLM"
    config: Callable                            # (cfg, special token ids) -> config.json dict
    state: Callable                             # (our state dict, cfg) -> the folder's state dict
    tokenizer_file: str                         # the name the tokenizer file gets in the folder
    tokenizer_config: Callable                  # (tokenizer, cfg) -> tokenizer_config.json dict


def _special_ids(tokenizer) -> dict:
    """bos / eos / pad ids for config.json (None where the tokenizer has none)."""
    ids = {}
    for name in ("bos", "eos", "pad"):
        value = getattr(tokenizer, f"{name}_id", -1) if tokenizer is not None else -1
        ids[f"{name}_token_id"] = value if isinstance(value, int) and value >= 0 else None
    return ids


def _pieces(tokenizer, names=("bos", "eos", "unk", "pad")) -> dict:
    """{"bos_token": "<s>", ...}: the pieces of the tokenizer's special ids."""
    found = {}
    for name in names:
        token_id = getattr(tokenizer, f"{name}_id", -1)
        found[f"{name}_token"] = tokenizer.id_to_piece(token_id) if token_id >= 0 else None
    return found


# ---- the four built-in layouts --------------------------------------------------------------------------------
def _llama_config(cfg: ModelConfig, special: dict) -> dict:
    """The inverse of ModelConfig.from_hf_config."""
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": cfg.vocab_size,
            "hidden_size": cfg.dim, "intermediate_size": cfg.ffn_hidden_dim, "num_hidden_layers": cfg.n_layers,
            "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_kv_heads, "hidden_act": "silu",
            "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta, "rope_scaling": None,
            "max_position_embeddings": cfg.max_seq_len, "attention_bias": False, "mlp_bias": False,
            "tie_word_embeddings": False, "use_cache": True, **special}


def _llama_tokenizer_config(tokenizer, cfg: ModelConfig) -> dict:
    """LlamaTokenizer on tokenizer.model, adding BOS in front as our Tokenizer.encode(text) does; legacy mode
    leaves text as SentencePiece reads it (no extra prefix-space rule)."""
    return {"tokenizer_class": "LlamaTokenizer", **_pieces(tokenizer), "add_bos_token": True,
            "add_eos_token": False, "legacy": True, "clean_up_tokenization_spaces": False,
            "model_max_length": cfg.max_seq_len, "sp_model_kwargs": {}}


def _llama_state(state: dict, cfg: ModelConfig) -> dict:
    return dict(ours_tensor_to_hf(key, tensor, cfg) for key, tensor in state.items())


def _bloom_config(cfg: ModelConfig, special: dict) -> dict:
    """The inverse of hf_bloom.bloom_config_from_hf."""
    return {"architectures": ["BloomForCausalLM"], "model_type": "bloom", "vocab_size": cfg.vocab_size,
            "hidden_size": cfg.dim, "n_layer": cfg.n_layers, "n_head": cfg.n_heads,
            "layer_norm_epsilon": cfg.norm_eps, "seq_length": cfg.max_seq_len, "tie_word_embeddings": True,
            "apply_residual_connection_post_layernorm": False, "slow_but_exact": False, "pretraining_tp": 1,
            "use_cache": True, **special}


def _bloom_tokenizer_config(tokenizer, cfg: ModelConfig) -> dict:
    return {"tokenizer_class": "BloomTokenizerFast", **_pieces(tokenizer), "add_prefix_space": False,
            "clean_up_tokenization_spaces": False, "model_max_length": cfg.max_seq_len, "padding_side": "left"}


def _bloom_state(state: dict, cfg: ModelConfig) -> dict:
    return dict(ours_tensor_to_hf_bloom(key, tensor, cfg) for key, tensor in state.items())


def _original_tokenizer_config(tokenizer, cfg: ModelConfig) -> dict:
    """THUDM's ChatGLMTokenizer (tokenization_chatglm.py, shipped with the original model, not with transformers)."""
    return {"tokenizer_class": "ChatGLMTokenizer", "auto_map": {"AutoTokenizer": ["tokenization_chatglm.ChatGLMTokenizer",
                                                                                  None]},
            "padding_side": "left", "remove_space": False, "do_lower_case": False,
            "model_max_length": cfg.max_seq_len}


def _chatglm_config(cfg: ModelConfig, special: dict) -> dict:
    """THUDM/chatglm-6b's config.json (read back by hf_chatglm.chatglm_config); its code files are named in auto_map."""
    return {"architectures": ["ChatGLMModel"], "model_type": "chatglm",
            "auto_map": {"AutoConfig": "configuration_chatglm.ChatGLMConfig",
                         "AutoModel": "modeling_chatglm.ChatGLMForConditionalGeneration",
                         "AutoModelForSeq2SeqLM": "modeling_chatglm.ChatGLMForConditionalGeneration"},
            "vocab_size": cfg.vocab_size, "hidden_size": cfg.dim, "num_layers": cfg.n_layers,
            "num_attention_heads": cfg.n_heads, "inner_hidden_size": cfg.ffn_hidden_dim,
            "layernorm_epsilon": cfg.norm_eps, "max_sequence_length": cfg.max_seq_len, "position_encoding_2d": True,
            "mask_token_id": cfg.mask_id, "gmask_token_id": cfg.gmask_id, "bos_token_id": cfg.sop_id,
            "eos_token_id": special["eos_token_id"], "pad_token_id": special["pad_token_id"],
            "quantization_bit": 0, "pre_seq_len": None, "prefix_projection": False, "use_cache": True}


LLAMA_LAYOUT = HFModelLayout("transformers LlamaForCausalLM", _llama_config, _llama_state, "tokenizer.model",
                             _llama_tokenizer_config)
BLOOM_LAYOUT = HFModelLayout("transformers BloomForCausalLM", _bloom_config, _bloom_state, "tokenizer.json",
                             _bloom_tokenizer_config)
GLM_LAYOUT = HFModelLayout("transformers GlmForCausalLM", glm_config, glm_state_from_ours, "tokenizer.model",
                           _original_tokenizer_config)
CHATGLM_LAYOUT = HFModelLayout("THUDM/chatglm-6b's own layout", _chatglm_config, chatglm_v1_state_from_ours,
                               "ice_text.model", _original_tokenizer_config)


# ---- the export ---------------------------------------------------------------------------------------------
def export_model_to_hf(model, folder, tokenizer_path=None, dtype: Optional[torch.dtype] = None,
                       max_shard_size: Union[int, str] = DEFAULT_MAX_SHARD_SIZE, overwrite: bool = False) -> Path:
    """Write `model` (a plain decoder: `merge_lora(peft_model)` after LoRA, `peft_model.base` after full
    fine-tuning) as a Hugging Face folder of its family's layout (module docstring), with the tokenizer files
    when `tokenizer_path` is given. CheckpointError for a PeftModel, a family without a layout, or a tokenizer
    that does not fit the model; the folder appears whole or not at all."""
    if not is_decoder(model):
        what = getattr(model, "method", None)
        hint = {"lora": "merge_lora(model) first", "full": "pass model.base"}.get(what, "merge or drop the method")
        raise CheckpointError(f"export_model_to_hf takes a plain decoder, got {type(model).__name__}"
                              f"{f' with {what!r}' if what else ''}: {hint} (an adapter alone is exported by "
                              f"peft.export_adapter_to_hf_peft)")
    cfg = model.config
    layout = get_family(cfg.family).hf_export
    if layout is None:
        with_layout = [f.name for f in FAMILIES.values() if f.hf_export is not None]
        raise CheckpointError(f"export_model_to_hf: family {cfg.family!r} has no Hugging Face layout here "
                              f"({', '.join(with_layout)} have one); save_model writes our folder for it")
    state = {key: tensor.detach() for key, tensor in model.state_dict().items()}
    checker = TensorChecker(cfg, "the model's ModelConfig")
    for key, tensor in state.items():
        checker.check(key, tensor, "the model to export")
    checker.finish("the model to export")
    tokenizer = None
    if tokenizer_path is not None:
        tokenizer_path = Path(tokenizer_path)
        if not tokenizer_path.is_file():
            raise CheckpointError(f"{tokenizer_path}: tokenizer file not found")
        check_tokenizer_fits(tokenizer_path, cfg.vocab_size, "the model's ModelConfig",
                             allow_extra_model_rows=get_family(cfg.family).tokenizer_may_be_smaller)
        tokenizer = tokenizer_for(cfg.family, tokenizer_path)
    config = layout.config(cfg, _special_ids(tokenizer))
    config["torch_dtype"] = str(dtype or next(iter(state.values())).dtype).removeprefix("torch.")
    hf_state = layout.state(state, cfg)
    with atomic_folder(Path(folder), overwrite=overwrite, error=CheckpointError, inputs=[tokenizer_path]) as tmp:
        writer = ShardWriter(tmp, parse_size(max_shard_size), dtype)
        for key, tensor in hf_state.items():
            writer.add(key, tensor)
        writer.finish()
        write_json_atomic(tmp / CONFIG_NAME, config)
        if tokenizer is not None:
            shutil.copyfile(tokenizer_path, tmp / layout.tokenizer_file)
            tokenizer_config = layout.tokenizer_config(tokenizer, cfg)
            write_json_atomic(tmp / "tokenizer_config.json", tokenizer_config)
            specials = {k: v for k, v in tokenizer_config.items() if k.endswith("_token") and v is not None}
            write_json_atomic(tmp / "special_tokens_map.json", specials)
    return Path(folder)
