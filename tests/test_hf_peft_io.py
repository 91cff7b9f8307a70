"""Adapters to and from Hugging Face peft (issue 26). Each export is loaded by peft itself onto the transformers
model that export_model_to_hf wrote from the same base (tests/test_hf_export_model.py checks that model): logits
within 1e-5 and the same greedy tokens. Adapters made by peft (with its rank_pattern, alpha_pattern, rsLoRA,
layers_to_transform, a folded prefix projection, an adaption prompt) are imported and give peft's logits.
ChatGLM-6B has no transformers class: its LoRA, in the original's names and row order, is merged into the exported
original-layout weights and checked against the float64 computation from the original's formulas."""

import copy

import pytest
import torch

from helpers_chatglm import GMASK, SOP, reference_logits
from helpers_hf_export import export_and_load, greedy_pair, random_model, tokens
from minipeft.checkpoint import export_model_to_hf
from minipeft.peft import (AdapterConfig, FullConfig, LlamaAdapterConfig, LoRAConfig, LoRALinear, PeftConfigError,
                           PrefixConfig, PromptConfig, apply_peft, export_adapter_to_hf_peft, load_adapter)

peft = pytest.importorskip("peft")
TOL = 1e-5
LORA_TARGETS = {"llama": ("wq", "wk", "wv", "wo", "w1", "w2", "w3", "output"), "bloom": ("wqkv", "wo", "w1", "w2"),
                "chatglm2": ("wk", "w1", "w3", "w2"), "chatglm2-w1": ("wq", "w1")}


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    """family -> (our random base, transformers' model loaded from its export)."""
    tmp = tmp_path_factory.mktemp("bases")
    found = {}
    for family in ("llama", "bloom", "chatglm2"):
        ours = random_model(family)
        found[family] = ours, export_and_load(ours, tmp / family)
    return found


