"""Every benchmark in bench/, then the report: one command.

    python bench/run_all.py            # full: about 2 h 45 min + the frontier (~7 h est.) on 2 cores
    python bench/run_all.py --quick    # every benchmark, small settings: under 15 minutes
    python bench/run_all.py --gpu      # the GPU benchmark only (bench/gpu_zero3.py)
    python bench/run_all.py --only quality,pruning     # a subset (then the report)

Full results go to bench/results/<name>.json, bench/REPORT.md and bench/results/plots/*.png.
`--quick` writes to bench/results/quick/ (its own REPORT.md and plots), so a smoke run never
replaces the committed figures. Each benchmark runs in its own process, one after another (they
would disturb each other's timings); one that fails is reported and the others still run.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"

# name: (full args, quick args or None = full only, minutes measured for the full run here)
BENCHES = {
    "support_selection": ([], ["--reference-matrices", "1"], 2),
    "adapter_step": (["--steps", "12"], ["--quick"], 3),
    "zero3_step": (["--steps", "6"], ["--steps", "2", "--batch", "2", "--seq", "128"], 3),
    "quality": (
        ["--steps", "60", "--eval-blocks", "48"],
        [
            "--steps",
            "2",
            "--eval-blocks",
            "4",
            "--methods",
            "base,full,lora_r8,dsee_grebsmo,dsee_random,lora_matched",
        ],
        33,
    ),
    "pruning": (
        [],
        [
            "--tune-steps",
            "2",
            "--retune-steps",
            "1",
            "--eval-blocks",
            "4",
            "--ratios",
            "0.3",
            "--channel-fractions",
            "0.25",
            "--speed-rounds",
            "1",
        ],
        37,
    ),
    "export_speed": ([], ["--config", "configs/gpt2-medium-random.yaml"], 5),
    "zero3_scale": ([], None, 4),
    "gguf_speed": ([], None, 20),
    "support_launcher": ([], None, 5),
    "instruct": (["--seeds", "0,1,2"], ["--steps", "2", "--generate", "3", "--eval-rows", "2"], 50),
    "frontier": (
        [],
        [
            "--cells",
            "stdlib:qv",
            "--seeds",
            "0",
            "--steps",
            "2",
            "--lrs",
            "1e-3",
            "--lora-ranks",
            "4",
            "--eval-blocks",
            "4",
        ],  # fmt: skip
        420,  # an estimate from the stdlib:qv runs here (~110 s per q,v run); not yet run whole
    ),
    "sparsity_speed": ([], ["--tokens", "64", "--shapes", "smollm2-135m"], 2),
    "prune_recovery": (
        [],
        ["--tune-steps", "2", "--recover-steps", "1", "--seeds", "0", "--eval-blocks", "2"],
        240,  # an estimate: 15 launcher runs per seed, 3 seeds
    ),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--gpu", action="store_true", help="run bench/gpu_zero3.py (needs a CUDA GPU)")
    ap.add_argument("--only", help="comma-separated subset of " + ",".join(BENCHES))
    args = ap.parse_args()

    if args.gpu:
        sys.exit(subprocess.run([sys.executable, str(BENCH / "gpu_zero3.py")], cwd=ROOT).returncode)
    names = args.only.split(",") if args.only else list(BENCHES)
    unknown = [n for n in names if n not in BENCHES]
    if unknown:
        print(f"error: --only: unknown {', '.join(unknown)} (allowed: {', '.join(BENCHES)})", file=sys.stderr)
        sys.exit(2)
    results = BENCH / "results" / ("quick" if args.quick else "")
    env = dict(os.environ, BENCH_RESULTS=str(results), DS_ACCELERATOR=os.environ.get("DS_ACCELERATOR", "cpu"))
    plan = [(n, BENCHES[n][1] if args.quick else BENCHES[n][0]) for n in names]
    plan = [(n, a) for n, a in plan if a is not None]
    if not args.quick:
        est = sum(BENCHES[n][2] for n, _ in plan)
        print(
            f"full run: {len(plan)} benchmarks, about {est} minutes on a 2-core CPU machine "
            f"(use --quick for a smoke run under 15 minutes)",
            flush=True,
        )
    failed, t_all = [], time.perf_counter()
    for i, (name, extra) in enumerate(plan):
        cmd = [sys.executable, str(BENCH / f"{name}.py"), *extra]
        print(f"\n=== [{i + 1}/{len(plan)}] {name}: {' '.join(cmd[1:])}", flush=True)
        t0 = time.perf_counter()
        rc = subprocess.run(cmd, cwd=ROOT, env=env).returncode
        print(
            f"=== {name}: {'ok' if rc == 0 else f'FAILED (exit {rc})'} in {time.perf_counter() - t0:.0f}s",
            flush=True,
        )
        if rc != 0:
            failed.append(name)
    report = results / "REPORT.md" if args.quick else BENCH / "REPORT.md"
    rc = subprocess.run(
        [sys.executable, str(BENCH / "report.py"), "--results", str(results), "--out", str(report)],
        cwd=ROOT,
        env=env,
    ).returncode
    print(
        f"\nall benchmarks: {time.perf_counter() - t_all:.0f}s"
        + (f"; FAILED: {', '.join(failed)}" if failed else "")
        + ("; report failed" if rc else "")
    )
    sys.exit(1 if failed or rc else 0)


if __name__ == "__main__":
    main()
