"""ChatGLM2-6B: a random tiny checkpoint written in ChatGLM2's own folder layout (as its modeling_chatglm.py names
and fuses the tensors), converted, against transformers' GlmForCausalLM holding the same weights."""

import json

import pytest
import torch

from minipeft import ModelConfig
from minipeft.checkpoint import CheckpointError, convert_checkpoint, load_model
from minipeft.families import build_model
from minipeft.generate import generate

transformers = pytest.importorskip("transformers")

TINY = dict(hidden_size=64, num_layers=2, num_attention_heads=4, multi_query_group_num=2, ffn_hidden_size=96,
            padded_vocab_size=120)


def chatglm2_folder(tmp_path, seed=0, **overrides):
    """config.json + pytorch_model.bin in ChatGLM2's layout, random weights (biases too). Returns (folder, state)."""
    cfg = {**TINY, **overrides}
    d, L, H, G, F = (cfg["hidden_size"], cfg["num_layers"], cfg["num_attention_heads"], cfg["multi_query_group_num"],
                     cfg["ffn_hidden_size"])
    hd, V = d // H, cfg["padded_vocab_size"]
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=0.2):
        return torch.randn(*shape, generator=gen) * scale

    state = {"transformer.embedding.word_embeddings.weight": rand(V, d, scale=1.0),
             "transformer.rotary_pos_emb.inv_freq": torch.ones(hd // 4),
             "transformer.encoder.final_layernorm.weight": 1 + rand(d),
             "transformer.output_layer.weight": rand(V, d)}
    for i in range(L):
        p = f"transformer.encoder.layers.{i}."
        state[p + "input_layernorm.weight"] = 1 + rand(d)
        state[p + "self_attention.query_key_value.weight"] = rand(H * hd + 2 * G * hd, d)
        state[p + "self_attention.query_key_value.bias"] = rand(H * hd + 2 * G * hd)
        state[p + "self_attention.dense.weight"] = rand(d, H * hd)
        state[p + "post_attention_layernorm.weight"] = 1 + rand(d)
        state[p + "mlp.dense_h_to_4h.weight"] = rand(2 * F, d)
        state[p + "mlp.dense_4h_to_h.weight"] = rand(d, F)
    folder = tmp_path / "chatglm2-hf"
    folder.mkdir()
    config = {"model_type": "chatglm", "add_bias_linear": False, "add_qkv_bias": True, "kv_channels": hd,
              "layernorm_epsilon": 1e-5, "multi_query_attention": True, "rmsnorm": True, "post_layer_norm": True,
              "apply_residual_connection_post_layernorm": False, "original_rope": True, "seq_length": 256,
              "quantization_bit": 0, "pre_seq_len": None, **cfg}
    (folder / "config.json").write_text(json.dumps(config))
    torch.save(state, folder / "pytorch_model.bin")
    return folder, config, state


def glm_peer(config, state):
    """transformers' GlmForCausalLM with the ChatGLM2 weights mapped onto its names (its gate_up_proj is
    dense_h_to_4h as is; q/k/v are the slices of query_key_value)."""
    d, H, G = config["hidden_size"], config["num_attention_heads"], config["multi_query_group_num"]
    hd = d // H
    glm_cfg = transformers.GlmConfig(
        vocab_size=config["padded_vocab_size"], hidden_size=d, intermediate_size=config["ffn_hidden_size"],
        num_hidden_layers=config["num_layers"], num_attention_heads=H, num_key_value_heads=G, head_dim=hd,
        partial_rotary_factor=0.5, rms_norm_eps=1e-5, attention_bias=True, tie_word_embeddings=False,
        max_position_embeddings=256, pad_token_id=0, eos_token_id=None, bos_token_id=None)
    peer = transformers.GlmForCausalLM(glm_cfg).eval()
    mapped = {"model.embed_tokens.weight": state["transformer.embedding.word_embeddings.weight"],
              "model.norm.weight": state["transformer.encoder.final_layernorm.weight"],
              "lm_head.weight": state["transformer.output_layer.weight"]}
    for i in range(config["num_layers"]):
        p, q = f"transformer.encoder.layers.{i}.", f"model.layers.{i}."
        w, b = state[p + "self_attention.query_key_value.weight"], state[p + "self_attention.query_key_value.bias"]
        sizes = [H * hd, G * hd, G * hd]
        for name, wi, bi in zip(("q_proj", "k_proj", "v_proj"), w.split(sizes), b.split(sizes)):
            mapped[q + f"self_attn.{name}.weight"], mapped[q + f"self_attn.{name}.bias"] = wi, bi
        mapped[q + "self_attn.o_proj.weight"] = state[p + "self_attention.dense.weight"]
        mapped[q + "mlp.gate_up_proj.weight"] = state[p + "mlp.dense_h_to_4h.weight"]
        mapped[q + "mlp.down_proj.weight"] = state[p + "mlp.dense_4h_to_h.weight"]
        mapped[q + "input_layernorm.weight"] = state[p + "input_layernorm.weight"]
        mapped[q + "post_attention_layernorm.weight"] = state[p + "post_attention_layernorm.weight"]
    missing, unexpected = peer.load_state_dict(mapped, strict=False)
    assert not unexpected and all("rotary" in k for k in missing), (missing, unexpected)
    return peer


def test_chatglm2_6b_preset_parameter_count():
    with torch.device("meta"):
        model = build_model(ModelConfig.from_name("chatglm2-6b"))
    assert model.num_parameters() == 6_243_584_000


def test_converted_chatglm2_matches_glm_for_causal_lm(tmp_path):
    folder, config, state = chatglm2_folder(tmp_path)
    summary = convert_checkpoint(folder, tmp_path / "ours")
    assert summary["config"].family == "chatglm2" and summary["config"].n_kv_heads == 2
    ours = load_model(tmp_path / "ours")
    peer = glm_peer(config, state)
    tokens = torch.randint(0, config["padded_vocab_size"], (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got, want = ours(tokens), peer(tokens).logits
    assert (got - want).abs().max().item() < 1e-5

    # Greedy generation, ours (KV cache) against the peer's own generate().
    prompt = tokens[0, :5]
    new = generate(ours, [prompt.tolist()], max_new_tokens=8)[0]
    with torch.no_grad():
        peer_out = peer.generate(prompt[None], max_new_tokens=8, do_sample=False, min_new_tokens=8)
    assert new == peer_out[0, 5:].tolist()


def test_chatglm2_bad_folders(tmp_path):
    folder, config, _ = chatglm2_folder(tmp_path)
    for field, value, needle in (("quantization_bit", 4, "quantization_bit"), ("pre_seq_len", 8, "pre_seq_len"),
                                 ("rmsnorm", False, "rmsnorm"), ("kv_channels", 8, "kv_channels")):
        (folder / "config.json").write_text(json.dumps({**config, field: value}))
        with pytest.raises(CheckpointError, match=needle):
            convert_checkpoint(folder, tmp_path / f"out-{field}")
        assert not (tmp_path / f"out-{field}").exists()
