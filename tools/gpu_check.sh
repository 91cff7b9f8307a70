#!/usr/bin/env bash
# One check on a GPU machine (H100 / H200), run from the repository as it is, nothing downloaded:
#   bash tools/gpu_check.sh            (PYTHON=/path/to/python3 to pick the interpreter; torch must be installed)
# 1. the test suite with MINIPEFT_DEVICE=cuda (tests that take a device train on the GPU), pytest -x -q,
#    at most 300 s;
# 2. tools/gpu_lora_bench.py: LoRA r=8 on wq,wv of a LLaMA-7B-shaped model with random weights, batch 4 x seq
#    512, gradient checkpointing: 20 timed bf16 steps, then 5 timed fp16 + GradScaler steps; prints tokens/s,
#    peak GPU memory and MFU (formula in the script's docstring), at most 180 s.
# Without network there: run tools/gpu_wheels.sh here first and carry .whl/ (the device tool's `carry`).
# Budget: well under 8 minutes. The exit code is non-zero if either part failed; both always run.
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# Test-only peers at the versions the tests pin, and DeepSpeed, carried as wheels (tools/gpu_wheels.sh).
if ls .whl/*.whl >/dev/null 2>&1; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/minipeft-site .whl/*.whl \
        && export PYTHONPATH="$PWD:/tmp/minipeft-site${PYTHONPATH#$PWD}"
fi
export MINIPEFT_DEVICE=cuda OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "(no nvidia-smi)"
$PY -c "import torch; assert torch.cuda.is_available(), 'CUDA is not available'; print('torch', torch.__version__, torch.cuda.get_device_name(0))" || exit 1

start=$(date +%s)
echo "== test suite on cuda (pytest -x -q)"
timeout 300 $PY -m pytest -x -q -p no:cacheprovider tests
tests_rc=$?
echo "== tests: exit $tests_rc after $(( $(date +%s) - start )) s"

echo "== LoRA on a LLaMA-7B-shaped model (bf16, then fp16 + GradScaler)"
timeout 180 $PY tools/gpu_lora_bench.py --preset 7b --device cuda --steps 20 --fp16-steps 5 --batch-size 4 --seq-len 512
bench_rc=$?
echo "== bench: exit $bench_rc; total $(( $(date +%s) - start )) s"
[ "$tests_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ]
