"""The benchmark tooling: the report reflects the JSON it reads, the GPU benchmark's code path runs
(on CPU, tiny models) and counts parameters right, bad arguments are one-line errors."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from helpers import ROOT

BENCH = ROOT / "bench"


def run(*args, env=None):
    return subprocess.run(
        [sys.executable, *map(str, args)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=dict(os.environ, DS_ACCELERATOR="cpu", **(env or {})),
        timeout=900,
    )


def test_report_tables_and_plots_come_from_the_results(tmp_path):
    pytest.importorskip("matplotlib")
    results = tmp_path / "results"
    results.mkdir()
    for name in (
        "adapter_step",
        "pruning",
        "zero3_step",
        "quality",
        "quality_seed1",
        "frontier",
        "frontier_man2",
        "prune_recovery",
    ):
        shutil.copy(BENCH / "results" / f"{name}.json", results)
    r = run(BENCH / "report.py", "--results", results, "--out", tmp_path / "REPORT.md")
    assert r.returncode == 0, r.stderr
    text = (tmp_path / "REPORT.md").read_text()
    a = json.loads((results / "adapter_step.json").read_text())
    assert f"| DSEE / LoRA train step (SmolLM2, CPU) | {a['step_time_ratio_dsee_over_lora']:,.3f} |" in text
    assert a["environment"]["command"] in text  # provenance beside the figure
    p = json.loads((results / "pruning.json").read_text())
    for key, row in p["unstructured"].items():
        assert f"| {row['pruned_ppl']:,.3f} | {row['retuned_ppl']:,.3f} |" in text, key
    q, q1 = (json.loads((results / f"{n}.json").read_text())["methods"] for n in ("quality", "quality_seed1"))
    for k, m in q1.items():  # the seed rerun beside the seed-0 number, with the difference
        a, b = q[k]["heldout_perplexity"], m["heldout_perplexity"]
        assert f"| {k} | 1 | {a:,.3f} | {b:,.3f} | {b - a:,.3f} |" in text
    lora = q["lora_r8"]["heldout_perplexity"] >= q["dsee_grebsmo"]["heldout_perplexity"]
    assert f"trainable): **{'met' if lora else 'missed'}**" in text
    f = json.loads((results / "frontier.json").read_text())
    series = json.loads((results / "frontier_man2.json").read_text())  # a --series of its own corpus
    assert "(series `man2`: its own corpus, `--series man2`)" in text
    for cell in [*f["cells"].values(), *series["cells"].values()]:  # each pairing, with its interval
        for x in cell["paired"]:
            lo, hi = x["perplexity_ratio_ci95"]
            assert (
                f"| {x['dsee']} | {x['lora']} | {x['perplexity_ratio']:,.3f} | [{lo:.4f}, {hi:.4f}] |" in text
            )
    for res in (f, series):  # every invocation that made the runs, where the runs recorded it
        for c in res.get("run_commands", []):
            assert f"`{c}`" in text, c
    ran = {name.split()[0] for name in f["cells"]}  # "man:qv fp32" is a run of man:qv
    missing = [c for c in f["cells_requested"] if c not in ran]
    assert ran and (f"Not run yet: {', '.join(missing)} (" in text if missing else "Not run yet:" not in text)
    pr = json.loads((results / "prune_recovery.json").read_text())
    for name, c in pr["configs"].items():  # each configuration with its ratio to the dense model
        assert f"| {name} | " in text and f"| {c['ratio_to_dense']:,.3f} | <= " in text, name
    pngs = sorted(x.name for x in (results / "plots").glob("*.png"))
    assert {
        "ppl_vs_sparsity.png",
        "speed_vs_sparsity.png",
        "loss_curves.png",
        "ppl_vs_trainable.png",
        "heatmap_layer_sparsity.png",
        "heatmap_head_importance.png",
        "frontier.png",
        "frontier_man2.png",
    } <= set(pngs)
    (results / "quality.json").unlink()
    assert run(BENCH / "report.py", "--results", results, "--out", tmp_path / "R2.md").returncode == 0
    assert "Not run (`python bench/quality.py`)" in (tmp_path / "R2.md").read_text()  # said, not invented
    for png in (results / "plots").glob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"plots/{png.name}" in text


def test_bench_bad_arguments_are_one_line_errors():
    r = run(BENCH / "run_all.py", "--only", "quality,nonsense")
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        "error: --only: unknown nonsense (allowed: "
        + ", ".join(
            [
                "support_selection",
                "adapter_step",
                "zero3_step",
                "quality",
                "pruning",
                "export_speed",
                "zero3_scale",
                "gguf_speed",
                "support_launcher",
                "instruct",
                "frontier",
                "sparsity_speed",
                "prune_recovery",
            ]
        )
        + ")"
    ]
    import torch

    if not torch.cuda.is_available():
        r = run(BENCH / "gpu_zero3.py")
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
        assert r.stderr.startswith("error: --device cuda: no CUDA GPU is visible")
    r = run(BENCH / "quality.py", "--methods", "base,lora_r99")
    assert r.returncode == 2 and r.stderr.strip() == (
        "error: --methods: unknown lora_r99 (allowed: base, full, lora_r8, dsee_grebsmo, dsee_svd, "
        "dsee_magnitude, dsee_random, lora_matched)"
    )


def test_frontier_keeps_training_precisions_apart(monkeypatch):
    """fp32 runs are their own cell: never best-lr'd, averaged or paired with bf16 runs, and a
    record from before --precision existed reads as bf16."""
    monkeypatch.syspath_prepend(str(BENCH))
    import frontier

    def rec(method, r, k, lr, seed, losses, precision=None):
        x = dict(cell="stdlib:qv", method=method, r=r, k=k, lr=lr, seed=seed, steps=36, batch=2,
                 trainable=230400, density=0.0, block_losses=losses, seconds=1.0)  # fmt: skip
        x["eval_loss"] = sum(losses) / len(losses)
        x["heldout_perplexity"] = 2.718281828 ** x["eval_loss"]
        return x if precision is None else dict(x, precision=precision)

    old = rec("lora", 4, 0, 3e-3, 0, [2.0, 2.2])
    assert frontier.run_key(old) == frontier.run_key(dict(old, precision="bf16"))
    assert frontier.run_key(old) != frontier.run_key(dict(old, precision="fp32"))
    runs = [
        old,
        rec("dsee", 2, 2, 3e-3, 0, [1.0, 1.2]),  # bf16: DSEE far better
        dict(rec("lora", 4, 0, 3e-3, 0, [2.1, 2.3], "fp32"), lr_from="bf16"),  # later swept in fp32
        rec("lora", 4, 0, 1e-3, 0, [2.5, 2.5], "fp32"),  # a worse fp32 lr: not the best
        rec("dsee", 2, 2, 3e-3, 0, [2.15, 2.45], "fp32"),
    ]
    s = frontier.summarize(runs, ["stdlib:qv"], [0])
    assert sorted(s) == ["stdlib:qv", "stdlib:qv fp32"]
    bf16, fp32 = s["stdlib:qv"]["paired"][0], s["stdlib:qv fp32"]["paired"][0]
    assert bf16["mean_loss_difference"] == pytest.approx(-1.0)
    assert fp32["mean_loss_difference"] == pytest.approx(0.1)  # (0.05 + 0.15) / 2, fp32 only
    lora = next(p for p in s["stdlib:qv fp32"]["points"] if p["method"] == "lora")
    assert lora["lr"] == 3e-3 and sorted(lora["lr_sweep"]) == [1e-3, 3e-3] and lora["seeds"] == [0]
    assert lora["lr_from"] == "sweep"
    s = frontier.summarize(runs[:3], ["stdlib:qv"], [0])  # fp32 LoRA only at bf16's lr: says so
    assert next(p for p in s["stdlib:qv fp32"]["points"] if p["method"] == "lora")["lr_from"] == "bf16"
    r = run(BENCH / "frontier.py", "--configs", "lora:4,dsee:9+9", "--report-only")
    assert r.returncode == 2 and r.stderr.strip() == (
        "error: --configs: unknown dsee:9+9 (allowed: lora:2, lora:4, lora:8, lora:16, lora:32, "
        "dsee:2+2, dsee:1+3, dsee:8+8, dsee:4+12)"
    )


def test_frontier_refuses_runs_recorded_on_another_corpus(monkeypatch, capsys):
    """The man corpus is this machine's manual pages, so it differs between machines: a cell
    whose recorded runs used another corpus exits 2 instead of resuming or pairing across
    corpora; the same corpus passes, and records from before fingerprints are checked by the
    untuned model's held-out block losses."""
    import types

    import torch

    from dsee_scale.data import Blocks

    from helpers import tiny_llama

    monkeypatch.syspath_prepend(str(BENCH))
    import frontier

    model = tiny_llama().eval()
    g = torch.Generator().manual_seed(0)
    eval_ids = torch.randint(0, 96, (4, 16), generator=g)
    train_ids = torch.randint(0, 96, (6, 16), generator=g)
    fingerprint = frontier.corpus_fingerprint(eval_ids, Blocks.from_ids(train_ids))
    args = types.SimpleNamespace(runs_file=frontier.runs_file(""))
    cell = types.SimpleNamespace(name="man:qv", base=model, eval_ids=eval_ids, corpus=fingerprint, args=args)
    one_token_off = train_ids.clone()
    one_token_off[5, 15] = (one_token_off[5, 15] + 1) % 96
    assert frontier.corpus_fingerprint(eval_ids, Blocks.from_ids(one_token_off)) != cell.corpus
    with torch.no_grad():
        recorded = frontier.block_losses(model, eval_ids)
    legacy = dict(frontier.BASE_SPEC, cell="man:qv", block_losses=recorded, heldout_perplexity=11.268)
    with torch.no_grad():
        frontier.check_corpus(cell, {frontier.run_key(legacy): legacy})  # same held-out set: passes
        frontier.check_corpus(cell, {"x": dict(legacy, corpus=cell.corpus)})
        frontier.check_corpus(cell, {"x": dict(legacy, cell="stdlib:qv", corpus="0" * 16)})  # another cell
    capsys.readouterr()
    shifted = dict(legacy, block_losses=[x + 0.5 for x in recorded])
    for done, says in [
        ({frontier.run_key(shifted): shifted}, "untuned held-out ppl "),
        ({"x": dict(legacy, corpus="0" * 16)}, f"fingerprint {'0' * 16} recorded, {cell.corpus} here"),
    ]:
        with pytest.raises(SystemExit) as e, torch.no_grad():
            frontier.check_corpus(cell, done)
        err = capsys.readouterr().err
        assert e.value.code == 2 and len(err.strip().splitlines()) == 1
        assert err.startswith("error: --cells man:qv: this machine's corpus is not the one its runs in ")
        assert says in err and "start a separate series here with --series NAME" in err
    r = run(BENCH / "frontier.py", "--series", "Man 2", "--report-only")
    assert r.returncode == 2 and r.stderr.strip() == (
        "error: --series 'Man 2': allowed are lower-case letters, digits, '_' and '-'"
    )
