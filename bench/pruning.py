"""DSEE's second sparsity on SmolLM2-135M tuned on Python source: quality and speed.

    python bench/pruning.py [--tune-steps 40] [--retune-steps 10] [--eval-blocks 24]

One process, plain PyTorch (the distributed path is tested in tests/test_prune_launcher.py):
1. tune DSEE (r=8, N=64, q and v, GreBsmo) on the standard library's train modules;
2. unstructured pruning of all block projections at 30% and 50% (global threshold) with
   magnitude |W|, DSEE's WABS |W + update| and Wanda-style |W| x ||x|| scores, held-out
   perplexity without and with re-tuning A, B, S (W frozen, pruned);
3. structured: 1 of 3 q heads in every kv group + 25% of MLP channels, with DSEE head scores +
   weight channel scores, with activation scores for both, and 25% channels alone (activation),
   without and with re-tuning;
4. forward tokens/s of the merged dense model vs the merged structurally pruned one, same process.
Held-out perplexity: mean token loss over `--eval-blocks` blocks of 256 tokens from held-out
modules (stride 256, no overlap), exponentiated.
"""
from __future__ import annotations

import argparse
import copy
import math
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.common import smollm2, stdlib_batch, write_result  # noqa: E402
from dsee_scale.adapters import DSEEConfig, inject, merge_and_unload  # noqa: E402
from dsee_scale.pruning import (apply_plan, channel_scores, collect_activations, head_scores,  # noqa: E402
                                make_plan)
from dsee_scale.pruning import unstructured as U  # noqa: E402

BLOCK = 256


def tune(model, batches, steps: int, lr: float) -> list[float]:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    model.train()
    losses = []
    for s in range(steps):
        ids = batches[s % len(batches)]
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    model.eval()
    return losses


@torch.no_grad()
def perplexity(model, eval_ids: torch.Tensor) -> float:
    model.eval()
    total = 0.0
    for i in range(0, eval_ids.shape[0], 4):
        ids = eval_ids[i:i + 4]
        total += model(input_ids=ids, labels=ids).loss.item() * ids.shape[0]
    return math.exp(total / eval_ids.shape[0])


@torch.no_grad()
def tokens_per_s(model, ids: torch.Tensor, reps: int = 5) -> float:
    model.eval()
    model(input_ids=ids)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        model(input_ids=ids)
        times.append(time.perf_counter() - t0)
    return ids.numel() / statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tune-steps", type=int, default=40)
    ap.add_argument("--retune-steps", type=int, default=10)
    ap.add_argument("--eval-blocks", type=int, default=24)
    ap.add_argument("--only", choices=["unstructured", "structured"],
                    help="run one part (written to pruning_<part>.json)")
    args = ap.parse_args()
    torch.manual_seed(0)

    base, tok = smollm2()
    train = [stdlib_batch(tok, 4, BLOCK, "train", seed=s) for s in range(args.tune_steps)]
    eval_ids = stdlib_batch(tok, args.eval_blocks, BLOCK, "heldout", seed=0)
    calib = train[:4]
    res = {"model": "SmolLM2-135M-Instruct (fp32)", "block": BLOCK, "eval_blocks": args.eval_blocks,
           "tune_steps": args.tune_steps, "retune_steps": args.retune_steps, "batch": [4, BLOCK]}
    res["base_perplexity"] = perplexity(base, eval_ids)
    print(f"base ppl {res['base_perplexity']:.3f}", flush=True)

    model = base
    inject(model, DSEEConfig(r=8, alpha=16, num_sparse=64, target_modules=["q_proj", "v_proj"]))
    res["tune_losses"] = tune(model, train, args.tune_steps, 4e-4)
    res["tuned_perplexity"] = perplexity(model, eval_ids)
    print(f"tuned ppl {res['tuned_perplexity']:.3f}", flush=True)

    if args.only != "structured":
        res["unstructured"] = unstructured(model, train, eval_ids, calib, args)
    if args.only != "unstructured":
        acts = collect_activations(model, calib)
        res["structured"] = {
            "dsee_heads+weight_channels": structured(model, train, eval_ids, args, "dsee", "weight", None),
            "activation_heads+activation_channels": structured(model, train, eval_ids, args,
                                                               "activation", "activation", acts),
            "activation_channels_only": structured(model, train, eval_ids, args, None, "activation", acts),
        }
    write_result("pruning" + (f"_{args.only}" if args.only else ""), res)


def unstructured(model, train, eval_ids, calib, args) -> dict:
    out = {}
    norms = U.input_norms(model, U.prunable(model), calib)
    for ratio in (0.3, 0.5):
        for score in ("magnitude", "wabs", "wanda"):
            m = copy.deepcopy(model)
            layers = U.prunable(m)
            keep = U.masks(U.scores(layers, score, norms), ratio, "global")
            U.apply_masks(layers, keep)
            row = {"pruned_ppl": perplexity(m, eval_ids)}
            tune(m, train[: args.retune_steps], args.retune_steps, 2e-4)
            row["retuned_ppl"] = perplexity(m, eval_ids)
            rep = U.sparsity_report(layers)
            row.update(weight_sparsity=rep["weight_sparsity"], merged_sparsity=rep["merged_sparsity"])
            out[f"{score}@{ratio}"] = row
            print(f"{score}@{ratio}: {row}", flush=True)
            del m
    return out


def structured(model, train, eval_ids, args, head_score, channel_score, acts) -> dict:
    """1 of 3 q heads per kv group (if head_score) and 25% of MLP channels, scored as given."""
    s = copy.deepcopy(model)
    H, KV = s.config.num_attention_heads, s.config.num_key_value_heads
    inter = s.config.intermediate_size
    hs = head_scores(s, head_score, acts) if head_score else None
    plan = make_plan(s, hs, 1 if head_score else 0, channel_scores(s, channel_score, acts), inter // 4)
    apply_plan(s, plan)
    st = {"removed": (f"1 of {H // KV} q heads per kv group ({H} -> {s.config.num_attention_heads}), "
                      if head_score else "no heads, ") + f"{inter // 4} of {inter} MLP channels",
          "head_score": head_score, "channel_score": channel_score,
          "pruned_ppl": perplexity(s, eval_ids)}
    tune(s, train[: args.retune_steps], args.retune_steps, 2e-4)
    st["retuned_ppl"] = perplexity(s, eval_ids)
    dense = copy.deepcopy(model)
    merge_and_unload(dense)
    merge_and_unload(s)
    st["params_dense"] = sum(p.numel() for p in dense.parameters())
    st["params_pruned"] = sum(p.numel() for p in s.parameters())
    ids = eval_ids[:4]
    speeds = {"dense": [], "pruned": []}
    for _ in range(3):  # alternate so noise hits both
        speeds["dense"].append(tokens_per_s(dense, ids))
        speeds["pruned"].append(tokens_per_s(s, ids))
    st["forward_tokens_per_s"] = {k: statistics.median(v) for k, v in speeds.items()}
    st["speedup"] = st["forward_tokens_per_s"]["pruned"] / st["forward_tokens_per_s"]["dense"]
    st["speed_target"] = 1.25
    print(f"structured: {st}", flush=True)
    return st


if __name__ == "__main__":
    main()
