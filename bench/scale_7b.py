"""Scale without O(model) work on one rank: a LLaMA-2-7B-shaped model through the whole pipeline.

    python bench/scale_7b.py [--ranks 2] [--deepspeed ds_configs/zero3_offload_nvme.json]
    python bench/scale_7b.py --shape tiny       # the same phases on a 2-layer model (minutes)
    python bench/scale_7b.py --phases train --max-live 2e8   # an engine variant, recorded apart

Phases, each a real launcher run on --ranks processes (ZeRO-3, bf16, gradient checkpointing,
DSEE r=8 N=64 on q,v with magnitude supports: GreBsmo is timed apart, see `support`):
  base        random bf16 weights written as a Hugging Face safetensors directory, one tensor
              at a time (the model's "source files", so checkpoints reference them:
              checkpoint.frozen_base)
  support     GreBsmo (100 rounds, float64, one thread as each rank runs it), SVD and magnitude
              supports of ONE 4096 x 4096 matrix, timed in this process
  train       inject, 3 steps of 1 x 256 tokens per rank, checkpoint
  resume      --resume, 1 more step, checkpoint
  structured  prune 1/4 of the heads and 25% of the MLP channels of every layer, 1 re-tune step
  unstructured 50% of every block weight by a global magnitude threshold, 1 re-tune step
  export      the unstructured run merged into a Hugging Face directory
For every phase: wall seconds, the peak of the summed RSS of all its processes (sampled every
0.2 s), bytes written, and that peak against ranks x (shard + largest layer) + the imports'
RSS. Results: bench/results/scale_7b[_tiny].json. Disk: about 3.5 x the model's bf16 size in
--work (default ~/.cache/dsee_scale/scale_7b), freed phase by phase where later phases do not
need it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

from common import write_result

ROOT = Path(__file__).resolve().parents[1]
SHAPES = {
    "llama-2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=32, vocab_size=32000),
    "tiny": dict(hidden_size=128, intermediate_size=344, num_hidden_layers=2, num_attention_heads=8,
                 num_key_value_heads=8, vocab_size=512),
}  # fmt: skip


def write_base(d: Path, shape: dict) -> dict:
    """A random bf16 LLaMA of `shape` as config.json + safetensors shards of ~2 GB, one tensor
    in memory at a time (the model is never built whole)."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    cfg = LlamaConfig(**shape, max_position_embeddings=4096, rms_norm_eps=1e-5, tie_word_embeddings=False)
    cfg.dtype = torch.bfloat16
    h, i, v = shape["hidden_size"], shape["intermediate_size"], shape["vocab_size"]
    kv = h // shape["num_attention_heads"] * shape["num_key_value_heads"]
    names: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (v, h)}
    for layer in range(shape["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        names.update({p + "self_attn.q_proj.weight": (h, h), p + "self_attn.k_proj.weight": (kv, h),
                      p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, h),
                      p + "mlp.gate_proj.weight": (i, h), p + "mlp.up_proj.weight": (i, h),
                      p + "mlp.down_proj.weight": (h, i), p + "input_layernorm.weight": (h,),
                      p + "post_attention_layernorm.weight": (h,)})  # fmt: skip
    names.update({"model.norm.weight": (h,), "lm_head.weight": (v, h)})
    d.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    shard: dict[str, torch.Tensor] = {}
    files: list[list[str]] = []

    def flush():
        if shard:
            save_file(shard, str(d / f"part-{len(files):05d}.safetensors"), metadata={"format": "pt"})
            files.append(list(shard))
            shard.clear()

    total = 0
    for name, s in names.items():
        t = torch.ones(s) if len(s) == 1 else torch.randn(s, generator=g) * 0.02
        shard[name] = t.to(torch.bfloat16)
        total += shard[name].numel()
        if sum(x.numel() * 2 for x in shard.values()) > 2e9:
            flush()
    flush()
    n = len(files)
    weight_map = {}
    for k, names_in in enumerate(files):
        final = f"model-{k + 1:05d}-of-{n:05d}.safetensors"
        os.replace(d / f"part-{k:05d}.safetensors", d / final)
        weight_map.update(dict.fromkeys(names_in, final))
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": 2 * total},
                                                                 "weight_map": weight_map}))  # fmt: skip
    cfg.save_pretrained(d)
    layer_params = 2 * h * h + 2 * kv * h + 3 * i * h + 2 * h
    return {"parameters": total, "bytes_bf16": 2 * total, "largest_layer_params": max(layer_params, v * h)}


