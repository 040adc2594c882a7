"""The quality frontier: DSEE against LoRA at equal trainable parameters, with error bars.

    python bench/frontier.py                 # run what is missing, then write frontier.json
    python bench/frontier.py --report-only   # only (re)write bench/results/frontier.json
    python bench/frontier.py --cells stdlib:qv --seeds 0 --steps 4   # a smoke run
    python bench/frontier.py --cells stdlib:qv --precision fp32 --lr-from bf16 \
        --configs lora:4,dsee:2+2,lora:16,dsee:8+8    # fp32 training at bf16's best lrs

Model: SmolLM2-135M-Instruct (fp32 weights, fp32 AdamW state, evaluation in fp32). --precision:
the training forward under bf16 autocast (bf16, the default: fast on a CPU with AMX or on a
GPU) or in plain fp32 (fp32: on an AVX2-only CPU, bf16 matmuls are emulated and a step is
about 25x slower than fp32). Runs of the two precisions are kept apart (in the run key and
as separate cells of the summary, "stdlib:qv fp32"), never averaged or paired together.
Corpora (cells = corpus x target set):
  stdlib   Python standard-library source, split by module (bench/common.stdlib_corpus)
  man      this machine's manual pages rendered to text, split by page (common.manpages_corpus)
Target sets: qv = q_proj, v_proj; all = the seven linear layers of every block.
Methods at equal trainable parameters (alpha = 2r everywhere, the same scale):
  LoRA r           PEFT LoRA, r in --lora-ranks                       r (in + out) per matrix
  DSEE r+k         DSEE rank r plus a GreBsmo sparse part with as many non-zeros as k more
                   LoRA ranks: dsee.sparse_density = k sum(in + out) / sum(in x out) over the
                   targets, so DSEE r+k has LoRA (r + k)'s trainable count (to rounding).
Learning rate: every configuration of every cell is swept over --lrs at seed 0, the sweep
extended past an end while the best lr sits at that end; its other seeds run at its best lr.
--lr-from bf16 (with --precision fp32) skips the sweep: each configuration runs every seed at
the best lr of its recorded bf16 sweep (the summary says so: "lr from the bf16 sweep").
--configs runs a subset (lora:R, dsee:R+K from the grid below).
Seeds: each seed changes the adapter initialisation and the data order (the same order for
every method at that seed). GreBsmo's support is computed once per cell from the frozen W with
DSEEConfig.seed 0 (it depends on W, not on the training seed).
Comparison: DSEE r+k against LoRA r+k, per held-out block and seed (paired): the mean
difference of the block's mean token loss, a two-level bootstrap (seeds, then blocks) 95%
interval, and the perplexity ratio exp(difference).
Every run is appended to bench/results/frontier_runs.jsonl as it finishes; a rerun skips runs
already there (same cell, method, ranks, lr, seed, steps, batch, precision), so the bench can be stopped
and resumed. Each run records its corpus's fingerprint (a hash of its train and held-out token
ids): the manual pages, and so the man corpus, differ between machines, and a cell whose
recorded runs used another corpus is refused rather than resumed or paired across corpora;
`--series NAME` starts a separate series (frontier_NAME_runs.jsonl -> frontier_NAME.json), e.g. the
man cells on another machine's pages.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import random
import re
import statistics
import sys
import time
from pathlib import Path

import torch

from common import (
    RESULTS,
    block_losses,
    command,
    manpages_corpus,
    peak_rss_mb,
    smollm2,
    stdlib_corpus,
    tune,
    write_result,
)

TARGET_SETS = {
    "qv": ["q_proj", "v_proj"],
    "all": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
}
CORPORA = {"stdlib": stdlib_corpus, "man": manpages_corpus}
LORA_ANCHOR, DSEE_ANCHOR = 4, (2, 2)
DSEE_GRID = [(2, 2), (1, 3), (8, 8), (4, 12)]  # (r, k): matched to LoRA 4 and LoRA 16
BLOCK = 256
SUPPORT_CACHE = Path.home() / ".cache" / "dsee_scale"
SUPPORTS: dict[str, dict] = {}  # target set -> {density: {matrix: Omega}}


PRECISIONS = ("bf16", "fp32")


def usage_error(message: str):
    """A bad argument: one line on stderr, exit status 2."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def run_key(run: dict) -> tuple:
    """Runs recorded before --precision existed were all bf16-autocast runs."""
    keys = ("cell", "method", "r", "k", "lr", "seed", "steps", "batch")
    return (*(run[k] for k in keys), run.get("precision", "bf16"))


