"""Scale on this machine: GPT-2 XL-sized (1.5B, random, bf16) + DSEE, ZeRO-3 + CPU offload, 2 ranks.

    python bench/zero3_scale.py [--ranks 2] [--steps 3]

Launches `deepspeed launchers/train.py --config configs/gpt2-xl-random.yaml` with 2 real
processes and reports the peak RSS of each rank, the injection time (supports chosen on
gathered layers, spread over the ranks), step times and losses, from the run's summary.json and
train_log.jsonl. Total parameters are counted from the model config without building it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from common import write_result

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--config", default="configs/gpt2-xl-random.yaml")
    args = ap.parse_args()

    import yaml
    from transformers import AutoConfig

    cfg = yaml.safe_load((ROOT / args.config).read_text())
    mc = dict(cfg["model"]["config"])
    hf = AutoConfig.for_model(mc.pop("model_type"), **mc)
    d, L, V, P = hf.n_embd, hf.n_layer, hf.vocab_size, hf.n_positions
    n_params = V * d + P * d + L * (12 * d * d + 13 * d) + 2 * d

    out = ROOT / "runs" / "bench-zero3-scale"
    shutil.rmtree(out, ignore_errors=True)
    cmd = [
        sys.executable,
        "-m",
        "deepspeed.launcher.runner",
        "--num_gpus",
        str(args.ranks),
        "--master_port",
        "29733",
        str(ROOT / "launchers" / "train.py"),
        "--config",
        str(ROOT / args.config),
        f"output_dir={out}",
        f"train.max_steps={args.steps}",
    ]
    env = dict(os.environ, DS_ACCELERATOR=os.environ.get("DS_ACCELERATOR", "cpu"))
    print(" ".join(cmd), flush=True)
    t0 = time.perf_counter()
    r = subprocess.run(cmd, cwd=ROOT, env=env)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        sys.exit(f"the run failed with exit code {r.returncode}")
    summary = json.loads((out / "summary.json").read_text())
    log = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    result = {
        "model": f"GPT-2 XL shape, random weights ({n_params / 1e9:.2f}B parameters), bf16",
        "parameters": n_params,
        "ranks": args.ranks,
        "deepspeed": cfg["deepspeed"],
        "dsee": cfg["dsee"],
        "batch": [cfg["train"]["batch_size"], cfg["data"]["block_size"]],
        "gradient_checkpointing": cfg["train"]["gradient_checkpointing"],
        "peak_rss_mb_per_rank": summary["peak_rss_mb_per_rank"],
        "peak_rss_gib_all_ranks": sum(summary["peak_rss_mb_per_rank"]) / 1024,
        "machine_ram_gib": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30,
        "inject_seconds": summary["inject_seconds"],
        "trainable_params": summary["trainable_params"],
        "losses": [x["loss"] for x in log],
        "wall_seconds_including_startup": wall,
    }
    print(json.dumps(result, indent=2))
    write_result("zero3_scale", result)


if __name__ == "__main__":
    main()
