#!/usr/bin/env bash
# One script for a lent GPU machine: install, run the GPU-marked tests, the CUDA speed benchmark,
# and a full-size predict; everything lands under $OUT (default benchmarks/results/gpu).
# Budget: about 8 minutes on an H100.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/gpu}
mkdir -p "$OUT"
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -m venv .gpu-venv && . .gpu-venv/bin/activate
  pip install -q --upgrade pip
  pip install -q torch 2>&1 | tail -1   # the machine's CUDA build
  pip install -q -e ".[testing]" 2>&1 | tail -1
  python -c "import torch; print(torch.__version__, torch.cuda.get_device_name())"
} > "$OUT/setup.log" 2>&1
. .gpu-venv/bin/activate
timeout 120 python -m pytest tests/test_gpu.py -q -p no:xvfb > "$OUT/gpu_tests.log" 2>&1
timeout 300 python benchmarks/speed.py --device cuda --out "$OUT" > "$OUT/speed.log" 2>&1
timeout 120 python benchmarks/predict_full_size.py --device cuda --out "$OUT" > "$OUT/predict.log" 2>&1
tail -n 3 "$OUT"/*.log