def all_configs(lora_ranks: list[int]) -> list[tuple[str, int, int]]:
    return [("lora", r, 0) for r in lora_ranks] + [("dsee", r, k) for r, k in DSEE_GRID]


def config_name(c: tuple[str, int, int]) -> str:
    return f"lora:{c[1]}" if c[0] == "lora" else f"dsee:{c[1]}+{c[2]}"


def result_name(series: str) -> str:
    """The summary's name (results/NAME.json); its runs go to results/NAME_runs.jsonl."""
    return f"frontier_{series}" if series else "frontier"


def runs_file(series: str) -> Path:
    return RESULTS / f"{result_name(series)}_runs.jsonl"


def done_runs(path: Path) -> dict[tuple, dict]:
    if not path.exists():
        return {}
    runs = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {run_key(r): r for r in runs}


def linear_dims(model, targets: list[str]) -> list[tuple[int, int]]:
    return [
        (m.out_features, m.in_features)
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and n.split(".")[-1] in targets
    ]


def density_for(model, targets: list[str], k: int) -> float:
    dims = linear_dims(model, targets)
    return k * sum(o + i for o, i in dims) / sum(o * i for o, i in dims)


def grebsmo_supports(model, targets: list[str], densities: list[float]) -> dict[float, dict]:
    """GreBsmo's S once per matrix (as `inject` computes it: DSEEConfig.seed 0, float64, one
    thread, same-shape batches), then Omega = complete_top_n for each density."""
    from dsee_scale.adapters import DSEEConfig
    from dsee_scale.adapters.inject import resolve_targets, target_weight
    from dsee_scale.adapters.support import complete_top_n, grebsmo_sparse, one_cpu_thread

    cfg = DSEEConfig(target_modules=targets, seed=0)
    ts = resolve_targets(model, cfg)
    out: dict[float, dict] = {d: {} for d in densities}
    t0 = time.perf_counter()
    with one_cpu_thread():
        for i, t in enumerate(ts):
            w = target_weight(model, t).detach()
            S = grebsmo_sparse(
                w[None],
                [t.seed(0)],
                rounds=cfg.grebsmo_rounds,
                threshold=cfg.grebsmo_relative_threshold,
                rank_fraction=cfg.grebsmo_rank_fraction,
            )[0]
            for d in densities:
                out[d][t.key] = complete_top_n(S, w, DSEEConfig(sparse_density=d).n_for(*w.shape))
            if (i + 1) % 20 == 0:
                print(f"  GreBsmo {i + 1}/{len(ts)} matrices ({time.perf_counter() - t0:.0f}s)", flush=True)
    print(f"  GreBsmo supports for {len(ts)} matrices in {time.perf_counter() - t0:.0f}s", flush=True)
    return out


def prepare(model, method: str, r: int, k: int, targets: list[str], seed: int, supports: dict | None):
    from peft import LoraConfig, get_peft_model

    from dsee_scale.adapters import DSEEConfig, inject

    for p in model.parameters():
        p.requires_grad_(False)
    torch.manual_seed(seed)
    if method == "lora":
        return get_peft_model(
            model, LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=targets)
        )
    d = density_for(model, targets, k)
    inject(model, DSEEConfig(r=r, alpha=2 * r, sparse_density=d, target_modules=targets, seed=seed), supports)
    return model


