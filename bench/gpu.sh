#!/usr/bin/env bash
# Every GPU figure of the product in one command, meant to finish in under 6 minutes on an H100/H200:
#   training throughput    bench/train.py: model-only, the pipeline (resident and streaming), the
#                          ImageFolder + DataLoader baseline, LRN against batch norm, alexnet at 224
#                          model-only and through the pipeline, and the 256-px decode ceilings
#   time to accuracy       bench/time_to_accuracy.py: the default recipe on CIFAR-10, 3 seeds
#   classification         bench/classify.py: into DuckDB, against model-only and the baseline
#   device tests           pytest -m device, over the test files that carry the mark
# Prints one summary table at the end (bench/gpu_report.py) and writes its JSON under $OUT when set.
#
#   make gpu-wheels                 # here: .whl/ gets what the GPU box lacks, and CIFAR-10
#   bash bench/gpu.sh               # there, with .whl carried; python3 is the box's (override: PYTHON=)
#   bash bench/gpu.sh --dry-run     # on this CPU with tiny sizes, ./.venv and no wheels (tests run it)
#
# Not -e: a failed step must still leave the other steps' figures, and the exit status says it failed.
set -uo pipefail
cd "$(dirname "$0")/.."

dry_run=false
case "${1:-}" in
  "") ;;
  --dry-run) dry_run=true ;;
  *) echo "usage: bash bench/gpu.sh [--dry-run]" >&2; exit 2 ;;
esac

scratch=$(mktemp -d "${TMPDIR:-/tmp}/cnnpipe-gpu-sh.XXXXXX")
trap 'rm -rf "$scratch"' EXIT
results=${OUT:-$scratch/results}
mkdir -p "$results" "$scratch/shared/data"
export PYTHONUNBUFFERED=1

if $dry_run; then
  PY=${PYTHON:-.venv/bin/python}
  device=cpu
  # A few hundred images keep every step to seconds on a 2-core CPU; without ../shared they are noise.
  "$PY" bench/mini_cifar.py "$scratch/shared/data/cifar10-jpeg.tar.gz" --train-per-class 30 --test-per-class 10 \
    || exit 1
  train_sizes=(--subset 10 --batch-size 16 --steps 2 --alexnet-per-class 1)
  classify_sizes=(--images 100 --batch-size 50 --repeats 1)
  accuracy_sizes=(--seeds 1 --epochs 1 --train-per-class 30 --test-per-class 10)
  report_flags=(--dry-run)
else
  if ! ls .whl/*.whl >/dev/null 2>&1; then
    echo "bench/gpu.sh: no wheels in .whl/: run 'make gpu-wheels' where pip can download, and carry .whl" >&2
    exit 1
  fi
  PY=${PYTHON:-python3}
  device=cuda
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$scratch/site" \
    .whl/*.whl || exit 1
  export PYTHONPATH=$scratch/site${PYTHONPATH:+:$PYTHONPATH}
  # The box has no ../shared: the tarball travels inside .whl/ (make gpu-wheels copies it there).
  cifar=.whl/cifar10-jpeg.tar.gz
  [ -f "$cifar" ] || cifar=${CNNPIPE_SHARED:-../shared}/data/cifar10-jpeg.tar.gz
  if [ ! -f "$cifar" ]; then
    echo "bench/gpu.sh: no CIFAR-10 tarball in .whl/: run 'make gpu-wheels' beside ../shared/data" >&2
    exit 1
  fi
  ln -s "$(realpath "$cifar")" "$scratch/shared/data/cifar10-jpeg.tar.gz"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  train_sizes=(--subset 0)
  classify_sizes=(--images 0)
  accuracy_sizes=()
  report_flags=()
fi
export CNNPIPE_SHARED=$scratch/shared
"$PY" -c "import sys, torch, torchvision; print('python', sys.version.split()[0], 'torch', torch.__version__, \
  'torchvision', torchvision.__version__, 'cuda', torch.cuda.is_available())"

step() {  # step NAME COMMAND...: runs one step, recording its exit status and wall seconds for the report
  local name=$1 started=$SECONDS
  shift
  echo -e "\n== $name: $*"
  "$@"
  printf '%s\t%s\t%s\n' "$name" "$?" "$((SECONDS - started))" >>"$scratch/steps.tsv"
}

step train "$PY" bench/train.py --device "$device" "${train_sizes[@]}" --json "$results/train.json"
step time-to-accuracy "$PY" bench/time_to_accuracy.py --device "$device" "${accuracy_sizes[@]}" \
  --json "$results/time_to_accuracy.json"
step classify "$PY" bench/classify.py --device "$device" "${classify_sizes[@]}" --json "$results/classify.json"
# Only the files that hold device tests: collecting the others imports prefect and mlflow, absent on the box.
mapfile -t device_test_files < <(grep -rlE 'pytest\.mark\.device\b' tests --include='test_*.py' | sort)
if [ ${#device_test_files[@]} -gt 0 ]; then
  step device-tests "$PY" -m pytest -m device -p no:cacheprovider -q --junitxml="$results/device_tests.xml" \
    "${device_test_files[@]}"
fi

"$PY" bench/gpu_report.py "$results" "$scratch/steps.tsv" "${report_flags[@]}" || exit 1
if cut -f2 "$scratch/steps.tsv" | grep -qv '^0$'; then
  exit 1
fi
