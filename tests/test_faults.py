"""Faults: a rank killed mid-training ends the whole job, promptly and with a non-zero exit."""

import json
import math
import os
import signal
import subprocess
import sys
import time

import psutil
import torch

from dsee_scale import faults

from helpers import LAUNCH_ENV, ROOT, launch_command, save_tiny_model, write_config


def test_kill_9_of_one_rank_ends_the_job_within_two_minutes(tmp_path):
    model = save_tiny_model(tmp_path, "gpt2")
    out = tmp_path / "run"
    cfg = write_config(
        tmp_path / "c.yaml",
        model,
        out,
        tmp_path / "cache",
        train={"max_steps": 100000, "collective_timeout_s": 60},
        eval={"every": 100000},
        checkpoint={"every": 100000},
    )
    cmd = launch_command(ROOT / "launchers" / "train.py", cfg, 2)
    runner = subprocess.Popen(cmd, cwd=ROOT, env=dict(os.environ, **LAUNCH_ENV), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)  # fmt: skip
    try:
        log = out / "train_log.jsonl"
        deadline = time.time() + 300
        while time.time() < deadline and not (log.exists() and len(log.read_text().splitlines()) >= 3):
            assert runner.poll() is None, runner.stdout.read()[-3000:]
            time.sleep(0.5)
        victim = [
            p
            for p in psutil.Process(runner.pid).children(recursive=True)
            if "--local_rank=1" in " ".join(p.cmdline())
        ]
        assert len(victim) == 1, "rank 1 not found"
        killed_at = time.time()
        os.kill(victim[0].pid, signal.SIGKILL)
        output = runner.communicate(timeout=120)[0]  # raises if the job hangs
        elapsed = time.time() - killed_at
    finally:
        if runner.poll() is None:
            for p in psutil.Process(runner.pid).children(recursive=True):
                p.kill()
            runner.kill()
    assert runner.returncode != 0
    assert elapsed < 120
    assert "--local_rank=1" in output and "-9" in output  # the launcher names the dead rank


def test_killed_during_save_resumes_from_the_previous_checkpoint(tmp_path, monkeypatch):
    from helpers import check, launch, losses

    model = save_tiny_model(tmp_path, "llama")
    kw = dict(checkpoint={"every": 2, "keep_last": 3})
    full = write_config(tmp_path / "full.yaml", model, tmp_path / "full", tmp_path / "cache", **kw)
    check(launch(full, 1))
    cfg = write_config(tmp_path / "cut.yaml", model, tmp_path / "cut", tmp_path / "cache", **kw)
    monkeypatch.setenv(faults.KILL_DURING_SAVE, "4")
    r = launch(cfg, 1)
    monkeypatch.delenv(faults.KILL_DURING_SAVE)
    assert r.returncode != 0
    ckpts = tmp_path / "cut" / "checkpoints"
    assert (ckpts / "latest").read_text() == "step_2"  # the half-saved step_4 is not `latest`
    assert (ckpts / "step_4").is_dir() and not (ckpts / "step_4" / "manifest.json").exists()
    check(launch(cfg, 1, "--resume"))
    a, b = losses(tmp_path / "full"), losses(tmp_path / "cut")
    assert (ckpts / "latest").read_text() == "step_6"
    for s in (3, 4, 5, 6):  # redone from step 2: the same as the uninterrupted run
        assert b[s] == a[s] or abs(b[s] - a[s]) < 1e-6, (s, a, b)


