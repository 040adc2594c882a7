#!/usr/bin/env python
"""The device check: the whole pipeline on one GPU in minutes, every figure to bench/results/.

    bash scripts/device_check.sh              # a machine with one NVIDIA GPU: installs, then this
    python scripts/device_check.py --dry-run  # the same steps on CPU with tiny models (tests)

Steps, each timed; the first failure stops the check with the step named (exit code 1):
  device-tests            the sparse update on the device: forward/backward vs dense math,
                          float64 gradcheck, bf16 close to fp32 (tests/test_delta.py -k on_device)
  <model>/zero3           `deepspeed --num_gpus 1 launchers/train.py`, ZeRO-3 fp32, stopped half way
                          and resumed from its checkpoint
  <model>/offload         the same run with ZeRO-3 + CPU offload (DeepSpeedCPUAdam)
  <model>/cpu-reference   the same run in plain PyTorch on the CPU (fp32): both device runs'
                          losses within 1e-2 relative of it (target; typically ~1e-5)
  <model>/prune           structured pruning of the resumed run (heads and MLP channels) + re-tune
  <model>/export          merged export, reloaded with plain transformers on the device; logits
                          against the framework's model rebuilt from DeepSpeed's consolidation
  bench                   bench/gpu_zero3.py: DSEE vs PEFT LoRA under ZeRO-3 bf16, on the same
                          target matrices: tokens/s and peak GPU memory
  sparse-kernels          bench/sparsity_speed.py: one linear layer's forward with 50% zeros in a
                          dense kernel, as CSR, 2:4 on sparse tensor cores
                          (to_sparse_semi_structured) and 25% smaller (structured), against dense
Models: a GPT-2-small-sized model (124M) and a SmolLM2-135M-shaped LLaMA (30 layers, GQA 9/3),
random weights (saved once, so every run and the CPU reference start from the same ones; the
real SmolLM2 GGUF is 92 MB, more than the device tool carries). Supports: magnitude (exactly
reproducible across devices; GreBsmo's top-N is decided by float rounding, see issue #17).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]

MODELS = {
    "gpt2-small": dict(
        model_type="gpt2", n_layer=12, n_embd=768, n_head=12, n_positions=1024, vocab_size=50257
    ),
    "smollm2-135m": dict(
        model_type="llama", hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
        num_attention_heads=9, num_key_value_heads=3, vocab_size=49152, max_position_embeddings=2048,
        tie_word_embeddings=True, rms_norm_eps=1e-5, rope_theta=100000.0,
    ),
}  # fmt: skip
TINY = {  # --dry-run: the same families, 2 layers
    "gpt2-small": dict(MODELS["gpt2-small"], n_layer=2, n_embd=64, n_head=4, n_positions=128, vocab_size=256),
    "smollm2-135m": dict(
        MODELS["smollm2-135m"], hidden_size=72, intermediate_size=96, num_hidden_layers=2,
        vocab_size=256, max_position_embeddings=128,
    ),
}  # fmt: skip
PRUNE = {  # a quarter of the heads (GQA: one q head per kv group) and of the MLP channels
    "gpt2-small": {"heads_per_layer": 3, "channels_per_layer": 768},
    "smollm2-135m": {"heads_per_layer": 1, "channels_per_layer": 384},
}
PRUNE_TINY = {"gpt2-small": {"heads_per_layer": 1, "channels_per_layer": 64},
              "smollm2-135m": {"heads_per_layer": 1, "channels_per_layer": 24}}  # fmt: skip
LOSS_TOLERANCE = 1e-2  # relative, device fp32 vs CPU fp32 (the target)


class Failed(Exception):
    pass


class Check:
    """Runs named steps, times them, keeps every figure, writes the JSON, stops at a failure."""

    def __init__(self, args):
        self.args, self.dry = args, args.dry_run
        self.device = "cpu" if self.dry else "cuda"
        self.work = Path(args.work)
        self.work.mkdir(parents=True, exist_ok=True)
        self.steps: dict[str, dict] = {}
        self.t0 = time.perf_counter()

    @contextlib.contextmanager
    def step(self, name: str):
        print(f"== {name}", flush=True)
        t0 = time.perf_counter()
        record: dict = {}
        self.steps[name] = record
        try:
            yield record
        except Exception as e:
            record.update(
                ok=False, seconds=round(time.perf_counter() - t0, 1), error=f"{type(e).__name__}: {e}"
            )
            if not isinstance(e, Failed):
                traceback.print_exc()
            self.finish(failed=name)
        record.update(ok=True, seconds=round(time.perf_counter() - t0, 1))
        print(f"   ok in {record['seconds']} s", flush=True)

    def run(self, cmd: list[str], log: str, env: dict | None = None) -> subprocess.CompletedProcess:
        r = subprocess.run(
            cmd,
            cwd=ROOT,
            capture_output=True,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        )
        (self.work / "logs").mkdir(exist_ok=True)
        (self.work / "logs" / f"{log}.log").write_text(r.stdout + r.stderr)
        if r.returncode != 0:
            tail = "\n".join((r.stdout + r.stderr).strip().splitlines()[-15:])
            raise Failed(f"`{' '.join(cmd[-6:])}` exited {r.returncode}:\n{tail}")
        return r

    def finish(self, failed: str | None = None) -> None:
        card = torch.cuda.get_device_name(0) if self.device == "cuda" else "cpu"
        slug = "".join(c if c.isalnum() else "_" for c in card.lower()).strip("_")
        result = {
            "device": card, "dry_run": self.dry, "torch": torch.__version__, "cuda": torch.version.cuda,
            "install_seconds": self.args.install_seconds,
            "total_seconds": round(time.perf_counter() - self.t0, 1),
            "failed_step": failed, "steps": self.steps,
        }  # fmt: skip
        common = _bench_common()
        common.write_result(f"device_check_{slug}" + ("_dry" if self.dry else ""), result)
        if failed:
            print(f"device check FAILED at step {failed}: {self.steps[failed]['error']}", file=sys.stderr)
            sys.exit(1)
        print(f"device check passed: {len(self.steps)} steps in {result['total_seconds']} s")


def _bench_common():
    """bench/common.py (result files with machine, versions and command)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_common", ROOT / "bench" / "common.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def save_model(check: Check, name: str) -> Path:
    """Random weights from a fixed seed, saved once: every run starts from the same model."""
    from transformers import AutoConfig, AutoModelForCausalLM

    d = check.work / "models" / name
    if not (d / "config.json").is_file():
        kw = dict((TINY if check.dry else MODELS)[name])
        torch.manual_seed(0)
        config = AutoConfig.for_model(kw.pop("model_type"), initializer_range=0.05, **kw)
        AutoModelForCausalLM.from_config(config).save_pretrained(d)
    return d