def randomise(peft_model, seed=3):
    """Non-zero LoRA B (zero at init) and a non-zero gate, so the adapter changes the output."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in peft_model.modules():
            if isinstance(module, LoRALinear):
                module.lora_B.copy_(0.2 * torch.randn(module.lora_B.shape, generator=generator))
    return peft_model


def check_in_peft(mine, hf_base, folder, virtual=0):
    """peft.PeftModel.from_pretrained(folder) on a copy of hf_base against `mine`: logits and greedy tokens."""
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(hf_base), str(folder)).eval()
    x = tokens()
    with torch.no_grad():
        got, want = mine(x), theirs(input_ids=x, attention_mask=torch.ones_like(x)).logits[:, virtual:]
        assert (got - want).abs().max().item() < TOL
        assert (hf_base(x).logits - want).abs().max().item() > 1e-2           # the adapter changes the output
    ours_tokens, peer_tokens = greedy_pair(mine, theirs, x[0, :5])
    assert ours_tokens == peer_tokens
    return got


def check_round_trip(mine, family, folder, want):
    """The exported folder, imported back (load_adapter detects peft's layout) onto a fresh copy of the base."""
    back = load_adapter(random_model(family), folder)
    with torch.no_grad():
        assert (back(tokens()) - want).abs().max().item() < 1e-6


@pytest.mark.parametrize("case", list(LORA_TARGETS))
def test_lora_export_loads_in_peft(bases, case, tmp_path):
    family = case.split("-")[0]
    ours, hf = bases[family]
    mine = randomise(apply_peft(copy.deepcopy(ours), LoRAConfig(rank=4, alpha=8, targets=LORA_TARGETS[case]))).eval()
    export_adapter_to_hf_peft(mine, tmp_path / "lora")
    got = check_in_peft(mine, hf, tmp_path / "lora")
    check_round_trip(mine, family, tmp_path / "lora", got)


def test_rslora_export_of_a_fused_module_keeps_its_scale(bases, tmp_path):
    """GLM's fused gate_up_proj holds our w1 and w3 as one rank-2r LoRA: with rsLoRA its alpha becomes
    alpha * sqrt(2) (alpha' / sqrt(2 r) = alpha / sqrt(r)), not 2 alpha."""
    ours, hf = bases["chatglm2"]
    mine = randomise(apply_peft(copy.deepcopy(ours), LoRAConfig(rank=4, alpha=8, targets=("wq", "w1", "w3"),
                                                                rslora=True))).eval()
    export_adapter_to_hf_peft(mine, tmp_path / "rslora")
    got = check_in_peft(mine, hf, tmp_path / "rslora")
    check_round_trip(mine, "chatglm2", tmp_path / "rslora", got)


@pytest.mark.parametrize("family", ["llama", "bloom", "chatglm2"])
@pytest.mark.parametrize("method", ["prompt", "prefix"])
def test_prompt_and_prefix_exports_load_in_peft(bases, family, method, tmp_path):
    ours, hf = bases[family]
    torch.manual_seed(5)
    config = PromptConfig(prompt_len=3, init="random") if method == "prompt" else \
        PrefixConfig(prefix_len=3, reparam_hidden=16)                          # the MLP is folded by the export
    mine = apply_peft(copy.deepcopy(ours), config).eval()
    export_adapter_to_hf_peft(mine, tmp_path / method)
    got = check_in_peft(mine, hf, tmp_path / method, virtual=3 if method == "prompt" else 0)
    check_round_trip(mine, family, tmp_path / method, got)


@pytest.mark.parametrize("gate, value", [("plain", 0.3), ("tanh", 0.5)])
def test_llama_adapter_exports_as_adaption_prompt(bases, gate, value, tmp_path):
    ours, hf = bases["llama"]
    torch.manual_seed(6)
    mine = apply_peft(copy.deepcopy(ours), LlamaAdapterConfig(prompt_len=3, adapter_layers=1, gate=gate)).eval()
    with torch.no_grad():
        mine.base.layers[1].attention.adapter_gate.fill_(value)
    export_adapter_to_hf_peft(mine, tmp_path / "ap")
    got = check_in_peft(mine, hf, tmp_path / "ap")
    with torch.no_grad():
        assert (ours(tokens()) - got).abs().max().item() > 1e-2                # the open gate matters
        mine.base.layers[1].attention.adapter_gate[0] += 0.1
    with pytest.raises(PeftConfigError, match="different gate per head"):
        export_adapter_to_hf_peft(mine, tmp_path / "ap2")


def test_what_peft_cannot_hold_is_refused_in_one_line(bases, tmp_path):
    ours, _ = bases["llama"]
    for config, needle in ((AdapterConfig(bottleneck=4), "no Houlsby"), (FullConfig(), "export_model_to_hf"),
                           (PromptConfig(prompt_len=2, init="random", extra_trainable=("output",)), "extra_trainable")):
        with pytest.raises(PeftConfigError, match=needle):
            export_adapter_to_hf_peft(apply_peft(copy.deepcopy(ours), config), tmp_path / "x")
    bloom_adapter = apply_peft(copy.deepcopy(bases["bloom"][0]), LlamaAdapterConfig(prompt_len=2, adapter_layers=1))
    with pytest.raises(PeftConfigError, match="adaption prompt knows only"):
        export_adapter_to_hf_peft(bloom_adapter, tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_chatglm_6b_lora_in_the_originals_names_and_rows(tmp_path):
    import json

    from safetensors.torch import load_file
    ours = random_model("chatglm")
    mine = randomise(apply_peft(copy.deepcopy(ours), LoRAConfig(rank=4, alpha=8, targets=("wqkv", "wo", "w1")))).eval()
    export_model_to_hf(ours, tmp_path / "base")
    export_adapter_to_hf_peft(mine, tmp_path / "lora")
    config = json.loads((tmp_path / "base" / "config.json").read_text())
    state = {k: v.double() for k, v in load_file(str(tmp_path / "base" / "model.safetensors")).items()}
    lora = load_file(str(tmp_path / "lora" / "adapter_model.safetensors"))
    for key, A in lora.items():
        if key.endswith("lora_A.weight"):                               # W + (alpha / r) B A, in the original's rows
            module = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
            B = lora[key.replace("lora_A", "lora_B")]
            state[f"{module}.weight"] += 2.0 * B.double() @ A.double()
    assert "base_model.model.transformer.layers.0.attention.query_key_value.lora_A.weight" in lora
    ids = [5, 17, 42, 8, GMASK, SOP, 33, 9, 61]
    with torch.no_grad():
        got = mine(torch.tensor([ids]))
        assert (got[0].double() - reference_logits(state, config, ids)).abs().max().item() < 1e-4
        back = load_adapter(random_model("chatglm"), tmp_path / "lora")
        assert (back(torch.tensor([ids])) - got).abs().max().item() < 1e-6


# ---- adapters made by peft, imported --------------------------------------------------------------------------
def save_peft(hf, config, folder, gate=None):
    model = peft.get_peft_model(copy.deepcopy(hf), config)
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.2 * torch.randn(p.shape, generator=generator))
            if "adaption_gate" in name:
                p.fill_(gate)
    model.save_pretrained(str(folder))
    return model.eval()


PEFT_LORAS = {
    "llama": dict(target_modules=["q_proj", "v_proj", "down_proj"], rank_pattern={"v_proj": 2},
                  alpha_pattern={"v_proj": 6}, use_rslora=True, layers_to_transform=[1]),
    "bloom": dict(target_modules=["query_key_value", "dense_4h_to_h"]),
    "chatglm2": dict(target_modules=["q_proj", "gate_up_proj", "down_proj"], rank_pattern={"q_proj": 2}),
}


@pytest.mark.parametrize("family", list(PEFT_LORAS))
def test_peft_lora_imports_with_peft_logits(bases, family, tmp_path):
    ours, hf = bases[family]
    theirs = save_peft(hf, peft.LoraConfig(r=4, lora_alpha=8, **PEFT_LORAS[family]), tmp_path / "lora")
    mine = load_adapter(copy.deepcopy(ours), tmp_path / "lora")
    x = tokens()
    with torch.no_grad():
        want = theirs(input_ids=x).logits
        assert (mine(x) - want).abs().max().item() < TOL
        assert (ours(x) - want).abs().max().item() > 1e-2


def test_thudm_chatglm2_names_import_like_glms(bases, tmp_path):
    """A LoRA trained with peft on THUDM's ChatGLM2 code names dense_h_to_4h ([gate ; up] rows, GLM's
    gate_up_proj) and dense_4h_to_h: the same adapter renamed must give the same logits."""
    from safetensors.torch import load_file, save_file
    ours, hf = bases["chatglm2"]
    theirs = save_peft(hf, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["gate_up_proj", "down_proj"]),
                       tmp_path / "glm")
    renamed = tmp_path / "thudm"
    renamed.mkdir()
    (renamed / "adapter_config.json").write_text((tmp_path / "glm" / "adapter_config.json").read_text())
    tensors = load_file(str(tmp_path / "glm" / "adapter_model.safetensors"))
    save_file({k.replace("model.model.layers", "model.transformer.encoder.layers").replace("gate_up_proj", "dense_h_to_4h")
               .replace("down_proj", "dense_4h_to_h"): v for k, v in tensors.items()}, str(renamed / "adapter_model.safetensors"))
    mine = load_adapter(copy.deepcopy(ours), renamed)
    x = tokens()
    with torch.no_grad():
        assert (mine(x) - theirs(input_ids=x).logits).abs().max().item() < TOL


