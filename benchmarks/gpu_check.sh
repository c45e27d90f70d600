#!/usr/bin/env bash
# The device checks for a GPU machine, in one go: is the engine right there, and how fast is the
# worker at 64 stories (issue 15's GPU item). A device run reaches no network and carries 64 MiB,
# so the model is the default's skeleton with random weights (benchmarks/random_model.py) and the
# Python packages the machine lacks travel as wheels. Prepare here, once:
#
#   python benchmarks/random_model.py skeleton .gpu/model
#   python -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux2014_x86_64 --platform any -d .gpu/wheels transformers==5.24.0 python-dotenv==1.2.1
#
# then run there, carrying .gpu (about 15 MB):  bash benchmarks/gpu_check.sh
# Figures and logs go to $OUT (the device tool's folder that comes back) or /tmp/gpu-check.
set -uo pipefail
out=${OUT:-/tmp/gpu-check}
mkdir -p "$out"
if compgen -G ".gpu/wheels/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .gpu/wheels/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 STORYGEN_CACHE_DIR=/tmp/storygen-cache
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$out/gpu.txt"
python3 -c "import torch, transformers; print('torch', torch.__version__, '| transformers', transformers.__version__)"
python3 benchmarks/device_check.py 2>&1 | tee "$out/device_check.txt"
rm -rf /tmp/model && cp -r .gpu/model /tmp/model && python3 benchmarks/random_model.py weights /tmp/model || exit 1
export STORYGEN_MODEL=/tmp/model STORYGEN_MODEL_FORMAT=instruct
n=${GPU_CHECK_N:-64}  # fewer for a try on a CPU
# A decode step's time with CUDA graphs and without, at 1, 16 and 64 rows; then the worker three ways,
# the newest first, so that the device tool's 600 s cut the oldest: the lean step as CUDA graphs, the
# lean step, and transformers' forward (auto's choice on a GPU today).
STORYGEN_LEAN_DECODE=true timeout 100 python3 benchmarks/step_bench.py --compare graphs --rows 1 16 64 --rounds 3 \
  2>&1 | tee "$out/step_bench_graphs.txt"
for run in "true auto" "true false" "false false"; do
  set -- $run
  STORYGEN_LEAN_DECODE=$1 STORYGEN_CUDA_GRAPHS=$2 timeout 130 python3 benchmarks/worker_bench.py --n "$n" --rounds 2 \
    --baseline-requests 8 2>&1 | tee "$out/worker_bench_lean_$1_graphs_$2.txt"
done
