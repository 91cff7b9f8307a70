"""minipeft.train (plain PyTorch loop) and tools/finetune.py on a tiny random model, all six methods.

Checks: the training loss falls; frozen base weights stay bit-identical; the saved adapter reloads onto a
fresh base to the same validation loss; gradient checkpointing gives the same steps; a run stopped and
resumed is bit-identical to one that never stopped; the lr schedule; fp16 loss scaling skips an overflowing
step; bf16 autocast on CPU; the command line (--help, bad flags); the default main job on the shipped assets.
"""

import dataclasses
import json
import math
import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_helpers import MAX_SEQ_LEN, make_workspace  # noqa: E402

from minipeft.checkpoint import load_model  # noqa: E402
from minipeft.peft.config import QLoRAConfig  # noqa: E402
from minipeft.peft import (AdapterConfig, DoRAConfig, FullConfig, IA3Config, LlamaAdapterConfig, LoRAConfig,  # noqa: E402
                           PrefixConfig, PromptConfig, load_adapter)
from minipeft.train import (METHODS, TrainConfig, TrainError, build_arg_parser, build_trainer,  # noqa: E402
                            evaluate_loss, lr_factor, prepare_run)

ROOT = Path(__file__).resolve().parents[1]
DEVICE = os.environ.get("MINIPEFT_DEVICE", "cpu")     # tools/gpu_check.sh sets cuda

# Small hyper-parameters so each method has a handful of trainable parameters and learns in a few steps.
METHOD_LR = {"full": 1e-2, "lora": 5e-2, "prompt": 2e-1, "prefix": 1e-1, "adapter": 5e-2, "llama_adapter": 2e-1,
             "dora": 5e-2, "ia3": 2e-1, "qlora": 5e-2}
METHOD_PEFT = {
    "full": dict(),
    "lora": dict(rank=4, targets=("wq", "wv", "w2")),
    "prompt": dict(prompt_len=4, init="random"),
    "prefix": dict(prefix_len=4, reparam_hidden=16),
    "adapter": dict(bottleneck=8),
    "llama_adapter": dict(prompt_len=4, adapter_layers=2),
    "dora": dict(rank=4, targets=("wq", "wv", "w2"), rslora=True, lora_plus_ratio=4.0),   # + the LoRA options
    "ia3": dict(),
    "qlora": dict(rank=4, targets=("wq", "wv", "w2")),
}
PEFT_CLASSES = {"full": FullConfig, "lora": LoRAConfig, "prompt": PromptConfig, "prefix": PrefixConfig,
                "adapter": AdapterConfig, "llama_adapter": LlamaAdapterConfig, "dora": DoRAConfig, "ia3": IA3Config,
                "qlora": QLoRAConfig}


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    return make_workspace(tmp_path_factory.mktemp("ws"))


def make_cfg(ws, tmp_path, method="lora", peft=None, **overrides) -> TrainConfig:
    """peft: fields of the method's config beyond METHOD_PEFT's."""
    values = dict(model=ws["model"], train_data=ws["train"], val_data=ws["val"], max_seq_len=MAX_SEQ_LEN,
                  batch_size=4, max_steps=12, warmup_steps=2, seed=0, device=DEVICE, lr=METHOD_LR[method],
                  out=str(tmp_path / f"run-{method}"), progress=False, exact_match=False, eval_batch_size=8)
    values.update(overrides)
    values["peft"] = PEFT_CLASSES[method](**{**METHOD_PEFT[method], **(peft or {})})
    return TrainConfig(**values)


def build(cfg):
    cfg, ds_config, base, tokenizer, data = prepare_run(cfg)
    return build_trainer(cfg, base, tokenizer, data, ds_config)


