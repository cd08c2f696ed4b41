#!/usr/bin/env bash
# The GPU checks, as one script for one `device` call (under 6 minutes on an H100/H200).
#
# The device machine has torch, torchvision, pyarrow and numpy but not the rest of cnn/'s
# needs. Fetch them here first, into .whl/ (ignored by git), and carry it:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#     -d .whl simplejpeg fsspec duckdb
# Also copy ../shared/data/cifar10-jpeg.tar.gz to .whl/ (it does not travel otherwise).
# On the CPU, check the script itself with: DEVICE=cpu SUBSET=100 bash bench/gpu.sh
set -euo pipefail
cd "$(dirname "$0")/.."
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
if [ -f .whl/cifar10-jpeg.tar.gz ]; then
  export CNNPIPE_SHARED=$PWD/.whl/shared
  mkdir -p "$CNNPIPE_SHARED/data" && ln -sf "$PWD/.whl/cifar10-jpeg.tar.gz" "$CNNPIPE_SHARED/data/"
fi
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ] && [ "${DEVICE:-cuda}" = cpu ] && PY=.venv/bin/python
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null || true
"$PY" -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__)"
"$PY" bench/train.py --device "${DEVICE:-cuda}" --subset "${SUBSET:-0}" 2>&1 | tee "${OUT:-/tmp}/train-bench.txt"
"$PY" bench/classify.py --device "${DEVICE:-cuda}" --images "${SUBSET:-0}" 2>&1 | tee "${OUT:-/tmp}/classify-bench.txt"
