"""The four built-in model families, one record each (family_registry.py says what a record holds).

    model = build_model(ModelConfig.from_name("tiny"))        # the class of cfg.family, randomly initialised
    with torch.device("meta"): model = build_model(cfg)       # shapes only, no memory (load_model does this)

Every family's model has the same forward signature as model.Transformer (tokens or input_embeds,
past_key_values, start_pos, position_ids, attention_mask, use_cache, return_hidden), the same cache layout per
layer ((k, v), each (B, G, S, hd)), `config`, `gradient_checkpointing`, `head(h)`, and blocks under `layers.{i}`
whose `attention` exposes the attention seam (attention_seam.py: `project(x, rotation=None)`, `attend(q, k, v,
mask)` and `qkv_layout`), so every PEFT method, `generate` and the trainer work on all of them. A family that does not number tokens 0, 1, ... adds `prompt_position_ids` /
`next_position_ids` (generate.py) and says where PEFT's virtual tokens sit (`cache_prefix_shifts_positions`,
`front_position_ids`, `shift_position_ids`: see peft/peft_model.py; ChatGLM-6B in chatglm.py).

Adding a family = its decoder file + one `register_family(Family(...))`, here or from your own code (a plugin:
minipeft/plugins.py); tests/test_custom_family.py adds one from a test file alone.
"""

from __future__ import annotations

from functools import partial

from . import bloom, chatglm, memory, model
from .checkpoint.hf_bloom import bloom_module_to_hf, hf_bloom_module_to_ours
from .checkpoint.hf_chatglm import chatglm_v1_lora_b, chatglm_v1_module_to_hf, chatglm_v1_module_to_ours
from .checkpoint.hf_export_model import BLOOM_LAYOUT, CHATGLM_LAYOUT, GLM_LAYOUT, LLAMA_LAYOUT
from .checkpoint.hf_glm import chatglm2_hf_module_to_ours, glm_module_to_hf
from .checkpoint.hf_llama import (hf_module_to_ours, key_vectors_from_hf, key_vectors_to_hf, lora_b_from_hf,
                                  lora_b_to_hf, ours_module_to_hf)
from .checkpoint.readers import HF_BLOOM, HF_CHATGLM, HF_LLAMA
from .family_registry import (FAMILIES, Family, FamilyError, FamilyFormulas, HFNames, build_model,  # noqa: F401
                              decoder_classes, family_of_tokenizer, get_family, hf_readers, is_decoder,
                              register_family, tokenizer_for, unregister_family)
from .prompts import ALPACA, CHATGLM2_6B, CHATGLM_6B
from .tokenizer import ByteLevelBPETokenizer, Tokenizer
from .tokenizer_chatglm import ChatGLM2Tokenizer, ChatGLMTokenizer



LLAMA_NAMES = HFNames(ours_module_to_hf, lora_b_to_hf, lora_b_from_hf, hf_module_to_ours, key_vectors_to_hf,
                      key_vectors_from_hf, model_type="llama")
ROPE_SWIGLU = FamilyFormulas(linear_shapes=memory.separate_qkv_linear_shapes, gated_mlp=True,
                             position_bytes_per_token=memory.rope_bytes_per_token,
                             parameter_count=memory.llama_parameter_count)

register_family(Family(
    "llama", model.Transformer, Tokenizer, ALPACA, check_config=model.check_config,
    hf=HF_LLAMA, hf_names=LLAMA_NAMES, hf_export=LLAMA_LAYOUT, formulas=ROPE_SWIGLU))
register_family(Family(          # ChatGLM2-6B: model.py with cfg.qkv_bias and cfg.rotary_fraction 0.5
    "chatglm2", model.Transformer, ChatGLM2Tokenizer, CHATGLM2_6B, check_config=model.check_config,
    tokenizer_may_be_smaller=True, hf=HF_CHATGLM, formulas=ROPE_SWIGLU, hf_export=GLM_LAYOUT,
    hf_names=HFNames(glm_module_to_hf, hf_to_modules=chatglm2_hf_module_to_ours, model_type="glm")))
register_family(Family(
    "chatglm", chatglm.ChatGLM, ChatGLMTokenizer, CHATGLM_6B, check_config=chatglm.check_config,
    qkv_layout=chatglm.Attention.qkv_layout, tokenizer_may_be_smaller=True, hf=HF_CHATGLM, hf_export=CHATGLM_LAYOUT,
    hf_names=HFNames(chatglm_v1_module_to_hf, chatglm_v1_lora_b, partial(chatglm_v1_lora_b, to_hf=False),
                     chatglm_v1_module_to_ours, model_type="chatglm"),
    formulas=FamilyFormulas(linear_shapes=memory.fused_qkv_linear_shapes, gated_mlp=False,
                            position_bytes_per_token=memory.rope_bytes_per_token)))   # Psi: counted on meta
register_family(Family(
    "bloom", bloom.Bloom, ByteLevelBPETokenizer, ALPACA, check_config=bloom.check_config,
    qkv_layout=bloom.BloomAttention.qkv_layout, tokenizer_may_be_smaller=True, hf=HF_BLOOM,
    hf_names=HFNames(bloom_module_to_hf, hf_to_modules=hf_bloom_module_to_ours, model_type="bloom"),
    hf_export=BLOOM_LAYOUT,
    formulas=FamilyFormulas(linear_shapes=memory.fused_qkv_linear_shapes, gated_mlp=False,
                            position_bytes_per_token=memory.alibi_bytes_per_token,
                            parameter_count=memory.bloom_parameter_count)))