def time_supports(n: int, rounds: int) -> dict:
    """Support selection of one n x n matrix (q_proj of the shape), as one rank runs it."""
    import torch

    from dsee_scale.adapters.support import grebsmo_sparse, top_n

    torch.set_num_threads(1)
    w = (torch.randn(n, n, generator=torch.Generator().manual_seed(0)) * 0.02).to(torch.bfloat16)
    out: dict = {}
    t0 = time.perf_counter()
    top_n(w.float().abs(), 64)
    out["magnitude_seconds"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    torch.linalg.svd(w.float(), full_matrices=False)
    out["svd_seconds"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    top_n(grebsmo_sparse(w[None].float(), [0], rounds=rounds)[0].abs(), 64)
    out["grebsmo_seconds"] = time.perf_counter() - t0
    out.update(matrix=[n, n], grebsmo_rounds=rounds, threads=1)
    return out


def matmul_speed(n: int, threads: int) -> dict:
    """GFLOP/s of one 256 x n @ n x n product per dtype with a rank's share of the cores: the
    engine phases' time is nearly all such products in bf16, and CPUs without bf16 instructions
    (AVX2 only) run them several times slower than float32, so phase times only compare
    between hosts with this figure beside them."""
    import torch

    torch.set_num_threads(threads)
    out: dict = {"cpu_capability": torch.backends.cpu.get_cpu_capability(), "threads": threads}
    for dtype in (torch.float32, torch.bfloat16):
        x, w = torch.randn(256, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        x @ w.T  # warm up
        t0 = time.perf_counter()
        x @ w.T
        seconds = time.perf_counter() - t0
        out[f"{str(dtype).removeprefix('torch.')}_gflops"] = 2 * 256 * n * n / seconds / 1e9
    return out


class Sampler:
    """The peaks of the summed RSS and PSS of a process and all its descendants, sampled every
    0.5 s. RSS counts a page every process maps (the model's memory-mapped files, DeepSpeed's
    shared-memory buffers) once per process; PSS shares it among them, so the summed PSS is
    the memory all ranks hold together. Swap (where the machine has any) is summed apart."""

    def __init__(self, pid: int):
        self.root, self.peak, self.peak_pss, self.stop = psutil.Process(pid), 0, 0, threading.Event()
        self.peak_swap = 0
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self):
        while not self.stop.is_set():
            rss = pss = swap = 0
            try:
                for p in [self.root, *self.root.children(recursive=True)]:
                    try:
                        m = p.memory_full_info()
                        rss, pss, swap = rss + m.rss, pss + m.pss, swap + m.swap
                    except psutil.Error:
                        pass
            except psutil.Error:
                pass
            self.peak, self.peak_pss = max(self.peak, rss), max(self.peak_pss, pss)
            self.peak_swap = max(self.peak_swap, swap)
            time.sleep(0.5)

    def finish(self) -> tuple[float, float]:
        """(peak summed RSS, peak summed PSS) in GiB."""
        self.stop.set()
        self.thread.join()
        return self.peak / 2**30, self.peak_pss / 2**30


def imports_rss() -> float:
    """GiB a rank holds before any model: the RSS of a process that imported what a launcher does."""
    code = ("import deepspeed, psutil, torch, transformers, dsee_scale.training.trainer\n"
            "print(psutil.Process().memory_info().rss)")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    return int(out.stdout.split()[-1]) / 2**30


def du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.exists() else 0


def export_beside_baselines(ckpt: Path, work: Path, measured) -> dict:
    """The merged export of a 7B checkpoint, in the same run as its two baselines: a plain copy
    of the checkpoint's files (the disk's speed) and DeepSpeed's own zero_to_fp32 consolidation
    of the same checkpoint to bf16 safetensors in 2 GB shards (the same bytes out). Each output
    is deleted before the next is written (disk)."""
    tag_dir = ckpt / (ckpt / "latest").read_text().strip()
    files = sorted(f for f in tag_dir.iterdir() if f.is_file())
    copy = work / "copy"
    shutil.rmtree(copy, ignore_errors=True)
    copy.mkdir()
    t0 = time.perf_counter()
    for f in files:
        shutil.copyfile(f, copy / f.name)
    os.sync()
    plain = {"seconds": time.perf_counter() - t0, "bytes": du(copy)}
    shutil.rmtree(copy)
    export = work / "export"
    cmd = [sys.executable, str(ROOT / "launchers" / "export.py"), str(ckpt), str(export), "--force"]
    ours = measured([*cmd, "--max-shard-size", "2GB"], export, sync=True)
    shutil.rmtree(export)
    z2f = work / "zero_to_fp32"
    shutil.rmtree(z2f, ignore_errors=True)
    script = ("import torch\nfrom deepspeed.utils import zero_to_fp32 as z\n"
              f"z.convert_zero_checkpoint_to_state_dict({str(ckpt)!r}, {str(z2f)!r}, dtype=torch.bfloat16, "
              "max_shard_size='2GB', safe_serialization=True)")  # fmt: skip
    # it loads every rank's frozen fragments whole (13.5 GB at 7B), then joins each parameter's:
    # it may not fit in RAM (a swap file lets it finish; the swap it used is recorded)
    limit = ["timeout", "1200"]  # swapping can take it past any useful time: exit 124 then
    deepspeed = measured([*limit, sys.executable, "-c", script], z2f, sync=True, may_fail=True)
    shutil.rmtree(z2f, ignore_errors=True)
    for r in (plain, ours, deepspeed):
        if r.get("exit_code", 0) == 0:
            r["bytes_per_second"] = (r.get("bytes") or r["bytes_written"]) / r["seconds"]
    return {**ours, "plain_copy": plain, "deepspeed_zero_to_fp32": deepspeed,
            "export_over_plain_copy_speed": ours["bytes_per_second"] / plain["bytes_per_second"],
            "checkpoint_bytes": sum(f.stat().st_size for f in files)}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", choices=list(SHAPES), default="llama-2-7b")
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--deepspeed", default="ds_configs/zero3_offload_cpu.json")
    ap.add_argument("--work", default=str(Path.home() / ".cache" / "dsee_scale" / "scale_7b"))
    ap.add_argument("--grebsmo-rounds", type=int, default=100)
    ap.add_argument("--phases", default="base,support,train,resume,structured,unstructured,export")
    ap.add_argument(
        "--max-live",
        type=float,
        default=None,
        help="the engine's stage3_max_live_parameters for these phases (recorded as "
        "<phase>_max_live_<N>, in their own output directories)",
    )
    ap.add_argument("--max-reuse", type=float, default=None,
                    help="the engine's stage3_max_reuse_distance (DeepSpeed keeps gathered every "
                         "parameter reused within that many elements; default 1e9), recorded as "
                         "<phase>[_max_live_<N>]_max_reuse_<M>")  # fmt: skip
    args = ap.parse_args()
    shape = SHAPES[args.shape]
    work = Path(args.work) / args.shape
    work.mkdir(parents=True, exist_ok=True)
    suffix, ds = "", json.loads((ROOT / args.deepspeed).read_text())
    for key, value, label in (("stage3_max_live_parameters", args.max_live, "max_live"),
                              ("stage3_max_reuse_distance", args.max_reuse, "max_reuse")):  # fmt: skip
        if value is not None:  # a variant of the engine config, beside the default's phases
            suffix += f"_{label}_{value:g}"
            ds["zero_optimization"][key] = value
    if suffix:
        variant = work / f"zero3{suffix}.json"
        variant.write_text(json.dumps(ds, indent=1))
    engine_config = str(variant) if suffix else args.deepspeed
    name = "scale_7b" + ("" if args.shape == "llama-2-7b" else f"_{args.shape}")
    results_path = work / "phases.json"  # phases done so far (a rerun skips them)
    done: dict = json.loads(results_path.read_text()) if results_path.is_file() else {}
    base = work / "base"
    env = dict(os.environ, DS_ACCELERATOR=os.environ.get("DS_ACCELERATOR", "cpu"))
    h = shape["hidden_size"]
    heads, channels = shape["num_attention_heads"] // 4, shape["intermediate_size"] // 4
    common = [
        f"model.path={base}", "model.dtype=bfloat16", "dsee.r=8", "dsee.alpha=16", "dsee.num_sparse=64",
        "dsee.support=magnitude", "data.source=python_stdlib", "data.block_size=256",
        "data.max_train_blocks=64", "data.max_eval_blocks=2", f"data.cache_dir={work / 'data'}",
        "train.batch_size=" + str(args.ranks), "train.micro_batch_size=1", "train.lr=1e-4",
        "train.precision=bf16", "train.gradient_checkpointing=true", "train.histogram_every=1000",
        "train.warmup_steps=0", "eval.every=1000000", "eval.batch_size=1", "checkpoint.keep_last=1",
        f"deepspeed={engine_config}", f"nvme_path={work / 'nvme'}",
    ]  # fmt: skip

    def launch(script: str, out: Path, *extra: str, flags: tuple[str, ...] = ()) -> dict:
        cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(args.ranks),
               "--master_port", "29791", str(ROOT / "launchers" / script),
               "--config", str(ROOT / "configs" / "scale-7b.yaml"), *flags,
               f"output_dir={out}", *common, *extra]  # fmt: skip
        result = measured(cmd, out)
        summary = out / "summary.json"  # the run's own ru_maxrss of each rank
        if summary.is_file():
            run_summary = json.loads(summary.read_text())
            result["peak_rss_mib_per_rank"] = run_summary.get("peak_rss_mb_per_rank")
            memory = run_summary.get("peak_memory_mb_per_rank", [])
            gathered = [m.get("mem/peak_gathered_params_mb") for m in memory]
            if gathered and None not in gathered:  # whole parameters held at once (steps, eval loss)
                result["peak_gathered_params_mib_per_rank"] = gathered
            stages = run_summary.get("memory_by_stage_mb")
            if stages:  # resident and high-water RSS after each stage (model, engine, steps, ...)
                result["memory_by_stage_mib_per_rank"] = stages
        return result

    def measured(cmd: list[str], out: Path, sync: bool = False, may_fail: bool = False) -> dict:
        """Run cmd; its wall seconds (sync: including writing its files to disk), the peak
        summed RSS of it and its children, and the bytes under out (may_fail: a failure, e.g.
        killed for memory, is recorded with its exit code instead of ending the bench)."""
        print(" ".join(cmd[-8:]), flush=True)
        t0 = time.perf_counter()
        p = subprocess.Popen(cmd, cwd=ROOT, env=env)
        s = Sampler(p.pid)
        rc = p.wait()
        peak, peak_pss = s.finish()
        swapped = s.peak_swap / 2**30
        if rc != 0 and not may_fail:
            sys.exit(f"error: {' '.join(cmd[-6:])} exited {rc}")
        if sync:
            os.sync()
        seconds = time.perf_counter() - t0
        return {"seconds": seconds, "peak_rss_gib_all_processes": peak, "exit_code": rc,
                "peak_pss_gib_all_processes": peak_pss, "bytes_written": du(out),
                **({"peak_swap_gib_all_processes": swapped} if swapped else {})}  # fmt: skip

    def phase(key: str, fn) -> None:
        engine_phase = key not in ("base", "support")  # the others do not run the engine
        if engine_phase:
            key += suffix
        if key in done or key.removesuffix(suffix) not in args.phases.split(","):
            return
        print(f"== {key}", flush=True)
        done[key] = fn()
        if engine_phase:
            done[key]["host_matmul"] = host
        if engine_phase and args.max_live is not None:
            done[key]["stage3_max_live_parameters"] = args.max_live
        if engine_phase and args.max_reuse is not None:
            done[key]["stage3_max_reuse_distance"] = args.max_reuse
        results_path.write_text(json.dumps(done, indent=1))
        print(json.dumps(done[key]), flush=True)

    def make_base() -> dict:
        shutil.rmtree(base, ignore_errors=True)
        t0 = time.perf_counter()
        info = write_base(base, shape)
        return {**info, "seconds": time.perf_counter() - t0, "bytes_written": du(base)}

    phase("base", make_base)
    host = matmul_speed(h, max(1, (os.cpu_count() or 1) // args.ranks))
    print(f"host: {host}", flush=True)
    if "parameters" in done.get("base", {}):  # forward, recomputation, input gradients: ~6 P per token
        step = 6 * done["base"]["parameters"] * 256 / (host["bfloat16_gflops"] * 1e9)
        print(f"a training step's products alone take about {step / 60:.0f} min per rank on this host",
              flush=True)  # fmt: skip
    phase("support", lambda: time_supports(h, args.grebsmo_rounds))
    tuned = work / ("tuned" + suffix)
    phase("train", lambda: launch("train.py", tuned, "train.max_steps=3", "checkpoint.every=3"))
    resume = ("train.max_steps=4", "checkpoint.every=4")
    phase("resume", lambda: launch("train.py", tuned, *resume, flags=("--resume",)))
    ckpt = ("--from", str(tuned / "checkpoints"))
    one_step = ("train.max_steps=1", "checkpoint.every=1")
    structured = work / ("structured" + suffix)
    cut = (f"prune.heads_per_layer={heads}", f"prune.channels_per_layer={channels}",
           "prune.head_score=weight", "prune.channel_score=weight")  # fmt: skip
    phase("structured", lambda: launch("prune.py", structured, "prune.kind=structured", *cut, *one_step,
                                        flags=ckpt))  # fmt: skip
    if "structured" + suffix in done:
        shutil.rmtree(structured, ignore_errors=True)  # nothing later needs it (its size is recorded)
    unstructured = work / ("unstructured" + suffix)
    half = ("prune.ratio=0.5", "prune.scope=global", "prune.score=magnitude")
    phase("unstructured", lambda: launch("prune.py", unstructured, "prune.kind=unstructured", *half,
                                          *one_step, flags=ckpt))  # fmt: skip
    phase("export", lambda: export_beside_baselines(unstructured / "checkpoints", work, measured))
    info = done.get("base", {})
    bound = None
    if info:
        shard = info["bytes_bf16"] / args.ranks
        layer = 2 * info["largest_layer_params"]
        imports = imports_rss()
        bound = {"shard_gib": shard / 2**30, "largest_layer_gib": layer / 2**30, "imports_rss_gib": imports,
                 "ranks_x_shard_plus_layer_gib": args.ranks * (shard + layer) / 2**30,
                 "ranks_x_shard_layer_imports_gib": args.ranks * ((shard + layer) / 2**30 + imports),
                 }  # fmt: skip
    result = {"shape": {args.shape: shape}, "ranks": args.ranks, "deepspeed": args.deepspeed,
              "phases": done, "memory_bound": bound,
              "target_peak_rss_gib_all_ranks": 20}  # fmt: skip
    write_result(name, result)


if __name__ == "__main__":
    main()