class Cell:
    """One corpus x target set: its data, its supports and its runs."""

    def __init__(self, name: str, base, tok, args):
        self.name, self.base, self.args = name, base, args
        corpus_name, tset = name.split(":")
        self.targets = TARGET_SETS[tset]
        corpus = CORPORA[corpus_name](tok, BLOCK)
        self.eval_ids = corpus.eval.rows(range(min(args.eval_blocks, len(corpus.eval))))["input_ids"]
        self.train = corpus.train
        self.corpus = corpus_fingerprint(self.eval_ids, self.train)

    def batches(self, seed: int) -> list:
        from dsee_scale.data import micro_batch

        b = self.args.batch
        return [
            micro_batch(self.train, s, 0, 0, 1, b, b, seed=seed)["input_ids"] for s in range(self.args.steps)
        ]

    def supports(self) -> dict:
        """GreBsmo supports for DSEE_GRID's densities, shared by the cells of one target set
        (the same frozen W) and kept on disk, so a resumed run does not recompute them."""
        tset = self.name.split(":")[1]
        if tset not in SUPPORTS:
            ds = [density_for(self.base, self.targets, k) for _, k in DSEE_GRID]
            path = SUPPORT_CACHE / f"frontier_supports_{tset}.pt"
            cached = torch.load(path) if path.exists() else None
            if cached is None or sorted(cached) != sorted(ds):
                cached = grebsmo_supports(self.base, self.targets, ds)
                path.parent.mkdir(parents=True, exist_ok=True)
                torch.save(cached, path.with_suffix(".tmp"))
                path.with_suffix(".tmp").rename(path)
            SUPPORTS[tset] = cached
        return SUPPORTS[tset]

    def run(self, method: str, r: int, k: int, lr: float, seed: int, done: dict) -> dict:
        a = self.args
        spec = dict(cell=self.name, method=method, r=r, k=k, lr=lr, seed=seed, steps=a.steps, batch=a.batch,
                    precision=a.precision)  # fmt: skip
        if run_key(spec) in done:
            return done[run_key(spec)]
        spec["corpus"] = self.corpus
        model = copy.deepcopy(self.base)
        sup = None
        if method == "dsee":
            sup = self.supports()[density_for(self.base, self.targets, k)]
        t0 = time.perf_counter()
        model = prepare(model, method, r, k, self.targets, seed, sup)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        bf16 = a.precision == "bf16"
        t = tune(model, self.batches(seed), a.steps, lr, bf16_autocast=bf16) if a.steps else {"losses": []}
        losses = block_losses(model, self.eval_ids)
        run = dict(
            spec,
            lr_from=a.lr_from,
            trainable=trainable,
            density=density_for(self.base, self.targets, k) if method == "dsee" else 0.0,
            eval_loss=statistics.fmean(losses),
            heldout_perplexity=math.exp(statistics.fmean(losses)),
            block_losses=losses,
            train_losses=t["losses"],
            seconds=time.perf_counter() - t0,
            command=command(),
        )
        with a.runs_file.open("a") as f:
            f.write(json.dumps(run) + "\n")
        done[run_key(run)] = run
        label = f"LoRA r={r}" if method == "lora" else f"DSEE {r}+{k}"
        print(
            f"[{self.name} {a.precision}] {label} lr {lr:g} seed {seed}: {trainable:,} trainable, "
            f"held-out ppl {run['heldout_perplexity']:.4f} ({run['seconds']:.0f}s)",
            flush=True,
        )
        del model
        return run

    def best_lr(self, method: str, r: int, k: int, done: dict) -> float:
        """The best of --lrs at seed 0; where the best is at an end of the sweep, the sweep
        extends past that end (x or / the sweep's ratio) until the best is inside it."""
        lrs = sorted(self.args.lrs)
        ratio = lrs[1] / lrs[0] if len(lrs) > 1 else 3.0
        loss = {lr: self.run(method, r, k, lr, 0, done)["eval_loss"] for lr in lrs}
        for _ in range(3):
            best = min(loss, key=loss.get)
            if len(loss) < 2 or min(loss) < best < max(loss):
                break
            nxt = float(f"{(best * ratio if best == max(loss) else best / ratio):.3g}")
            loss[nxt] = self.run(method, r, k, nxt, 0, done)["eval_loss"]
        return min(loss, key=loss.get)

    def recorded_best_lr(self, c: tuple[str, int, int], precision: str, done: dict) -> float:
        """The best lr of c's recorded seed-0 sweep at `precision` (for --lr-from)."""
        a = self.args
        sweep = {
            run["lr"]: run["eval_loss"]
            for key, run in done.items()
            if key == (self.name, *c, run["lr"], 0, a.steps, a.batch, precision)
        }
        if not sweep:
            usage_error(
                f"--lr-from {precision}: no recorded {precision} sweep of {config_name(c)} in "
                f"{self.name} at {a.steps} steps x batch {a.batch} (run it with --precision {precision})"
            )
        return min(sweep, key=sweep.get)

    def all_runs(self, done: dict) -> None:
        a = self.args
        best = {}
        for c in a.configs:  # every configuration at its own best lr (seed 0), then the other seeds
            if a.lr_from == "sweep":
                best[c] = self.best_lr(*c, done)
            else:
                best[c] = self.recorded_best_lr(c, a.lr_from, done)
            print(f"[{self.name} {a.precision}] {config_name(c)}: best lr {best[c]:g} ({a.lr_from})",
                  flush=True)  # fmt: skip
        for seed in a.seeds:
            for c in a.configs:
                self.run(c[0], c[1], c[2], best[c], seed, done)