@pytest.mark.parametrize("method", METHODS)
def test_method_trains_keeps_base_and_reloads(ws, tmp_path, method):
    cfg = make_cfg(ws, tmp_path, method)
    trainer = build(cfg)
    base_before = {k: v.clone() for k, v in load_model(ws["model"]).state_dict().items()}
    before = trainer.evaluate()["val_loss"]
    history = trainer.train()
    after = trainer.evaluate()["val_loss"]
    losses = [h["loss"] for h in history]
    assert len(losses) == 12 and all(math.isfinite(x) for x in losses)
    assert sum(losses[-3:]) / 3 < losses[0] - 0.05, losses
    assert after < before

    base_now = trainer.model.base.state_dict()
    missing = sorted(set(base_before) - set(base_now))       # QLoRA holds its linear weights as 4-bit buffers
    assert all(k.endswith(".weight") for k in missing) and bool(missing) == (method == "qlora"), missing
    changed = [k for k, v in base_before.items() if k in base_now and not torch.equal(base_now[k].cpu(), v)]
    if method == "full":
        assert len(changed) == len(base_before)              # every weight trained
    else:
        assert changed == []                                 # frozen: bit-identical

    folder = trainer.save_final()
    reloaded = load_adapter(load_model(ws["model"]), folder).to(trainer.device)
    val_loss = evaluate_loss(reloaded, trainer.data.val, batch_size=8, pad_id=trainer.pad_id, device=trainer.device)
    assert val_loss == pytest.approx(after, rel=1e-5, abs=1e-6)
    lines = [json.loads(x) for x in (Path(cfg.out) / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == list(range(1, 13)) and all("tokens_per_s" in x for x in lines)
    assert [x["lr"] for x in lines] == pytest.approx([cfg.lr * lr_factor(s, 12, 2) for s in range(12)])

    # gradient checkpointing recomputes the blocks in backward: the same two steps
    plain, checkpointed = (build(make_cfg(ws, tmp_path, method, max_steps=2, gradient_checkpointing=gc,
                                          out=str(tmp_path / f"gc{gc}"))) for gc in (False, True))
    assert checkpointed.model.base.gradient_checkpointing
    plain.train(), checkpointed.train()
    for (name, p), (_, q) in zip(plain.trainable, checkpointed.trainable):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-7, msg=name)


def test_resume_is_bit_identical(ws, tmp_path):
    # dropout (RNG), accumulation and several epochs: 24 examples / batch 4 = 6 micro-batches per epoch
    # (on CPU whatever MINIPEFT_DEVICE says: bit-identical replay is promised for CPU runs)
    common = dict(peft=dict(dropout=0.1), grad_accum=2, max_steps=8, save_every=3, keep_checkpoints=3, device="cpu")
    full = build(make_cfg(ws, tmp_path, "lora", out=str(tmp_path / "a"), **common))
    full_history = full.train()
    assert sorted(p.name for p in (tmp_path / "a" / "checkpoints").glob("*.pt")) == ["step-000003.pt", "step-000006.pt"]

    resumed = build(make_cfg(ws, tmp_path, "lora", out=str(tmp_path / "b"), **common))
    resumed.resume(tmp_path / "a" / "checkpoints" / "step-000003.pt")
    assert resumed.step == 3
    resumed_history = resumed.train()
    assert [h["loss"] for h in resumed_history] == [h["loss"] for h in full_history[3:]]
    for (name, p), (_, q) in zip(full.trainable, resumed.trainable):
        assert torch.equal(p, q), name
    resumed.resume(tmp_path / "a")                                        # a run folder: its newest checkpoint
    assert resumed.step == 6

    other = build(make_cfg(ws, tmp_path, "lora", out=str(tmp_path / "c"), **{**common, "grad_accum": 1}))
    with pytest.raises(TrainError, match="grad_accum"):
        other.resume(tmp_path / "a")


def test_lr_schedule():
    assert [lr_factor(s, 10, 2) for s in (0, 1)] == [0.5, 1.0]
    assert lr_factor(2, 10, 2) == 1.0
    assert lr_factor(6, 10, 2) == pytest.approx(0.5 * (1 + math.cos(math.pi * 4 / 8)))
    assert lr_factor(9, 10, 2, min_lr_ratio=0.1) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 7 / 8)))


def test_fp16_scaler_skips_overflowing_step(ws, tmp_path):
    trainer = build(make_cfg(ws, tmp_path, "lora", precision="fp16", max_steps=4))
    trainer.scaler = torch.amp.GradScaler(trainer.device.type, init_scale=2.0 ** 100)   # scaled loss overflows
    before = [p.detach().clone() for _, p in trainer.trainable]
    metrics = trainer.train_step()
    assert metrics["skipped"] and trainer.scaler.get_scale() == 2.0 ** 99
    assert all(torch.equal(p, b) for (_, p), b in zip(trainer.trainable, before))
    assert trainer.optimizer.param_groups[0]["lr"] == metrics["lr"]                      # the schedule waits
    trainer.scaler = torch.amp.GradScaler(trainer.device.type)                           # normal scale: trains
    metrics = trainer.train_step()
    assert not metrics["skipped"] and math.isfinite(metrics["loss"])
    assert any(not torch.equal(p, b) for (_, p), b in zip(trainer.trainable, before))


def test_bf16_autocast_trains(ws, tmp_path):
    trainer = build(make_cfg(ws, tmp_path, "llama_adapter", precision="bf16", max_steps=8))
    frozen = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if not p.requires_grad}
    losses = [h["loss"] for h in trainer.train()]
    assert losses[-1] < losses[0] and all(p.dtype == torch.float32 for _, p in trainer.trainable)
    # --base-dtype auto: the frozen base is held in bf16 (2 bytes/parameter) and stays bit-identical
    after = dict(trainer.model.named_parameters())
    assert frozen and all(p.dtype == torch.bfloat16 and torch.equal(after[n], p) for n, p in frozen.items())


