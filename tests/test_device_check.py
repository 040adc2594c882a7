"""The device check script (scripts/device_check.sh) in its CPU dry mode, so it never rots: the
same steps a GPU machine runs, with tiny models (one model family here, to keep CI short; the
GPT-2 family runs the same code with another config)."""

import json
import os
import subprocess
import sys

import pytest

from helpers import ROOT, free_port, leaked_shm_buffers, shm_buffers

SCRIPT = ROOT / "scripts" / "device_check.sh"


def run(tmp_path, *args, env=None):
    env = dict(
        os.environ, BENCH_RESULTS=str(tmp_path / "results"), MASTER_PORT=str(free_port()), **(env or {})
    )
    cmd = ["bash", str(SCRIPT), "--dry-run", "--work", str(tmp_path / "work"), *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1200, env=env)


def test_the_dry_run_passes_every_step_and_writes_its_figures(tmp_path):
    pytest.importorskip("peft")

    shm = shm_buffers()
    r = run(tmp_path, "--models", "smollm2-135m")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    # its `deepspeed --num_gpus 1` runs leave none of DeepSpeed's shared-memory buffers behind
    assert not leaked_shm_buffers(shm)
    res = json.loads((tmp_path / "results" / "device_check_cpu_dry.json").read_text())
    steps = res["steps"]
    assert list(steps) == ["device-tests", *(f"smollm2-135m/{s}" for s in (
        "zero3", "offload", "cpu-reference", "prune", "export")), "bench", "sparse-kernels"]  # fmt: skip
    assert all(s["ok"] for s in steps.values()) and res["failed_step"] is None
    assert steps["smollm2-135m/zero3"]["resumed_from"] == 2  # stopped half way, resumed
    # on the CPU the launcher runs and the plain-PyTorch reference agree far inside the GPU target
    assert max(steps["smollm2-135m/cpu-reference"]["max_relative_difference"].values()) < 1e-4
    assert steps["smollm2-135m/prune"]["new_sizes"]["num_attention_heads"] == 6
    assert steps["smollm2-135m/export"]["max_abs_logit_difference"] < 1e-4
    # the bench compares DSEE and PEFT LoRA on the same matrices
    rows = json.loads((tmp_path / "results" / "gpu_zero3_cpu_tiny.json").read_text())["rows"]
    assert set(rows) == {"gpt2-medium/dsee", "gpt2-medium/lora", "smollm2-135m/dsee", "smollm2-135m/lora"}
    # tiny LLaMA: hidden 72, 9 heads of 8, 3 kv heads (v: 72 -> 24), 2 layers; r=8, N=64
    assert rows["smollm2-135m/dsee"]["trainable_parameters"] == 2 * (8 * (72 + 72) + 64 + 8 * (72 + 24) + 64)
    assert rows["smollm2-135m/lora"]["trainable_parameters"] == 2 * (8 * (72 + 72) + 8 * (72 + 24))
    # tiny GPT-2: n_embd 64; DSEE and PEFT LoRA both on all of c_attn (64 -> 3 x 64)
    assert rows["gpt2-medium/dsee"]["trainable_parameters"] == 2 * (8 * (64 + 3 * 64) + 64)
    assert rows["gpt2-medium/lora"]["trainable_parameters"] == 2 * 8 * (64 + 3 * 64)
    assert all(v["tokens_per_s"] > 0 and v["peak_gpu_memory_mb"] is None for v in rows.values())
    # the sparse kernels: every kind timed against dense on the same W, except 2:4 (CUDA only)
    kernels = json.loads((tmp_path / "results" / "sparsity_speed_cpu.json").read_text())["rows"]
    assert set(kernels) == {f"smollm2-135m/{m}" for m in ("q_proj", "gate_proj", "down_proj")}
    for row in kernels.values():
        assert row["dense"]["speedup_vs_dense"] == 1.0 and "CUDA" in row["2:4-semi"]["skipped"]
        assert all(row[k]["us"] > 0 for k in ("dense-50%-zeros", "csr-50%", "structured-25%"))


def test_a_failing_step_stops_the_check_and_is_named(tmp_path):
    from dsee_scale import faults

    r = run(tmp_path, "--models", "smollm2-135m", env={faults.EXIT_AFTER_STEP: "1"})  # every run dies
    assert r.returncode == 1
    assert "device check FAILED at step smollm2-135m/zero3" in r.stderr
    res = json.loads((tmp_path / "results" / "device_check_cpu_dry.json").read_text())
    assert res["failed_step"] == "smollm2-135m/zero3" and not res["steps"]["smollm2-135m/zero3"]["ok"]
    assert "smollm2-135m/offload" not in res["steps"]  # nothing after the failure ran


def test_without_a_gpu_the_real_check_refuses_in_one_line():
    script = str(ROOT / "scripts" / "device_check.py")
    r = subprocess.run([sys.executable, script], capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.startswith("error: no CUDA GPU is visible")
    r = subprocess.run([sys.executable, script, "--dry-run", "--models", "x"], capture_output=True, text=True)
    assert r.returncode == 2 and "--models" in r.stderr
