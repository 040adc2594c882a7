#!/usr/bin/env bash
# The test command: lint, format and type checks, then the CPU test suite.
#   bash scripts/test.sh                 # everything CI runs
#   bash scripts/test.sh -k export -x    # extra arguments go to pytest
#   TEST_WORKERS=0 bash scripts/test.sh  # one test at a time (default: 2 test files at a time)
# pytest's exit code 5 (no test collected) fails this script like any other failure.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
echo "== ruff (lint, format)"
$PY -m ruff check dsee_scale launchers bench tests
$PY -m ruff format --check dsee_scale launchers bench tests
echo "== mypy dsee_scale"
$PY -m mypy
echo "== pytest"
# Two test files at a time (pytest-xdist, a file's tests and module fixtures stay on one worker):
# a test spends much of its time in single-threaded process start-up (each launch imports torch,
# DeepSpeed and transformers three times over: runner, launch, ranks), so one at a time keeps a
# 2-core machine about half idle.
$PY -m pytest -n "${TEST_WORKERS:-2}" --dist loadfile "$@"