def test_trainable_embeddings_are_trained_and_saved(ws, tmp_path):
    trainer = build(make_cfg(ws, tmp_path, "lora", peft=dict(extra_trainable=("tok_embeddings", "output")),
                             max_steps=3))
    names = {n for n, _ in trainer.trainable}
    assert {"base.tok_embeddings.weight", "base.output.weight"} <= names
    before = trainer.model.base.output.weight.detach().clone()
    trainer.train()
    trainer.save_final()
    assert not torch.equal(before, trainer.model.base.output.weight)
    reloaded = load_adapter(load_model(ws["model"], dtype=torch.float32), trainer.run_dir / "adapter")
    assert torch.equal(reloaded.base.output.weight, trainer.model.base.output.weight.detach().cpu())


# ---- the command line ---------------------------------------------------------------------------
def run_finetune(argv):
    """finetune.py's exit status (a flag's type refusing a value: argparse's SystemExit, status 2)."""
    sys.path.insert(0, str(ROOT / "tools"))
    import finetune
    try:
        return finetune.main(argv)
    except SystemExit as stop:
        return stop.code


def test_help_documents_every_flag():
    text = build_arg_parser().format_help()
    for f in dataclasses.fields(TrainConfig):
        flag = {"exact_match": "--no-exact-match", "progress": "--no-progress", "strict_data": "--strict-data",
                "local_rank": "--local_rank", "peft": "--trainable-embeddings"}.get(f.name, "--" + f.name.replace("_", "-"))
        assert flag in text, flag
    for flag in ("--lora-rank", "--lora-alpha", "--lora-dropout", "--lora-targets", "--prompt-len", "--prompt-init",
                 "--prefix-len", "--prefix-hidden", "--adapter-bottleneck", "--llama-adapter-len",
                 "--llama-adapter-layers", "--llama-adapter-gate", "--gradient-checkpointing", "--deepspeed"):
        assert flag in text


def test_bad_flags_stop_before_work(ws, tmp_path, capsys):
    assert run_finetune(["--method", "bitfit"]) == 2 and "invalid choice" in capsys.readouterr().err
    common = ["--model", ws["model"], "--train-data", ws["train"], "--out", str(tmp_path / "never")]
    for extra, message in ((["--lora-rank", "0"], "argument --lora-rank: expected an integer in [1, 65536], got '0'"),
                           (["--lora-dropout", "1.5"], "argument --lora-dropout: expected a number in [0, 1), got '1.5'"),
                           (["--prompt-init", "text", "--method", "prompt"], "needs --prompt-init-text"),
                           (["--val-data", str(tmp_path / "nope.json")], "nope.json: file not found")):
        assert run_finetune(common + extra) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "never").exists()


def test_finetune_cli_on_tiny_model(ws, tmp_path, capsys):
    out = tmp_path / "cli"
    assert run_finetune(["--model", ws["model"], "--train-data", ws["train"], "--val-data", ws["val"],
                         "--max-seq-len", str(MAX_SEQ_LEN), "--max-steps", "3", "--batch-size", "4", "--no-progress",
                         "--out", str(out), "--method", "adapter", "--adapter-bottleneck", "4"]) == 0
    printed = capsys.readouterr().out
    assert "before" in printed and "after" in printed and "exact match" in printed
    assert (out / "adapter" / "adapter_config.json").is_file()
    assert json.loads((out / "train_config.json").read_text())["peft"]["bottleneck"] == 4


def test_default_main_job_few_steps(tmp_path, capsys):
    """The default main job (shipped tiny model, demo data, LoRA) for 3 steps: the adapter is written and
    reloads onto the shipped base to the same validation loss the run printed."""
    import minipeft
    assets = minipeft.assets_dir()
    assert (assets / "tiny-llama" / "config.json").is_file(), "the shipped tiny model is missing"
    out = tmp_path / "main"
    assert run_finetune(["--max-steps", "3", "--out", str(out), "--no-progress", "--device", DEVICE]) == 0
    printed = capsys.readouterr().out
    after_line = next(line for line in printed.splitlines() if line.startswith("after"))
    printed_loss = float(after_line.split()[1])
    # the run trains in float32 on top of the fp16-stored weights; reload the same way
    model = load_adapter(load_model(assets / "tiny-llama", dtype=torch.float32), out / "adapter", method="lora")
    from minipeft.data import AlpacaEncoder, read_records
    from minipeft.tokenizer import Tokenizer
    tokenizer = Tokenizer(assets / "tiny-llama" / "tokenizer.model")
    records, _ = read_records(assets / "demo_data" / "heldout.json")
    examples, _ = AlpacaEncoder(tokenizer, TrainConfig().max_seq_len).encode_all(records)
    loss = evaluate_loss(model.to(DEVICE), examples, batch_size=16, pad_id=tokenizer.pad_id, device=DEVICE)
    assert loss == pytest.approx(printed_loss, abs=1e-4)
