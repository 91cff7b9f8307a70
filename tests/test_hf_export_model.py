"""export_model_to_hf (issue 26): a whole model -> a Hugging Face folder. LLaMA, BLOOM and ChatGLM2 (as
GlmForCausalLM) are loaded by transformers itself and give our logits within 1e-5 and the same greedy tokens;
ChatGLM-6B's folder (the original's layout, which transformers has no class for) is checked against the float64
computation from the original's formulas (helpers_chatglm.reference_logits) and read back by our reader; the
tokenizer files load in transformers' tokenizers with our ids; the tool runs end to end on the shipped tiny LLaMA."""

import json

import pytest
import torch

from helpers_chatglm import SOP, GMASK, reference_logits
from helpers_hf_export import export_and_load, greedy_pair, random_model, tokens
from minipeft.checkpoint import CheckpointError, export_model_to_hf, load_model
from minipeft.peft import LoRAConfig, apply_peft

transformers = pytest.importorskip("transformers")


@pytest.mark.parametrize("family, hf_class", [("llama", "LlamaForCausalLM"), ("bloom", "BloomForCausalLM"),
                                              ("chatglm2", "GlmForCausalLM")])
def test_transformers_loads_the_export_with_our_logits_and_greedy_tokens(family, hf_class, tmp_path):
    ours = random_model(family)
    theirs = export_and_load(ours, tmp_path / "hf")
    assert type(theirs).__name__ == hf_class
    x = tokens()
    with torch.no_grad():
        assert (ours(x) - theirs(x).logits).abs().max().item() < 1e-5
    mine, peer = greedy_pair(ours, theirs, x[0, :5])
    assert mine == peer
    # and the folder reads back through our own reader for the families it has one for
    if family != "chatglm2":
        with torch.no_grad():
            assert torch.equal(load_model(tmp_path / "hf")(x), ours(x))


def test_chatglm_6b_export_is_the_originals_layout(tmp_path):
    from safetensors.torch import load_file
    ours = random_model("chatglm")
    export_model_to_hf(ours, tmp_path / "glm6b")
    config = json.loads((tmp_path / "glm6b" / "config.json").read_text())
    state = load_file(str(tmp_path / "glm6b" / "model.safetensors"))
    assert config["auto_map"]["AutoModel"] == "modeling_chatglm.ChatGLMForConditionalGeneration"
    assert torch.equal(state["lm_head.weight"], state["transformer.word_embeddings.weight"])
    assert "transformer.layers.1.attention.rotary_emb.inv_freq" in state
    ids = [5, 17, 42, 8, GMASK, SOP, 33, 9, 61]
    with torch.no_grad():
        mine = ours(torch.tensor([ids]))[0].double()
        want = reference_logits(state, config, ids)                   # float64, the original's formulas
        assert (mine - want).abs().max().item() < 1e-4
        assert torch.equal(load_model(tmp_path / "glm6b")(torch.tensor([ids])), ours(torch.tensor([ids])))


def test_llama_tokenizer_files_load_in_transformers(tmp_path):
    from minipeft import Tokenizer
    folder = "minipeft/assets/tiny-llama"
    ours = load_model(folder)
    export_model_to_hf(ours, tmp_path / "hf", tokenizer_path=f"{folder}/tokenizer.model", dtype=torch.bfloat16)
    mine = Tokenizer(f"{folder}/tokenizer.model")
    theirs = transformers.LlamaTokenizer.from_pretrained(str(tmp_path / "hf"))
    for text in ["Hello world", " leading space", "你好，世界", "a\nb  c"]:
        assert theirs(text)["input_ids"] == mine.encode(text), text
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"], config["torch_dtype"]) == (mine.bos_id, mine.eos_id,
                                                                                        "bfloat16")


def test_bloom_tokenizer_json_loads_in_transformers(tmp_path):
    from helpers_bloom import train_tiny_bpe
    from minipeft.tokenizer import ByteLevelBPETokenizer
    path = train_tiny_bpe(tmp_path)
    ours = random_model("bloom", vocab=320)
    export_model_to_hf(ours, tmp_path / "hf", tokenizer_path=path)
    theirs = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    mine = ByteLevelBPETokenizer(path)
    for text in ["the cat sat", "你好 🙂", " two  spaces"]:
        assert theirs(text, add_special_tokens=False)["input_ids"] == mine.encode(text, bos=False), text


def test_refusals_and_the_overwrite_rule(tmp_path):
    model = random_model("llama")
    with pytest.raises(CheckpointError, match="merge_lora"):
        export_model_to_hf(apply_peft(random_model("llama"), LoRAConfig()), tmp_path / "x")
    export_model_to_hf(model, tmp_path / "hf")
    with pytest.raises(CheckpointError, match="overwrite"):
        export_model_to_hf(model, tmp_path / "hf")
    export_model_to_hf(model, tmp_path / "hf", overwrite=True)
    assert not (tmp_path / "x").exists()
