"""The pruned model where people run it: llama.cpp, CPU, 2 threads. Dense vs structured-pruned
SmolLM2-135M as GGUF (f16 and q8_0): held-out perplexity and tokens/s (prompt processing and
generation apart), all in one run.

    python bench/gguf_speed.py [--tune-steps 30] [--retune-steps 30] [--chunks 48]

1. llama.cpp is built here from the llama-cpp-python source package (the same llama.cpp whose
   converter `dsee-scale export --format gguf` uses; cached, about 7 minutes on 2 cores), for
   x86-64 with AVX-512 and without AMX (see SIMD).
2. SmolLM2-135M is tuned with DSEE (configs/smollm2-python-code.yaml, q,v, r=8, N=64) and pruned
   structurally (one q head per kv group: 9 -> 6 heads; 384 of 1536 MLP channels; activation
   scores from 4 calibration batches), then re-tuned.
3. Both are exported by `dsee-scale export --format gguf --gguf-type f16,q8_0`.
4. llama-perplexity on the held-out standard-library modules (the training run's eval split;
   contexts of 256 tokens, scored on their second half as llama.cpp does) and llama-bench
   (2 threads, prompt 128, generation 32, 3 repetitions).
Results: bench/results/gguf_speed.json.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

from dsee_scale.assets import CACHE, LLAMA_CPP_PYTHON, fetch_once, pip_download, split_of, stdlib_files

from common import write_result

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "smollm2-python-code.yaml"
TOOLS = ("llama-bench", "llama-perplexity")
# x86-64 SIMD up to AVX-512, without AMX: a native build on this machine's Xeon (AMX present)
# segfaulted in every q8_0 run (llama-bench and llama-perplexity; f16 ran), so AMX stays off
SIMD = ["-DGGML_NATIVE=OFF", "-DGGML_AVX=ON", "-DGGML_AVX2=ON", "-DGGML_FMA=ON", "-DGGML_F16C=ON",
        "-DGGML_BMI2=ON", "-DGGML_AVX512=ON", "-DGGML_AVX512_VBMI=ON", "-DGGML_AVX512_VNNI=ON",
        "-DGGML_AVX512_BF16=ON", "-DGGML_AVX_VNNI=ON", "-DGGML_AMX_TILE=OFF",
        "-DGGML_AMX_INT8=OFF"]  # fmt: skip


def build_llama_cpp() -> Path:
    """llama.cpp's CPU tools built from the llama-cpp-python source package, once."""

    def build(target: Path) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            archive = pip_download(f"llama-cpp-python=={LLAMA_CPP_PYTHON}", Path(tmp), source=True)
            with tarfile.open(archive) as tar:
                members = [m for m in tar.getmembers() if "/vendor/llama.cpp/" in m.name]
                tar.extractall(tmp, members=members, filter="data")
            src = next(Path(tmp).glob("*/vendor/llama.cpp"))
            flags = ["-DLLAMA_CURL=OFF", "-DBUILD_SHARED_LIBS=OFF", "-DCMAKE_BUILD_TYPE=Release", *SIMD]
            run(["cmake", "-S", str(src), "-B", str(src / "build"), *flags])
            run(["cmake", "--build", str(src / "build"), "-j", str(os.cpu_count()), "--target", *TOOLS])
            partial = target.with_name(target.name + ".partial")
            partial.mkdir(parents=True, exist_ok=True)
            for tool in TOOLS:
                shutil.copy(src / "build" / "bin" / tool, partial / tool)
            partial.rename(target)

    return fetch_once(CACHE / f"llama.cpp-{LLAMA_CPP_PYTHON}-bin-avx512", build)


def run(cmd: list[str], **kw) -> str:
    print("$", " ".join(cmd), flush=True)
    r = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if r.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}")
    return r.stdout + r.stderr


def launcher(script: str, *args: str) -> None:
    run([sys.executable, str(ROOT / "launchers" / script), *args], cwd=ROOT)


def heldout_text(path: Path) -> Path:
    """The held-out standard-library modules (the training run's eval split), as one file."""
    files = [f for f in stdlib_files() if split_of(f) == "heldout"]
    path.write_text("\n\n".join(f.read_text(encoding="utf-8", errors="replace") for f in files))
    return path


def perplexity(bin_dir: Path, model: Path, text: Path, chunks: int) -> dict:
    out = run([str(bin_dir / "llama-perplexity"), "-m", str(model), "-f", str(text), "-c", "256", "-b", "256",
               "--chunks", str(chunks), "-t", "2"])  # fmt: skip
    m = re.search(r"Final estimate: PPL = ([\d.]+) \+/- ([\d.]+)", out)
    if not m:
        sys.exit(f"no perplexity in llama-perplexity's output:\n{out[-2000:]}")
    return {
        "perplexity": float(m.group(1)),
        "plus_minus": float(m.group(2)),
        "chunks": chunks,
        "context": 256,
    }


