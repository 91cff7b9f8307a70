#!/usr/bin/env bash
# Run on a machine with PyPI access (e.g. the development machine) before carrying the repository to a GPU
# machine that has torch but cannot download: puts the test-only peers (transformers 4.57.6 + peft 0.21.2,
# which the parity tests pin) and DeepSpeed with what it needs into .whl/ for Python 3.12 on x86-64.
# tools/gpu_check.sh installs them from there when the folder exists.
set -euo pipefail
cd "$(dirname "$0")/.."
PYVER=${PYVER:-3.12}
mkdir -p .whl
platform="--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp $platform -d .whl \
    transformers==4.57.6 peft==0.21.2 tokenizers==0.22.2 huggingface-hub==0.36.2 hjson py-cpuinfo \
    pydantic==2.14.4 pydantic-core==2.50.5 annotated-types typing-inspection
python3 -m pip wheel -q --no-deps -w .whl deepspeed==0.19.8     # DeepSpeed ships as source only; its wheel is pure Python
ls .whl
