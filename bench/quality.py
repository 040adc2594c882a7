"""Quality on a real model: DSEE against LoRA and full fine-tuning on SmolLM2-135M.

    python bench/quality.py [--steps 60] [--eval-blocks 48] [--methods base,full,...]

Every method tunes the same model (SmolLM2-135M-Instruct, fp32) on the same batches (Python
standard-library source, packed 256-token blocks of the train modules, batch 4: the token budget
is steps x 1,024) with AdamW, constant lr, grad clip 1.0, and is scored on the same held-out
modules' blocks (block 256, stride 256, no overlap). Methods:
  base          no tuning
  full          every parameter (lr 2e-5)
  lora_r8       PEFT LoRA r=8, alpha=16 on q_proj, v_proj (lr 4e-4)
  dsee_<s>      DSEE r=8, alpha=16, N=64 on q_proj, v_proj, support s in grebsmo / svd /
                magnitude / random (lr 4e-4)
  lora_matched  PEFT LoRA on q_proj, v_proj with the smallest rank whose trainable count is
                >= DSEE's (alpha = 2r, the same scale; lr 4e-4)
Each method runs in its own process, so its peak RSS is its own.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from common import peak_rss_mb, perplexity, smollm2, stdlib_corpus, tune, write_result

ROOT = Path(__file__).resolve().parents[1]

METHODS = [
    "base",
    "full",
    "lora_r8",
    "dsee_grebsmo",
    "dsee_svd",
    "dsee_magnitude",
    "dsee_random",
    "lora_matched",
]
TARGETS = ["q_proj", "v_proj"]
DSEE = dict(r=8, alpha=16, num_sparse=64)
LR = {"full": 2e-5}
ADAPTER_LR = 4e-4
BATCH, BLOCK = 4, 256


def target_matrices(model) -> list[torch.nn.Linear]:
    return [
        m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n.split(".")[-1] in TARGETS
    ]


def lora_rank_matching(model, dsee_trainable: int) -> int:
    """Smallest LoRA rank on TARGETS with at least `dsee_trainable` parameters."""
    per_rank = sum(m.in_features + m.out_features for m in target_matrices(model))
    return -(-dsee_trainable // per_rank)


def dsee_trainable_count(model) -> int:
    """DSEE's trainable count on TARGETS without building it: r (in + out) + N per matrix."""
    return sum(
        DSEE["r"] * (m.in_features + m.out_features) + DSEE["num_sparse"] for m in target_matrices(model)
    )


def prepare(method: str, model, seed: int = 0):
    """Apply `method` to `model`; returns (model, description)."""
    from peft import LoraConfig, get_peft_model

    from dsee_scale.adapters import DSEEConfig, inject

    if method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return model, "all parameters"
    if method.startswith("dsee_"):
        support = method.split("_", 1)[1]
        t0 = time.perf_counter()
        inject(model, DSEEConfig(**DSEE, support=support, target_modules=TARGETS, seed=seed))
        return model, f"DSEE r=8 N=64 q,v, {support} support ({time.perf_counter() - t0:.1f}s)"
    r = 8 if method == "lora_r8" else lora_rank_matching(model, dsee_trainable_count(model))
    model = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=TARGETS))
    return model, f"PEFT LoRA r={r} alpha={2 * r} q,v"