@pytest.mark.parametrize("kind", ["prompt", "prefix", "adaption_prompt"])
def test_peft_prompt_prefix_and_adaption_prompt_import(bases, kind, tmp_path):
    ours, hf = bases["llama"]
    torch.manual_seed(8)
    config = {"prompt": peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3),
              "prefix": peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3, prefix_projection=True,
                                                encoder_hidden_size=16),
              "adaption_prompt": peft.AdaptionPromptConfig(task_type="CAUSAL_LM", adapter_len=3, adapter_layers=1)}[kind]
    theirs = save_peft(hf, config, tmp_path / kind, gate=0.4)
    mine = load_adapter(copy.deepcopy(ours), tmp_path / kind)
    x = tokens()
    with torch.no_grad():
        want = theirs(input_ids=x, attention_mask=torch.ones_like(x)).logits[:, 3 if kind == "prompt" else 0:]
        assert (mine(x) - want).abs().max().item() < TOL
        assert (ours(x) - want).abs().max().item() > 1e-2


def test_unimportable_peft_folders_are_one_line_errors(bases, tmp_path):
    ours, hf = bases["llama"]
    save_peft(hf, peft.LoraConfig(r=2, target_modules=["q_proj"], use_dora=True), tmp_path / "dora")
    with pytest.raises(PeftConfigError, match="use_dora"):
        load_adapter(copy.deepcopy(ours), tmp_path / "dora")
    save_peft(hf, peft.IA3Config(task_type="CAUSAL_LM", target_modules=["k_proj"], feedforward_modules=[]),
              tmp_path / "ia3")
    with pytest.raises(PeftConfigError, match="peft_type 'IA3'"):
        load_adapter(copy.deepcopy(ours), tmp_path / "ia3")
    save_peft(bases["bloom"][1], peft.LoraConfig(r=2, target_modules=["query_key_value"]), tmp_path / "bloom")
    with pytest.raises(PeftConfigError, match="not a module of a llama model"):
        load_adapter(copy.deepcopy(ours), tmp_path / "bloom")
