"""DSEE vs PEFT LoRA: train-step time and memory on SmolLM2-135M, same batch, same process.

    python bench/adapter_step.py [--steps 8] [--batch 4] [--seq 256] [--quick]

DSEE: r=8, N=64 on q_proj and v_proj (support from GreBsmo), and the same at 1% density
(dsee.sparse_density 0.01: N = 3,318 per q_proj, 1,106 per v_proj). LoRA: r=8 on q_proj and
v_proj. Steps rotate over the models so machine noise hits all alike; ratios are of medians.
Memory: trainable parameters, optimizer-state bytes (AdamW: exp_avg + exp_avg_sq) and the bytes
autograd saves for backward in one step (activations), counted exactly with saved-tensor hooks.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

from dsee_scale.adapters import DSEEConfig, inject, trainable_parameter_count

from common import optimizer_bytes, peak_rss_mb, smollm2, stdlib_batch, write_result


def saved_bytes(model, ids) -> int:
    """Bytes of activations autograd keeps for backward (weights, frozen or not, excluded)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen, total = set(), 0

    def pack(t):
        nonlocal total
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if key[0] not in params and key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    model.zero_grad(set_to_none=True)
    return total


def step(model, opt, ids) -> float:
    t0 = time.perf_counter()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--quick", action="store_true", help="3 timed steps, batch 2 x 128")
    args = ap.parse_args()
    if args.quick:
        args.steps, args.batch, args.seq = 3, 2, 128

    from peft import LoraConfig, get_peft_model

    base, tok = smollm2()
    ids = stdlib_batch(tok, args.batch, args.seq)
    dsee_cfg = DSEEConfig(r=8, alpha=16, num_sparse=64, target_modules=["q_proj", "v_proj"])

    dsee = copy.deepcopy(base).train()
    t0 = time.perf_counter()
    targets = inject(dsee, dsee_cfg)
    inject_s = time.perf_counter() - t0
    dense1 = copy.deepcopy(base).train()
    inject(dense1, DSEEConfig(r=8, alpha=16, sparse_density=0.01, target_modules=["q_proj", "v_proj"]))
    lora = get_peft_model(
        copy.deepcopy(base),
        LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj"]),
    ).train()
    del base

    models = {"dsee": dsee, "lora": lora, "dsee_density_1pct": dense1}
    opts = {
        k: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.0)
        for k, m in models.items()
    }
    act = {k: saved_bytes(m, ids) for k, m in models.items()}
    for k in models:  # warm-up (allocator, optimizer state)
        step(models[k], opts[k], ids)
    times = {k: [] for k in models}
    names = list(models)
    for i in range(args.steps):
        for k in names[i % 3 :] + names[: i % 3]:  # rotate the order
            times[k].append(step(models[k], opts[k], ids))
        print(
            f"step {i + 1}/{args.steps}: " + "  ".join(f"{k} {v[-1]:.3f}s" for k, v in times.items()),
            flush=True,
        )

    med = {k: statistics.median(v) for k, v in times.items()}
    trainable = {k: trainable_parameter_count(m) for k, m in models.items()}
    opt_bytes = {k: optimizer_bytes(o) for k, o in opts.items()}
    n_targets = len(targets)
    result = {
        "model": "SmolLM2-135M-Instruct (GGUF Q4_1 dequantized to fp32)",
        "batch": [args.batch, args.seq],
        "dtype": "float32",
        "timed_steps": args.steps,
        "dsee": {"r": 8, "alpha": 16, "num_sparse": 64, "targets": n_targets, "support": "grebsmo"},
        "lora": {"r": 8, "alpha": 16, "targets": ["q_proj", "v_proj"]},
        "step_seconds_median": med,
        "step_seconds_all": times,
        "step_time_ratio_dsee_over_lora": med["dsee"] / med["lora"],
        "step_time_ratio_dsee_density_1pct_over_lora": med["dsee_density_1pct"] / med["lora"],
        "dsee_density_1pct_sparse_values": sum(
            p.numel() for n, p in dense1.named_parameters() if n.endswith("sparse_values")
        ),
        "trainable_parameters": trainable,
        "trainable_excess_over_lora_plus_N_per_matrix": trainable["dsee"]
        - (trainable["lora"] + 64 * n_targets),
        "optimizer_state_bytes": opt_bytes,
        "optimizer_state_ratio_dsee_over_lora": opt_bytes["dsee"] / opt_bytes["lora"],
        "saved_activation_bytes_per_step": act,
        "saved_activation_ratio_dsee_over_lora": act["dsee"] / act["lora"],
        "dsee_inject_seconds_including_support_selection": inject_s,
        "process_peak_rss_mb": peak_rss_mb(),
    }
    print(
        f"DSEE/LoRA step time: {result['step_time_ratio_dsee_over_lora']:.3f} "
        f"(dsee {med['dsee']:.3f}s, lora {med['lora']:.3f}s); trainable {trainable}; "
        f"optimizer bytes {opt_bytes}; activations {act}"
    )
    write_result("adapter_step", result)


if __name__ == "__main__":
    main()
