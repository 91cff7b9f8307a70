"""A fifth model family added from this file alone (no package file edited): its decoder and its registry
record. LoRA and prompt tuning apply to it, match a computation by hand, generate with the KV cache, and the
whole pipeline (config check, save / load, tokenizer, prompt format, Trainer, adapter folder) works on it.

The toy family, "toy_parallel": a parallel-residual decoder (the GPT-J / PaLM block) with one LayerNorm per
block, RoPE on q and k, and a GELU MLP:

    x = LayerNorm(h);   h_next = h + Attention(x) + MLP(x)
"""

import copy
import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from helpers_generate import greedy_without_cache  # noqa: E402
from train_helpers import MAX_SEQ_LEN, make_records  # noqa: E402
from helpers_tokenizer import train_tiny_sentencepiece  # noqa: E402

from minipeft.checkpoint import load_model, save_model  # noqa: E402
from minipeft.config import ConfigError, ModelConfig  # noqa: E402
from minipeft.data import AlpacaEncoder  # noqa: E402
from minipeft.families import Family, build_model, get_family, register_family, unregister_family  # noqa: E402
from minipeft.generate import generate  # noqa: E402
from minipeft.kv_cache import append_kv, cache_length  # noqa: E402
from minipeft.model import Transformer, apply_rope, rope_cos_sin  # noqa: E402
from minipeft.peft import LoRAConfig, PromptConfig, apply_peft, load_adapter  # noqa: E402
from minipeft.prompts import PromptFormat  # noqa: E402
from minipeft.tokenizer import Tokenizer  # noqa: E402
from minipeft.train import TrainConfig, build_trainer, prepare_run  # noqa: E402

NAME = "toy_parallel"
TOY_FORMAT = PromptFormat("Q: {instruction} ({input})\nA: ", "Q: {instruction}\nA: ", "A: ")


class ToyAttention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.n_heads = self.n_kv_heads = cfg.n_heads
        self.head_dim = cfg.head_dim
        self.wq, self.wk, self.wv, self.wo = (nn.Linear(cfg.dim, cfg.dim, bias=False) for _ in range(4))

    def project(self, x, rotation=None):
        B, T, _ = x.shape
        q, k, v = (w(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2) for w in (self.wq, self.wk, self.wv))
        if rotation is not None:
            cos, sin = rotation
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        return q, k, v

    def attend(self, q, k, v, mask):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and q.shape[2] > 1)

    def forward(self, x, rotation, mask, past_kv=None):
        B, T, _ = x.shape
        q, k, v = self.project(x, rotation)
        k, v = append_kv(past_kv, k, v)
        out = self.attend(q, k, v, mask).transpose(1, 2).reshape(B, T, -1)
        return self.wo(out), (k, v)


