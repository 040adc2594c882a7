"""Faults: a rank killed mid-training ends the whole job, promptly and with a non-zero exit."""
import os
import signal
import subprocess
import sys
import time

import psutil

from train_helpers import ROOT, free_port, save_tiny_model, write_config


def test_kill_9_of_one_rank_ends_the_job_within_two_minutes(tmp_path):
    model = save_tiny_model(tmp_path, "gpt2")
    out = tmp_path / "run"
    cfg = write_config(tmp_path / "c.yaml", model, out, tmp_path / "cache",
                       train={"max_steps": 100000, "collective_timeout_s": 60},
                       eval={"every": 100000}, checkpoint={"every": 100000})
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    runner = subprocess.Popen(
        [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port",
         str(free_port()), str(ROOT / "launchers" / "train.py"), "--config", str(cfg)],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        log = out / "train_log.jsonl"
        deadline = time.time() + 300
        while time.time() < deadline and not (log.exists() and len(log.read_text().splitlines()) >= 3):
            assert runner.poll() is None, runner.stdout.read()[-3000:]
            time.sleep(0.5)
        victim = [p for p in psutil.Process(runner.pid).children(recursive=True)
                  if "--local_rank=1" in " ".join(p.cmdline())]
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


def test_killed_during_save_resumes_from_the_previous_checkpoint(tmp_path):
    from train_helpers import check, launch, losses

    model = save_tiny_model(tmp_path, "llama")
    kw = dict(checkpoint={"every": 2, "keep_last": 3})
    full = write_config(tmp_path / "full.yaml", model, tmp_path / "full", tmp_path / "cache", **kw)
    check(launch(full, 1))
    cfg = write_config(tmp_path / "cut.yaml", model, tmp_path / "cut", tmp_path / "cache", **kw)
    os.environ["DSEE_FAULT_KILL_DURING_SAVE"] = "4"
    try:
        r = launch(cfg, 1)
    finally:
        del os.environ["DSEE_FAULT_KILL_DURING_SAVE"]
    assert r.returncode != 0
    ckpts = tmp_path / "cut" / "checkpoints"
    assert (ckpts / "latest").read_text() == "step_2"  # the half-saved step_4 is not `latest`
    assert (ckpts / "step_4").is_dir() and not (ckpts / "step_4" / "manifest.json").exists()
    check(launch(cfg, 1, "--resume"))
    a, b = losses(tmp_path / "full"), losses(tmp_path / "cut")
    assert (ckpts / "latest").read_text() == "step_6"
    for s in (3, 4, 5, 6):  # redone from step 2: the same as the uninterrupted run
        assert b[s] == a[s] or abs(b[s] - a[s]) < 1e-6, (s, a, b)


def test_a_corrupted_checkpoint_is_refused_by_resume_and_export(tmp_path):
    from train_helpers import check, launch

    model = save_tiny_model(tmp_path, "gpt2")
    cfg = write_config(tmp_path / "c.yaml", model, tmp_path / "run", tmp_path / "cache",
                       train={"max_steps": 2}, checkpoint={"every": 2})
    check(launch(cfg, 1))
    shard = tmp_path / "run" / "checkpoints" / "step_2" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte, same size
    shard.write_bytes(bytes(data))
    r = launch(cfg, 1, "--resume", "train.max_steps=4")
    assert r.returncode == 2 and "does not match its checksum" in r.stderr and shard.name in r.stderr
    r = subprocess.run([sys.executable, str(ROOT / "launchers" / "export.py"),
                        str(tmp_path / "run" / "checkpoints"), str(tmp_path / "exp")],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "does not match its checksum" in r.stderr and not (tmp_path / "exp").exists()