def corpus_fingerprint(eval_ids: torch.Tensor, train) -> str:
    """A hash of a cell's held-out ids and every train block's ids (train: data.Blocks)."""
    h = hashlib.sha1(eval_ids.numpy().tobytes())
    for start in range(0, len(train), 4096):
        h.update(train.rows(range(start, min(start + 4096, len(train))))["input_ids"].numpy().tobytes())
    return h.hexdigest()[:16]


BASE_SPEC = dict(method="base", r=0, k=0, lr=0.0, seed=0, steps=0, batch=0)


def check_corpus(cell: Cell, done: dict) -> None:
    """Refuse (exit 2) a cell whose recorded runs used another corpus than this machine's. Runs
    recorded before fingerprints existed are checked by the untuned model's held-out block
    losses, which are the held-out set's fingerprint."""
    recorded = {r.get("corpus") for r in done.values() if r["cell"] == cell.name}
    if not recorded or cell.corpus in recorded:
        return
    if recorded - {None}:
        differ = f"fingerprint {', '.join(sorted(recorded - {None}))} recorded, {cell.corpus} here"
    else:
        base = done.get(run_key(dict(BASE_SPEC, cell=cell.name)))
        if base is None:
            return
        losses = block_losses(cell.base, cell.eval_ids)
        if len(losses) == len(base["block_losses"]) and all(
            abs(a - b) < 1e-3 for a, b in zip(losses, base["block_losses"])
        ):
            return
        ppl = math.exp(statistics.fmean(losses))
        differ = f"untuned held-out ppl {ppl:.3f} here, {base['heldout_perplexity']:.3f} recorded"
    usage_error(
        f"--cells {cell.name}: this machine's corpus is not the one its runs in {cell.args.runs_file.name} "
        f"used ({differ}); start a separate series here with --series NAME"
    )


def base_run(cell: Cell, done: dict) -> dict:
    """The untuned model on this cell's held-out blocks (steps 0)."""
    check_corpus(cell, done)
    spec = dict(BASE_SPEC, cell=cell.name)
    if run_key(spec) in done:
        return done[run_key(spec)]
    losses = block_losses(cell.base, cell.eval_ids)
    run = dict(spec, corpus=cell.corpus, trainable=0, density=0.0, eval_loss=statistics.fmean(losses),
               heldout_perplexity=math.exp(statistics.fmean(losses)), block_losses=losses,
               command=command())  # fmt: skip
    with cell.args.runs_file.open("a") as f:
        f.write(json.dumps(run) + "\n")
    done[run_key(run)] = run
    print(f"[{cell.name}] base: held-out ppl {run['heldout_perplexity']:.4f}", flush=True)
    return run


