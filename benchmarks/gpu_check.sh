#!/usr/bin/env bash
# One script for a lent GPU machine (run through the device tool): the GPU-marked tests, the CUDA
# speed benchmark (inference and the training table, fused and unfused), a full-size predict and
# the loader with --augment-on-device on CUDA; results land under $OUT. Budget: about 10 minutes.
#
# The device machine has no network. It ships Python 3.12 with a CUDA torch (see the device
# tool's KINDS.md); what else the project needs (monai, nibabel, safetensors, ...) travels as
# wheels in .whl/ (see /work/.library/device/README.md): carry ".whl" and this installs them.
# Not yet run on a GPU: the first session lent one should run it and fix what the machine needs.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/gpu}
mkdir -p "$OUT"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD/src
else
  export PYTHONPATH=$PWD/src
fi
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt" 2>&1
python3 -c "import torch; print(torch.__version__, torch.cuda.get_device_name())" >> "$OUT/gpu.txt" 2>&1
timeout 120 python3 -m pytest tests/test_gpu.py -q -p no:xvfb -p no:cacheprovider 2>&1 | tee "$OUT/gpu_tests.log"
timeout 300 python3 benchmarks/speed.py --device cuda --quick --out "$OUT" 2>&1 | tee "$OUT/speed.log"
timeout 120 python3 benchmarks/predict_full_size.py --device cuda --out "$OUT" 2>&1 | tee "$OUT/predict.log"
# The loader against the GPU: patches/s of the CPU workers and of --augment-on-device on CUDA.
python3 -m ciml_core.cli phantom --kind brats --cases 2 --shape 240 240 155 --out /tmp/full \
  > /dev/null 2>&1
timeout 240 python3 benchmarks/loader.py --data /tmp/full --cases 2 --cache /tmp/loader_cache \
  --out "$OUT/loader_cuda.json" 2>&1 | tee "$OUT/loader.log"