def write_experiment(check: Check, name: str, model_dir: Path) -> Path:
    steps = 4 if check.dry else 20
    cfg = {
        "model": {"path": str(model_dir)},
        "dsee": {"r": 8, "alpha": 16, "num_sparse": 64, "support": "magnitude"},
        "data": {"source": "python_stdlib", "block_size": 128, "max_train_blocks": 512, "max_eval_blocks": 16,
                 "cache_dir": str(check.work / "cache")},
        "train": {"max_steps": steps, "batch_size": 4, "micro_batch_size": 4, "lr": 1e-3, "warmup_steps": 2,
                  "schedule": "linear", "precision": "fp32", "histogram_every": steps},
        "eval": {"every": steps // 2, "batch_size": 4},
        "checkpoint": {"every": steps // 2, "keep_last": 3},
        "deepspeed": str(ROOT / "ds_configs" / "zero3.json"),
        "output_dir": str(check.work / "runs" / name),
    }  # fmt: skip
    path = check.work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def launch(check: Check, script: str, config: Path, log: str, *overrides: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "1",
           "--master_port", str(_free_port()), str(ROOT / "launchers" / script), "--config", str(config),
           *overrides]  # fmt: skip
    return check.run(cmd, log)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_losses(output_dir: Path) -> dict[int, float]:
    lines = (output_dir / "train_log.jsonl").read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines)}


def summary(output_dir: Path) -> dict:
    return json.loads((output_dir / "summary.json").read_text())


