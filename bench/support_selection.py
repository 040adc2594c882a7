"""Support-selection time on SmolLM2-135M (q_proj and v_proj of all 30 layers).

    python bench/support_selection.py [--reference-matrices 2]

Ours (dsee_scale.adapters.support, float64, batched, QR of 5 columns) on all 60 matrices,
against the literal GreBsmo oracle of tests/reference_grebsmo.py on the first few q and v
matrices (the literal one takes seconds per matrix, so its total is extrapolated and labelled
so): time and support agreement. The gradient-informed support (RoSA's) is timed too: 8
calibration micro-batches of 4 x 256 standard-library tokens through the DSEE-injected model.
Also: the non-zeros of S per matrix at the relative threshold (fewer than N would fall back to
magnitude), the same matrices one by one (path independence),
svd / magnitude / random selection time and the support overlap between methods.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from dsee_scale.adapters import DSEEConfig, resolve_targets
from dsee_scale.adapters.inject import compute_supports, target_weight
from dsee_scale.adapters.support import complete_top_n, grebsmo_sparse

from common import load_file_module, smollm2, write_result

ROOT = Path(__file__).resolve().parents[1]
# the tests' literal GreBsmo oracle, read from its file (tests/ is no package)
grebsmo_reference = load_file_module(ROOT / "tests" / "reference_grebsmo.py").grebsmo_reference


def same(a: torch.Tensor, b: torch.Tensor) -> float:
    """Fraction of support positions two (2, N) index tensors share."""
    x = set((a[0] * 10**6 + a[1]).tolist())
    return len(x & set((b[0] * 10**6 + b[1]).tolist())) / a.shape[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument(
        "--reference-matrices",
        type=int,
        default=2,
        help="how many q and how many v matrices the literal oracle times",
    )
    ap.add_argument("--num-sparse", type=int, default=64)
    args = ap.parse_args()

    model, tok = smollm2()
    cfg = DSEEConfig(num_sparse=args.num_sparse, target_modules=["q_proj", "v_proj"])
    targets = resolve_targets(model, cfg)
    weights = {t.key: target_weight(model, t).detach().float() for t in targets}
    shapes = sorted({tuple(w.shape) for w in weights.values()})
    print(f"{len(targets)} matrices, shapes {shapes}", flush=True)

    nnz = {}
    for t in targets:
        S = grebsmo_sparse(weights[t.key][None], [t.seed(cfg.seed)], rounds=cfg.grebsmo_rounds)[0]
        nnz[t.key] = int(S.count_nonzero())
    print(
        f"non-zeros of S: min {min(nnz.values())}, median {sorted(nnz.values())[len(nnz) // 2]}", flush=True
    )
    timings, supports = {}, {}
    for method in ("grebsmo", "svd", "magnitude", "random"):
        cfg.support = method
        t0 = time.perf_counter()
        supports[method] = compute_supports(weights, targets, cfg)
        timings[method] = time.perf_counter() - t0
        print(f"{method:9s}: {timings[method]:.2f}s for {len(targets)} matrices", flush=True)

    # gradient (RoSA): needs the injected model and calibration batches, not just the weights
    import copy

    from dsee_scale.adapters import inject
    from dsee_scale.adapters.gradient import squared_gradient_scores, supports_from_scores

    from common import stdlib_batch

    g_model = copy.deepcopy(model).eval()
    inject(g_model, cfg, {t.key: torch.zeros(2, args.num_sparse, dtype=torch.long) for t in targets})
    ids = stdlib_batch(tok, 32, 256)
    t0 = time.perf_counter()
    scores = squared_gradient_scores(
        g_model, targets, [{"input_ids": ids[i : i + 4], "labels": ids[i : i + 4]} for i in range(0, 32, 4)],
        lambda b: g_model(**b, use_cache=False).loss,
    )  # fmt: skip
    supports["gradient"] = supports_from_scores(scores, cfg.n_for)
    timings["gradient"] = time.perf_counter() - t0
    print(f"gradient : {timings['gradient']:.2f}s for {len(targets)} matrices (8 micro-batches)", flush=True)

    cfg.support = "grebsmo"  # (the loop above left it at the last method)
    ref = {}
    for kind in ("q_proj", "v_proj"):
        keys = [t.key for t in targets if t.key.endswith(kind)][: args.reference_matrices]
        per, agree, agree64 = [], [], []
        for key in keys:
            t = next(t for t in targets if t.key == key)
            t0 = time.perf_counter()
            S, _ = grebsmo_reference(weights[key], seed=t.seed(cfg.seed))
            per.append(time.perf_counter() - t0)
            ours = supports["grebsmo"][key]
            agree.append(same(complete_top_n(S, weights[key], args.num_sparse), ours))
            # the same matrix alone (the launcher's path) against the batched library call
            alone = compute_supports({key: weights[key]}, [t], cfg)[key]
            agree64.append(same(alone, ours))
        ref[kind] = {
            "matrices_timed": len(keys),
            "seconds_per_matrix": sum(per) / len(per),
            "support_agreement_literal_vs_ours": agree,
            "support_agreement_one_by_one_vs_batched": agree64,
        }
        print(f"reference {kind}: {ref[kind]}", flush=True)
    n_q = sum(t.key.endswith("q_proj") for t in targets)
    n_v = len(targets) - n_q
    ref_total = ref["q_proj"]["seconds_per_matrix"] * n_q + ref["v_proj"]["seconds_per_matrix"] * n_v

    def overlap(a, b):
        return sum(same(a[k], b[k]) for k in a) / len(a)

    result = {
        "model": "SmolLM2-135M-Instruct",
        "matrices": len(targets),
        "shapes": shapes,
        "num_sparse": args.num_sparse,
        "grebsmo_rounds": cfg.grebsmo_rounds,
        "grebsmo_rank_fraction": cfg.grebsmo_rank_fraction,
        "grebsmo_relative_threshold": cfg.grebsmo_relative_threshold,
        "s_nonzeros_min": min(nnz.values()),
        "s_nonzeros_median": sorted(nnz.values())[len(nnz) // 2],
        "matrices_with_fewer_than_n_nonzeros": sum(v < args.num_sparse for v in nnz.values()),
        "seconds_all_matrices": timings,
        "grebsmo_target_seconds": 20.0,
        "grebsmo_meets_target": timings["grebsmo"] < 20.0,
        "reference_literal_grebsmo": ref,
        "reference_total_seconds_extrapolated": ref_total,
        "speedup_ours_over_reference": ref_total / timings["grebsmo"],
        "support_overlap_with_grebsmo": {
            m: overlap(supports["grebsmo"], supports[m]) for m in ("svd", "magnitude", "random", "gradient")
        },
    }
    print(
        f"GreBsmo all {len(targets)}: ours {timings['grebsmo']:.1f}s vs literal "
        f"~{ref_total:.0f}s (extrapolated): {result['speedup_ours_over_reference']:.1f}x"
    )
    write_result("support_selection", result)


if __name__ == "__main__":
    main()
