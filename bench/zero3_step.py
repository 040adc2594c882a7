"""Step time of the same DSEE model: plain PyTorch vs ZeRO-3 (1 rank) vs ZeRO-3 + CPU offload.

    python bench/zero3_step.py [--steps 6] [--batch 4] [--seq 256]

SmolLM2-135M, DSEE r=8 N=64 on q,v (one support computation shared by all three), fp32,
AdamW. The three engines live in one process and their steps alternate, so machine noise
hits all alike; ratios are of medians against plain PyTorch.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from pathlib import Path

import torch

from common import peak_rss_mb, stdlib_batch, write_result

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    args = ap.parse_args()

    import deepspeed

    from dsee_scale.adapters import DSEEConfig, inject, supports_of
    from dsee_scale.experiment import ExperimentConfig, TrainConfig
    from dsee_scale.models import ModelConfig, load_model, load_tokenizer
    from dsee_scale.training.distributed import setup_env
    from dsee_scale.training.engine import build_model, create_engine, deepspeed_config

    setup_env()
    deepspeed.init_distributed(verbose=False)
    dsee = DSEEConfig(r=8, alpha=16, num_sparse=64, target_modules=["q_proj", "v_proj"])
    mc = ModelConfig(preset="smollm2-135m")
    train = TrainConfig(
        max_steps=1000, batch_size=args.batch, micro_batch_size=args.batch, lr=1e-4, grad_clip=1.0
    )

    plain = load_model(mc).train()
    ids = stdlib_batch(load_tokenizer(mc), args.batch, args.seq)
    t0 = time.perf_counter()
    inject(plain, dsee)
    support_s = time.perf_counter() - t0
    supports = {k: v.clone() for k, v in supports_of(plain).items()}
    params = [p for p in plain.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)

    def plain_step():
        loss = plain(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    engines = {}
    for name, cfg in (("zero3", "zero3.json"), ("zero3_offload_cpu", "zero3_offload_cpu.json")):
        exp = ExperimentConfig(
            model=mc, dsee=copy.deepcopy(dsee), train=train, deepspeed=str(ROOT / "ds_configs" / cfg)
        )
        ds = deepspeed_config(exp, 1)
        model = build_model(exp, ds)
        inject(model, dsee, supports)
        engines[name] = create_engine(model, ds, exp, 1000)[0]

    def ds_step(engine):
        def run():
            loss = engine(input_ids=ids, labels=ids).loss
            engine.backward(loss)
            engine.step()

        return run

    runs = {"plain_pytorch": plain_step, **{k: ds_step(e) for k, e in engines.items()}}
    for f in runs.values():  # warm-up
        f()
    times = {k: [] for k in runs}
    for i in range(args.steps):
        for k, f in runs.items():
            t0 = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t0)
        print(
            f"step {i + 1}/{args.steps}: " + "  ".join(f"{k} {v[-1]:.2f}s" for k, v in times.items()),
            flush=True,
        )
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {
        "model": "SmolLM2-135M-Instruct (fp32)",
        "batch": [args.batch, args.seq],
        "dsee": {
            "r": 8,
            "num_sparse": 64,
            "targets": "q_proj, v_proj",
            "support": "grebsmo",
            "support_seconds": support_s,
        },
        "ranks": 1,
        "step_seconds_median": med,
        "step_seconds_all": times,
        "ratio_over_plain": {k: v / med["plain_pytorch"] for k, v in med.items()},
        "process_peak_rss_mb": peak_rss_mb(),
    }
    print("ratios over plain PyTorch:", {k: round(v, 3) for k, v in result["ratio_over_plain"].items()})
    write_result("zero3_step", result)


if __name__ == "__main__":
    main()
