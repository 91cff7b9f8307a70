"""Shared pytest fixtures. Keep this small: fixtures used by several test files only."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")        # tests never download anything
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
import torch

from minipeft.config import ModelConfig


@pytest.fixture
def small_cfg() -> ModelConfig:
    """A tiny grouped-query model: 4 query heads sharing 2 key/value heads, head_dim 16."""
    return ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=97, multiple_of=16,
                       norm_eps=1e-5, max_seq_len=64)


@pytest.fixture
def small_model(small_cfg):
    """A random float32 Transformer(small_cfg) in eval mode, seeded."""
    from minipeft.model import Transformer
    torch.manual_seed(0)
    return Transformer(small_cfg).eval()
