"""The shipped tiny BLOOM, ChatGLM-6B and Chinese-LLaMA (minipeft/assets/): each loads as its family, is far
better than its random init on its held-out text (perplexity computed here from the formula, checked against
the recorded one), is that family's model by the peer or the reference (transformers' BloomForCausalLM; the
float64 ChatGLM-6B reference of tests/helpers_chatglm.py; transformers' LlamaForCausalLM), and has the family's
kind of tokenizer."""

import json
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import helpers_chatglm  # noqa: E402
import minipeft  # noqa: E402
from minipeft.checkpoint import load_model  # noqa: E402
from minipeft.families import build_model, tokenizer_for  # noqa: E402

ASSETS = minipeft.assets_dir()
BASES = {"tiny-bloom": ("bloom", "Bloom", "tokenizer.json"), "tiny-chatglm": ("chatglm", "ChatGLM", "tokenizer.model"),
         "tiny-chinese-llama": ("llama", "Transformer", "tokenizer.model")}


def load(name):
    folder = ASSETS / name
    family = BASES[name][0]
    model = load_model(folder, dtype=torch.float32)
    tok = tokenizer_for(family, folder / BASES[name][2])
    text = (folder / "val_text.txt").read_text(encoding="utf-8")
    metrics = json.loads((folder / "pretrain_metrics.json").read_text(encoding="utf-8"))
    return model, tok, text, metrics


def layout(chunk, tok, family):
    """A chunk of text ids as pretraining scored it: [bos] + c[:-1] -> c, or for GLM [gMASK] <sop> + c[:-1] -> c."""
    marks = [tok.gmask_id, tok.sop_id] if family == "chatglm" else [tok.bos_id]
    inputs = marks + chunk[:-1]
    targets = [-100] * (len(marks) - 1) + chunk
    return torch.tensor([inputs]), torch.tensor([targets])


@torch.no_grad()
def total_nll(model, tok, text, family, chunk_len=255):
    """(sum of next-token NLLs in nats, scored tokens) of a text cut into chunks of chunk_len ids."""
    ids = tok.encode(text, bos=False)
    nll, count = 0.0, 0
    for start in range(0, len(ids), chunk_len):
        inputs, targets = layout(ids[start:start + chunk_len], tok, family)
        logits = model(inputs).float()
        nll += F.cross_entropy(logits[0], targets[0], ignore_index=-100, reduction="sum").item()
        count += int((targets != -100).sum())
    return nll, count


def perplexity(model, tok, text, family, chunk_len=255):
    nll, count = total_nll(model, tok, text, family, chunk_len)
    return math.exp(nll / count)


@pytest.mark.parametrize("name", sorted(BASES))
def test_loads_as_its_family_and_beats_its_random_init(name):
    model, tok, text, metrics = load(name)
    family, class_name, _ = BASES[name]
    assert type(model).__name__ == class_name and model.config.family == family
    assert model.tok_embeddings.weight.dtype == torch.float32 and tok.vocab_size <= model.config.vocab_size
    assert sum((ASSETS / name / f).stat().st_size for f in metrics["file_bytes"]) < 12_000_000        # small
    chunk_len = metrics["seq_len"] - (1 if family == "chatglm" else 0)
    trained = perplexity(model, tok, text, family, chunk_len)
    torch.manual_seed(0)
    random_ppl = perplexity(build_model(model.config).eval(), tok, text, family, chunk_len)
    assert random_ppl > 0.5 * tok.vocab_size                          # about a uniform guess
    assert trained < random_ppl / 10
    assert trained == pytest.approx(metrics["val_text_perplexity"], rel=0.01)   # what pretraining recorded
    readme = (ASSETS / "README.md").read_text(encoding="utf-8")
    assert f"{metrics['val_text_perplexity']:.1f}" in readme


def test_bloom_is_transformers_bloom():
    from transformers import BloomConfig, BloomForCausalLM
    from minipeft.checkpoint import bloom_module_to_hf
    model, tok, text, _ = load("tiny-bloom")
    cfg = model.config
    hf = BloomForCausalLM(BloomConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.dim, n_layer=cfg.n_layers,
                                      n_head=cfg.n_heads, layer_norm_epsilon=cfg.norm_eps)).eval()
    state = {}
    for key, tensor in model.state_dict().items():
        module, _, param = key.rpartition(".")
        state[f"{bloom_module_to_hf(module)}.{param}"] = tensor
    state["lm_head.weight"] = state["transformer.word_embeddings.weight"]
    hf.load_state_dict(state, strict=True)
    ids = torch.tensor([tok.encode(text, bos=True)[:96]])
    with torch.no_grad():
        theirs, ours = hf(ids).logits, model(ids)
    assert (ours - theirs).abs().max().item() < 1e-4 * theirs.abs().max().item()
    # byte-level BPE: any text round-trips; BLOOM's special ids
    sample = "Thou art 春风 🙂\n\n  two  spaces"
    assert tok.decode(tok.encode(sample)) == sample
    assert (tok.unk_id, tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2, 3)


