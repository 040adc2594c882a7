"""Export speed and memory: a GPT-2 large-sized (774M) checkpoint written by 2 ranks.

    python bench/export_speed.py [--max-shard-size 500MB]

1. trains 1 step of configs/gpt2-large-random.yaml on 2 ranks (skipped if the checkpoint exists);
2. in the same run: a plain copy of the checkpoint's bytes (the baseline), then
   `launchers/export.py --mode merged` in a child process whose peak RSS is measured;
3. reports bytes/s of both, and peak RSS against the largest output shard.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from common import write_result

ROOT = Path(__file__).resolve().parents[1]


def run_measured(cmd, env) -> tuple[float, float, str]:
    """(wall seconds, peak RSS MiB of that child alone, its stdout)."""
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)
    out = p.stdout.read()
    _, status, usage = os.wait4(p.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"{cmd[1]} failed")
    return time.perf_counter() - t0, usage.ru_maxrss / 1024, out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--max-shard-size", default="500MB")
    ap.add_argument(
        "--config",
        default="configs/gpt2-large-random.yaml",
        help="the experiment whose 2-rank checkpoint is exported (1 step is trained)",
    )
    args = ap.parse_args()
    env = dict(os.environ, DS_ACCELERATOR=os.environ.get("DS_ACCELERATOR", "cpu"))
    config = ROOT / args.config
    run = ROOT / "runs" / f"bench-export-{config.stem}"
    ckpt = run / "checkpoints"
    if not (ckpt / "latest").is_file():
        subprocess.run(
            [
                sys.executable,
                "-m",
                "deepspeed.launcher.runner",
                "--num_gpus",
                "2",
                "--master_port",
                "29744",
                str(ROOT / "launchers" / "train.py"),
                "--config",
                str(config),
                f"output_dir={run}",
                "train.max_steps=1",
                "checkpoint.every=1",
                "eval.every=1000000",
            ],
            cwd=ROOT,
            env=env,
            check=True,
        )
    tag_dir = ckpt / (ckpt / "latest").read_text().strip()
    from dsee_scale.checkpoint import ZeroCheckpoint

    zc = ZeroCheckpoint(ckpt, tag_dir.name)
    n_params = sum(math.prod(s) for s in {**zc.frozen_shapes, **zc.trainable_shapes}.values())
    ck_bytes = sum(f.stat().st_size for f in tag_dir.iterdir() if f.is_file())

    copy_dir = ROOT / "runs" / "bench-export-copy"
    shutil.rmtree(copy_dir, ignore_errors=True)
    copy_dir.mkdir(parents=True)
    t0 = time.perf_counter()
    for f in tag_dir.iterdir():
        if f.is_file():
            shutil.copyfile(f, copy_dir / f.name)
    copy_s = time.perf_counter() - t0
    shutil.rmtree(copy_dir)

    out = ROOT / "runs" / "bench-export-merged"
    export_s, export_rss, stdout = run_measured(
        [
            sys.executable,
            str(ROOT / "launchers" / "export.py"),
            str(ckpt),
            str(out),
            "--force",
            "--max-shard-size",
            args.max_shard_size,
        ],
        env,
    )
    print(stdout.strip())
    inner_s = float(stdout.strip().rsplit(" in ", 1)[1].split("s")[0])
    shards = sorted(out.glob("*.safetensors"))
    out_bytes = sum(f.stat().st_size for f in shards)
    largest = max(f.stat().st_size for f in shards)
    baseline = subprocess.run(
        [
            sys.executable,
            "-c",
            "import resource, torch, transformers, deepspeed;"
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)",
        ],
        env=env,
        capture_output=True,
        text=True,
    )
    import_rss = int(baseline.stdout.strip().splitlines()[-1]) / 1024
    result = {
        "checkpoint": str(tag_dir.relative_to(ROOT)),
        "checkpoint_ranks": 2,
        "model": f"{config.stem} (random weights, {n_params / 1e6:.0f}M parameters)",
        "config": args.config,
        "checkpoint_bytes": ck_bytes,
        "output_bytes": out_bytes,
        "shards": len(shards),
        "max_shard_size": args.max_shard_size,
        "largest_shard_bytes": largest,
        "plain_copy_seconds": copy_s,
        "plain_copy_bytes_per_s": ck_bytes / copy_s,
        "export_seconds_including_python_start": export_s,
        "export_seconds_inside_tool": inner_s,
        "export_output_bytes_per_s": out_bytes / inner_s,
        "export_over_copy_time_ratio": inner_s / copy_s,
        "export_peak_rss_mb": export_rss,
        "python_torch_import_rss_mb": import_rss,
        "export_rss_above_imports_over_largest_shard": (export_rss - import_rss) * 2**20 / largest,
    }
    print(json.dumps(result, indent=2))
    write_result("export_speed", result)


if __name__ == "__main__":
    main()
