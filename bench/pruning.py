"""DSEE's second sparsity on SmolLM2-135M tuned on Python source: quality and speed.

    python bench/pruning.py [--tune-steps 40] [--retune-steps 10] [--eval-blocks 48]
                            [--ratios 0.1,0.2,0.3,0.4,0.5] [--only unstructured|structured]

One process, plain PyTorch (the distributed path is tested in tests/test_prune_launcher.py):
1. tune DSEE (r=8, N=64, q and v, GreBsmo) on the standard library's train modules;
2. unstructured pruning of all block projections at each ratio (global threshold) with
   magnitude |W|, DSEE's WABS |W + update| and Wanda-style |W| x ||x|| scores, held-out
   perplexity without and with re-tuning A, B, S (W frozen, pruned); the zero fraction of
   every matrix is kept for the per-layer heatmap;
3. structured: 1 of 3 q heads in every kv group + 25% of MLP channels, with DSEE head scores +
   weight channel scores, with activation scores for both, and 12.5 / 25 / 50% channels alone
   (activation), without and with re-tuning; DSEE's head scores per layer for the heatmap;
4. forward tokens/s of the merged dense model vs each merged structurally pruned one, same
   process, alternating.
Data: the framework's packed blocks of the standard library (bench.common.stdlib_corpus), batch 4
x 256; held-out perplexity: mean token loss over `--eval-blocks` held-out blocks of 256 tokens
(stride 256, no overlap), exponentiated.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from pathlib import Path

import torch

from dsee_scale.adapters import DSEEConfig, inject, merge_and_unload
from dsee_scale.pruning import apply_plan, channel_scores, collect_activations, head_scores, make_plan
from dsee_scale.pruning import unstructured as U

from common import perplexity, smollm2, stdlib_corpus, tune, write_result

ROOT = Path(__file__).resolve().parents[1]

BLOCK = 256


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
    ap.add_argument("--eval-blocks", type=int, default=48)
    ap.add_argument("--ratios", default="0.1,0.2,0.3,0.4,0.5", help="unstructured sparsities")
    ap.add_argument("--speed-rounds", type=int, default=3, help="alternating dense / pruned timings")
    ap.add_argument(
        "--channel-fractions",
        default="0.125,0.25,0.5",
        help="MLP channel shares removed in the channels-only structured runs",
    )
    ap.add_argument(
        "--only", choices=["unstructured", "structured"], help="run one part (written to pruning_<part>.json)"
    )
    args = ap.parse_args()
    torch.manual_seed(0)

    from dsee_scale.data import micro_batch

    base, tok = smollm2()
    corpus = stdlib_corpus(tok, BLOCK)
    train = [micro_batch(corpus.train, s, 0, 0, 1, 4, 4, seed=0)["input_ids"] for s in range(args.tune_steps)]
    eval_ids = corpus.eval.rows(range(min(args.eval_blocks, len(corpus.eval))))["input_ids"]
    calib = train[:4]
    res = {
        "model": "SmolLM2-135M-Instruct (fp32)",
        "block": BLOCK,
        "eval_blocks": args.eval_blocks,
        "eval_stride": BLOCK,
        "tune_steps": args.tune_steps,
        "retune_steps": args.retune_steps,
        "batch": [4, BLOCK],
    }
    res["base_perplexity"] = perplexity(base, eval_ids)
    print(f"base ppl {res['base_perplexity']:.3f}", flush=True)

    model = base
    inject(model, DSEEConfig(r=8, alpha=16, num_sparse=64, target_modules=["q_proj", "v_proj"]))
    res["tune_losses"] = tune(model, train, args.tune_steps, 4e-4)["losses"]
    res["tuned_perplexity"] = perplexity(model, eval_ids)
    print(f"tuned ppl {res['tuned_perplexity']:.3f}", flush=True)

    if args.only != "structured":
        res["unstructured"] = unstructured(model, train, eval_ids, calib, args)
    if args.only != "unstructured":
        acts = collect_activations(model, calib)
        res["head_scores_dsee"] = head_scores(model, "dsee").tolist()  # (layers, q heads)
        res["structured"] = {
            "dsee_heads+weight_channels": structured(model, train, eval_ids, args, "dsee", "weight", None),
            "activation_heads+activation_channels": structured(
                model, train, eval_ids, args, "activation", "activation", acts
            ),
        }
        for frac in map(float, args.channel_fractions.split(",")):
            res["structured"][f"activation_channels_only@{frac}"] = structured(
                model, train, eval_ids, args, None, "activation", acts, frac
            )
    write_result("pruning" + (f"_{args.only}" if args.only else ""), res)


def unstructured(model, train, eval_ids, calib, args) -> dict:
    out = {}
    norms = U.input_norms(model, U.prunable(model), calib)
    for ratio in map(float, args.ratios.split(",")):
        for score in ("magnitude", "wabs", "wanda"):
            m = copy.deepcopy(model)
            layers = U.prunable(m)
            keep = U.masks(U.scores(layers, score, norms), ratio, "global")
            U.apply_masks(layers, keep)
            row = {"pruned_ppl": perplexity(m, eval_ids)}
            tune(m, train[: args.retune_steps], args.retune_steps, 2e-4)
            row["retuned_ppl"] = perplexity(m, eval_ids)
            rep = U.sparsity_report(layers)
            row.update(
                weight_sparsity=rep["weight_sparsity"],
                merged_sparsity=rep["merged_sparsity"],
                per_matrix_weight_sparsity={k: v["weight"] for k, v in rep["per_matrix"].items()},
            )
            out[f"{score}@{ratio}"] = row
            print(
                f"{score}@{ratio}: pruned {row['pruned_ppl']:.3f} retuned {row['retuned_ppl']:.3f}",
                flush=True,
            )
            del m
    return out


def structured(
    model, train, eval_ids, args, head_score, channel_score, acts, channel_fraction: float = 0.25
) -> dict:
    """1 of 3 q heads per kv group (if head_score) and `channel_fraction` of MLP channels."""
    s = copy.deepcopy(model)
    H, KV = s.config.num_attention_heads, s.config.num_key_value_heads
    inter = s.config.intermediate_size
    hs = head_scores(s, head_score, acts) if head_score else None
    n_ch = int(inter * channel_fraction)
    plan = make_plan(s, hs, 1 if head_score else 0, channel_scores(s, channel_score, acts), n_ch)
    apply_plan(s, plan)
    st = {
        "removed": (
            f"1 of {H // KV} q heads per kv group ({H} -> {s.config.num_attention_heads}), "
            if head_score
            else "no heads, "
        )
        + f"{n_ch} of {inter} MLP channels",
        "channel_fraction": channel_fraction,
        "head_score": head_score,
        "channel_score": channel_score,
        "pruned_ppl": perplexity(s, eval_ids),
    }
    tune(s, train[: args.retune_steps], args.retune_steps, 2e-4)
    st["retuned_ppl"] = perplexity(s, eval_ids)
    dense = copy.deepcopy(model)
    merge_and_unload(dense)
    merge_and_unload(s)
    st["params_dense"] = sum(p.numel() for p in dense.parameters())
    st["params_pruned"] = sum(p.numel() for p in s.parameters())
    ids = eval_ids[:4]
    speeds = {"dense": [], "pruned": []}
    for _ in range(args.speed_rounds):  # alternate so noise hits both
        speeds["dense"].append(tokens_per_s(dense, ids))
        speeds["pruned"].append(tokens_per_s(s, ids))
    st["forward_tokens_per_s"] = {k: statistics.median(v) for k, v in speeds.items()}
    st["speedup"] = st["forward_tokens_per_s"]["pruned"] / st["forward_tokens_per_s"]["dense"]
    st["speed_target"] = 1.25
    print(
        f"structured {st['removed']}: {st['pruned_ppl']:.3f} -> {st['retuned_ppl']:.3f}, "
        f"{st['speedup']:.3f}x",
        flush=True,
    )
    return st


if __name__ == "__main__":
    main()
