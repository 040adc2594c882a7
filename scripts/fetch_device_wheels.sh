#!/usr/bin/env bash
# Packages the device check needs on a lent GPU machine that reaches no package registry.
# Its image already has CUDA torch, transformers, peft, safetensors, tensorboard, sentencepiece,
# pyyaml, tqdm and DeepSpeed's small dependencies (ninja, msgpack, py-cpuinfo, einops, psutil,
# nvidia-ml-py); it lacks DeepSpeed itself and pydantic / hjson. This downloads them HERE (the
# versions installed on this machine, which the tests ran with) into .whl/ (git-ignored), for
# Python 3.12 on x86-64; carry it with the device tool: carry=[".whl"].
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${1:-.whl}
PY=${PYTHON:-python3}
mkdir -p "$DEST"
version() { $PY -c "import importlib.metadata as m; print(m.version('$1'))"; }
WHEELS=""
for pkg in hjson pydantic pydantic-core annotated-types typing-inspection; do
  WHEELS="$WHEELS $pkg==$(version $pkg)"
done
$PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform any -d "$DEST" $WHEELS
# DeepSpeed ships as a source package: built there against the machine's CUDA torch
$PY -m pip download -q --no-deps --no-binary=:all: -d "$DEST" "deepspeed==$(version deepspeed)"
ls -la "$DEST"
du -sh "$DEST"
