"""DeepSpeed for real on CPU: two ranks under torchrun (gloo), ZeRO-2 and ZeRO-3 with CPU offload, LoRA and
LLaMA-Adapter, fp32 and bf16, the ZeRO-3 base loaded partitioned vs. whole (tests/ds_worker.py runs all cases
in one launch); and the checks that stop a DeepSpeed config contradicting the command line before any work
starts."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_helpers import MAX_SEQ_LEN, make_workspace  # noqa: E402

from minipeft.checkpoint import load_model  # noqa: E402
from minipeft.peft import load_adapter  # noqa: E402
from minipeft.train import TrainConfig, TrainError, resolve_deepspeed_config, zero3_dtype  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "tools" / "ds_configs"


def ds_config(name):
    return json.loads((CONFIGS / name).read_text())


# ---- the configuration, resolved against the command line (no DeepSpeed import needed) ----------------
def test_auto_values_filled_from_command_line():
    ds, cfg = resolve_deepspeed_config(ds_config("zero3.json"), TrainConfig(batch_size=3, grad_accum=5, lr=2e-4,
                                                                             precision="bf16"), world_size=2)
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"], ds["train_batch_size"]) == (3, 5, 30)
    assert ds["optimizer"]["params"]["lr"] == 2e-4 and ds["optimizer"]["params"]["weight_decay"] == 0.0
    assert ds["gradient_clipping"] == 1.0 and ds["bf16"]["enabled"] is True and ds["fp16"]["enabled"] is False
    assert ds["zero_optimization"]["stage"] == 3


def test_reference_recipe_values_come_from_the_config():
    ds, cfg = resolve_deepspeed_config(ds_config("zero3_offload_reference.json"), TrainConfig(method="lora"),
                                       world_size=8)
    assert (cfg.batch_size, cfg.grad_accum, cfg.lr, cfg.precision) == (4, 4, 1e-4, "fp16")
    assert ds["train_batch_size"] == 128 and ds["fp16"]["enabled"] is True
    zero = ds["zero_optimization"]
    assert zero["offload_optimizer"]["device"] == "cpu" and zero["offload_param"]["device"] == "cpu"


def test_zero3_base_dtype_is_the_configs():
    ds, cfg = resolve_deepspeed_config(ds_config("zero3.json"), TrainConfig(precision="bf16"), world_size=2)
    assert zero3_dtype(cfg, ds) == torch.bfloat16
    ds, cfg = resolve_deepspeed_config(ds_config("zero3.json"), TrainConfig(base_dtype="bfloat16"), world_size=2)
    with pytest.raises(TrainError, match="--base-dtype bfloat16: under ZeRO-3 the base is held in .* float32"):
        zero3_dtype(cfg, ds)


@pytest.mark.parametrize("config, flags, message", [
    ({"train_batch_size": 32}, dict(batch_size=4, grad_accum=1), r"train_batch_size is 32 but micro batch 4 x gradient accumulation 1 x world size 2 = 8"),
    ({"train_micro_batch_size_per_gpu": 4}, dict(batch_size=8), r"train_micro_batch_size_per_gpu is 4 but --batch-size is 8"),
    ({"fp16": {"enabled": True}}, dict(precision="bf16"), r"fp16.enabled is true but --precision is bf16"),
    ({"optimizer": {"type": "AdamW", "params": {"lr": 1e-4}}}, dict(lr=3e-4), r"optimizer.params.lr is 0.0001 but --lr is 0.0003"),
])
def test_contradictions_are_refused(config, flags, message):
    with pytest.raises(TrainError, match=message):
        resolve_deepspeed_config(config, TrainConfig(**flags), world_size=2)


def test_cli_stops_on_contradicting_config_before_work(tmp_path, capsys, monkeypatch):
    sys.path.insert(0, str(ROOT / "tools"))
    import finetune
    monkeypatch.setenv("WORLD_SIZE", "2")
    out = tmp_path / "never"
    code = finetune.main(["--deepspeed", str(CONFIGS / "zero3_offload_reference.json"), "--batch-size", "8",
                          "--out", str(out)])
    assert code == 2
    err = capsys.readouterr().err
    assert "train_micro_batch_size_per_gpu is 4 but --batch-size is 8" in err
    assert not out.exists()
    bad = tmp_path / "fixed.json"
    bad.write_text(json.dumps({**ds_config("zero2.json"), "train_batch_size": 32}))
    assert finetune.main(["--deepspeed", str(bad), "--batch-size", "4", "--out", str(out)]) == 2
    assert "train_batch_size is 32" in capsys.readouterr().err and not out.exists()


# ---- two ranks for real --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory):
    pytest.importorskip("deepspeed", reason="the [deepspeed] extra is not installed")
    folder = tmp_path_factory.mktemp("ds")
    ws = make_workspace(folder)
    offload = ds_config("zero3.json")
    offload["zero_optimization"].update(offload_optimizer={"device": "cpu"}, offload_param={"device": "cpu"})
    (folder / "zero3_offload.json").write_text(json.dumps(offload))
    ws.update(zero2=str(CONFIGS / "zero2.json"), zero3=str(CONFIGS / "zero3.json"),
              zero3_offload=str(folder / "zero3_offload.json"), max_seq_len=MAX_SEQ_LEN)
    (folder / "ws.json").write_text(json.dumps(ws))
    out = folder / "out"
    out.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "DEEPSPEED_TIMEOUT": "2",
           "PYTHONPATH": str(ROOT), "MASTER_PORT": str(29500 + os.getpid() % 1000)}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_port", env["MASTER_PORT"], str(ROOT / "tests" / "ds_worker.py"),
                           str(folder / "ws.json"), str(out)],
                          env=env, capture_output=True, text=True, timeout=240, cwd=str(folder))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    def facts(rank, case):
        data = json.loads((out / f"rank{rank}_{case}.json").read_text())
        assert "error" not in data, data.get("error")
        return data
    return ws, out, facts


@pytest.mark.parametrize("case, stage, dtype", [("zero2_lora", 2, "torch.float32"),
                                                ("zero3_offload_la", 3, "torch.float32"),
                                                ("zero3_lora_bf16", 3, "torch.bfloat16")])
def test_two_ranks_train_with_frozen_base(two_rank_run, case, stage, dtype):
    ws, out, facts = two_rank_run
    for rank in (0, 1):
        f = facts(rank, case)
        assert f["world_size"] == 2 and f["zero_stage"] == stage and f["train_batch_size"] == 2 * 2 * 2
        assert f["engine_dtype"] == dtype
        assert f["frozen_unchanged"]
        assert sum(f["losses"][-3:]) / 3 < f["losses"][0] and f["val_after"] < f["val_before"]
    assert facts(0, case)["losses"] == facts(1, case)["losses"]       # the logged loss is the mean over ranks
    assert (out / case / "adapter" / "adapter.safetensors").is_file()


@pytest.mark.parametrize("case", ["zero3_offload_la", "zero3_lora_bf16"])
def test_zero3_partitioned_load_matches_full_load(two_rank_run, case):
    """Under ZeRO-3 the base is built partitioned (zero.Init) and filled tensor by tensor from the checkpoint:
    right after loading, the gathered weights are the checkpoint's exactly, and training gives the losses of
    the same run with the whole base loaded on every rank."""
    ws, out, facts = two_rank_run
    for rank in (0, 1):
        partitioned, full = facts(rank, case), facts(rank, case + "_full_load")
        assert partitioned["partitioned"] and partitioned["loaded_exact"]
        assert full["frozen_unchanged"] and len(full["losses"]) == len(partitioned["losses"]) == 8
        assert partitioned["losses"] == full["losses"]          # bit-identical on CPU (gloo, 2 ranks)


def test_zero3_adapter_is_complete_and_reloads(two_rank_run):
    """The adapter written under ZeRO-3 (2 ranks, offload) holds full tensors equal to DeepSpeed's own
    consolidation of its checkpoint, and a plain single-process model with it gives the engine's logits."""
    ws, out, facts = two_rank_run
    from safetensors.torch import load_file
    saved = load_file(str(out / "zero3_offload_la" / "adapter" / "adapter.safetensors"))
    consolidated = torch.load(out / "zero3_offload_la_zero_to_fp32.pt", weights_only=True)
    assert len(saved) == 2 * 2                                   # prompt + gate on each of the 2 layers
    for key, tensor in saved.items():
        assert torch.equal(tensor, consolidated["base." + key]), key
    cfg = load_model(ws["model"]).config
    prompt_key = next(k for k in saved if saved[k].numel() == 4 * cfg.dim)     # K x d: the full tensor
    assert saved[prompt_key].shape == (4, cfg.dim)

    reference = torch.load(out / "zero3_offload_la_logits.pt", weights_only=True)
    model = load_adapter(load_model(ws["model"]), out / "zero3_offload_la" / "adapter", method="llama_adapter")
    with torch.no_grad():
        logits = model(reference["input_ids"])
    torch.testing.assert_close(logits, reference["logits"], rtol=1e-5, atol=1e-5)


def test_finetune_cli_under_two_ranks(two_rank_run):
    ws, out, facts = two_rank_run
    assert facts(0, "cli_zero2")["exit_code"] == 0 and facts(1, "cli_zero2")["exit_code"] == 0
    assert (out / "cli" / "adapter" / "adapter_config.json").is_file()
    steps = [json.loads(x) for x in (out / "cli" / "metrics.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps if not s.get("eval")] == [1, 2]