def model_steps(check: Check, name: str) -> None:
    model_dir = save_model(check, name)
    cfg = write_experiment(check, name, model_dir)
    runs = check.work / "runs"
    steps = 4 if check.dry else 20
    with check.step(f"{name}/zero3") as rec:
        launch(check, "train.py", cfg, f"{name}-zero3-first", f"train.stop_at_step={steps // 2}")
        launch(check, "train.py", cfg, f"{name}-zero3-resume", "--resume")
        got = run_losses(runs / name)
        if sorted(got) != list(range(1, steps + 1)):
            raise Failed(f"steps logged: {sorted(got)}")
        s = summary(runs / name)
        rec.update(losses=got, resumed_from=s["start_step"], peak_memory_mb=s.get("peak_memory_mb_per_rank"),
                   trainable_params=s["trainable_params"])  # fmt: skip
    with check.step(f"{name}/offload") as rec:
        launch(check, "train.py", cfg, f"{name}-offload", f"output_dir={runs / (name + '-offload')}",
               f"deepspeed={ROOT / 'ds_configs' / 'zero3_offload_cpu.json'}")  # fmt: skip
        rec.update(losses=run_losses(runs / f"{name}-offload"))
    with check.step(f"{name}/cpu-reference") as rec:
        from dsee_scale.reference import plain_reference

        reference, _, _ = plain_reference(cfg)
        worst = {}
        for run in (name, f"{name}-offload"):
            got = run_losses(runs / run)
            worst[run] = max(abs(got[s] - reference[s]) / abs(reference[s]) for s in reference)
        rec.update(cpu_losses=reference, max_relative_difference=worst, tolerance=LOSS_TOLERANCE)
        if max(worst.values()) > LOSS_TOLERANCE:
            raise Failed(f"losses differ from the CPU fp32 reference by {worst} (> {LOSS_TOLERANCE})")
    pruned = runs / f"{name}-pruned"
    with check.step(f"{name}/prune") as rec:
        sizes = (PRUNE_TINY if check.dry else PRUNE)[name]
        launch(check, "prune.py", cfg, f"{name}-prune", "--from", str(runs / name / "checkpoints"),
               f"output_dir={pruned}", f"train.max_steps={2 if check.dry else 5}",
               *(f"prune.{k}={v}" for k, v in sizes.items()))  # fmt: skip
        plan = json.loads((pruned / "prune_plan.json").read_text())
        rec.update(removed_per_layer=sizes, new_sizes=plan["config"], losses=run_losses(pruned))
    with check.step(f"{name}/export") as rec:
        rec.update(export_and_compare(check, pruned / "checkpoints", check.work / "exports" / name))


@torch.no_grad()
def export_and_compare(check: Check, ckpt: Path, out: Path) -> dict:
    from transformers import AutoModelForCausalLM

    from dsee_scale.reference import rebuilt

    check.run(
        [sys.executable, str(ROOT / "launchers" / "export.py"), str(ckpt), str(out), "--force"], "export"
    )
    loaded = AutoModelForCausalLM.from_pretrained(out).to(check.device).eval()
    framework = rebuilt(ckpt).to(check.device).eval()
    ids = torch.randint(0, 256, (2, 64), generator=torch.Generator().manual_seed(0)).to(check.device)
    a, b = loaded(ids).logits.float(), framework(ids).logits.float()
    diff = float((a - b).abs().max())
    if diff > 1e-3:
        raise Failed(f"export logits differ from the framework's model by {diff} (> 1e-3)")
    return {"max_abs_logit_difference": diff, "model_type": loaded.config.model_type,
            "parameters": sum(p.numel() for p in loaded.parameters())}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny models (what the test suite runs)")
    ap.add_argument("--work", default="/tmp/dsee_device_check", help="scratch directory")
    ap.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, of {', '.join(MODELS)}")
    ap.add_argument("--install-seconds", type=float, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    models = [m for m in args.models.split(",") if m]
    if any(m not in MODELS for m in models):
        print(f"error: --models: allowed: {', '.join(MODELS)}", file=sys.stderr)
        sys.exit(2)
    if not args.dry_run and not torch.cuda.is_available():
        print(f"error: no CUDA GPU is visible (torch {torch.__version__}); use --dry-run on a CPU machine",
              file=sys.stderr)  # fmt: skip
        sys.exit(2)
    if args.dry_run:  # a smoke run: its figures go to the git-ignored quick results
        os.environ["DS_ACCELERATOR"] = "cpu"
        os.environ.setdefault("BENCH_RESULTS", str(ROOT / "bench" / "results" / "quick"))
    check = Check(args)
    with check.step("device-tests") as rec:
        r = check.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                       str(ROOT / "tests" / "test_delta.py"), "-k", "on_device"], "device-tests")  # fmt: skip
        rec.update(pytest=r.stdout.strip().splitlines()[-1])
    for name in models:
        model_steps(check, name)
    with check.step("bench") as rec:
        cmd = [sys.executable, str(ROOT / "bench" / "gpu_zero3.py")]
        tiny = ["--device", "cpu", "--tiny", "--steps", "1", "--batch", "2", "--seq", "16"]
        cmd += tiny if check.dry else ["--steps", "10"]
        r = check.run(cmd, "bench", env={"MASTER_PORT": str(_free_port())})
        rec.update(output=r.stdout.strip().splitlines()[-4:])
    with check.step("sparse-kernels") as rec:  # what unstructured / 2:4 / structured sparsity buys
        cmd = [sys.executable, str(ROOT / "bench" / "sparsity_speed.py")]
        cmd += ["--tokens", "64", "--shapes", "smollm2-135m"] if check.dry else []
        r = check.run(cmd, "sparse-kernels")
        rec.update(output=r.stdout.strip().splitlines()[-4:])
    check.finish()


if __name__ == "__main__":
    main()