def test_manifest_checksums_split_over_ranks_cover_every_file_once(tmp_path):
    """Each rank hashes its own shards at save and a share of the files at load; the shares
    are disjoint and together cover every file, and sizes are checked by every rank."""
    from dsee_scale.checkpoint import format as fmt

    d = tmp_path / "step_1"
    d.mkdir()
    for r in range(3):
        (d / f"zero_pp_rank_{r}_mp_rank_00_model_states.pt").write_bytes(bytes([r]) * (100 + r))
    (d / "dsee_meta.json").write_text("{}")
    parts = {}
    for r in range(3):  # what save gathers from the ranks, then rank 0 hashes the rest
        assert fmt.rank_files(d, r) == [f"zero_pp_rank_{r}_mp_rank_00_model_states.pt"]
        parts.update(fmt.hash_files(d, fmt.rank_files(d, r)))
    fmt.write_manifest(d, parts)
    whole = json.loads((d / "manifest.json").read_text())["files"]
    assert sorted(whole) == sorted(p.name for p in d.iterdir() if p.name != "manifest.json")
    for name, entry in whole.items():  # the same as hashing every file in one place
        assert entry == fmt.hash_files(d, [name])[name]
    names = list(whole)
    for victim in names:
        data = bytearray((d / victim).read_bytes())
        (d / victim).write_bytes(bytes(b ^ 0xFF for b in data))  # same size, other bytes
        found = [fmt.manifest_problem(d, (r, 3)) for r in range(3)]
        assert [f is not None for f in found].count(True) == 1, (victim, found)  # exactly one rank sees it
        assert victim in next(f for f in found if f)
        (d / victim).write_bytes(bytes(data))
    (d / names[0]).write_bytes(b"x")  # truncated: every rank sees it
    assert all("bytes" in (fmt.manifest_problem(d, (r, 3)) or "") for r in range(3))


