"""Training on BLOOM: every method with the plain loop (loss falls, frozen base bit-identical, the adapter
reloads to the same validation loss), and tools/finetune.py --model <bloom folder> with every method in
bf16 and fp16 (a couple of steps each; the folder's tokenizer.json is found by itself)."""

import json
import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from helpers_bloom import make_bloom_workspace  # noqa: E402

from minipeft.checkpoint import load_model  # noqa: E402
from minipeft.peft.config import QLoRAConfig  # noqa: E402
from minipeft.peft import (AdapterConfig, DoRAConfig, FullConfig, IA3Config, LlamaAdapterConfig, LoRAConfig,  # noqa: E402
                           PrefixConfig, PromptConfig, load_adapter)
from minipeft.train import METHODS, TrainConfig, build_trainer, evaluate_loss, prepare_run  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MAX_SEQ_LEN = 48
METHOD_LR = {"full": 1e-2, "lora": 5e-2, "prompt": 2e-1, "prefix": 1e-1, "adapter": 5e-2, "llama_adapter": 2e-1,
             "dora": 5e-2, "ia3": 2e-1, "qlora": 5e-2}
METHOD_PEFT = {
    "full": FullConfig(),
    "lora": LoRAConfig(rank=4, targets=("wqkv", "wo", "w1", "w2")),
    "prompt": PromptConfig(prompt_len=4, init="random"),
    "prefix": PrefixConfig(prefix_len=4, reparam_hidden=16),
    "adapter": AdapterConfig(bottleneck=8),
    "llama_adapter": LlamaAdapterConfig(prompt_len=4, adapter_layers=2),
    "dora": DoRAConfig(rank=4, targets=("wqkv", "w2")),
    "ia3": IA3Config(targets=("wqkv", "w2")),
    "qlora": QLoRAConfig(rank=4, targets=("wqkv", "w2")),
}


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    return make_bloom_workspace(tmp_path_factory.mktemp("bloom_ws"))


@pytest.mark.parametrize("method", METHODS)
def test_method_trains_on_bloom(ws, tmp_path, method):
    cfg = TrainConfig(model=ws["model"], train_data=ws["train"], val_data=ws["val"], max_seq_len=MAX_SEQ_LEN,
                      batch_size=4, max_steps=10, warmup_steps=2, seed=0, device="cpu", lr=METHOD_LR[method],
                      out=str(tmp_path / method), progress=False, exact_match=False, eval_batch_size=8,
                      peft=METHOD_PEFT[method])
    cfg, ds_config, base, tokenizer, data = prepare_run(cfg)
    assert type(tokenizer).__name__ == "ByteLevelBPETokenizer" and base.config.family == "bloom"
    trainer = build_trainer(cfg, base, tokenizer, data, ds_config)
    before_base = {k: v.clone() for k, v in load_model(ws["model"]).state_dict().items()}
    before = trainer.evaluate()["val_loss"]
    losses = [h["loss"] for h in trainer.train()]
    after = trainer.evaluate()["val_loss"]
    assert all(math.isfinite(x) for x in losses) and sum(losses[-3:]) / 3 < losses[0] and after < before
    base_now = trainer.model.base.state_dict()
    missing = sorted(set(before_base) - set(base_now))       # QLoRA holds its linear weights as 4-bit buffers
    assert all(k.endswith(".weight") for k in missing) and bool(missing) == (method == "qlora"), missing
    changed = [k for k, v in before_base.items() if k in base_now and not torch.equal(base_now[k].cpu(), v)]
    assert changed == ([] if method != "full" else list(before_base))
    folder = trainer.save_final()
    reloaded = load_adapter(load_model(ws["model"]), folder)
    val_loss = evaluate_loss(reloaded, trainer.data.val, batch_size=8, pad_id=trainer.pad_id, device="cpu")
    assert val_loss == pytest.approx(after, rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_finetune_cli_every_method_on_bloom(ws, tmp_path, capsys, precision):
    sys.path.insert(0, str(ROOT / "tools"))
    import finetune
    for method in METHODS:
        out = tmp_path / f"{method}-{precision}"
        code = finetune.main(["--model", ws["model"], "--train-data", ws["train"], "--val-data", ws["val"],
                              "--max-seq-len", str(MAX_SEQ_LEN), "--max-steps", "2", "--batch-size", "4",
                              "--no-progress", "--out", str(out), "--method", method, "--precision", precision,
                              "--lr", "1e-2", "--no-exact-match", "--samples", "1"])
        printed = capsys.readouterr()
        assert code == 0, (method, printed.err[-2000:])
        assert (out / "adapter" / "adapter_config.json").is_file(), method
        steps = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        assert all(math.isfinite(s["loss"]) for s in steps if "loss" in s), method
        if method == "lora":       # LoRA's default targets (wq, wv) become BLOOM's fused query_key_value
            assert json.loads((out / "train_config.json").read_text())["peft"]["targets"] == ["wqkv"]
