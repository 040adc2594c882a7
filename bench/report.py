"""bench/results/*.json -> a Markdown report with tables and PNG plots (matplotlib).

    python bench/report.py [--results bench/results] [--out bench/REPORT.md]

Only what the JSON files hold is reported; a missing benchmark is listed as not run. Each
figure and table names the machine, the library versions and the exact command that made it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MATRICES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


BASELINES = ("plain_copy", "deepspeed_zero_to_fp32")  # measured beside scale_7b's export


def provenance(res: dict) -> str:
    e = res.get("environment", {})
    return (
        f"{e.get('cpus')} CPUs {e.get('machine')}, torch {e.get('torch')}, deepspeed "
        f"{e.get('deepspeed')}, transformers {e.get('transformers')}, peft {e.get('peft')}; "
        f"{e.get('date')}; `{e.get('command')}`"
    )


def fig_footer(fig, res: dict) -> float:
    """Write the provenance under the axes; return the share of the figure's height it takes."""
    width_in, height_in = fig.get_size_inches()
    lines = textwrap.wrap(provenance(res).replace("`", ""), width=int(width_in * 24))
    fig.text(0.01, 0.005, "\n".join(lines), fontsize=6, color="0.35", va="bottom")
    return (len(lines) * 6 * 1.25 + 4) / (height_in * 72)


def table(header: list[str], rows: list[list]) -> str:
    def cell(v):
        if isinstance(v, float):
            return f"{v:,.3f}" if abs(v) < 1e5 else f"{v:.3g}"
        if isinstance(v, int):
            return f"{v:,}"
        return "" if v is None else str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


