"""CLI-level: a bad config exits 2 with one clear line and no traceback."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run(*args):
    return subprocess.run(
        [sys.executable, "-m", "dsee_scale", *args], cwd=ROOT, capture_output=True, text=True, timeout=300
    )


def test_inspect_good_config():
    r = run("inspect", "--config", "configs/gpt2-tiny.yaml")
    assert r.returncode == 0, r.stderr
    assert "targets: 4" in r.stdout and "trainable: 4,352" in r.stdout


BAD_CONFIGS = [
    ("dsee.r=0", "dsee.r"),
    ("dsee.rank=8", "dsee.rank: unknown key"),
    ("dsee.num_sparse=100000", "dsee.num_sparse"),
    ("dsee.target_modules=[nope]", "matches no module"),
    ("dsee.support=best", "dsee.support"),
    ("dsee.alpha=abc", "dsee.alpha"),
    ("model.path=/does/not/exist", "model"),
]


@pytest.fixture(scope="module")
def inspect_runs():
    """`dsee-scale inspect` on each bad override, forked from one interpreter (tests/forked_cli.py)."""
    from helpers import launch_many

    argvs = [["inspect", "--config", str(ROOT / "configs" / "gpt2-tiny.yaml"), o] for o, _ in BAD_CONFIGS]
    return dict(zip([o for o, _ in BAD_CONFIGS], launch_many(argvs), strict=True))


@pytest.mark.parametrize("override,needle", BAD_CONFIGS)
def test_bad_config_one_line_exit_2(inspect_runs, override, needle):
    r = inspect_runs[override]
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], r.stderr


def test_missing_config_file():
    r = run("inspect", "--config", "no/such.yaml")
    assert r.returncode == 2 and "does not exist" in r.stderr and "Traceback" not in r.stderr