def test_chatglm_is_the_glm_reference(monkeypatch):
    from minipeft.checkpoint.hf_chatglm import V1_NAMES, pairs_to_rotate_half
    model, tok, text, _ = load("tiny-chatglm")
    cfg = model.config
    ours_to_original = {v: k for k, v in V1_NAMES.items()}
    state = {"transformer.word_embeddings.weight": model.tok_embeddings.weight,
             "transformer.final_layernorm.weight": model.norm.weight, "transformer.final_layernorm.bias": model.norm.bias}
    for key, tensor in model.state_dict().items():
        if key.startswith("layers."):
            _, index, rest = key.split(".", 2)
            module, _, param = rest.rpartition(".")
            if module == "attention.wqkv":
                tensor = pairs_to_rotate_half(tensor, cfg.n_heads)
            state[f"transformer.layers.{index}.{ours_to_original[module]}.{param}"] = tensor
    for name, value in (("SOP", tok.sop_id), ("GMASK", tok.gmask_id), ("MASK", tok.mask_id)):
        monkeypatch.setattr(helpers_chatglm, name, value)
    config = {"hidden_size": cfg.dim, "num_attention_heads": cfg.n_heads, "num_layers": cfg.n_layers}
    lines = text.splitlines()
    row = tok.encode(lines[0], bos=True) + tok.encode(lines[1], bos=False)[:20]     # context [gMASK] <sop> reply
    assert tok.gmask_id in row and tok.sop_id in row
    want = helpers_chatglm.reference_logits(state, config, row)
    with torch.no_grad():
        got = model.double()(torch.tensor([row]))[0]
    assert (got - want).abs().max().item() < 1e-8 * want.abs().max().item()
    # GLM's tokenizer: its special tokens are pieces, newlines become <n>
    for piece in ("[MASK]", "[gMASK]", "<sop>", "<eop>", "<n>"):
        assert tok.sp.piece_to_id(piece) != tok.sp.unk_id(), piece
    assert tok.sp.piece_to_id("<n>") in tok.encode("a\nb", bos=False)
    assert tok.decode(tok.encode("春风\n  又绿", bos=False)) == "春风\n  又绿"


def test_chinese_llama_is_transformers_llama_with_the_base_vocabulary_extended():
    from transformers import LlamaConfig, LlamaForCausalLM
    from minipeft.checkpoint import ours_module_to_hf, permute_for_hf
    from minipeft.vocab import check_extends
    model, tok, text, metrics = load("tiny-chinese-llama")
    cfg = model.config
    base = ASSETS / "tiny-llama" / "tokenizer.model"
    check_extends(base, ASSETS / "tiny-chinese-llama" / "tokenizer.model")           # every base id unchanged
    base_size = tokenizer_for("llama", base).vocab_size
    assert cfg.vocab_size == tok.vocab_size > base_size + 1000
    hf = LlamaForCausalLM(LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.dim, intermediate_size=cfg.ffn_hidden_dim,
                                      num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
                                      num_key_value_heads=cfg.n_kv_heads, rms_norm_eps=cfg.norm_eps,
                                      rope_theta=cfg.rope_theta, tie_word_embeddings=False,
                                      attn_implementation="eager")).eval()
    state = {}
    for key, tensor in model.state_dict().items():
        module, _, param = key.rpartition(".")
        if module.endswith("attention.wq"):
            tensor = permute_for_hf(tensor, cfg.n_heads)
        elif module.endswith("attention.wk"):
            tensor = permute_for_hf(tensor, cfg.n_kv_heads)
        state[f"{ours_module_to_hf(module)}.{param}"] = tensor
    hf.load_state_dict(state, strict=False)
    ids = torch.tensor([tok.encode(text, bos=True)[:96]])
    with torch.no_grad():
        theirs, ours = hf(ids).logits, model(ids)
    assert (ours - theirs).abs().max().item() < 1e-4 * theirs.abs().max().item()
    # the further pretraining started from the shipped tiny LLaMA with the new rows at the mean of the old
    assert metrics["init_from"] and metrics["initial"]["val_text_perplexity"] > metrics["val_text_perplexity"]
    # per character (the tokenizers differ) it models held-out Chinese text better than the tiny LLaMA it came from
    base_model = load_model(ASSETS / "tiny-llama", dtype=torch.float32)
    base_tok = tokenizer_for("llama", base)
    chinese = "".join(line + "\n" for line in text.splitlines() if any("\u4e00" <= c <= "\u9fff" for c in line))
    assert len(chinese) > 1000
    ours_per_char = total_nll(model, tok, chinese, "llama")[0] / len(chinese)
    base_per_char = total_nll(base_model, base_tok, chinese, "llama")[0] / len(chinese)
    assert ours_per_char < base_per_char