class Report:
    def __init__(self, results: Path, out: Path):
        import matplotlib

        matplotlib.use("Agg")
        self.results, self.out = results, out
        self.plots = results / "plots"
        self.plots.mkdir(parents=True, exist_ok=True)
        self.parts: list[str] = []
        self.data = {p.stem: json.loads(p.read_text()) for p in sorted(results.glob("*.json"))}

    def rel(self, p: Path) -> str:
        return os.path.relpath(p, self.out.parent)

    def save(self, fig, name: str, res: dict, title: str) -> None:
        import matplotlib.pyplot as plt

        fig.tight_layout(rect=(0, fig_footer(fig, res), 1, 1))
        path = self.plots / f"{name}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        self.parts.append(f"![{title}]({self.rel(path)})\n\n*{title}. {provenance(res)}*\n")

    def add(self, text: str) -> None:
        self.parts.append(text + "\n")

    # -- sections ---------------------------------------------------------------------------
    def quality(self) -> None:
        import matplotlib.pyplot as plt

        q = self.data.get("quality")
        self.add("## Quality on SmolLM2-135M: DSEE vs LoRA vs full fine-tuning")
        if q is None:
            self.add("Not run (`python bench/quality.py`).")
            return
        ev = q["eval"]
        self.add(
            f"{q['model']}; {q['data']}; batch {q['batch'][0]} x {q['batch'][1]}, "
            f"{q['steps']} steps = {q['tokens_per_method']:,} training tokens for every method; "
            f"held-out perplexity over {ev['blocks']} blocks of {ev['block_size']} tokens, "
            f"stride {ev['stride']} ({ev['tokens']:,} tokens).\n"
        )
        rows = []
        for k, m in q["methods"].items():
            rows.append(
                [
                    k,
                    m["description"],
                    m["trainable_parameters"],
                    m["heldout_perplexity"],
                    m.get("optimizer_state_bytes"),
                    m.get("step_seconds_median"),
                    m["peak_rss_mb"],
                ]
            )
        self.add(
            table(
                [
                    "method",
                    "what",
                    "trainable params",
                    "held-out ppl",
                    "optimizer state bytes",
                    "step s (median)",
                    "peak RSS MB",
                ],
                rows,
            )
        )
        self.seed_spread(q)
        tuned = {k: m for k, m in q["methods"].items() if m.get("train_losses")}
        if tuned:
            fig, ax = plt.subplots(figsize=(7, 4))
            for k, m in tuned.items():
                ls = m["train_losses"]
                w = min(5, len(ls))
                smooth = [
                    sum(ls[max(0, i - w + 1) : i + 1]) / len(ls[max(0, i - w + 1) : i + 1])
                    for i in range(len(ls))
                ]
                ax.plot(range(1, len(ls) + 1), smooth, label=k, lw=1.2)
            ax.set_xlabel("step"), ax.set_ylabel(f"train loss (moving mean of {min(5, len(ls))})")
            ax.legend(fontsize=7)
            self.save(fig, "loss_curves", q, "Training loss, SmolLM2-135M on Python source")
        fig, ax = plt.subplots(figsize=(7, 4))
        for k, m in q["methods"].items():
            if m["trainable_parameters"]:
                ax.scatter(m["trainable_parameters"], m["heldout_perplexity"], label=k)
        if "base" in q["methods"]:
            ax.axhline(q["methods"]["base"]["heldout_perplexity"], ls="--", c="0.5", label="base (no tuning)")
        ax.set_xscale("log"), ax.set_xlabel("trainable parameters"), ax.set_ylabel("held-out perplexity")
        ax.legend(fontsize=7)
        self.save(fig, "ppl_vs_trainable", q, "Held-out perplexity vs trainable parameters")

    def seed_spread(self, q: dict) -> None:
        """Reruns with another initialisation seed (bench/quality.py --seed N): the noise floor."""
        reruns = {n: r for n, r in self.data.items() if n.startswith("quality_seed")}
        rows = []
        for _, r in sorted(reruns.items()):
            for k, m in r["methods"].items():
                if k in q["methods"]:
                    a, b = q["methods"][k]["heldout_perplexity"], m["heldout_perplexity"]
                    rows.append([k, r["seed"], a, b, b - a, provenance(r)])
        if rows:
            self.add(
                "\nThe same methods, data and steps with another initialisation seed (the noise floor "
                "of the comparison above):\n"
            )
            self.add(
                table(
                    [
                        "method",
                        "seed",
                        "ppl, seed 0",
                        "ppl, this seed",
                        "difference",
                        "machine / versions / command",
                    ],
                    rows,
                )
            )

    def pruning(self) -> None:
        import matplotlib.pyplot as plt

        p = self.data.get("pruning")
        self.add("## Pruning (DSEE's second sparsity) on the tuned SmolLM2-135M")
        if p is None:
            self.add("Not run (`python bench/pruning.py`).")
            return
        self.add(
            f"Base held-out perplexity {p['base_perplexity']:.3f}; DSEE-tuned ({p['tune_steps']} "
            f"steps) {p['tuned_perplexity']:.3f}; re-tuning {p['retune_steps']} steps of A, B, S "
            f"with the pruned weights frozen; held-out {p['eval_blocks']} blocks of {p['block']} "
            f"tokens, stride {p.get('eval_stride', p['block'])}. `wabs` is DSEE's score "
            f"|W + update|, `magnitude` is |W|, `wanda` is |W| x ||x||.\n"
        )
        un = p.get("unstructured", {})
        if un:
            rows = [
                [
                    k.split("@")[0],
                    float(k.split("@")[1]),
                    v["pruned_ppl"],
                    v["retuned_ppl"],
                    v["merged_sparsity"],
                ]
                for k, v in un.items()
            ]
            self.add(
                table(
                    ["score", "weight sparsity", "pruned ppl", "re-tuned ppl", "merged-weight zero fraction"],
                    rows,
                )
            )
            fig, ax = plt.subplots(figsize=(7, 4))
            for score, c in (("magnitude", "C0"), ("wabs", "C1"), ("wanda", "C2")):
                pts = sorted((float(k.split("@")[1]), v) for k, v in un.items() if k.startswith(score + "@"))
                if not pts:
                    continue
                xs = [0.0] + [x for x, _ in pts]
                ax.plot(
                    xs,
                    [p["tuned_perplexity"]] + [v["pruned_ppl"] for _, v in pts],
                    "--",
                    c=c,
                    label=f"{score}, pruned",
                )
                ax.plot(
                    xs,
                    [p["tuned_perplexity"]] + [v["retuned_ppl"] for _, v in pts],
                    "-o",
                    c=c,
                    label=f"{score}, re-tuned",
                    ms=3,
                )
            ax.set_yscale("log"), ax.set_xlabel("unstructured sparsity of the block weights")
            ax.set_ylabel("held-out perplexity"), ax.legend(fontsize=7)
            self.save(fig, "ppl_vs_sparsity", p, "Held-out perplexity vs unstructured sparsity")
            self.sparsity_heatmap(p, un)
        st = p.get("structured")
        if isinstance(st, dict) and "removed" in st:  # older single-variant file
            st = {"dsee_heads+weight_channels": st}
        if st:
            rows = [
                [
                    k,
                    v["removed"],
                    v["pruned_ppl"],
                    v["retuned_ppl"],
                    v["params_pruned"],
                    1 - v["params_pruned"] / v["params_dense"],
                    v["speedup"],
                ]
                for k, v in st.items()
            ]
            self.add(
                table(
                    [
                        "scores",
                        "removed per layer",
                        "pruned ppl",
                        "re-tuned ppl",
                        "parameters",
                        "parameters removed",
                        "forward speed-up (same process)",
                    ],
                    rows,
                )
            )
            fig, ax = plt.subplots(figsize=(7, 4))
            for k, v in st.items():
                x = 1 - v["params_pruned"] / v["params_dense"]
                ax.scatter(x, v["speedup"], label=f"{k} (re-tuned ppl {v['retuned_ppl']:.3g})")
            ax.axhline(1.0, c="0.6", lw=0.8)
            ax.legend(fontsize=6, loc="lower right")
            (
                ax.set_xlabel("share of parameters removed (structured)"),
                ax.set_ylabel("forward tokens/s vs dense"),
            )
            self.save(fig, "speed_vs_sparsity", p, "Forward speed-up vs structured sparsity")
        hs = p.get("head_scores_dsee")
        if hs:
            fig, ax = plt.subplots(figsize=(5, 6))
            im = ax.imshow(hs, aspect="auto", cmap="viridis")
            ax.set_xlabel("q head"), ax.set_ylabel("layer"), fig.colorbar(im, ax=ax)
            self.save(fig, "heatmap_head_importance", p, "DSEE head importance (|BA + S| of q, v) per layer")

    def sparsity_heatmap(self, p: dict, un: dict) -> None:
        import matplotlib.pyplot as plt

        ratio = max(float(k.split("@")[1]) for k in un)
        picks = [(s, un.get(f"{s}@{ratio}")) for s in ("magnitude", "wabs", "wanda")]
        picks = [(s, v) for s, v in picks if v and v.get("per_matrix_weight_sparsity")]
        if not picks:
            return
        fig, axes = plt.subplots(1, len(picks), figsize=(3.2 * len(picks), 6), squeeze=False)
        for ax, (score, v) in zip(axes[0], picks):
            per = v["per_matrix_weight_sparsity"]
            layers = sorted({int(n.split(".layers.")[1].split(".")[0]) for n in per})
            grid = [
                [
                    next((f for n, f in per.items() if f".layers.{i}." in n and n.endswith(m)), math.nan)
                    for m in MATRICES
                ]
                for i in layers
            ]
            im = ax.imshow(grid, aspect="auto", vmin=0, vmax=1, cmap="magma")
            ax.set_title(f"{score} @ {ratio}", fontsize=9)
            ax.set_xticks(range(len(MATRICES)), [m.split("_")[0] for m in MATRICES], fontsize=7)
            ax.set_ylabel("layer")
            fig.colorbar(im, ax=ax, fraction=0.08)
        self.save(fig, "heatmap_layer_sparsity", p, f"Per-layer zero fraction at {ratio} global sparsity")

    def speed(self) -> None:
        self.add("## Speed and memory (ratios against a baseline in the same process)")
        rows = []
        a = self.data.get("adapter_step")
        if a:
            rows.append(
                [
                    "DSEE / LoRA train step (SmolLM2, CPU)",
                    a["step_time_ratio_dsee_over_lora"],
                    "<= 1.05",
                    provenance(a),
                ]
            )
            rows.append(
                ["DSEE / LoRA optimizer state", a["optimizer_state_ratio_dsee_over_lora"], "", provenance(a)]
            )
        z = self.data.get("zero3_step")
        if z:
            for k, v in z["ratio_over_plain"].items():
                if k != "plain_pytorch":
                    rows.append([f"{k} / plain PyTorch step", v, "", provenance(z)])
        s = self.data.get("support_selection")
        if s:
            rows.append(
                [
                    f"GreBsmo support selection, {s['matrices']} matrices (s)",
                    s["seconds_all_matrices"]["grebsmo"],
                    "< 20 s",
                    provenance(s),
                ]
            )
            rows.append(
                ["literal GreBsmo / ours (time)", s["speedup_ours_over_reference"], "", provenance(s)]
            )
            what = {"support_agreement_literal_vs_ours": "literal oracle vs ours",
                    "support_agreement_one_by_one_vs_batched": "one by one vs batched"}  # fmt: skip
            for kind, r in s["reference_literal_grebsmo"].items():
                for key, label in what.items():
                    if key in r:
                        name = f"GreBsmo support agreement, {label} ({kind}, {r['matrices_timed']} matrices)"
                        rows.append([name, min(r[key]), "1.0", provenance(s)])
            sl = self.data.get("support_launcher")
            if sl:
                for k, r in sl["runs"].items():
                    name = f"GreBsmo in the launcher, {k} ({r['ranks']} x {r['threads_per_rank']} threads), s"
                    rows.append([name, r["support_seconds"], "", provenance(sl)])
                ratio = sl["two_ranks_over_one_process_per_core"]
                rows.append(["launcher: 2 ranks / 1 process, per core", ratio, "<= 1.5", provenance(sl)])
                rows.append(["launcher: the same supports in every run", str(sl["same_supports_everywhere"]),
                             "True", provenance(sl)])  # fmt: skip
            if "s_nonzeros_min" in s:
                name = f"GreBsmo: fewest non-zeros of S over {s['matrices']} matrices"
                rows.append([name, s["s_nonzeros_min"], f">= N = {s['num_sparse']}", provenance(s)])
        e = self.data.get("export_speed")
        if e:
            rows.append(
                [f"export MB/s ({e['model']})", e["export_output_bytes_per_s"] / 1e6, "", provenance(e)]
            )
            rows.append(
                ["export time / plain copy time", e["export_over_copy_time_ratio"], "", provenance(e)]
            )
            rows.append(
                [
                    "export peak RSS above imports / largest shard",
                    e["export_rss_above_imports_over_largest_shard"],
                    "",
                    provenance(e),
                ]
            )
        p = self.data.get("pruning")
        if p and isinstance(p.get("structured"), dict):
            for k, v in p["structured"].items():
                if isinstance(v, dict) and "speedup" in v:
                    aim = "1.25" if v.get("head_score") else ""
                    rows.append([f"pruned / dense forward tokens/s ({k})", v["speedup"], aim, provenance(p)])
        sc = self.data.get("zero3_scale")
        if sc:
            rows.append(
                [
                    f"{sc['model']}, {sc['ranks']} ranks, ZeRO-3 offload: peak RSS GiB, all ranks",
                    sc["peak_rss_gib_all_ranks"],
                    f"< {sc['machine_ram_gib']:.1f} GiB RAM",
                    provenance(sc),
                ]
            )
        self.add(
            table(["figure", "value", "aim", "machine / versions / command"], rows) if rows else "Not run."
        )
        for name, g in self.data.items():
            if name.startswith("gpu_zero3_"):
                self.add(f"\n### {g['device']} (`{name}.json`)\n")
                self.add(
                    table(
                        ["model / method", "trainable", "tokens/s", "peak GPU MB"],
                        [
                            [k, r["trainable_parameters"], r["tokens_per_s"], r["peak_gpu_memory_mb"]]
                            for k, r in g["rows"].items()
                        ],
                    )
                )
                self.add("\n" + provenance(g))
        if not any(n.startswith("gpu_zero3_") and "cpu" not in n for n in self.data):
            self.add("\nGPU: no GPU result yet (`python bench/run_all.py --gpu` on a GPU machine).")

    def deployment(self) -> None:
        """The pruned model where people run it (bench/gguf_speed.py) and the device check."""
        self.add("## The pruned model in llama.cpp (GGUF, CPU, 2 threads)")
        g = self.data.get("gguf_speed")
        if not g:
            self.add("Not run (`python bench/gguf_speed.py`).")
        else:
            self.add(f"Dense: SmolLM2-135M tuned {g['tune_steps']} steps with DSEE; pruned: "
                     f"{g['pruned_sizes']}, re-tuned {g['retune_steps']} steps. Perplexity: "
                     f"llama-perplexity on the held-out standard-library modules.\n")  # fmt: skip
            rows = []
            for k, r in g["rows"].items():
                ppl = f"{r['perplexity']:.3f} ± {r['plus_minus']:.3f}"
                rows.append([k, r["file_mb"], ppl, r["prompt_tokens_per_s"], r["generation_tokens_per_s"]])
            header = ["model / type", "file MB", "perplexity", "prompt tokens/s", "generation tokens/s"]
            self.add(table(header, rows))
            ratios = [[t, r["prompt_speedup"], r["generation_speedup"], r["perplexity_ratio"]]
                      for t, r in g["pruned_over_dense"].items()]  # fmt: skip
            self.add("\n" + table(["type", "pruned / dense prompt speed", "generation speed", "perplexity"],
                                   ratios))  # fmt: skip
            self.add("\n" + provenance(g))
        for name, d in self.data.items():
            if name.startswith("device_check_") and not d.get("dry_run"):
                status = "passed" if d["failed_step"] is None else f"failed at {d['failed_step']}"
                self.add(f"\n### Device check on {d['device']}: {status}\n")
                self.add(
                    table(
                        ["step", "ok", "seconds"], [[k, v["ok"], v["seconds"]] for k, v in d["steps"].items()]
                    )
                )
                self.add("\n" + provenance(d))

    def instruct(self) -> None:
        """Instruction tuning on the docstring task (bench/instruct.py)."""
        self.add("## Instruction tuning: summarise a standard-library function (SmolLM2-135M-Instruct)")
        g = self.data.get("instruct")
        if not g:
            self.add("Not run (`python bench/instruct.py`).")
            return
        self.add(f"{g['records']['train']:,} train / {g['records']['heldout']:,} held-out records (split by "
                 f"module); {g['corpus']}. {g['steps']} steps x {g['batch_rows']} rows of {g['block']} "
                 f"tokens, lr {g['lr']}. Answer-token perplexity over {g['eval_answer_tokens']:,} held-out "
                 f"answer tokens; exact match and chrF of greedy answers to {g['generated_samples']} "
                 "held-out prompts.\n")  # fmt: skip
        rows = []
        for r in g["runs"]:
            rows.append([r["method"], r["seed"], r.get("trainable_parameters", 0), r["answer_perplexity"],
                         r["exact_match"], r["chrf"], r["generate_tokens_per_s"]])  # fmt: skip
        header = ["method", "seed", "trainable", "answer ppl", "exact match %", "chrF", "generate tokens/s"]
        self.add(table(header, rows))
        self.add("\nPaired per-prompt chrF differences (bootstrap 95% interval over prompts):\n")
        pairs = [
            [k, v["mean"], f"[{v['ci95'][0]:.2f}, {v['ci95'][1]:.2f}]"] for k, v in g["paired_chrf"].items()
        ]
        self.add(table(["a - b", "mean chrF difference", "95% interval"], pairs))
        self.add("\nExamples (held-out, greedy):\n")
        for ex in g["examples"][:4]:
            code = ex["prompt"].split("```python\n", 1)[-1].rsplit("\n```", 1)[0]
            first = code.splitlines()[0] if code else ""
            answers = "; ".join(f"**{k}**: {v!r}" for k, v in ex.items() if k not in ("prompt", "reference"))
            self.add(f"- `{first}` reference {ex['reference']!r}; {answers}")
        self.add("\n" + provenance(g))

    def frontiers(self) -> None:
        """The main frontier series, then each named one (`--series NAME`: another machine's corpus)."""
        self.frontier("frontier")
        for key in sorted(k for k in self.data if k.startswith("frontier_")):
            self.frontier(key)

    def frontier(self, key: str) -> None:
        """DSEE vs LoRA at equal trainable parameters, two corpora, q,v and all linear layers."""
        import matplotlib.pyplot as plt
        from matplotlib.ticker import NullFormatter

        f = self.data.get(key)
        series = key.removeprefix("frontier").removeprefix("_")
        self.add(
            "## The quality frontier: DSEE against LoRA at equal trainable parameters"
            + (f" (series `{series}`: its own corpus, `--series {series}`)" if series else "")
        )
        if not f:
            self.add("Not run (`python bench/frontier.py`).")
            return
        self.add(
            f"{f['model']}; {f['steps']} steps x {f['batch'][0]} rows of {f['batch'][1]} tokens = "
            f"{f['tokens_per_run']:,} training tokens per run; held-out loss over {f['eval']['blocks']} "
            f"blocks of {f['eval']['block_size']} tokens. LoRA r in {f['lora_ranks']}; DSEE r+k = rank r "
            "plus a GreBsmo sparse part with the trainable count of k more LoRA ranks "
            f"({', '.join(f['dsee_grid'])}); "
            "each configuration at its best lr from a sweep of 3 lrs at seed 0 (extended past an end "
            f"that wins; each table lists the lrs swept); seeds {f['seeds']} (initialisation and data "
            "order). Paired: DSEE r+k minus LoRA (r+k) per held-out block and seed, two-level "
            "bootstrap 95% interval; a ratio below 1 favours DSEE.\n"
        )  # fmt: skip
        if f.get("run_commands"):
            self.add("Runs made by: " + "; ".join(f"`{c}`" for c in f["run_commands"]) + ".\n")
        cells = f["cells"]
        run = {name.split()[0] for name in cells}  # "man:qv fp32" is a run of man:qv
        missing = [c for c in f.get("cells_requested", []) if c not in run]
        if missing:
            self.add(
                f"Not run yet: {', '.join(missing)} (`python bench/frontier.py` resumes where it stopped).\n"
            )
        fig, axes = plt.subplots(1, len(cells), figsize=(4.2 * len(cells), 3.8), squeeze=False)
        for ax, (name, c) in zip(axes[0], cells.items(), strict=True):
            self.add(
                f"### {name} ({c.get('precision', 'bf16')} training; untuned held-out ppl "
                f"{c['base_perplexity']:.3f})\n"
            )
            rows = []
            for q in c["points"]:
                sweep = ", ".join(f"{float(lr):g}: {v:.3f}" for lr, v in q["lr_sweep"].items())
                best = f"{q['lr']:g}" + (
                    ""
                    if q.get("lr_bracketed")
                    else f" (from the {q['lr_from']} sweep)"
                    if q.get("lr_from", "sweep") != "sweep"
                    else " (sweep not finished)"
                )
                rows.append([q["label"], q["trainable"], f"{100 * q['density']:.2f}%", sweep, best,
                             q["perplexity_mean"], q["perplexity_sd"], len(q["seeds"])])  # fmt: skip
            self.add(table(["config", "trainable", "S density", "lr sweep (seed 0 ppl)", "best lr",
                            "held-out ppl (mean)", "sd", "seeds"], rows))  # fmt: skip
            pairs = [[x["dsee"], x["lora"], x["perplexity_ratio"],
                      f"[{x['perplexity_ratio_ci95'][0]:.4f}, {x['perplexity_ratio_ci95'][1]:.4f}]",
                      len(x["seeds"]), x["verdict"]] for x in c["paired"]]  # fmt: skip
            if pairs:
                self.add("\n" + table(["DSEE", "LoRA (same trainable)", "ppl ratio", "95% interval", "seeds",
                                        "verdict"], pairs) + "\n")  # fmt: skip
            for method, marker in (("lora", "o-"), ("dsee", "s")):
                pts = sorted((q for q in c["points"] if q["method"] == method), key=lambda q: q["trainable"])
                if pts:
                    ax.errorbar([q["trainable"] for q in pts], [q["perplexity_mean"] for q in pts],
                                yerr=[q["perplexity_sd"] or 0 for q in pts], fmt=marker, capsize=3,
                                label="LoRA" if method == "lora" else "DSEE r+k")  # fmt: skip
                    for q in pts:
                        ax.annotate(q["label"].replace("LoRA ", "").replace("DSEE ", ""),
                                    (q["trainable"], q["perplexity_mean"]), fontsize=6)  # fmt: skip
            ax.set_xscale("log"), ax.set_title(name, fontsize=9), ax.set_xlabel("trainable parameters")
            ax.xaxis.set_minor_formatter(NullFormatter())  # the 2x/3x/... labels of a short log axis collide
            ax.set_ylabel("held-out perplexity"), ax.legend(fontsize=7)
        title = "Held-out perplexity vs trainable parameters (mean +- sd over seeds)"
        self.save(fig, key, f, title + (f", series {series}" if series else ""))

    def aims(self) -> None:
        """The issue's targets, met or missed, computed from the results."""
        lines = []
        q, p, a = self.data.get("quality"), self.data.get("pruning"), self.data.get("adapter_step")
        if q:
            m = q["methods"]
            d = m.get("dsee_grebsmo")
            for lo in ("lora_r8", "lora_matched"):
                if d and lo in m:
                    ok = d["heldout_perplexity"] <= m[lo]["heldout_perplexity"]
                    lines.append(
                        f"DSEE (GreBsmo) held-out perplexity <= {m[lo]['description']} "
                        f"({m[lo]['trainable_parameters']:,} vs DSEE's {d['trainable_parameters']:,} "
                        f"trainable): **{'met' if ok else 'missed'}**, {d['heldout_perplexity']:.4f} vs "
                        f"{m[lo]['heldout_perplexity']:.4f}"
                    )
            if d and "full" in m:
                r = d["heldout_perplexity"] / m["full"]["heldout_perplexity"]
                lines.append(
                    f"DSEE within 2% of full fine-tuning: **{'met' if r <= 1.02 else 'missed'}**, "
                    f"{d['heldout_perplexity']:.4f} vs {m['full']['heldout_perplexity']:.4f} "
                    f"(+{100 * (r - 1):.1f}%)"
                )
        if a:
            r = a["step_time_ratio_dsee_over_lora"]
            lines.append(f"DSEE step time <= 1.05 x LoRA's: **{'met' if r <= 1.05 else 'missed'}**, {r:.3f}")
        un = (p or {}).get("unstructured", {})
        for ratio in sorted({k.split("@")[1] for k in un}, key=float):
            w, mg, wd = (un.get(f"{s}@{ratio}") for s in ("wabs", "magnitude", "wanda"))
            if not (w and mg and wd):
                continue
            best = min(mg["pruned_ppl"], wd["pruned_ppl"], mg["retuned_ppl"], wd["retuned_ppl"])
            plain = w["retuned_ppl"] < min(mg["pruned_ppl"], wd["pruned_ppl"])
            alike = w["retuned_ppl"] <= best
            lines.append(
                f"sparsity {ratio}, DSEE (WABS scores + re-tuning) {w['retuned_ppl']:.3f}; magnitude "
                f"{mg['pruned_ppl']:.3f} (re-tuned {mg['retuned_ppl']:.3f}), Wanda {wd['pruned_ppl']:.3f} "
                f"(re-tuned {wd['retuned_ppl']:.3f}): vs both as pruned **{'met' if plain else 'missed'}**; "
                f"vs both re-tuned alike **{'met' if alike else 'missed'}**"
            )
        self.add("## The aims, met or missed\n")
        self.add("\n".join(f"- {x}" for x in lines) if lines else "No results yet.")

    def prune_recovery(self) -> None:
        r = self.data.get("prune_recovery")
        self.add("## Pruned models people would deploy: recovery with every-linear DSEE and distillation")
        if r is None:
            self.add("Not run yet (`python bench/prune_recovery.py`).")
            return
        dense, t = r["dense_tuned_ppl"], r["targets"]
        self.add(
            f"{r['model']}: dense tuned held-out perplexity **{dense:.3f}** "
            f"({r['tune_steps']} tuning steps); every pruned model recovered alike for "
            f"{r['recover_steps']} steps ({', '.join(r['recovery'])}), eval over {r['eval_blocks']} "
            "held-out blocks; +kd = with distillation from the tuned model.\n"
        )
        rows = []
        for name, c in r["configs"].items():
            seeds = ", ".join(f"{x:.3f}" for x in c["ppl_per_seed"])
            kind = "2:4" if "2:4" in name else "structured_20" if "structured" in name else "unstructured_50"
            target = t[kind]
            met = "met" if c["ratio_to_dense"] <= target else f"missed by {c['ratio_to_dense'] / target:.2f}x"
            sparsity = c["weight_sparsity"]
            sp = None if sparsity is None else f"{sparsity:.3f}"
            rows.append([name, seeds, c["mean"], c["stdev"], c["ratio_to_dense"], f"<= {target}x: {met}", sp,
                         c["seconds_per_run"]])  # fmt: skip
        head = [
            "configuration",
            "ppl per seed",
            "mean",
            "stdev",
            "/ dense",
            "target",
            "weight sparsity",
            "s/run",
        ]
        self.add(table(head, rows))
        speed = r.get("forward_tokens_per_s")
        if speed:
            d = speed["dense"]
            self.add(
                "\nForward tokens/s (merged exports, 4 x 256 tokens, this CPU): "
                + ", ".join(f"{n} {v:,.0f} ({v / d:.2f}x)" for n, v in speed.items())
                + f"; target >= {t['structured_speedup']}x for the structured models."
            )
        self.add(f"\n*{provenance(r)}*")

    def sparsity_speed(self) -> None:
        self.add("## What each kind of sparsity buys at inference: one linear layer's forward")
        found = {n: r for n, r in self.data.items() if n.startswith("sparsity_speed_")}
        if not found:
            self.add("Not run yet (`python bench/sparsity_speed.py`; on a GPU the device check runs it).")
            return
        kinds = ["dense-50%-zeros", "csr-50%", "2:4-semi", "structured-25%"]
        for r in found.values():
            rows = [
                [name, "x".join(map(str, row["shape"]))]
                + [f"{row[k]['speedup_vs_dense']:.2f}x" if "us" in row[k] else "not run" for k in kinds]
                for name, row in r["rows"].items()
            ]
            self.add(f"\n{r['device']}, {r['dtype']}, {r['tokens']} tokens; speed against the dense W:\n")
            self.add(table(["matrix", "out x in", *kinds], rows))
            skipped = {row[k]["skipped"] for row in r["rows"].values() for k in kinds if "skipped" in row[k]}
            if skipped:
                self.add("\nNot run: " + "; ".join(sorted(skipped)) + ".")
            self.add(f"\n*{provenance(r)}*")

    def scale_7b(self) -> None:
        """bench/scale_7b.py: a LLaMA-2-7B-shaped model through every stage on 2 ranks."""
        self.add("## A LLaMA-2-7B-shaped model through every stage (bench/scale_7b.py)")
        r = self.data.get("scale_7b")
        if not r or "train" not in r.get("phases", {}):
            self.add("Not run yet (`python bench/scale_7b.py`: ~1 h and the machine alone).")
            return
        b = r.get("memory_bound") or {}
        bound = (
            f"ranks x (partition {b.get('shard_gib', 0):.2f} GiB + largest block "
            f"{b.get('largest_layer_gib', 0):.2f} GiB + imports {b.get('imports_rss_gib', 0):.2f} GiB) "
            f"= {b.get('ranks_x_shard_layer_imports_gib', 0):.2f} GiB"
        )
        self.add(
            f"{r['ranks']} ranks, `{r['deepspeed']}`, bf16. The issue's bound for all ranks together: "
            f"{bound}; target < {r['target_peak_rss_gib_all_ranks']} GiB. RSS counts the pages both "
            "ranks map (model files, shared-memory buffers) twice; PSS once.\n"
        )
        rows = []
        for name, ph in r["phases"].items():
            if name == "support":
                times = (
                    f"{ph['grebsmo_seconds']:.1f} / {ph['svd_seconds']:.1f} / {ph['magnitude_seconds']:.1f}"
                )
                label = f"support: GreBsmo / SVD / magnitude, one {ph['matrix']} matrix"
                rows.append([label, times, "", "", "", "", ""])
                continue
            for label, q in [(name, ph)] + [(f"{name} baseline: {k}", ph[k]) for k in BASELINES if k in ph]:
                if q.get("exit_code"):
                    label += f" (failed, exit code {q['exit_code']}: -9 is killed for memory, 124 timed out)"
                if q.get("peak_swap_gib_all_processes"):
                    label += f" (and {q['peak_swap_gib_all_processes']:.1f} GiB in swap)"
                per_rank = " / ".join(f"{m / 1024:.2f}" for m in q.get("peak_rss_mib_per_rank", []))
                whole = " / ".join(f"{m / 1024:.2f}" for m in q.get("peak_gathered_params_mib_per_rank", []))
                rows.append([label, q["seconds"], q.get("peak_rss_gib_all_processes", ""),
                             q.get("peak_pss_gib_all_processes", ""), per_rank, whole,
                             (q.get("bytes") or q["bytes_written"]) / 1e9])  # fmt: skip
        per_rank_bound = b.get("ranks_x_shard_layer_imports_gib", 0) / max(r["ranks"], 1)
        header = ["phase", "seconds", "peak RSS GiB, all", "peak PSS GiB, all",
                  f"peak RSS GiB per rank (bound {per_rank_bound:.2f})",
                  f"whole parameters held at once (steps, eval), GiB per rank (largest block "
                  f"{b.get('largest_layer_gib', 0):.2f})",
                  "GB written"]  # fmt: skip
        self.add(table(header, rows))
        ratio = r["phases"].get("export", {}).get("export_over_plain_copy_speed")
        if ratio is not None:
            self.add(f"\nExport speed / plain-copy speed: {ratio:.2f} (target >= 0.5).")
        self.add(f"\n*{provenance(r)}*")

    def write(self) -> Path:
        head = [
            "# dsee-scale benchmark report",
            "Generated by `python bench/report.py` from the JSON files in "
            f"`{self.rel(self.results)}/`; every number below was measured by the command "
            "named beside it. Times are ratios against a baseline run in the same process "
            "where one exists.\n",
        ]
        self.aims()
        self.quality()
        self.pruning()
        self.speed()
        self.deployment()
        self.instruct()
        self.frontiers()
        self.prune_recovery()
        self.sparsity_speed()
        self.scale_7b()
        self.out.write_text("\n".join(head + self.parts) + "\n")
        print(f"wrote {self.out} and {len(list(self.plots.glob('*.png')))} plots in {self.plots}")
        return self.out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", default=str(ROOT / "bench" / "results"))
    ap.add_argument("--out", default=str(ROOT / "bench" / "REPORT.md"))
    args = ap.parse_args()
    Report(Path(args.results), Path(args.out)).write()


if __name__ == "__main__":
    main()
