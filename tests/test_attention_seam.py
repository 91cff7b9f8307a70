"""The attention seam (minipeft/attention_seam.py): every family's attention has the same project / attend /
forward signature and says where its q/k/v live (qkv_layout); rotation=None is a position-free projection; and
the PEFT package names no family module."""

import ast
import dataclasses
import inspect
from pathlib import Path

import pytest
import torch

from minipeft.attention_seam import PER_HEAD_FUSED_QKV, SEPARATE_QKV, QKVLayout
from minipeft.bloom import BloomAttention
from minipeft.chatglm import Attention as ChatGLMAttention
from minipeft.config import ModelConfig
from minipeft.model import Attention, apply_rope, rope_cos_sin
from minipeft.peft.llama_adapter import GatedAdapterPrompt

PEFT = Path(__file__).resolve().parents[1] / "minipeft" / "peft"
FAMILY_MODULES = ("minipeft.model", "minipeft.bloom", "minipeft.chatglm")   # families.py (build_model) may be used


def cfg_for(family):
    base = ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=50, multiple_of=16)
    if family == "chatglm2":
        return dataclasses.replace(base, family="chatglm2", qkv_bias=True, rotary_fraction=0.5)
    if family in ("bloom", "chatglm"):
        return dataclasses.replace(base, family=family, n_kv_heads=4)
    return base


def attention_of(family):
    torch.manual_seed(0)
    cfg = cfg_for(family)
    if family == "bloom":
        return BloomAttention(cfg)
    if family == "chatglm":
        return ChatGLMAttention(cfg, layer_index=1)
    attention = Attention(cfg)
    if family == "chatglm2":
        with torch.no_grad():
            for linear in (attention.wq, attention.wk, attention.wv):
                linear.bias.normal_()
    return attention


def test_every_family_has_the_same_signatures():
    classes = (Attention, BloomAttention, ChatGLMAttention)
    for method, parameters in (("project", ["self", "x", "rotation"]), ("attend", ["self", "q", "k", "v", "mask"]),
                               ("forward", ["self", "x", "rotation", "mask", "past_kv"])):
        for cls in classes:
            signature = inspect.signature(getattr(cls, method))
            assert list(signature.parameters) == parameters, f"{cls.__qualname__}.{method}{signature}"
        for cls in classes:
            if method == "project":
                assert inspect.signature(cls.project).parameters["rotation"].default is None, cls


def test_qkv_layout_is_data_on_each_attention_class():
    assert Attention.qkv_layout == SEPARATE_QKV == QKVLayout(fused=False)
    assert BloomAttention.qkv_layout == ChatGLMAttention.qkv_layout == PER_HEAD_FUSED_QKV == QKVLayout(fused=True)
    for family in ("llama", "bloom", "chatglm"):
        attention = attention_of(family)
        for name in attention.qkv_layout.modules:
            assert isinstance(getattr(attention, name), torch.nn.Linear), (family, name)
        wrapped = GatedAdapterPrompt(attention, prompt_len=2)
        assert wrapped.qkv_layout is attention.qkv_layout
    with pytest.raises(dataclasses.FrozenInstanceError):
        SEPARATE_QKV.fused = True


def test_fused_rows_are_per_head_q_k_v():
    """PER_HEAD_FUSED_QKV's documented layout: rows [q_0, k_0, v_0, q_1, ...], hd each."""
    for family in ("bloom", "chatglm"):
        attention = attention_of(family)
        H, hd = attention.n_heads, attention.head_dim
        x = torch.randn(1, 3, attention.wqkv.in_features)
        q, k, v = attention.project(x)
        rows = attention.wqkv(x).view(1, 3, H, 3, hd)                            # per head [q, k, v]
        for j, got in enumerate((q, k, v)):
            assert torch.equal(got, rows[:, :, :, j].transpose(1, 2)), (family, j)


@pytest.mark.parametrize("family", ["llama", "chatglm2", "chatglm"])
def test_rotation_none_is_the_identity_rotation_bit_for_bit(family):
    """What LLaMA-Adapter's prompt keys used to get (cos 1, sin 0) is exactly what rotation=None gives (fp32)."""
    attention = attention_of(family)
    x = torch.randn(2, 5, attention.wo.out_features)
    pairs = attention.head_dim // 2
    cos = torch.ones(1, 1, 5, pairs)
    plain = attention.project(x, None)
    identity = attention.project(x, (cos, torch.zeros_like(cos)))
    for a, b in zip(plain, identity):
        assert torch.equal(a, b)


@pytest.mark.parametrize("family", ["llama", "chatglm2", "chatglm"])
def test_a_stacked_rotation_equals_the_pair(family):
    """The forwards pass (cos, sin) stacked in one tensor; project reads it exactly as the pair."""
    attention = attention_of(family)
    x = torch.randn(2, 5, attention.wo.out_features)
    positions = torch.arange(3, 8).expand(2, 5)
    cos, sin = rope_cos_sin(positions, attention.head_dim, 10000.0)
    for a, b in zip(attention.project(x, (cos, sin)), attention.project(x, torch.stack([cos, sin]))):
        assert torch.equal(a, b)
    if family != "chatglm":                                                      # model.py rotates with apply_rope
        q_plain, _, _ = attention.project(x)
        q, _, _ = attention.project(x, (cos, sin))
        assert torch.equal(q, apply_rope(q_plain, cos, sin))


def test_bloom_refuses_a_rotation():
    attention = attention_of("bloom")
    cos = torch.ones(1, 1, 3, 4)
    with pytest.raises(ValueError, match="rotation must be None"):
        attention.project(torch.randn(1, 3, 32), (cos, cos))


def test_peft_imports_no_family_module():
    """minipeft/peft/* installs through the seam alone: no import of model.py, bloom.py or chatglm.py."""
    offenders = []
    for path in sorted(PEFT.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.ImportFrom):
                package = {0: "", 1: "minipeft.peft", 2: "minipeft"}[node.level]
                name = ".".join(part for part in (package, node.module) if part)
                names = [name] + [f"{name}.{alias.name}" for alias in node.names]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            else:
                continue
            if any(n in FAMILY_MODULES for n in names):
                offenders.append(f"{path.name}:{node.lineno}")
    assert not offenders, f"minipeft/peft imports a family module at {offenders}"
