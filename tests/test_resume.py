"""Resumes never silently change the run: same settings, same random numbers, each step logged
once, and a clear way back from a corrupt `latest`."""

import json

import pytest

from dsee_scale import faults

from helpers import check, launch, launch_many, losses, save_tiny_model, write_config

# dropout everywhere (the model's and DSEE's own): a resume that loses the RNG state diverges
DROPOUT = {"resid_pdrop": 0.1, "embd_pdrop": 0.1, "attn_pdrop": 0.1, "initializer_range": 0.1}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """A 6-step run with dropout, checkpoints at 3 and 6, and its config writer."""
    root = tmp_path_factory.mktemp("resume")
    model = save_tiny_model(root, "gpt2", **DROPOUT)

    def config(name, **sections):
        return write_config(
            root / f"{name}.yaml", model, root / name, root / "cache",
            dsee={"dropout": 0.1}, train={"lr": 3e-2}, **sections,
        )  # fmt: skip

    check(launch(config("full"), 1))
    return root, config


def test_a_crash_between_checkpoints_resumes_to_the_same_losses_and_logs_each_step_once(
    uninterrupted, monkeypatch
):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    root, config = uninterrupted
    cfg = config("crash")
    monkeypatch.setenv(faults.EXIT_AFTER_STEP, "5")  # dies after step 5; the last checkpoint is step 3
    r = launch(cfg, 1)
    monkeypatch.delenv(faults.EXIT_AFTER_STEP)
    assert r.returncode != 0 and sorted(losses(root / "crash")) == [1, 2, 3, 4, 5]
    check(launch(cfg, 1, "--resume"))
    steps = [json.loads(x)["step"] for x in (root / "crash" / "train_log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]  # steps 4 and 5 of the first attempt were forgotten
    # dropout masks continue where the checkpoint left them: the uninterrupted run's losses
    want, got = losses(root / "full"), losses(root / "crash")
    for s in range(1, 7):
        assert got[s] == pytest.approx(want[s], rel=1e-6, abs=1e-6), (s, got, want)
    acc = EventAccumulator(str(root / "crash" / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    assert [e.step for e in acc.Scalars("train/loss")] == [1, 2, 3, 4, 5, 6]
    assert acc.Scalars("train/loss")[4].value == pytest.approx(want[5], rel=1e-6)


CHANGES = [
    ("dsee.r=2", "dsee.r", "4", "2"),
    ("data.block_size=16", "data.block_size", "32", "16"),
    ("train.batch_size=8", "train.batch_size", "4", "8"),
    ("train.precision=bf16", "train.precision", "'fp32'", "'bf16'"),
]


@pytest.fixture(scope="module")
def changed_resumes(uninterrupted):
    """Each change resumed once, forked from one interpreter (tests/forked_cli.py); the file
    listing of the run before them all (a refused resume writes nothing)."""
    root, config = uninterrupted
    before = sorted(p.name for p in (root / "full").rglob("*"))
    argvs = [
        ["train", "--config", str(config("full")), "--resume", "train.max_steps=8", o] for o, *_ in CHANGES
    ]
    return before, dict(zip([c[0] for c in CHANGES], launch_many(argvs), strict=True))


@pytest.mark.parametrize("override,key,old,new", CHANGES)
def test_a_resume_that_changes_the_run_is_refused(uninterrupted, changed_resumes, override, key, old, new):
    root, _ = uninterrupted
    before, runs = changed_resumes
    r = runs[override]
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert r.returncode == 2 and len(errors) == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert f"{key} was {old} in" in errors[0] and f"now {new}" in errors[0], errors[0]
    assert sorted(p.name for p in (root / "full").rglob("*")) == before  # nothing written


def test_a_corrupt_latest_names_the_newest_intact_checkpoint(uninterrupted):
    root, config = uninterrupted
    ckpts = root / "full" / "checkpoints"
    assert (ckpts / "latest").read_text() == "step_6"
    shard = ckpts / "step_6" / "zero_pp_rank_0_mp_rank_00_model_states.pt"
    original = shard.read_bytes()
    shard.write_bytes(original[: len(original) // 2])  # truncated
    try:
        r = launch(config("full"), 1, "--resume", "train.max_steps=8")
        assert r.returncode == 2 and "Traceback" not in r.stderr
        error = next(line for line in r.stderr.splitlines() if line.startswith("error:"))
        assert "step_6" in error and shard.name in error and "truncated" in error
        assert (
            "the newest intact checkpoint is step_3" in error and f"echo step_3 > {ckpts / 'latest'}" in error
        )
    finally:
        shard.write_bytes(original)


def test_a_checkpoint_from_before_a_new_key_resumes_at_its_default(tmp_path):
    """A run saved before `data.format` (and the other instruction keys) existed is the same
    run at their defaults, and not at another value."""
    from dataclasses import asdict

    import yaml

    from dsee_scale.errors import ConfigError
    from dsee_scale.experiment import DataConfig, ExperimentConfig
    from dsee_scale.training.checkpoint import check_same_run

    exp = ExperimentConfig(data=DataConfig(source="python_stdlib"))
    saved = yaml.safe_load(yaml.safe_dump(asdict(exp)))
    for key in ("format", "packing", "overlong", "chat_template"):
        del saved["data"][key]
    check_same_run(saved, exp, tmp_path)
    exp.data.format = "chat"  # type: ignore[union-attr]
    with pytest.raises(ConfigError, match="data.format was None in .*, now 'chat'"):
        check_same_run(saved, exp, tmp_path)
