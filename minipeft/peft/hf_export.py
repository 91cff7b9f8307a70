"""Export a LoRA adapter in Hugging Face peft's layout, for a transformers model of the same weights.

    export_lora_to_hf_peft(model, "runs/lora-hf")        # then peft.PeftModel.from_pretrained(hf_model, folder)

Writes adapter_config.json + adapter_model.safetensors with keys
base_model.model.<HF module name>.lora_A.weight (r, d_in) and ...lora_B.weight (d_out, r).

transformers stores LLaMA's q/k rows permuted for its half-split rotary (W_hf = Perm W_meta). The update of
a q/k projection is Delta W_hf = Perm s B A = s (Perm B) A, so lora_B's rows are permuted (with n_heads for
q, n_kv_heads for k) and lora_A is unchanged. The module names and that permutation come from the family's
record (`hf_names`: the one HF name table, checkpoint/hf_llama.py).

BLOOM (transformers BloomForCausalLM): names from checkpoint/hf_bloom.py (our fused wqkv is peft's
query_key_value, with the same per-head [q_h, k_h, v_h] rows), and no permutation: BLOOM has no rotary.
"""

from __future__ import annotations

from pathlib import Path

from ..family_registry import FAMILIES, get_family
from ..fileio import atomic_folder, write_json_atomic, write_safetensors_atomic
from .api import lora_modules
from .config import PeftConfigError
from .peft_model import PeftModel


def export_lora_to_hf_peft(model: PeftModel, folder, overwrite: bool = False) -> Path:
    """Write `folder`/adapter_config.json + adapter_model.safetensors in Hugging Face peft's LoRA layout for a
    transformers LlamaForCausalLM (BloomForCausalLM for a BLOOM) of the same weights (see the module docstring).
    The folder appears whole or not at all; an existing one is refused unless `overwrite`. Base modules the LoRA
    also trained in full (`extra_trainable`: tok_embeddings, output) are exported as peft's `modules_to_save`
    (embed_tokens, lm_head), saved under base_model.model.<HF module name>.weight as peft saves them."""
    extra = tuple(getattr(model.peft_config, "extra_trainable", ()) or ())
    modules = lora_modules(model, "export_lora_to_hf_peft")
    if model.peft_config.init == "pissa":
        raise PeftConfigError("export_lora_to_hf_peft: a PiSSA adapter (init 'pissa') holds A, B for the residual "
                              "base weights, not for the original model peft would load it onto; merge_lora it "
                              "into a plain checkpoint instead")
    cfg = model.base.config
    names = get_family(cfg.family).hf_names
    if names is None:
        with_names = [f.name for f in FAMILIES.values() if f.hf_names is not None]
        raise PeftConfigError(f"export_lora_to_hf_peft: this model's family is {cfg.family!r}, which has no Hugging "
                              f"Face name table here ({', '.join(with_names)} have one); save_adapter writes our "
                              f"folder for it")
    module_to_hf = names.module_to_hf
    tensors = {}
    target_modules = set()
    for name, lora in modules:
        if lora.merged:
            raise PeftConfigError(f"{name} is merged; unmerge() it before exporting (the export holds A and B "
                                  "for the unmerged base weights)")
        lora_B = lora.lora_B.detach()                                                  # (d_out, r)
        if names.lora_b_to_hf is not None:                                            # LLaMA: q/k rows permuted
            lora_B = names.lora_b_to_hf(name, lora_B, cfg)
        hf_name = module_to_hf(name)
        target_modules.add(hf_name.rsplit(".", 1)[-1])
        tensors[f"base_model.model.{hf_name}.lora_A.weight"] = lora.lora_A.detach()   # (r, d_in)
        tensors[f"base_model.model.{hf_name}.lora_B.weight"] = lora_B
    params = dict(model.base.named_parameters())
    modules_to_save = []
    for name in extra:
        hf_name = module_to_hf(name)                                # model.embed_tokens, lm_head
        if hf_name.rsplit(".", 1)[-1] in target_modules:
            raise PeftConfigError(f"export_lora_to_hf_peft: {name} is both a LoRA target and trained in full "
                                  f"(extra_trainable); peft cannot hold both on one module")
        tensors[f"base_model.model.{hf_name}.weight"] = params[f"{name}.weight"].detach()      # (V, d)
        modules_to_save.append(hf_name.rsplit(".", 1)[-1])
    config = model.peft_config
    hf_config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": None,
        "r": config.rank,
        "lora_alpha": config.alpha,
        "lora_dropout": config.dropout,
        "target_modules": sorted(target_modules),
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "use_rslora": config.rslora,                                 # scale alpha / sqrt(r)
        "use_dora": False,
        "modules_to_save": sorted(modules_to_save) or None,
        "layers_to_transform": None,
        "rank_pattern": {},
        "alpha_pattern": {},
    }
    folder = Path(folder)
    with atomic_folder(folder, overwrite=overwrite, error=PeftConfigError) as tmp:
        write_safetensors_atomic(tmp / "adapter_model.safetensors", tensors)
        write_json_atomic(tmp / "adapter_config.json", hf_config)
    return folder
