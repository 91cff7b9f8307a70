"""The benchmark scripts run end to end at a tiny shape (their timings are measured by hand and written
down in docs/bench.md, never asserted): tools/bench.py checks that minipeft and its peers agree (loss, tokens) before timing them, and
tools/gpu_lora_bench.py (the LoRA part of tools/gpu_check.sh) runs its bf16 and fp16 phases on the CPU."""

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_tool(*argv):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    result = subprocess.run([sys.executable, *map(str, argv)], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=180)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return result.stdout


def test_bench_compares_the_same_model():
    out = run_tool(ROOT / "tools" / "bench.py", "--threads", "1", "--repeats", "1", "--dim", "32", "--layers", "1",
                   "--heads", "2", "--kv-heads", "1", "--intermediate", "64", "--vocab", "97", "--seq", "16",
                   "--batch", "2", "--prompt-len", "4", "--new-tokens", "4")
    assert "same tokens: True" in out
    for workload in ("full fine-tuning step", "LoRA r=8 q,v step", "greedy decode"):
        row = next(line for line in out.splitlines() if line.startswith(f"| {workload}"))
        assert re.search(r"\| [0-9]+ ms \| [0-9]+ ms", row) and "DIFFERENT" not in row, row


def test_gpu_lora_bench_runs_on_cpu_at_tiny_shape():
    out = run_tool(ROOT / "tools" / "gpu_lora_bench.py", "--preset", "tiny", "--device", "cpu", "--steps", "2",
                   "--fp16-steps", "1", "--warmup", "1", "--batch-size", "2", "--seq-len", "32")
    assert re.search(r"\[bf16\] params [0-9,]+ \(LoRA 4,096\)", out)        # r=8 on wq, wv of 2 layers, d=64
    assert "[fp16]" in out and "tokens/s" in out and "MFU" in out
