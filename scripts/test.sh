#!/usr/bin/env bash
# The test command: lint, format and type checks, then the CPU test suite.
#   bash scripts/test.sh                 # everything CI runs
#   bash scripts/test.sh -k export -x    # extra arguments go to pytest
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
$PY -m pytest "$@"
