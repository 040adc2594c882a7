"""ZeRO-3 training through launchers/train.py with real processes (2 ranks where it matters).

Runs are made on demand by the `runs` fixture and shared between tests, so any test can run
alone or in any order. Models are initialised wide (std 0.5) so their logits are far from
uniform and the loss moves: a dropped or wrong update shows in the trained values."""

import json

import pytest
import torch

from dsee_scale.training.trainer import supports_digest

from helpers import (
    ROOT,
    check,
    deepspeed_params,
    launch,
    losses,
    plain_reference,
    save_tiny_model,
    write_config,
)

WIDE = {"initializer_range": 0.1}


class Runs:
    """name -> (output dir, process result); each run launched once, when first asked for."""

    def __init__(self, root):
        self.root, self.done = root, {}
        self.models = {
            "gpt2": save_tiny_model(root, "gpt2", **WIDE),
            "llama": save_tiny_model(root, "llama", **WIDE),
            # wider still: a model that can memorise two blocks in 6 steps
            "llama-wide": save_tiny_model(root, "llama", initializer_range=0.5),
        }

    def config(self, name, kind, **sections):
        sections["train"] = {"lr": 3e-2, **sections.get("train", {})}  # a loss that moves in 6 steps
        return write_config(
            self.root / f"{name}.yaml", self.models[kind], self.root / name, self.root / "cache", **sections
        )

    def get(self, name, kind, nproc, *extra, **sections):
        if name not in self.done:
            r = check(launch(self.config(name, kind, **sections), nproc, *extra))
            self.done[name] = (self.root / name, r)
        return self.done[name]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return Runs(tmp_path_factory.mktemp("zero3"))


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_two_ranks_match_one_rank_and_plain_pytorch(runs, kind):
    out1, _ = runs.get(f"{kind}-1", kind, 1)
    out2, r2 = runs.get(f"{kind}-2", kind, 2)
    plain, plain_supports, plain_trained = plain_reference(runs.root / f"{kind}-1.yaml")
    l1, l2 = losses(out1), losses(out2)
    assert sorted(l1) == sorted(l2) == sorted(plain) == list(range(1, 7))
    for s in plain:
        # fp32; the order of reductions differs (2 ranks reduce-scatter), hence not bit-exact
        assert l1[s] == pytest.approx(plain[s], rel=1e-5, abs=1e-5), (s, l1, plain)
        assert l2[s] == pytest.approx(plain[s], rel=1e-4, abs=1e-4), (s, l2, plain)
    assert l1[6] < l1[1] - 0.05, l1  # it learns, visibly
    # the trained A, B and S values themselves, as DeepSpeed consolidates them
    for out, tol in ((out1, 1e-5), (out2, 1e-4)):
        trained = deepspeed_params(out / "checkpoints")
        for name, want in plain_trained.items():
            assert want.abs().max() > 0, name  # B and S moved away from their zero init
            torch.testing.assert_close(trained[name], want, rtol=tol, atol=tol, msg=name)
    # every rank chose the same supports, and they are the ones a plain run chooses
    s1 = json.loads((out1 / "summary.json").read_text())
    s2 = json.loads((out2 / "summary.json").read_text())
    assert s1["supports_digest"] == s2["supports_digest"] == supports_digest(plain_supports)
    assert "identical on 2 ranks" in r2.stdout + r2.stderr


