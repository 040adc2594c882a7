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
