"""Pruned models people would deploy (#16): SmolLM2-135M tuned with DSEE, pruned, recovered.

    python bench/prune_recovery.py [--tune-steps 100] [--recover-steps 40] [--seeds 0,1,2]
                                   [--eval-blocks 48] [--only sparsegpt@50%,...] [--report-only]

Everything runs as a user runs it, through the launchers on one rank (ZeRO-3, fp32):
1. tune: `launchers/train.py --config configs/smollm2-python-code.yaml` (DSEE r=8, N=64 on q,v);
   its held-out perplexity is the dense reference;
2. prune + recover: `launchers/prune.py --from <tuned>` with
   - 50% unstructured, per output row: magnitude, Wanda, SparseGPT, DSEE's WABS;
   - 2:4 for the two best of those;
   - structured, about 20% fewer parameters (1 of 3 q heads per kv group, 384 of 1536 MLP
     channels): taylor scores, and activation scores;
   each recovered alike: fresh DSEE adapters on every linear of each block (prune.recovery, r=8,
   N=64, GreBsmo with 20 rounds), `--recover-steps` steps of 4 x 256 tokens at lr 5e-4, with
   and without distillation from the tuned model (prune.distill.kl_weight=1, T=2);
   unstructured runs keep the zeros (the update is masked, so the merged export has the
   stated sparsity). Held-out perplexity: the run's own eval (mean
   token loss over `--eval-blocks` held-out blocks of 256 tokens), per recovery seed;
3. speed of the structured models: the merged export of the tuned model against each
   structured export, forward tokens/s of 4 x 256 tokens, alternating, in this process.

Each finished run is appended to bench/results/prune_recovery_runs.jsonl and skipped on a rerun;
the summary (bench/results/prune_recovery.json) has every configuration's perplexity per seed,
mean and spread, its ratio to the dense tuned model and the issue's targets.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from common import RESULTS, write_result

ROOT = Path(__file__).resolve().parents[1]
WORK = Path(os.environ.get("DSEE_BENCH_WORK", Path.home() / ".cache" / "dsee_scale" / "prune_recovery")) / (
    "quick" if RESULTS.name == "quick" else "full"
)  # checkpoints and exports (not in the repository)
RUNS = RESULTS / "prune_recovery_runs.jsonl"
CONFIG = "configs/smollm2-python-code.yaml"
LINEARS = "[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj]"
RECOVERY = [
    f"prune.recovery.target_modules={LINEARS}",
    "prune.recovery.r=8",
    "prune.recovery.alpha=16",
    "prune.recovery.num_sparse=64",
    "prune.recovery.grebsmo_rounds=20",  # 100 rounds: ~10 s per MLP matrix here, 15 min a run
    "train.lr=5e-4",
    "train.batch_size=4",
    "train.micro_batch_size=4",
    "train.warmup_steps=0",
]
UNSTRUCTURED = {
    "magnitude": ["prune.score=magnitude", "prune.scope=row"],
    "wanda": ["prune.score=wanda", "prune.scope=row"],
    "sparsegpt": ["prune.score=sparsegpt"],
    "wabs": ["prune.score=wabs", "prune.scope=row"],
}
STRUCTURED = {
    "taylor": ["prune.head_score=taylor", "prune.channel_score=taylor"],
    "activation": ["prune.head_score=activation", "prune.channel_score=activation"],
}
SPEED = "forward_speed"  # the row of forward tokens/s of the structured exports
TARGETS = {"unstructured_50": 1.5, "2:4": 2.0, "structured_20": 1.5, "structured_speedup": 1.2}


def launch(script: str, out: Path, args: list[str], flags: tuple[str, ...] = ()) -> float:
    """Run a launcher on one rank; returns its wall seconds (exit on failure, with its stderr)."""
    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    cmd = [
        sys.executable,
        "-m",
        "deepspeed.launcher.runner",
        "--num_gpus",
        "1",
        "--master_port",
        "29781",
        str(ROOT / "launchers" / script),
        "--config",
        CONFIG,
        *flags,
        f"output_dir={out}",
        *args,
    ]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if r.returncode:
        sys.exit(f"error: {script} {' '.join(args)} failed:\n{r.stderr[-4000:]}")
    return time.perf_counter() - t0


def done_runs() -> dict[str, dict]:
    if not RUNS.is_file():
        return {}
    return {r["name"]: r for r in map(json.loads, RUNS.read_text().splitlines()) if r}


def record(row: dict) -> None:
    RUNS.parent.mkdir(parents=True, exist_ok=True)
    with open(RUNS, "a") as f:
        f.write(json.dumps(row) + "\n")
    print(json.dumps(row), flush=True)


def ppl(run_dir: Path) -> float:
    import math

    return math.exp(json.loads((run_dir / "summary.json").read_text())["eval_loss"])


def tune(args) -> dict:
    runs = done_runs()
    out = WORK / "tuned"
    recorded = runs.get("tuned")
    if recorded is not None and (out / "checkpoints").is_dir():
        return recorded
    if recorded is not None:
        print(f"{out} is gone (a fresh machine?): tuning it again, as recorded", flush=True)
    if out.exists():
        shutil.rmtree(out)  # an unfinished attempt
    seconds = launch(
        "train.py",
        out,
        [
            f"train.max_steps={args.tune_steps}",
            f"eval.every={args.tune_steps}",
            f"checkpoint.every={args.tune_steps}",
            f"data.max_eval_blocks={args.eval_blocks}",
        ],
    )
    row = {"name": "tuned", "ppl": ppl(out), "seconds": seconds, "dir": str(out), "steps": args.tune_steps}
    if recorded is not None:  # the recorded prune runs were cut from that model: it must be the same
        if abs(row["ppl"] - recorded["ppl"]) > 1e-4 * recorded["ppl"] or row["steps"] != recorded["steps"]:
            sys.exit(
                f"error: the re-tuned model (ppl {row['ppl']:.4f}, {row['steps']} steps) is not the "
                f"recorded one (ppl {recorded['ppl']:.4f}, {recorded['steps']} steps): move {RUNS} "
                "aside to start the comparison over"
            )
        return recorded
    record(row)
    return row


def prune_run(args, name: str, overrides: list[str], seed: int, distill: bool) -> dict:
    key = f"{name}{'+kd' if distill else ''}@seed{seed}"
    runs = done_runs()
    if key in runs:
        return runs[key]
    out = WORK / key.replace(":", "_").replace("@", "_")
    if out.exists():
        shutil.rmtree(out)  # an unfinished attempt
    extra = [
        f"train.max_steps={args.recover_steps}",
        f"eval.every={args.recover_steps}",
        f"checkpoint.every={args.recover_steps}",
        f"data.max_eval_blocks={args.eval_blocks}",
        f"train.seed={seed}",
        f"prune.recovery.seed={seed}",
        *RECOVERY,
        *overrides,
    ]
    if distill:
        extra += ["prune.distill.kl_weight=1.0", "prune.distill.temperature=2.0"]
    seconds = launch("prune.py", out, extra, ("--from", str(WORK / "tuned" / "checkpoints")))
    plan = json.loads((out / "prune_plan.json").read_text())
    row = {
        "name": key,
        "config": name,
        "distill": distill,
        "seed": seed,
        "ppl": ppl(out),
        "seconds": seconds,
        "weight_sparsity": plan.get("weight_sparsity"),
        "sizes": plan.get("config"),
        "dir": str(out),
    }
    record(row)
    return row


def forward_speed(dirs: dict[str, Path], rounds: int = 7) -> dict[str, float]:
    """Forward tokens/s of each merged export (4 x 256 tokens), alternating between models."""
    import torch
    from transformers import AutoModelForCausalLM

    import dsee_scale  # noqa: F401  (registers the pruned model classes)
    from dsee_scale.export import export_checkpoint

    models = {}
    for name, run in dirs.items():
        exp = WORK / "exports" / name
        if not (exp / "config.json").is_file():
            export_checkpoint(str(run / "checkpoints"), str(exp))
        models[name] = AutoModelForCausalLM.from_pretrained(exp, dtype=torch.float32).eval()
    ids = torch.randint(0, 49152, (4, 256), generator=torch.Generator().manual_seed(0))
    times: dict[str, list[float]] = {n: [] for n in models}
    with torch.no_grad():
        for m in models.values():
            m(input_ids=ids)  # warm-up
        for _ in range(rounds):
            for n, m in models.items():
                t0 = time.perf_counter()
                m(input_ids=ids)
                times[n].append(time.perf_counter() - t0)
    return {n: ids.numel() / statistics.median(t) for n, t in times.items()}


def summarize(runs: dict[str, dict]) -> dict:
    dense = runs["tuned"]["ppl"]
    by_config: dict[str, list[dict]] = {}
    for r in runs.values():
        if r["name"] not in ("tuned", SPEED):
            by_config.setdefault(r["config"] + ("+kd" if r["distill"] else ""), []).append(r)
    table = {}
    for cfg, rows in sorted(by_config.items()):
        ppls = [r["ppl"] for r in sorted(rows, key=lambda r: r["seed"])]
        mean = statistics.mean(ppls)
        table[cfg] = {
            "ppl_per_seed": ppls,
            "mean": mean,
            "stdev": statistics.stdev(ppls) if len(ppls) > 1 else None,
            "ratio_to_dense": mean / dense,
            "weight_sparsity": rows[0]["weight_sparsity"],
            "sizes": rows[0]["sizes"],
            "seconds_per_run": statistics.mean(r["seconds"] for r in rows),
        }
    return {"dense_tuned_ppl": dense, "configs": table}


def best_two() -> list[str]:
    """The two 50% scores with the lowest recovered (distilled) perplexity so far."""
    rows = summarize(done_runs())["configs"]
    return sorted(UNSTRUCTURED, key=lambda n: rows.get(n + "@50%+kd", {}).get("mean", float("inf")))[:2]


def jobs(seeds: list[int]):
    """(config name, overrides, seed, distill) in the order they run: seed 0 of every comparison the
    issue asks for (50% with distillation, 2:4 for the best two, structured, 50% without
    distillation), then the other seeds of the same, best scores first."""
    unstructured = {n: ["prune.kind=unstructured", "prune.ratio=0.5", *o] for n, o in UNSTRUCTURED.items()}
    structured = {
        n: ["prune.heads_per_layer=1", "prune.channels_per_layer=384", "prune.calibration_batches=8", *o]
        for n, o in STRUCTURED.items()
    }
    for seed in seeds:
        for name, o in unstructured.items():
            yield name + "@50%", o, seed, True
        for name in best_two():
            o = [x for x in UNSTRUCTURED[name] if not x.startswith("prune.scope")]
            yield name + "@2:4", ["prune.kind=unstructured", "prune.nm=2:4", *o], seed, True
        for name, o in structured.items():
            yield name + "@structured", o, seed, True
        for name in best_two():
            yield name + "@50%", unstructured[name], seed, False
        for name, o in structured.items():
            yield name + "@structured", o, seed, False
        for name in UNSTRUCTURED:
            if name not in best_two():
                yield name + "@50%", unstructured[name], seed, False


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tune-steps", type=int, default=100)
    ap.add_argument("--recover-steps", type=int, default=40)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--eval-blocks", type=int, default=48)
    ap.add_argument("--only", default="", help="comma-separated configurations to run, as the summary names "
                    "them (sparsegpt@50%%, wanda@50%%+kd, taylor@structured, ...); default: all")  # fmt: skip
    ap.add_argument("--report-only", action="store_true", help="summarize the recorded runs, run nothing")
    args = ap.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    only = {c for c in args.only.split(",") if c}
    known = {name + ("+kd" if distill else "") for name, _, _, distill in jobs([0])}
    if only - known:
        bad, allowed = ", ".join(sorted(only - known)), ", ".join(sorted(known))
        print(f"error: --only: unknown {bad}; allowed: {allowed}", file=sys.stderr)
        sys.exit(2)
    if not args.report_only:
        tune(args)
        for name, overrides, seed, distill in jobs(seeds):  # most informative first
            if not only or name + ("+kd" if distill else "") in only:
                prune_run(args, name, overrides, seed, distill)
            runs = done_runs()
            structured = {n: Path(r["dir"]) for n, r in runs.items() if "@structured+kd@seed0" in n}
            if len(structured) == len(STRUCTURED) and SPEED not in runs:
                record({"name": SPEED, **forward_speed({"dense": WORK / "tuned", **structured})})
            write_result("prune_recovery", report(args))
    write_result("prune_recovery", report(args))


def report(args) -> dict:
    runs = done_runs()
    result = {
        "model": "SmolLM2-135M (GGUF, fp32), tuned DSEE r=8 N=64 q,v",
        "tune_steps": args.tune_steps,
        "recover_steps": args.recover_steps,
        "eval_blocks": args.eval_blocks,
        "recovery": RECOVERY,
        "targets": TARGETS,
        **summarize(runs),
    }
    if SPEED in runs:
        result["forward_tokens_per_s"] = {k: v for k, v in runs[SPEED].items() if k != "name"}
    return result


if __name__ == "__main__":
    main()