def test_tensorboard_has_the_scalars_and_histograms(runs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, _ = runs.get("gpt2-1", "gpt2", 1)
    acc = EventAccumulator(str(out / "tensorboard"), size_guidance={"histograms": 0, "scalars": 0})
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    for tag in (
        "train/loss", "train/perplexity", "train/lr", "train/grad_norm", "train/samples",
        "perf/tokens_per_s", "perf/step_time_s", "mem/rss_mb", "mem/peak_gathered_params_mb",
        "model/trainable_params", "eval/loss", "eval/perplexity",
    ):  # fmt: skip
        assert tag in tags, (tag, tags)
    loss_events = acc.Scalars("train/loss")
    assert [e.step for e in loss_events] == list(range(1, 7))
    assert loss_events[0].value == pytest.approx(losses(out)[1], rel=1e-6)
    assert {"dsee/sparse_values", "dsee/lora_A", "dsee/lora_B"} <= set(acc.Tags()["histograms"])


OFFLOAD = dict(
    data={"max_train_blocks": 2, "max_eval_blocks": 2},
    dsee={"r": 8, "target_modules": ["*_proj"]},
    train={"lr": 5e-2, "schedule": "constant", "warmup_steps": 0},
    deepspeed=str(ROOT / "ds_configs" / "zero3_offload_cpu.json"),
)


def test_offload_trains_memorisable_batch_and_resumes_exactly(runs):
    full, _ = runs.get("off-full", "llama-wide", 1, **OFFLOAD)
    l_full = losses(full)
    assert l_full[6] < 0.5 * l_full[1]  # memorising two blocks
    part = runs.config("off-part", "llama-wide", **OFFLOAD)
    check(launch(part, 1, "train.stop_at_step=3"))
    assert sorted(losses(runs.root / "off-part")) == [1, 2, 3]
    assert (runs.root / "off-part" / "checkpoints" / "latest").read_text() == "step_3"
    check(launch(part, 1, "--resume"))
    l_res = losses(runs.root / "off-part")
    for s in (4, 5, 6):
        assert l_res[s] == pytest.approx(l_full[s], rel=1e-6, abs=1e-6), (s, l_res, l_full)


def test_resume_two_ranks_on_one_rank(runs):
    reference, _ = runs.get("gpt2-2", "gpt2", 2)  # uninterrupted, 2 ranks
    cfg = runs.config("uni", "gpt2")
    check(launch(cfg, 2, "train.stop_at_step=3"))
    r = check(launch(cfg, 1, "--resume"))
    resumed, want = losses(runs.root / "uni"), losses(reference)
    assert sorted(resumed) == list(range(1, 7))
    assert (runs.root / "uni" / "checkpoints" / "step_3_universal").is_dir()
    for s in (4, 5, 6):
        assert resumed[s] == pytest.approx(want[s], rel=1e-4, abs=1e-4), (s, resumed, want)
    assert "Traceback" not in r.stderr


def test_gradient_checkpointing_and_bf16(runs):
    reference, _ = runs.get("llama-1", "llama", 1)
    gc, _ = runs.get("gc", "llama", 1, train={"gradient_checkpointing": True})
    for s, v in losses(reference).items():
        assert losses(gc)[s] == pytest.approx(v, rel=1e-5, abs=1e-5)
    bf, _ = runs.get("bf16", "gpt2", 1, train={"precision": "bf16", "lr": 2e-2}, data={"max_train_blocks": 2})
    lb = losses(bf)
    assert all(torch.isfinite(torch.tensor(v)) for v in lb.values()) and lb[6] < lb[1]


def test_deepspeed_config_conflict_is_a_clear_error(runs, tmp_path):
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"train_micro_batch_size_per_gpu": 8, "zero_optimization": {"stage": 3}}))
    cfg = write_config(
        tmp_path / "c.yaml", runs.models["gpt2"], tmp_path / "out", runs.root / "cache", deepspeed=str(ds)
    )
    r = launch(cfg, 1)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "train_micro_batch_size_per_gpu=8 conflicts with train.micro_batch_size=2" in r.stderr


def test_summary_reports_the_gathered_parameters_and_they_follow_the_live_budget(runs, tmp_path):
    """summary.json's peak of whole (gathered) parameters per rank is a measurement: with
    stage3_max_live_parameters, prefetching, persistence and reuse distance at 0 (DeepSpeed's
    default max_reuse_distance of 1e9 keeps every parameter reused within 1e9 elements
    gathered, whatever max_live says), no rank ever holds more than
    one decoder block whole (the block's size from the plain model and DeepSpeed's zero_to_fp32),
    while the default budget keeps more of this tiny model gathered at once."""
    ds = json.loads((ROOT / "ds_configs" / "zero3.json").read_text())
    zero = ("stage3_max_live_parameters", "stage3_prefetch_bucket_size",
            "stage3_param_persistence_threshold", "stage3_max_reuse_distance")  # fmt: skip
    ds["zero_optimization"].update(dict.fromkeys(zero, 0))
    (tmp_path / "tight.json").write_text(json.dumps(ds))
    out, _ = runs.get("llama-2-tight", "llama", 2, deepspeed=str(tmp_path / "tight.json"))
    default, _ = runs.get("llama-2", "llama", 2)
    from transformers import AutoModelForCausalLM

    trained = deepspeed_params(out / "checkpoints")  # A, B, S values (the base is not saved)
    params = {n: t for n, t in trained.items() if not n.endswith("sparse_index")}  # parameters only
    params.update(AutoModelForCausalLM.from_pretrained(runs.models["llama"]).named_parameters())
    blocks: dict[str, int] = {}
    for name, t in params.items():
        if name.startswith("model.layers."):
            block = ".".join(name.split(".")[:3])
            blocks[block] = blocks.get(block, 0) + t.numel() * t.element_size()
    whole = sum(t.numel() * t.element_size() for t in {t.data_ptr(): t for t in params.values()}.values())
    assert len(blocks) == 2 and max(blocks.values()) < whole / 2

    def peaks(run):
        memory = json.loads((run / "summary.json").read_text())["peak_memory_mb_per_rank"]
        return [m["mem/peak_gathered_params_mb"] * 2**20 for m in memory]

    tight, loose = peaks(out), peaks(default)
    assert len(tight) == len(loose) == 2
    for rank in range(2):
        assert 0 < tight[rank] <= max(blocks.values()), (tight, blocks)
        assert loose[rank] > max(blocks.values()), (loose, blocks)  # the budget is what bounds it
        assert loose[rank] <= whole, (loose, whole)