# -- analysis --------------------------------------------------------------------------------
def paired(a: list[dict], b: list[dict], reps: int = 4000) -> dict:
    """Mean of (a - b) block losses over seeds present in both, with a two-level bootstrap 95%
    interval (resample seeds, then blocks with the same indices for every seed)."""
    sa, sb = {x["seed"]: x["block_losses"] for x in a}, {x["seed"]: x["block_losses"] for x in b}
    seeds = sorted(set(sa) & set(sb))
    diffs = [[p - q for p, q in zip(sa[s], sb[s], strict=True)] for s in seeds]
    n = len(diffs[0])
    mean = statistics.fmean(v for d in diffs for v in d)
    rng = random.Random(0)
    boots = []
    for _ in range(reps):
        ss = [diffs[rng.randrange(len(seeds))] for _ in seeds]
        idx = [rng.randrange(n) for _ in range(n)]
        boots.append(statistics.fmean(d[i] for d in ss for i in idx))
    boots.sort()
    lo, hi = boots[int(0.025 * reps)], boots[int(0.975 * reps) - 1]
    per_seed = [statistics.fmean(d) for d in diffs]
    return {
        "seeds": seeds,
        "blocks": n,
        "mean_loss_difference": mean,
        "ci95": [lo, hi],
        "per_seed": per_seed,
        "perplexity_ratio": math.exp(mean),
        "perplexity_ratio_ci95": [math.exp(lo), math.exp(hi)],
        "verdict": ("DSEE better" if hi < 0 else "LoRA better" if lo > 0 else "no difference beyond noise")
        + (
            ""
            if len(seeds) >= 3
            else f" (on {len(seeds)} seed(s): block noise only, seed noise not measured)"
        ),
    }


def summarize(runs: list[dict], cells: list[str], seeds: list[int]) -> dict:
    """One summary per cell and training precision: "stdlib:qv" (bf16) and "stdlib:qv fp32"."""
    out: dict = {}
    for cell in cells:
        for precision in PRECISIONS:
            s = summarize_cell([r for r in runs if r["cell"] == cell], precision, seeds)
            if s:
                out[cell if precision == "bf16" else f"{cell} {precision}"] = s
    return out


