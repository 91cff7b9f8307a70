"""ZeRO-3 on two CPU ranks (torchrun, gloo) with LoRA on a tiny BLOOM, the base loaded partitioned: the frozen
base stays bit-identical, the loss falls, and the adapter the trainer gathers and saves equals DeepSpeed's
own zero_to_fp32 consolidation of its checkpoint. ZeRO-2 with LLaMA-Adapter on the same BLOOM in the same launch."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from helpers_bloom import make_bloom_workspace  # noqa: E402

from minipeft.checkpoint import load_model  # noqa: E402
from minipeft.peft import load_adapter  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def test_zero3_lora_on_bloom_two_ranks(tmp_path):
    pytest.importorskip("deepspeed", reason="the [deepspeed] extra is not installed")
    ws = make_bloom_workspace(tmp_path)
    ws.update(zero3=str(ROOT / "tools" / "ds_configs" / "zero3.json"),
              zero2=str(ROOT / "tools" / "ds_configs" / "zero2.json"), max_seq_len=48)
    (tmp_path / "ws.json").write_text(json.dumps(ws))
    out = tmp_path / "out"
    out.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "DEEPSPEED_TIMEOUT": "2",
           "PYTHONPATH": str(ROOT), "MASTER_PORT": str(29500 + (os.getpid() + 337) % 1000)}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_port", env["MASTER_PORT"], str(ROOT / "tests" / "ds_bloom_worker.py"),
                           str(tmp_path / "ws.json"), str(out)],
                          env=env, capture_output=True, text=True, timeout=240, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    facts = [json.loads((out / f"rank{r}_zero3_lora.json").read_text()) for r in (0, 1)]
    for f in facts:
        assert "error" not in f, f.get("error")
        assert f["partitioned"] and f["zero_stage"] == 3 and f["frozen_unchanged"]
        assert f["losses"][-1] < f["losses"][0]
    assert facts[0]["losses"] == facts[1]["losses"]

    from safetensors.torch import load_file
    saved = load_file(str(Path(facts[0]["adapter"]) / "adapter.safetensors"))
    consolidated = torch.load(out / "zero_to_fp32.pt")
    assert len(saved) == 2 * 4 * 2                          # 2 layers x 4 targets x (A, B)
    for key, tensor in saved.items():
        assert torch.equal(tensor, consolidated["base." + key]), key
    assert saved["layers.0.attention.wqkv.lora_B"].shape == (3 * 32, 4)
    model = load_adapter(load_model(ws["model"]), facts[0]["adapter"])   # reloads on a plain BLOOM
    assert model.method == "lora"

    zero2 = [json.loads((out / f"rank{r}_zero2_la.json").read_text()) for r in (0, 1)]
    for f in zero2:
        assert "error" not in f, f.get("error")
        assert f["zero_stage"] == 2 and f["frozen_unchanged"] and f["losses"][-1] < f["losses"][0]
    assert zero2[0]["losses"] == zero2[1]["losses"]
    reloaded = load_adapter(load_model(ws["model"]), zero2[0]["adapter"])
    assert reloaded.method == "llama_adapter"
