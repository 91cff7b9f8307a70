"""Test helper for the training tests (plain and DeepSpeed): a tiny random model saved as our checkpoint
folder with the tiny SentencePiece tokenizer, and a small learnable Alpaca data set ("say A then B" -> "A B")."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from helpers_tokenizer import train_tiny_sentencepiece  # noqa: E402

WORDS = ["cat", "dog", "mat", "log", "tree", "house", "note", "sleep"]
MAX_SEQ_LEN = 48
INIT_STD = 0.2            # larger than a real init, so a random model's output depends clearly on its input          # the template's head is cut (the prompt keeps its end: instruction + marker)


def make_records(n: int, offset: int = 0) -> list:
    records = []
    for i in range(offset, offset + n):
        a, b = WORDS[i % 8], WORDS[(3 * i + 1) % 8]
        records.append({"instruction": f"say {a} then {b}", "input": "the" if i % 3 == 0 else "",
                        "output": f"{a} {b}"})
    return records


def make_workspace(folder) -> dict:
    """Write tokenizer, model folder (config.json + model.safetensors + tokenizer.model), train.json and
    val.json into `folder`; returns their paths."""
    from minipeft.checkpoint import save_model
    from minipeft.config import ModelConfig
    from minipeft.model import Transformer
    from minipeft.tokenizer import Tokenizer
    folder = Path(folder)
    sp_path = train_tiny_sentencepiece(folder)
    cfg = ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=Tokenizer(sp_path).vocab_size,
                      multiple_of=16, norm_eps=1e-5, max_seq_len=128)
    torch.manual_seed(1234)
    model = Transformer(cfg)
    model.init_weights(std=INIT_STD)
    save_model(model, cfg, folder / "model", tokenizer_path=sp_path)
    (folder / "train.json").write_text(json.dumps(make_records(24)))
    (folder / "val.json").write_text(json.dumps(make_records(8, offset=100)))
    return {"tokenizer": sp_path, "model": str(folder / "model"), "train": str(folder / "train.json"),
            "val": str(folder / "val.json")}