def test_a_corrupted_checkpoint_is_refused_by_resume_and_export(tmp_path):
    """Two ranks: each checks a share of the checksums and the verdict is shared, so both
    refuse, whichever rank's share holds the corrupt file."""
    from helpers import check, launch

    model = save_tiny_model(tmp_path, "gpt2")
    cfg = write_config(
        tmp_path / "c.yaml",
        model,
        tmp_path / "run",
        tmp_path / "cache",
        train={"max_steps": 2},
        checkpoint={"every": 2},
    )
    check(launch(cfg, 2))
    shard = tmp_path / "run" / "checkpoints" / "step_2" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte, same size
    shard.write_bytes(bytes(data))
    r = launch(cfg, 2, "--resume", "train.max_steps=4")
    assert r.returncode == 2 and "does not match its checksum" in r.stderr and shard.name in r.stderr
    assert "Traceback" not in r.stderr
    r = subprocess.run(
        [
            sys.executable,
            str(ROOT / "launchers" / "export.py"),
            str(tmp_path / "run" / "checkpoints"),
            str(tmp_path / "exp"),
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2 and "does not match its checksum" in r.stderr and not (tmp_path / "exp").exists()


def _params(ckpt_dir):
    from helpers import deepspeed_params

    return deepspeed_params(ckpt_dir.parent, tag=ckpt_dir.name)


def test_a_nan_batch_is_skipped_logged_and_leaves_the_state_unchanged(tmp_path, monkeypatch):
    """NaN in rank 0's batch at steps 3 and 5 of 5 (2 ranks): both steps skipped on every rank,
    logged and counted; step 4 trains normally; the final checkpoint (step 5, written although
    skipped) holds exactly the parameters of step 4, and no checkpoint is written for step 3."""
    from helpers import check, launch

    model = save_tiny_model(tmp_path, "gpt2")
    out = tmp_path / "run"
    cfg = write_config(
        tmp_path / "c.yaml",
        model,
        out,
        tmp_path / "cache",
        train={"max_steps": 5, "max_nonfinite_steps": 2, "schedule": "constant"},
        checkpoint={"every": 1, "keep_last": 10},
    )
    monkeypatch.setenv(faults.NAN_AT_STEPS, "3,5")
    r = check(launch(cfg, 2))
    log = {rec["step"]: rec for rec in map(json.loads, (out / "train_log.jsonl").read_text().splitlines())}
    assert [s for s in log if log[s].get("skipped")] == [3, 5]
    assert log[3]["loss"] is None and log[3]["grad_norm"] is None
    assert all(math.isfinite(log[s]["loss"]) for s in (1, 2, 4))
    assert "step 3: skipped" in r.stdout + r.stderr
    assert json.loads((out / "summary.json").read_text())["skipped_steps"] == 2
    ckpts = out / "checkpoints"
    assert not (ckpts / "step_3").exists() and (ckpts / "latest").read_text() == "step_5"
    before, after = _params(ckpts / "step_4"), _params(ckpts / "step_5")
    trained = [k for k in after if "lora_" in k or "sparse_values" in k]
    assert trained and all(torch.equal(before[k], after[k]) for k in after)
    assert not torch.equal(_params(ckpts / "step_2")[trained[0]], before[trained[0]])  # step 4 trained


def test_k_nonfinite_steps_in_a_row_stop_the_run_keeping_the_last_good_checkpoint(tmp_path, monkeypatch):
    from helpers import launch

    model = save_tiny_model(tmp_path, "llama")
    out = tmp_path / "run"
    cfg = write_config(
        tmp_path / "c.yaml",
        model,
        out,
        tmp_path / "cache",
        train={"max_steps": 8, "max_nonfinite_steps": 2},
        checkpoint={"every": 1, "keep_last": 2},
    )
    monkeypatch.setenv(faults.NAN_AT_STEPS, "3,4,5")
    r = launch(cfg, 1)
    monkeypatch.delenv(faults.NAN_AT_STEPS)
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert r.returncode == 3 and len(errors) == 1, r.stderr[-3000:]
    assert "steps 3-4: 2 steps in a row" in errors[0] and "max_nonfinite_steps=2" in errors[0]
    ckpts = out / "checkpoints"
    assert str(ckpts / "step_2") in errors[0]
    assert (ckpts / "latest").read_text() == "step_2"
    assert sorted(p.name for p in ckpts.glob("step_*")) == ["step_1", "step_2"]
    steps = [json.loads(x)["step"] for x in (out / "train_log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]  # stopped at the K-th, step 5 never ran
    summary = json.loads((out / "summary.json").read_text())
    assert summary["skipped_steps"] == 2 and "stopped" in summary
    r = launch(cfg, 1, "--resume", "train.max_nonfinite_steps=5")  # resumable from step 2
    assert r.returncode == 0, r.stderr[-3000:]


def test_backward_loss_poisons_every_gradient_only_when_the_loss_is_not_finite():
    from dsee_scale.training.nonfinite import backward_loss

    w = torch.nn.Parameter(torch.ones(3))
    backward_loss((w * 2).sum()).backward()
    assert torch.equal(w.grad, torch.full((3,), 2.0))
    w.grad = None
    # an inf loss whose own gradient is finite (the case DeepSpeed's norm check would miss)
    backward_loss((w * 2).sum() + torch.tensor(float("inf"))).backward()
    assert torch.isnan(w.grad).all()


def test_skips_counts_and_stops_after_k_in_a_row():
    from dsee_scale.errors import RunStopped
    from dsee_scale.training.nonfinite import Skips

    s = Skips(limit=2, fp16=False)
    assert not s.update(1, True, 1.0) and s.update(2, False, float("nan"))
    assert not s.update(3, True, 1.0) and s.stop_message(None) is None  # the run was broken
    assert s.update(4, False, 2.0) and s.update(5, False, float("inf"))  # finite loss, bad grad
    assert (
        s.total == 3
        and "steps 4-5" in s.stop_message("ck/step_3")
        and "ck/step_3" in s.stop_message("ck/step_3")
    )
    f = Skips(limit=1, fp16=True)  # fp16: a loss-scale overflow is a skip, not a non-finite step
    assert f.update(1, False, 1.0) and f.stop_message(None) is None and f.total == 1
    try:
        Skips(limit=3, fp16=False).update(1, True, float("nan"))
    except RunStopped as e:
        assert "applied the step" in str(e)
    else:
        raise AssertionError("an applied step with a NaN loss must stop the run")


def test_universal_conversion_waits_under_its_own_timeout_and_reports_rank0s_failure(tmp_path):
    """Ranks > 0 wait for rank 0's universal conversion on the filesystem, with
    checkpoint.universal_timeout_s, and stop with rank 0's reason when it failed."""
    import pytest

    from dsee_scale.errors import UserError
    from dsee_scale.training.checkpoint import ensure_universal

    (tmp_path / "step_3").mkdir()
    with pytest.raises(UserError, match="did not finish within checkpoint.universal_timeout_s=1"):
        ensure_universal(tmp_path, "step_3", rank=1, timeout_s=1)
    (tmp_path / "step_3_universal.failed").write_text("no space left on device")
    with pytest.raises(UserError, match="failed on rank 0: no space left on device"):
        ensure_universal(tmp_path, "step_3", rank=1, timeout_s=60)
    (tmp_path / "step_3_universal" / "zero").mkdir(parents=True)  # done: returns at once
    assert ensure_universal(tmp_path, "step_3", rank=1, timeout_s=1) == "step_3_universal"