class ToyBlock(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.norm = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.attention = ToyAttention(cfg)
        self.w1 = nn.Linear(cfg.dim, cfg.ffn_hidden_dim)
        self.w2 = nn.Linear(cfg.ffn_hidden_dim, cfg.dim)

    def forward(self, h, rotation, mask, past_kv=None):
        x = self.norm(h)
        attn_out, kv = self.attention(x, rotation, mask, past_kv)
        return h + attn_out + self.w2(F.gelu(self.w1(x))), kv


class ToyParallel(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.config = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(ToyBlock(cfg) for _ in range(cfg.n_layers))
        self.norm = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.gradient_checkpointing = False
        if self.output.weight.device.type != "meta":
            for name, p in self.named_parameters():
                nn.init.normal_(p, std=0.2) if p.dim() == 2 else nn.init.zeros_(p) if "bias" in name else nn.init.ones_(p)

    def forward(self, tokens=None, *, input_embeds=None, past_key_values=None, start_pos=None, position_ids=None,
                attention_mask=None, use_cache=False, return_hidden=False):
        h = self.tok_embeddings(tokens) if tokens is not None else input_embeds
        B, T, _ = h.shape
        past_len = cache_length(past_key_values)
        if position_ids is None:
            first = past_len if start_pos is None else start_pos
            position_ids = torch.arange(first, first + T).expand(B, T)
        rotation = rope_cos_sin(position_ids, self.config.head_dim, self.config.rope_theta)
        mask = Transformer.build_mask(B, T, past_len, attention_mask, h.device)
        cache = []
        for i, layer in enumerate(self.layers):
            h, kv = layer(h, rotation, mask, past_key_values[i] if past_key_values is not None else None)
            cache.append(kv)
        out = h if return_hidden else self.head(h)
        return (out, cache) if use_cache else out

    def head(self, h):
        return self.output(self.norm(h))

    def num_parameters(self, trainable_only=False):
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)


def check_toy_config(cfg):
    if cfg.n_kv_heads != cfg.n_heads:
        raise ConfigError(f"toy_parallel has plain multi-head attention, got n_kv_heads {cfg.n_kv_heads}")
    if cfg.ffn_hidden_dim is None:
        cfg.ffn_hidden_dim = 2 * cfg.dim


class ToyTokenizer(Tokenizer):
    family = NAME


@pytest.fixture()
def family():
    record = register_family(Family(NAME, ToyParallel, ToyTokenizer, TOY_FORMAT, check_config=check_toy_config))
    yield record
    unregister_family(NAME)


def toy_config(vocab_size=64):
    return ModelConfig(family=NAME, dim=32, n_layers=2, n_heads=4, vocab_size=vocab_size, norm_eps=1e-5,
                       max_seq_len=128)


def test_the_family_is_known_only_once_registered(family):
    cfg = toy_config()
    assert cfg.ffn_hidden_dim == 64                                        # the record's check_config filled it
    with pytest.raises(ConfigError, match="plain multi-head"):
        ModelConfig(family=NAME, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=64)
    assert isinstance(build_model(cfg), ToyParallel) and get_family(NAME) is family
    unregister_family(NAME)
    with pytest.raises(ConfigError, match=f"family '{NAME}': expected one of llama"):
        toy_config()
    register_family(family)


def test_lora_on_the_toy_family_equals_the_merge_by_hand(family):
    torch.manual_seed(0)
    base = build_model(toy_config()).eval()
    reference = copy.deepcopy(base)
    tokens = torch.randint(0, 64, (2, 7))
    model = apply_peft(base, LoRAConfig(rank=2, alpha=4, targets=("wq", "wv")))
    with torch.no_grad():
        assert torch.equal(model(tokens), reference(tokens))                                  # B = 0: the base
        for i in range(2):
            for name in ("wq", "wv"):
                lora = getattr(model.base.layers[i].attention, name)
                lora.lora_B.normal_()
                getattr(reference.layers[i].attention, name).weight += 2.0 * lora.lora_B @ lora.lora_A  # W0 + s B A
        assert (model(tokens) - reference(tokens)).abs().max() < 1e-5
    assert model.report.trainable == 2 * 2 * 2 * (32 + 32)
    assert generate(model, [tokens[0].tolist()], 6) == [greedy_without_cache(model, tokens[0].tolist(), 6)]


def test_prompt_tuning_on_the_toy_family_equals_the_prompt_in_front(family):
    torch.manual_seed(0)
    base = build_model(toy_config()).eval()
    tokens = torch.randint(0, 64, (2, 7))
    model = apply_peft(base, PromptConfig(prompt_len=3, init="vocab"), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        prompt = model.soft_prompt.weight[None].expand(2, 3, 32)
        by_hand = base(input_embeds=torch.cat([prompt, base.tok_embeddings(tokens)], dim=1))[:, 3:]   # positions 0..
        assert (model(tokens) - by_hand).abs().max() < 1e-6
    assert model.report.trainable == 3 * 32
    assert generate(model, [tokens[0].tolist()], 6) == [greedy_without_cache(model, tokens[0].tolist(), 6)]


def test_the_whole_pipeline_trains_lora_on_the_toy_family(family, tmp_path):
    sp_path = train_tiny_sentencepiece(tmp_path)
    cfg = toy_config(vocab_size=ToyTokenizer(sp_path).vocab_size)
    torch.manual_seed(1234)
    save_model(build_model(cfg), cfg, tmp_path / "model", tokenizer_path=sp_path)
    (tmp_path / "train.json").write_text(json.dumps(make_records(24)))
    (tmp_path / "val.json").write_text(json.dumps(make_records(8, offset=100)))
    run = TrainConfig(model=str(tmp_path / "model"), train_data=str(tmp_path / "train.json"),
                      val_data=str(tmp_path / "val.json"), max_seq_len=MAX_SEQ_LEN, method="lora", lr=1e-2,
                      batch_size=4, max_steps=8, warmup_steps=1, device="cpu", out=str(tmp_path / "run"),
                      progress=False, exact_match=False)
    run, ds_config, base, tokenizer, data = prepare_run(run)
    assert isinstance(base, ToyParallel) and isinstance(tokenizer, ToyTokenizer)
    assert AlpacaEncoder(tokenizer, MAX_SEQ_LEN).format is TOY_FORMAT                 # the family's own format
    trainer = build_trainer(run, base, tokenizer, data, ds_config)
    before = trainer.evaluate()["val_loss"]
    trainer.train()
    after = trainer.evaluate()["val_loss"]
    assert after < before - 0.1, (before, after)
    folder = trainer.save_final()
    reloaded = load_adapter(load_model(tmp_path / "model"), folder).eval()
    trainer.model.eval()
    tokens = torch.tensor([data.val[0].input_ids])
    with torch.no_grad():
        assert torch.equal(reloaded(tokens), trainer.model(tokens))