def speed(bin_dir: Path, model: Path) -> dict:
    out = run([str(bin_dir / "llama-bench"), "-m", str(model), "-t", "2", "-p", "128", "-n", "32", "-r", "3",
               "-o", "json"])  # fmt: skip
    rows = json.loads(out[out.index("[") : out.rindex("]") + 1])
    pp = next(r for r in rows if r["n_prompt"] > 0)
    tg = next(r for r in rows if r["n_gen"] > 0)
    return {"prompt_tokens_per_s": pp["avg_ts"], "prompt_tokens_per_s_stdev": pp["stddev_ts"],
            "generation_tokens_per_s": tg["avg_ts"], "generation_tokens_per_s_stdev": tg["stddev_ts"],
            "threads": 2, "prompt": 128, "generated": 32, "repetitions": 3}  # fmt: skip


def ratio(rows: dict, gguf_type: str, key: str) -> float:
    return rows[f"pruned/{gguf_type}"][key] / rows[f"dense/{gguf_type}"][key]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tune-steps", type=int, default=30)
    ap.add_argument("--retune-steps", type=int, default=30)
    ap.add_argument("--chunks", type=int, default=48, help="llama-perplexity contexts of 256 tokens")
    ap.add_argument("--work", default="/tmp/dsee_gguf_bench")
    args = ap.parse_args()
    if not (shutil.which("cmake") and shutil.which("c++")):
        sys.exit("error: building llama.cpp needs cmake and a C++ compiler (apt-get install cmake g++)")
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    t0 = time.perf_counter()
    bin_dir = build_llama_cpp()
    build_s = time.perf_counter() - t0
    tuned, pruned = work / "tuned", work / "pruned"

    def steps(n: int, out: Path) -> list[str]:
        return [f"train.max_steps={n}", f"eval.every={n}", f"checkpoint.every={n}", f"output_dir={out}",
                "train.batch_size=4", "train.micro_batch_size=4", "data.max_eval_blocks=16"]  # fmt: skip

    launcher("train.py", "--config", str(CONFIG), *steps(args.tune_steps, tuned))
    # activation scores: DSEE's update scores and weight channel scores wreck this model (bench/REPORT.md)
    prune = ["prune.heads_per_layer=1", "prune.channels_per_layer=384", "prune.head_score=activation",
             "prune.channel_score=activation"]  # fmt: skip
    launcher("prune.py", "--config", str(CONFIG), "--from", str(tuned / "checkpoints"), *prune,
             *steps(args.retune_steps, pruned))  # fmt: skip
    text = heldout_text(work / "heldout.txt")
    rows = {}
    for name, run_dir in (("dense", tuned), ("pruned", pruned)):
        out = work / f"gguf-{name}"
        launcher("export.py", str(run_dir / "checkpoints"), str(out), "--format", "gguf",
                 "--gguf-type", "f16,q8_0")  # fmt: skip
        eval_loss = json.loads((run_dir / "summary.json").read_text())["eval_loss"]
        for gguf_type in ("f16", "q8_0"):
            model = out / f"model-{gguf_type}.gguf"
            row = {"file_mb": model.stat().st_size / 2**20, "framework_eval_loss": eval_loss}
            row.update(perplexity(bin_dir, model, text, args.chunks))
            row.update(speed(bin_dir, model))
            rows[f"{name}/{gguf_type}"] = row
            print(name, gguf_type, row, flush=True)
    ratios = {t: {"prompt_speedup": ratio(rows, t, "prompt_tokens_per_s"),
                  "generation_speedup": ratio(rows, t, "generation_tokens_per_s"),
                  "perplexity_ratio": ratio(rows, t, "perplexity")}
              for t in ("f16", "q8_0")}  # fmt: skip
    plan = json.loads((pruned / "prune_plan.json").read_text())
    write_result("gguf_speed", {
        "llama_cpp_python": LLAMA_CPP_PYTHON, "llama_cpp_build_seconds": build_s,
        "tune_steps": args.tune_steps, "retune_steps": args.retune_steps, "pruned_sizes": plan["config"],
        "rows": rows, "pruned_over_dense": ratios, "total_seconds": time.perf_counter() - t0,
    })  # fmt: skip
    for t, r in ratios.items():
        print(
            f"{t}: pruned / dense: prompt {r['prompt_speedup']:.2f}x, "
            f"generation {r['generation_speedup']:.2f}x, perplexity x{r['perplexity_ratio']:.2f}"
        )


if __name__ == "__main__":
    main()