def run_method(method: str, steps: int, eval_blocks: int, seed: int = 0) -> dict:
    torch.manual_seed(seed)  # LoRA's initialisation; DSEE's is DSEEConfig.seed; data order is fixed
    model, tok = smollm2()
    corpus = stdlib_corpus(tok, BLOCK)
    from dsee_scale.data import micro_batch

    batches = [micro_batch(corpus.train, s, 0, 0, 1, BATCH, BATCH, seed=0)["input_ids"] for s in range(steps)]
    eval_ids = corpus.eval.rows(range(min(eval_blocks, len(corpus.eval))))["input_ids"]
    if method == "base":
        return {
            "method": method,
            "description": "no tuning",
            "trainable_parameters": 0,
            "heldout_perplexity": perplexity(model, eval_ids),
            "peak_rss_mb": peak_rss_mb(),
        }
    for p in model.parameters():
        p.requires_grad_(False)
    model, desc = prepare(method, model, seed)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"{method}: {desc}, {trainable:,} trainable", flush=True)
    t = tune(model, batches, steps, LR.get(method, ADAPTER_LR), log_every=10)
    return {
        "method": method,
        "description": desc,
        "trainable_parameters": trainable,
        "lr": LR.get(method, ADAPTER_LR),
        "train_losses": t["losses"],
        "step_seconds_median": statistics.median(t["step_seconds"][1:] or t["step_seconds"]),
        "optimizer_state_bytes": t["optimizer_state_bytes"],
        "heldout_perplexity": perplexity(model, eval_ids),
        "peak_rss_mb": peak_rss_mb(),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--eval-blocks", type=int, default=48)
    ap.add_argument(
        "--methods", default=",".join(METHODS), help="comma-separated subset of " + ",".join(METHODS)
    )
    ap.add_argument(
        "--seed",
        type=int,
        default=0,
        help="adapter initialisation seed (and DSEE's random support); the data are the same; "
        "seed > 0 writes quality_seed<N>.json",
    )
    ap.add_argument("--one", help=argparse.SUPPRESS)  # child: run this method, JSON to --to
    ap.add_argument("--to", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        Path(args.to).write_text(json.dumps(run_method(args.one, args.steps, args.eval_blocks, args.seed)))
        return
    methods = args.methods.split(",")
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        print(
            f"error: --methods: unknown {', '.join(unknown)} (allowed: {', '.join(METHODS)})", file=sys.stderr
        )
        sys.exit(2)

    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for i, m in enumerate(methods):
            print(f"[{i + 1}/{len(methods)}] {m} ({args.steps} steps)", flush=True)
            to = Path(tmp) / f"{m}.json"
            t0 = time.perf_counter()
            subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--one",
                    m,
                    "--to",
                    str(to),
                    "--steps",
                    str(args.steps),
                    "--eval-blocks",
                    str(args.eval_blocks),
                    "--seed",
                    str(args.seed),
                ],
                check=True,
                env=dict(os.environ),
            )
            rows[m] = json.loads(to.read_text())
            rows[m]["wall_seconds"] = time.perf_counter() - t0
            print(f"  -> held-out perplexity {rows[m]['heldout_perplexity']:.3f}", flush=True)
    result = {
        "model": "SmolLM2-135M-Instruct (GGUF dequantized to fp32)",
        "data": "Python standard library, packed blocks; train modules / held-out modules",
        "batch": [BATCH, BLOCK],
        "steps": args.steps,
        "seed": args.seed,
        "tokens_per_method": args.steps * BATCH * BLOCK,
        "eval": {
            "blocks": args.eval_blocks,
            "block_size": BLOCK,
            "stride": BLOCK,
            "tokens": args.eval_blocks * BLOCK,
        },
        "methods": rows,
        "aims": aims(rows),
    }
    write_result("quality" + (f"_seed{args.seed}" if args.seed else ""), result)
    for k, v in result["aims"].items():
        print(f"{k}: {v}")


def aims(rows: dict) -> dict:
    """The issue's quality targets, computed from the rows present."""
    out = {}
    ppl = {k: v["heldout_perplexity"] for k, v in rows.items()}
    dsee = {k: v for k, v in ppl.items() if k.startswith("dsee_")}
    if "dsee_grebsmo" in ppl and "lora_matched" in ppl:
        out["dsee_grebsmo_le_lora_matched"] = ppl["dsee_grebsmo"] <= ppl["lora_matched"]
    if "dsee_grebsmo" in ppl and "lora_r8" in ppl:
        out["dsee_grebsmo_le_lora_r8"] = ppl["dsee_grebsmo"] <= ppl["lora_r8"]
    if "dsee_grebsmo" in ppl and "full" in ppl:
        out["dsee_grebsmo_over_full"] = ppl["dsee_grebsmo"] / ppl["full"]
        out["dsee_grebsmo_within_2pct_of_full"] = ppl["dsee_grebsmo"] <= 1.02 * ppl["full"]
    if dsee:
        out["best_dsee_support"] = min(dsee, key=dsee.get)
    return out


if __name__ == "__main__":
    main()
