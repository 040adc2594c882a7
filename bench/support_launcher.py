"""Support selection as a user runs it: the launcher's own figure, 1 process vs 2 ranks.

    python bench/support_launcher.py

SmolLM2-135M, DSEE r=8 N=64 on q,v (GreBsmo), ZeRO-3 + CPU offload, one training step, run as
`python launchers/train.py` (1 process) and `deepspeed --num_gpus 2 launchers/train.py` (2 ranks,
with and without OMP_NUM_THREADS=2, torch's old default of every core per rank). Reads
`support_seconds`, the threads per rank and the supports digest from each run's summary.json.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from common import write_result

ROOT = Path(__file__).resolve().parents[1]
ARGS = ["--config", "configs/smollm2-python-code.yaml", "deepspeed=ds_configs/zero3_offload_cpu.json",
        "train.max_steps=1", "data.max_eval_blocks=2", "train.micro_batch_size=1"]  # fmt: skip


def run(name: str, ranks: int, out: Path, env_extra: dict[str, str]) -> dict:
    env = (
        {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
        | {"DS_ACCELERATOR": "cpu"}
        | env_extra
    )
    script = str(ROOT / "launchers" / "train.py")
    if ranks == 1:
        cmd = [sys.executable, script, *ARGS, "train.batch_size=1"]
    else:
        cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(ranks), "--master_port",
               str(29700 + len(name)), script, *ARGS, "train.batch_size=2"]  # fmt: skip
    r = subprocess.run([*cmd, f"output_dir={out / name}"], cwd=ROOT, env=env, capture_output=True, text=True)
    if r.returncode:
        sys.exit(f"error: {name} failed:\n{r.stderr[-3000:]}")
    s = json.loads((out / name / "summary.json").read_text())
    row = {"ranks": ranks, "threads_per_rank": s["torch_threads_per_rank"], "env": env_extra,
           "support_seconds": s["support_seconds"], "supports_digest": s["supports_digest"]}  # fmt: skip
    print(name, row, flush=True)
    return row


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        rows = {
            "one_process": run("one_process", 1, Path(tmp), {}),
            "two_ranks": run("two_ranks", 2, Path(tmp), {}),
            "two_ranks_omp2": run("two_ranks_omp2", 2, Path(tmp), {"OMP_NUM_THREADS": "2"}),
        }
    one, two = rows["one_process"], rows["two_ranks"]
    write_result("support_launcher", {
        "model": "SmolLM2-135M-Instruct, q_proj + v_proj (60 matrices), GreBsmo, N=64",
        "runs": rows,
        "same_supports_everywhere": len({r["supports_digest"] for r in rows.values()}) == 1,
        # GreBsmo runs on one thread per rank, so a core-second is the fair unit
        "two_ranks_over_one_process_per_core": two["support_seconds"] * 2 / one["support_seconds"],
        "target_per_core_ratio": 1.5,
    })  # fmt: skip


if __name__ == "__main__":
    main()
