"""Reading Hugging Face BLOOM folders: safetensors / .bin, sharded or not, with or without the `transformer.`
prefix, tokenizer.json carried over; our folder round trip; clear errors for what cannot be read."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from minipeft import Tokenizer, load_model, save_model
from minipeft.checkpoint import (CheckpointError, bloom_module_to_hf, convert_checkpoint, hf_bloom_key_to_ours)
from helpers_bloom import make_hf_bloom, train_tiny_bpe

REPO = Path(__file__).resolve().parent.parent
VOCAB = 300   # = the tiny BPE's size, so the folder's tokenizer fits exactly


@pytest.fixture(scope="module")
def hf():
    return make_hf_bloom(vocab=VOCAB, layers=2)


def our_state_from_hf(hf):
    return {hf_bloom_key_to_ours(k): v for k, v in hf.state_dict().items() if k != "lm_head.weight"}


def assert_loaded_equals(folder, hf):
    model = load_model(folder)
    state = model.state_dict()
    expected = our_state_from_hf(hf)
    assert sorted(state) == sorted(expected)
    for key, tensor in expected.items():
        assert torch.equal(state[key], tensor), key
    tokens = torch.randint(0, VOCAB, (2, 7))
    with torch.no_grad():
        assert (model(tokens) - hf(tokens).logits).abs().max() < 1e-5
    return model


def test_name_table_both_directions(hf):
    for key in hf.state_dict():
        if key == "lm_head.weight":
            continue
        module, _, param = hf_bloom_key_to_ours(key).rpartition(".")
        assert f"{bloom_module_to_hf(module)}.{param}" == key
    assert hf_bloom_key_to_ours("h.1.self_attention.query_key_value.bias") == "layers.1.attention.wqkv.bias"
    with pytest.raises(KeyError):
        hf_bloom_key_to_ours("transformer.h.0.self_attention.rotary.weight")


@pytest.mark.parametrize("layout", ["safetensors", "bin", "sharded-safetensors", "sharded-bin", "no-prefix"])
def test_hf_folder_layouts_convert(tmp_path, hf, layout):
    src = tmp_path / "hf"
    if layout == "no-prefix":           # as on the hub: keys without "transformer.", no lm_head
        hf.save_pretrained(src)
        state = load_file(str(src / "model.safetensors"))
        save_file({k.removeprefix("transformer."): v.contiguous() for k, v in state.items()},
                  str(src / "model.safetensors"), metadata={"format": "pt"})
    else:
        hf.save_pretrained(src, safe_serialization="safetensors" in layout,
                           max_shard_size="20KB" if "sharded" in layout else "5GB")
    train_tiny_bpe(src)
    summary = convert_checkpoint(src, tmp_path / "ours")
    assert summary["format"] == "hf" and summary["config"].family == "bloom"
    assert summary["num_parameters"] == sum(p.numel() for p in hf.parameters())
    assert (tmp_path / "ours" / "tokenizer.json").is_file() and summary["tokenizer"] == "tokenizer.json"
    assert_loaded_equals(tmp_path / "ours", hf)
    assert_loaded_equals(src, hf)          # load_model reads the HF folder directly too
    assert Tokenizer(tmp_path / "ours").encode("你好 🙂", bos=False) == Tokenizer(src / "tokenizer.json").encode("你好 🙂", bos=False)


def test_cli_converts_a_bloom_folder(tmp_path, hf, capsys):
    hf.save_pretrained(tmp_path / "hf")
    spec = importlib.util.spec_from_file_location("convert_checkpoint", REPO / "tools" / "convert_checkpoint.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    assert cli.main([str(tmp_path / "hf"), str(tmp_path / "out")]) == 0
    assert "family          : bloom" in capsys.readouterr().out
    assert_loaded_equals(tmp_path / "out", hf)


def test_our_folder_round_trip_with_tokenizer_json(tmp_path, hf):
    model = load_model(_saved(tmp_path, hf))
    tokenizer = train_tiny_bpe(tmp_path)
    save_model(model, model.config, tmp_path / "ours", tokenizer_path=tokenizer, max_shard_size="30KB")
    assert (tmp_path / "ours" / "tokenizer.json").is_file()
    assert json.loads((tmp_path / "ours" / "config.json").read_text())["family"] == "bloom"
    assert_loaded_equals(tmp_path / "ours", hf)


def _saved(tmp_path, hf, **kwargs):
    hf.save_pretrained(tmp_path / "hf", **kwargs)
    return tmp_path / "hf"


def test_a_missing_shard_is_a_clear_error(tmp_path, hf):
    src = _saved(tmp_path, hf, max_shard_size="20KB")
    shards = sorted(src.glob("model-*.safetensors"))
    shards[1].unlink()
    with pytest.raises(CheckpointError, match=f"names shard '{shards[1].name}', which is missing"):
        convert_checkpoint(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_tokenizer_larger_than_the_vocabulary_is_a_clear_error(tmp_path):
    src = tmp_path / "hf"
    make_hf_bloom(vocab=200).save_pretrained(src)
    train_tiny_bpe(src)                       # 300 tokens, but only 200 embedding rows
    with pytest.raises(CheckpointError, match=r"tokenizer\.json: tokenizer has 300 pieces.*vocabulary of 200"):
        convert_checkpoint(src, tmp_path / "out")
    model = load_model(_saved(tmp_path / "b", make_hf_bloom(vocab=200)))
    with pytest.raises(CheckpointError, match="tokenizer has 300 pieces"):
        save_model(model, model.config, tmp_path / "ours", tokenizer_path=src / "tokenizer.json")


@pytest.mark.parametrize("setting, message", [
    ({"slow_but_exact": True, "pretraining_tp": 2}, "slow_but_exact=true with pretraining_tp=2"),
    ({"apply_residual_connection_post_layernorm": True}, "apply_residual_connection_post_layernorm=true"),
    ({"tie_word_embeddings": False}, "tie_word_embeddings=false"),
])
def test_settings_bloom_py_does_not_compute_are_refused(tmp_path, hf, setting, message):
    src = _saved(tmp_path, hf)
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, **setting}))
    with pytest.raises(CheckpointError, match=f"config.json: {message}"):
        convert_checkpoint(src, tmp_path / "out")


def test_pretraining_tp_without_slow_but_exact_is_the_plain_model(tmp_path, hf):
    """pretraining_tp > 1 changes transformers' numerics only together with slow_but_exact (bloom-176b's
    config has pretraining_tp 4): such a folder converts and gives the same logits."""
    src = _saved(tmp_path, hf)
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, "pretraining_tp": 4, "slow_but_exact": False}))
    assert_loaded_equals(src, hf)


def test_an_unknown_key_names_the_file(tmp_path, hf):
    src = _saved(tmp_path, hf)
    state = load_file(str(src / "model.safetensors"))
    state["transformer.h.0.self_attention.rotary.inv_freq"] = torch.zeros(3)
    save_file(state, str(src / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="model.safetensors: unexpected key .*rotary.*not a BLOOM parameter"):
        convert_checkpoint(src, tmp_path / "out")


def test_generate_tool_on_a_bloom_folder(tmp_path, hf, capsys):
    """tools/generate.py finds the folder's tokenizer.json and prints what greedy generation gives."""
    src = _saved(tmp_path, hf)
    train_tiny_bpe(src)
    convert_checkpoint(src, tmp_path / "ours")
    spec = importlib.util.spec_from_file_location("generate_tool", REPO / "tools" / "generate.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    assert tool.main([str(tmp_path / "ours"), "--prompt", "the cat", "--max-new-tokens", "5", "--device", "cpu"]) == 0
    tokenizer = Tokenizer(tmp_path / "ours")
    prompt = tokenizer.encode("the cat", bos=True)
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=5, do_sample=False, eos_token_id=None, pad_token_id=3)
    assert tokenizer.decode(out[0, len(prompt):].tolist()) in capsys.readouterr().out
