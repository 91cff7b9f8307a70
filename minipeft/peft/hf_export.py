"""Export an adapter in Hugging Face peft's layout, for the transformers model of the same weights (the model
export's folder: checkpoint/hf_export_model.py).

    export_adapter_to_hf_peft(model, "runs/lora-hf")   # then peft.PeftModel.from_pretrained(hf_model, folder)

Writes adapter_config.json + adapter_model.safetensors. What each method becomes (Shapes: P / K prompt length,
L layers, d dim, H heads, G kv heads, hd head dim, r rank):

    lora           LORA: base_model.model.<HF module>.lora_A.weight (r, d_in), ...lora_B.weight (d_out, r);
                   scaling alpha / r. The family's name table (record.hf_names) gives the HF module; where
                   transformers permutes rows (LLaMA's q/k for its half-split rotary: W_hf = Perm W), B's rows are
                   permuted too, since Delta W_hf = Perm s B A = s (Perm B) A. Where one HF module fuses several of
                   ours (ChatGLM2's w1 ; w3 = GLM's gate_up_proj), the update of the fused rows is one LoRA of rank
                   k r: A = [A_1 ; ... ; A_k] (k r, d_in), B = blockdiag(B_1, ..., B_k) (zero rows where a part has
                   no LoRA), with alpha k alpha so the scaling stays alpha / r (peft's rank_pattern / alpha_pattern).
    prompt         PROMPT_TUNING: prompt_embeddings (P, d), the soft prompt as it is.
    prefix         PREFIX_TUNING, prefix_projection false: prompt_embeddings (P, L * 2 * G * hd) ordered
                   [layer][k/v][head][hd], from the folded prefix (the reparameterisation MLP evaluated once;
                   prefix.py); keys in the HF model's head layout (LLaMA: permuted like its k_proj rows).
    llama_adapter  ADAPTION_PROMPT (transformers model types llama / mistral only, peft's list): per adapted layer
                   adaption_prompt (1, K, d) and one scalar adaption_gate (1,), used by peft as it is (no tanh).
                   Ours has a gate per head: exported only when all heads of a layer have the same gate value;
                   a tanh gate is written as its value tanh(g) (the same output; further training in peft then
                   moves the plain gate).

Refused, in one line naming why: Houlsby adapters (peft has no bottleneck adapter of this placement), full
fine-tuning (a whole model: checkpoint.export_model_to_hf), merged LoRA, prompt/prefix/LLaMA-Adapter with
extra_trainable embeddings, a family without a Hugging Face name table.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from ..family_registry import FAMILIES, get_family
from ..fileio import atomic_folder, write_json_atomic, write_safetensors_atomic
from .api import lora_modules
from .config import PeftConfigError
from .peft_model import PeftModel

ADAPTION_PROMPT_MODEL_TYPES = ("llama", "mistral")      # peft 0.21's TRANSFORMERS_MODEL_CONFIG (gpt2 aside)
NOT_EXPORTED = {
    "adapter": "peft has no Houlsby bottleneck adapter (after attention and MLP, before each residual add)",
    "full": "full fine-tuning changes the whole model: write it with checkpoint.export_model_to_hf "
            "(tools/export.py CHECKPOINT --out OUT)",
}


def _base_config(method: str) -> dict:
    return {"peft_type": method, "task_type": "CAUSAL_LM", "base_model_name_or_path": None, "revision": None,
            "inference_mode": True}


def _lora(model: PeftModel, names) -> tuple:
    cfg, config = model.base.config, model.peft_config
    if config.init == "pissa":
        raise PeftConfigError("export_adapter_to_hf_peft: a PiSSA adapter (init 'pissa') holds A, B for the residual "
                              "base weights, not for the original model peft would load it onto; merge_lora it "
                              "into a plain checkpoint instead")
    loras = dict(lora_modules(model, "export_adapter_to_hf_peft"))
    by_hf = {}
    for name, lora in loras.items():
        if lora.merged:
            raise PeftConfigError(f"{name} is merged; unmerge() it before exporting (the export holds A and B "
                                  "for the unmerged base weights)")
        by_hf.setdefault(names.module_to_hf(name), []).append(name)
    tensors, rank_pattern, alpha_pattern = {}, {}, {}
    for hf_name, ours in by_hf.items():
        parts = names.hf_to_modules(hf_name, cfg) if names.hf_to_modules is not None else [(ours[0], None)]
        present = [name for name, _ in parts if name in loras]
        A = torch.cat([loras[name].lora_A.detach() for name in present])                  # (k r, d_in)
        r, out_rows = config.rank, [rows or loras[name].lora_B.shape[0] for name, rows in parts]
        B = A.new_zeros(sum(out_rows), len(present) * r)                                  # (d_out, k r)
        offset = 0
        for (name, _), n in zip(parts, out_rows):                                         # block-diagonal
            if name in loras:
                j = present.index(name)
                B[offset:offset + n, j * r:(j + 1) * r] = loras[name].lora_B.detach()
            offset += n
        if names.lora_b_to_hf is not None:
            B = names.lora_b_to_hf(present[0], B, cfg)
        tensors[f"base_model.model.{hf_name}.lora_A.weight"] = A
        tensors[f"base_model.model.{hf_name}.lora_B.weight"] = B
        if len(present) > 1:
            short = hf_name.rsplit(".", 1)[-1]
            k = len(present)                  # k blocks of rank r: the same scale s at rank k r needs alpha' with
            # alpha' / (k r) = alpha / r, or with rsLoRA alpha' / sqrt(k r) = alpha / sqrt(r)
            rank_pattern[short] = k * config.rank
            alpha_pattern[short] = (math.sqrt(k) if config.rslora else k) * config.alpha
    params = dict(model.base.named_parameters())
    targets = {hf_name.rsplit(".", 1)[-1] for hf_name in by_hf}
    modules_to_save = []
    for name in getattr(config, "extra_trainable", ()) or ():
        hf_name = names.module_to_hf(name)                                  # model.embed_tokens, lm_head
        if hf_name.rsplit(".", 1)[-1] in targets:
            raise PeftConfigError(f"export_adapter_to_hf_peft: {name} is both a LoRA target and trained in full "
                                  f"(extra_trainable); peft cannot hold both on one module")
        tensors[f"base_model.model.{hf_name}.weight"] = params[f"{name}.weight"].detach()    # (V, d)
        modules_to_save.append(hf_name.rsplit(".", 1)[-1])
    hf_config = {**_base_config("LORA"), "r": config.rank, "lora_alpha": config.alpha,
                 "lora_dropout": config.dropout, "target_modules": sorted(targets), "bias": "none",
                 "fan_in_fan_out": False, "init_lora_weights": True, "use_rslora": config.rslora, "use_dora": False,
                 "modules_to_save": sorted(modules_to_save) or None, "layers_to_transform": None,
                 "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern}
    return tensors, hf_config


def _prompt_learning_config(method: str, model: PeftModel, P: int, heads: int, token_dim: int) -> dict:
    cfg = model.base.config
    return {**_base_config(method), "num_virtual_tokens": P, "token_dim": token_dim, "num_attention_heads": heads,
            "num_layers": cfg.n_layers, "num_transformer_submodules": 1}


def _prompt(model: PeftModel, names) -> tuple:
    weight = model.soft_prompt_module.weight.detach()                                     # (P, d)
    hf_config = {**_prompt_learning_config("PROMPT_TUNING", model, weight.shape[0], model.base.config.n_heads,
                                           weight.shape[1]),
                 "prompt_tuning_init": "RANDOM", "prompt_tuning_init_text": None, "tokenizer_name_or_path": None,
                 "tokenizer_kwargs": None}
    return {"prompt_embeddings": weight}, hf_config


def _prefix(model: PeftModel, names) -> tuple:
    cfg = model.base.config
    keys, values = (t.detach() for t in model.prefix_module.prefix_tensors())            # (L, G, P, hd) folded
    if names.key_vectors_to_hf is not None:
        keys = names.key_vectors_to_hf(keys)
    P = keys.shape[2]
    flat = torch.stack([keys, values]).permute(3, 1, 0, 2, 4).reshape(P, -1)             # (P, L*2*G*hd)
    hf_config = {**_prompt_learning_config("PREFIX_TUNING", model, P, cfg.n_kv_heads, cfg.kv_dim),
                 "prefix_projection": False, "encoder_hidden_size": cfg.dim}
    return {"prompt_embeddings": flat.contiguous()}, hf_config


def _llama_adapter(model: PeftModel, names) -> tuple:
    if names.model_type not in ADAPTION_PROMPT_MODEL_TYPES:
        raise PeftConfigError(f"export_adapter_to_hf_peft: peft's adaption prompt knows only the transformers model "
                              f"types {ADAPTION_PROMPT_MODEL_TYPES} (gpt2 aside); this model exports as "
                              f"{names.model_type!r}")
    tensors, layers, prompt_len = {}, [], None
    for name, module in model.base.named_modules():
        if not hasattr(module, "gate_values") or not hasattr(module, "adapter_prompt"):
            continue
        gates = module.gate_values().detach()                                             # (H,)
        if not torch.all(gates == gates[0]):
            raise PeftConfigError(f"export_adapter_to_hf_peft: {name} has a different gate per head "
                                  f"({[round(g, 4) for g in gates.tolist()]}); peft's adaption prompt has one "
                                  f"scalar gate per layer")
        hf_attention = names.module_to_hf(f"{name}.wo").rsplit(".", 1)[0]                # model.layers.i.self_attn
        tensors[f"base_model.model.{hf_attention}.adaption_prompt"] = module.adapter_prompt.detach()[None]
        tensors[f"base_model.model.{hf_attention}.adaption_gate"] = gates[:1].clone()
        layers.append(int(name.split(".")[1]))
        prompt_len = module.prompt_len
    n_layers = model.base.config.n_layers
    if layers != list(range(n_layers - len(layers), n_layers)):
        raise PeftConfigError(f"export_adapter_to_hf_peft: adapted layers {layers} are not the top ones; peft's "
                              f"adaption prompt adapts the top adapter_layers layers")
    hf_config = {**_base_config("ADAPTION_PROMPT"), "target_modules": "self_attn", "adapter_len": prompt_len,
                 "adapter_layers": len(layers)}
    return tensors, hf_config


EXPORTERS = {"lora": _lora, "prompt": _prompt, "prefix": _prefix, "llama_adapter": _llama_adapter}


def export_adapter_to_hf_peft(model: PeftModel, folder, overwrite: bool = False) -> Path:
    """Write `folder`/adapter_config.json + adapter_model.safetensors in Hugging Face peft's layout for the
    transformers model that export_model_to_hf writes from the base (see the module docstring). The folder
    appears whole or not at all; an existing one is refused unless `overwrite`. PeftConfigError, naming the
    reason, for what peft cannot represent exactly."""
    if not isinstance(model, PeftModel):
        raise PeftConfigError(f"export_adapter_to_hf_peft takes a PeftModel (from apply_peft / load_adapter), got "
                              f"{type(model).__name__}")
    if model.method in NOT_EXPORTED or model.method not in EXPORTERS:
        reason = NOT_EXPORTED.get(model.method, f"no peft method holds {model.method!r} exactly")
        raise PeftConfigError(f"export_adapter_to_hf_peft: cannot export a {model.method!r} adapter: {reason}")
    cfg = model.base.config
    names = get_family(cfg.family).hf_names
    if names is None:
        with_names = [f.name for f in FAMILIES.values() if f.hf_names is not None]
        raise PeftConfigError(f"export_adapter_to_hf_peft: this model's family is {cfg.family!r}, which has no "
                              f"Hugging Face name table here ({', '.join(with_names)} have one); save_adapter "
                              f"writes our folder for it")
    extra = tuple(getattr(model.peft_config, "extra_trainable", ()) or ())
    if extra and model.method != "lora":
        raise PeftConfigError(f"export_adapter_to_hf_peft: {model.method!r} with extra_trainable {list(extra)}: "
                              f"only peft's LoRA export here carries fully trained modules (modules_to_save)")
    tensors, hf_config = EXPORTERS[model.method](model, names)
    with atomic_folder(Path(folder), overwrite=overwrite, error=PeftConfigError) as tmp:
        write_safetensors_atomic(tmp / "adapter_model.safetensors", tensors)
        write_json_atomic(tmp / "adapter_config.json", hf_config)
    return Path(folder)


def export_lora_to_hf_peft(model: PeftModel, folder, overwrite: bool = False) -> Path:
    """export_adapter_to_hf_peft for a LoRA PeftModel (PeftConfigError for any other method)."""
    lora_modules(model, "export_lora_to_hf_peft")
    return export_adapter_to_hf_peft(model, folder, overwrite=overwrite)