def summarize_cell(all_rs: list[dict], precision: str, seeds: list[int]) -> dict | None:
    base = next((r for r in all_rs if r["method"] == "base"), None)
    rs = [r for r in all_rs if r["method"] != "base" and r.get("precision", "bf16") == precision]
    if not rs:
        return None
    sweep: dict[tuple, dict] = {}  # (method, r, k) -> lr -> perplexity at seed 0
    for x in rs:
        if x["seed"] == 0:
            sweep.setdefault((x["method"], x["r"], x["k"]), {})[x["lr"]] = x["heldout_perplexity"]
    best = {c: min(v, key=v.get) for c, v in sweep.items()}
    points = []
    groups: dict[tuple, list[dict]] = {}
    for x in rs:
        c = (x["method"], x["r"], x["k"])
        if x["lr"] == best[c] and x["seed"] in seeds:
            groups.setdefault(c, []).append(x)
    for (method, r, k), g in sorted(groups.items()):
        ppl = [x["heldout_perplexity"] for x in g]
        label = f"LoRA r={r}" if method == "lora" else f"DSEE {r}+{k}"
        points.append({
            "method": method, "r": r, "k": k, "label": label,
            "trainable": g[0]["trainable"], "density": g[0]["density"], "lr": g[0]["lr"],
            "lr_sweep": dict(sorted(sweep[(method, r, k)].items())),
            "lr_bracketed": min(sweep[(method, r, k)]) < g[0]["lr"] < max(sweep[(method, r, k)]),
            # a run first made at another precision's best lr, later swept here, is the sweep's
            "lr_from": "sweep" if len(sweep[(method, r, k)]) > 1 else g[0].get("lr_from", "sweep"),
            "seeds": sorted(x["seed"] for x in g), "perplexity_mean": statistics.fmean(ppl),
            "perplexity_sd": statistics.stdev(ppl) if len(ppl) > 1 else None,
            "seconds_mean": statistics.fmean(x["seconds"] for x in g),
        })  # fmt: skip
    comparisons = []
    for (method, r, k), g in sorted(groups.items()):
        if method == "dsee" and ("lora", r + k, 0) in groups:
            c = paired(g, groups[("lora", r + k, 0)])
            comparisons.append({"dsee": f"DSEE {r}+{k}", "lora": f"LoRA r={r + k}", **c})
    return {
        "precision": precision,
        "base_perplexity": base["heldout_perplexity"] if base else None,
        "points": points,
        "paired": comparisons,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cells", default="stdlib:qv,man:qv,stdlib:all,man:all")
    ap.add_argument("--steps", type=int, default=36)
    ap.add_argument("--batch", type=int, default=2, help="rows of 256 tokens per step")
    ap.add_argument("--eval-blocks", type=int, default=32)
    ap.add_argument("--lrs", default="1e-3,3e-3,1e-2")
    ap.add_argument("--lora-ranks", default="2,4,8,16,32")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--precision", choices=PRECISIONS, default="bf16", help="the training forward")
    ap.add_argument("--configs", default="", help="a subset, e.g. lora:4,dsee:2+2 (default: all)")
    ap.add_argument("--lr-from", choices=("sweep", *PRECISIONS), default="sweep",
                    help="sweep here, or the best lr of that precision's recorded sweep")  # fmt: skip
    ap.add_argument("--series", default="", help="a separate series of runs (default: the main one)")
    ap.add_argument("--report-only", action="store_true")
    args = ap.parse_args()
    if args.series and not re.fullmatch(r"[a-z0-9_-]+", args.series):
        usage_error(f"--series {args.series!r}: allowed are lower-case letters, digits, '_' and '-'")
    args.runs_file = runs_file(args.series)
    args.lrs = [float(x) for x in args.lrs.split(",")]
    args.lora_ranks = [int(x) for x in args.lora_ranks.split(",")]
    args.seeds = [int(x) for x in args.seeds.split(",")]
    known = {config_name(c): c for c in all_configs(args.lora_ranks)}
    wanted = [x for x in args.configs.split(",") if x]
    unknown = [x for x in wanted if x not in known]
    if unknown:
        usage_error(f"--configs: unknown {', '.join(unknown)} (allowed: {', '.join(known)})")
    args.configs = [known[x] for x in wanted] or list(known.values())
    if args.lr_from == args.precision:
        usage_error(f"--lr-from {args.lr_from}: that is --precision itself (use sweep)")
    cells = args.cells.split(",")
    bad = [c for c in cells if c.split(":")[0] not in CORPORA or c.partition(":")[2] not in TARGET_SETS]
    if bad:
        usage_error(f"--cells: unknown {', '.join(bad)} (corpus:targets, corpus in "
                         f"{', '.join(CORPORA)}, targets in {', '.join(TARGET_SETS)})")  # fmt: skip
    RESULTS.mkdir(parents=True, exist_ok=True)
    done = done_runs(args.runs_file)
    t0 = time.perf_counter()
    if not args.report_only:
        base, tok = smollm2()
        for p in base.parameters():
            p.requires_grad_(False)
        for name in cells:
            cell = Cell(name, base, tok, args)
            base_run(cell, done)
            cell.all_runs(done)
    runs = [r for r in done.values() if r["steps"] in (0, args.steps) and r["batch"] in (0, args.batch)]
    write_result(
        result_name(args.series),
        {
            "model": "SmolLM2-135M-Instruct (GGUF dequantized to fp32; training under bf16 autocast, "
            "or in fp32 in the cells named '... fp32')",
            "steps": args.steps,
            "batch": [args.batch, BLOCK],
            "tokens_per_run": args.steps * args.batch * BLOCK,
            "eval": {"blocks": args.eval_blocks, "block_size": BLOCK},
            "lrs": args.lrs,
            "lora_ranks": args.lora_ranks,
            "dsee_grid": [f"{r}+{k}" for r, k in DSEE_GRID],
            "seeds": args.seeds,
            "cells": summarize(runs, cells, args.seeds),
            "cells_requested": cells,
            "runs_file": str(args.runs_file.relative_to(RESULTS.parent.parent)),
            # every invocation that made these runs (runs recorded before commands were kept have none)
            "run_commands": list(dict.fromkeys(r["command"] for r in runs if r.get("command"))),
            "wall_seconds_this_invocation": time.perf_counter() - t0,
            "peak_rss_mb": peak_rss_mb(),
        },
    )


if __name__ == "__main__":
    main()
