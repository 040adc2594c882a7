#!/usr/bin/env bash
# One command to set up dsee-scale: torch, DeepSpeed with its C++ ops built once, the package.
#
#   bash scripts/setup.sh            # CPU (this project's CI and dev machines)
#   TORCH_SPEC="torch==2.13.0" TORCH_INDEX=https://download.pytorch.org/whl/cu128 \
#   DS_ACCELERATOR=cuda bash scripts/setup.sh     # a CUDA machine (see README)
#
# Safe to run again: it skips the DeepSpeed op build when the ops are already installed.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}
DS_VERSION=${DS_VERSION:-0.19.8}

echo "== [1/5] system library for DeepSpeed async I/O (NVMe offload): libaio-dev"
if ! [ -e /usr/include/libaio.h ]; then
  if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    apt-get install -y -q libaio-dev >/dev/null 2>&1 || { apt-get update -q >/dev/null && apt-get install -y -q libaio-dev >/dev/null; } \
      || echo "   (libaio-dev not installed: NVMe offload will be unavailable)"
  else
    echo "   (not root / no apt-get: install libaio-dev yourself for NVMe offload)"
  fi
fi

echo "== [2/5] $TORCH_SPEC"
if [ -n "${TORCH_INDEX:-}" ]; then
  $PY -m pip install -q "$TORCH_SPEC" --index-url "$TORCH_INDEX"
else
  $PY -m pip install -q "$TORCH_SPEC"
fi

echo "== [3/5] DeepSpeed $DS_VERSION with its C++ ops built once (cpu_adam, async_io; shm comm on CPU, fused_adam on CUDA), for $DS_ACCELERATOR"
ops_ok() {
  $PY - 2>/dev/null <<PY
import sys
import deepspeed
from deepspeed.git_version_info import installed_ops as o
sys.exit(0 if deepspeed.__version__ == "$DS_VERSION" and o.get("cpu_adam") else 1)
PY
}
if ops_ok; then
  echo "   already built"
else
  AIO=0; [ -e /usr/include/libaio.h ] && AIO=1
  SHM=0; [ "$DS_ACCELERATOR" = cpu ] && SHM=1
  FUSED=0; [ "$DS_ACCELERATOR" = cuda ] && FUSED=1  # FusedAdam: the GPU optimizer (engine.py)
  echo "   compiling (about 9 minutes on 2 cores) ..."
  # --no-build-isolation: build against the torch installed above, not a fresh (CUDA) one
  export DS_BUILD_CPU_ADAM=1 DS_BUILD_SHM_COMM=$SHM DS_BUILD_AIO=$AIO DS_BUILD_FUSED_ADAM=$FUSED
  $PY -m pip install -q --no-build-isolation --no-cache-dir "deepspeed==$DS_VERSION"
  # already installed without ops (e.g. pulled in by another package): rebuild it alone
  ops_ok || $PY -m pip install -q --no-build-isolation --no-cache-dir --force-reinstall --no-deps "deepspeed==$DS_VERSION"
  ops_ok || { echo "DeepSpeed ops failed to build"; exit 1; }
fi

echo "== [4/5] dsee-scale and its dependencies (editable)"
$PY -m pip install -q -e ".[baselines,gguf,bench,dev]"
echo "== [5/5] llama.cpp's GGUF converter (from the llama-cpp-python source package, once; for --format gguf)"
$PY -c "from dsee_scale.assets import llama_cpp_converter as c; print('  ', c())" 2>&1 | { grep -v WARNING || true; }
$PY -c "import dsee_scale, deepspeed, torch; print('ok: dsee_scale', dsee_scale.__version__, '| deepspeed', deepspeed.__version__, '| torch', torch.__version__)"