def test_summary_splits_each_ranks_memory_by_stage(runs):
    """summary.json's memory_by_stage_mb: per rank, the stages of the run in order, each with
    what the rank held then and its peak so far; the peak never falls and ends at the rank's
    reported peak."""
    default, _ = runs.get("llama-2", "llama", 2)
    summary = json.loads((default / "summary.json").read_text())
    stages = summary["memory_by_stage_mb"]
    assert len(stages) == 2
    for rank, mine in enumerate(stages):
        assert list(mine)[:5] == ["start", "model", "data", "engine", "setup"], mine
        assert "first step" in mine and "checkpoint" in mine
        peaks = [s["peak_mb"] for s in mine.values()]
        assert peaks == sorted(peaks), mine
        assert all(s["resident_mb"] <= s["peak_mb"] + 1 for s in mine.values()), mine
        assert peaks[-1] <= summary["peak_rss_mb_per_rank"][rank] + 1


def test_stage_memory_follows_what_a_stage_allocates():
    """mark_stage against a known allocation: 256 MiB touched shows in resident and peak; freed,
    resident falls back while the peak stays."""
    import subprocess
    import sys

    code = """
import json, torch
from dsee_scale.training.monitor import mark_stage, release_freed_memory, stage_memory
mark_stage("before")
t = torch.ones(64 * 2**20)  # 256 MiB, every page written
mark_stage("held")
del t
release_freed_memory()
mark_stage("freed")
mark_stage("before", once=True)  # keeps its first record
print(json.dumps(stage_memory()))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    s = json.loads(out.stdout.splitlines()[-1])
    assert list(s) == ["before", "held", "freed"]
    assert 240 < s["held"]["resident_mb"] - s["before"]["resident_mb"] < 300, s
    # the peak is a high-water mark: imports may already have pushed it above "before"'s resident
    assert s["held"]["peak_mb"] >= s["held"]["resident_mb"] - 1, s
    assert s["held"]["peak_mb"] >= s["before"]["peak_mb"], s
    assert s["held"]["resident_mb"] - s["freed"]["resident_mb"] > 200, s
    assert s["freed"]["peak_mb"] >= s["held"]["peak_mb"], s


def test_memory_freed_between_stages_goes_back_to_the_os():
    """glibc keeps freed chunks under its mmap threshold resident (what a stage that reads and
    drops one block after another leaves behind); release_freed_memory hands them back."""
    import subprocess
    import sys

    code = """
import psutil, torch
from dsee_scale.training.monitor import release_freed_memory
rss = lambda: psutil.Process().memory_info().rss
t = torch.ones(2 * 2**20); del t  # an 8 MiB mmapped chunk freed: glibc raises its mmap threshold
blocks = [torch.ones(2 * 2**20) for _ in range(50)]  # 50 x 8 MiB, now on the heap
last = blocks[-1]  # holds the top of the heap, so glibc cannot trim it on free
del blocks
freed = rss()
release_freed_memory()
print(freed, rss())
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    freed, released = map(int, out.stdout.split())
    assert freed - released > 300 * 2**20, (freed, released)  # of the 392 MiB freed
