#!/usr/bin/env bash
# The device check on a machine with one NVIDIA GPU (issues #12 / #13): install, then every stage
# of the pipeline on the GPU (scripts/device_check.py says which), figures to bench/results/.
#
#   bash scripts/device_check.sh             # GPU machine; target: under 9 minutes, installs included
#   bash scripts/device_check.sh --dry-run   # CPU, tiny models, no installs (the test suite runs it)
#
# Install: the machine's CUDA torch is kept when it sees the GPU (else torch from $TORCH_INDEX);
# DeepSpeed is built with its CPU-Adam and fused-Adam ops for this GPU only; this package goes in
# editable without its dependencies (the CUDA image has them). Without network, first run
# `bash scripts/fetch_device_wheels.sh` where pip works and carry .whl/ along: it is used when there.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ "${1:-}" = "--dry-run" ]; then
  echo "== install: skipped (dry run)"
  exec env DS_ACCELERATOR=cpu $PY scripts/device_check.py "$@"
fi
t0=$(date +%s)
echo "== install"
export DS_ACCELERATOR=cuda
if ! $PY -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  $PY -m pip install -q torch --index-url "${TORCH_INDEX:-https://download.pytorch.org/whl/cu128}"
fi
FROM=""
if [ -d .whl ]; then FROM="--no-index --find-links .whl"; fi
if ! $PY -c 'import deepspeed' 2>/dev/null; then
  if [ -d .whl ]; then $PY -m pip install -q --no-deps $FROM .whl/*.whl; fi
  ARCH=$($PY -c 'import torch; m, n = torch.cuda.get_device_capability(); print(f"{m}.{n}")')
  # build the two optimizer ops now (parallel, this GPU's architecture only), not on first use
  DS_BUILD_CPU_ADAM=1 DS_BUILD_FUSED_ADAM=1 TORCH_CUDA_ARCH_LIST="$ARCH" MAX_JOBS=$(nproc) \
    $PY -m pip install -q --no-build-isolation $FROM "deepspeed==${DS_VERSION:-0.19.8}"
fi
$PY -m pip install -q --no-deps --no-build-isolation -e .
t1=$(date +%s)
echo "install: $((t1 - t0)) s"
exec $PY scripts/device_check.py --install-seconds $((t1 - t0)) "$@"
