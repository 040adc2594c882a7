"""The training run behind `deepspeed launchers/train.py`: build, inject, train, evaluate,
checkpoint, resume. Every rank runs this; only rank 0 writes logs and TensorBoard."""
from __future__ import annotations

import hashlib
import json
import math
import random
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from ..adapters import DSEELayer, inject
from ..adapters.inject import check_num_sparse, resolve_targets
from ..data import ByteTokenizer, build_corpus, micro_batch
from ..errors import ConfigError, RunStopped
from ..models import load_tokenizer
from ..zero import all_gather_objects, gathered
from . import checkpoint as ckpt
from .distributed import setup_env
from .engine import (build_model, create_engine, deepspeed_config, enable_gradient_checkpointing,
                     inject_distributed, trainable_count)
from .monitor import Monitor, memory_scalars
from .nonfinite import Skips, backward_loss, nan_fault


def supports_digest(supports: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for k in sorted(supports):
        h.update(k.encode())
        h.update(supports[k].to(torch.int64).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _mean_over_ranks(value: float, world: int) -> float:
    if world == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t.item()) / world


def check_model_fits_data(model, tokenizer, block_size: int) -> None:
    cfg = model.config
    n_pos = getattr(cfg, "n_positions", None) or getattr(cfg, "max_position_embeddings", None)
    if n_pos is not None and block_size > n_pos:
        raise ConfigError(f"data.block_size: {block_size} is larger than the model's context "
                          f"({n_pos} positions)")
    tok_vocab = getattr(tokenizer, "vocab_size", None)
    if tok_vocab is not None and tok_vocab > cfg.vocab_size:
        raise ConfigError(f"model: the tokenizer has {tok_vocab} ids but the model's vocab_size is "
                          f"{cfg.vocab_size}")


@torch.no_grad()
def evaluate(engine, blocks: torch.Tensor, batch_size: int, rank: int, world: int) -> float:
    """Mean held-out token loss over all eval blocks (every rank runs the same number of
    forwards, as ZeRO-3 gathers parameters collectively)."""
    engine.eval()
    n = blocks.shape[0]
    mine = blocks[rank::world]
    rounds = math.ceil(math.ceil(n / world) / batch_size)
    total = torch.zeros(2, dtype=torch.float64)  # sum of token losses, tokens
    for i in range(rounds):
        ids = mine[i * batch_size:(i + 1) * batch_size]
        weight = ids.shape[0]
        if weight == 0:  # nothing left on this rank: a dummy forward that counts for nothing
            ids = blocks[:1]
        out = engine(input_ids=ids, labels=ids)
        tokens = ids.shape[0] * (ids.shape[1] - 1)
        if weight:
            total += torch.tensor([out.loss.float().item() * tokens, tokens], dtype=torch.float64)
    if world > 1:
        dist.all_reduce(total)
    engine.train()
    return float(total[0] / total[1])


def dsee_histograms(model, monitor: Monitor, step: int) -> None:
    """Histograms of the DSEE values (gathered: a collective, so every rank calls it)."""
    groups = {"lora_A": [], "lora_B": [], "sparse_values": []}
    for m in model.modules():
        if isinstance(m, DSEELayer):
            for d in m.dsee.values():
                groups["lora_A"].append(d.lora_A)
                groups["lora_B"].append(d.lora_B)
                groups["sparse_values"].append(d.sparse_values)
    for name, params in groups.items():
        with gathered(params):
            if monitor.enabled and params:
                monitor.histogram(step, f"dsee/{name}",
                                  torch.cat([p.detach().reshape(-1).float().cpu() for p in params]))


def restore_frozen(model, root, tag: str, rank: int) -> None:
    """DeepSpeed's universal checkpoints carry the trained (optimizer) parameters only: frozen
    weights would stay as the freshly built model has them (wrong for pruned or random-config
    models). Read them from the original checkpoint, one at a time."""
    from ..export.zero_checkpoint import ZeroCheckpoint
    from ..zero import copy_full_into

    ck = ZeroCheckpoint(root, tag)
    for name, p in model.named_parameters():
        if not p.requires_grad and name in ck.frozen_shapes:
            copy_full_into(model, name, ck.tensor(name), rank)


def run(exp, resume: bool = False, build=None) -> dict:
    """Train `exp`; returns a summary (final losses, steps) on every rank.

    build(exp, ds, rank, world) -> (model, supports): a custom way to make the DSEE model for a
    fresh run (the pruning launcher builds the pruned model with it); default: load + inject."""
    setup_env()
    import deepspeed

    deepspeed.init_distributed(verbose=False, timeout=timedelta(seconds=exp.train.collective_timeout_s))
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(exp.train.seed)
    random.seed(exp.train.seed)
    out = Path(exp.output_dir)
    ds = deepspeed_config(exp, world)

    if not resume and (out / "checkpoints" / "latest").exists():
        raise ConfigError(f"output_dir: {str(out)!r} already holds a run (checkpoints/latest); "
                          "continue it with --resume or choose another output_dir")
    load_tag = meta = root = None
    if resume:
        root, tag, meta = ckpt.latest(exp)
        load_tag = tag
        if meta["world_size"] != world:
            load_tag = ckpt.ensure_universal(root, tag, rank)
            ds.setdefault("checkpoint", {})["load_universal"] = True

    t_build = time.perf_counter()
    if build is not None and not resume:
        model, supports = build(exp, ds, rank, world)
    else:
        model = build_model(exp, ds)
    tokenizer = load_tokenizer(exp.model) or ByteTokenizer()
    check_model_fits_data(model, tokenizer, exp.data.block_size)
    if rank == 0:  # tokenize once into the cache; the other ranks then read it
        corpus = build_corpus(exp.data, tokenizer)
    if world > 1:
        dist.barrier()
    if rank != 0:
        corpus = build_corpus(exp.data, tokenizer)
    if exp.train.gradient_checkpointing:
        enable_gradient_checkpointing(model)

    bar = None

    def inject_progress(done, total):
        nonlocal bar
        if rank == 0:
            if bar is None:
                from tqdm import tqdm

                bar = tqdm(total=total, desc=f"supports ({exp.dsee.support})", unit="matrix")
            bar.update(done - bar.n)

    if build is not None and not resume:
        inject_s = time.perf_counter() - t_build
    elif resume:
        supports = ckpt.load_supports(root, meta["tag"])
        check_num_sparse(model, resolve_targets(model, exp.dsee), exp.dsee)
        inject(model, exp.dsee, supports)
        inject_s = 0.0
    else:
        _, supports, inject_s = inject_distributed(model, exp.dsee, inject_progress)
        if bar is not None:
            bar.close()
    digests = all_gather_objects(supports_digest(supports))
    if len(set(digests)) != 1:
        raise RuntimeError(f"supports differ between ranks: {digests}")

    n_train = corpus.train.shape[0]
    t = exp.train
    total_steps = t.max_steps or max(1, math.ceil(t.epochs * n_train / t.batch_size))
    n_trainable = trainable_count(model)
    engine, _, scheduler = create_engine(model, ds, exp, total_steps)
    accum = engine.gradient_accumulation_steps()

    start = 0
    if resume:
        path, _ = engine.load_checkpoint(str(root), tag=load_tag)
        if path is None:
            raise ConfigError(f"--resume: DeepSpeed could not load {root / load_tag}")
        start = int(meta["step"])
        if load_tag != meta["tag"]:
            restore_frozen(engine.module, root, meta["tag"], rank)

    if rank == 0:  # only now: a run stopped by bad input leaves nothing on disk
        out.mkdir(parents=True, exist_ok=True)
    monitor = Monitor(out / "tensorboard", rank == 0, total_steps, start)
    log_path = out / "train_log.jsonl"
    if rank == 0:
        monitor.text(f"dsee-scale: {world} rank(s), ZeRO stage "
                     f"{ds.get('zero_optimization', {}).get('stage', 0)}, {corpus.describe()}, "
                     f"{n_trainable:,} trainable parameters, supports {digests[0]} "
                     f"(identical on {world} ranks, chosen in {inject_s:.1f}s)")
        monitor.scalars(start, {"model/trainable_params": float(n_trainable)})
    tokens_per_step = t.batch_size * exp.data.block_size
    summary = {"world_size": world, "total_steps": total_steps, "start_step": start,
               "supports_digest": digests[0], "trainable_params": n_trainable}
    engine.train()
    eval_loss = None
    skips = Skips(t.max_nonfinite_steps, fp16=t.precision == "fp16")
    fault = nan_fault(engine.module, rank)
    last_good = str(root / meta["tag"]) if resume else None
    for step in range(start, total_steps):
        t0 = time.perf_counter()
        loss_sum = 0.0
        for micro in range(accum):
            ids = micro_batch(corpus.train, step, micro, rank, world, t.micro_batch_size,
                              t.batch_size, t.seed)
            with fault(step + 1, micro):
                loss = engine(input_ids=ids, labels=ids).loss
            engine.backward(backward_loss(loss))
            engine.step()
            loss_sum += float(loss.detach().float().item())
        loss_mean = _mean_over_ranks(loss_sum / accum, world)
        dt = time.perf_counter() - t0
        done = step + 1
        skipped = skips.update(done, engine.was_step_applied(), loss_mean)
        grad_norm = engine.get_global_grad_norm()
        grad_norm = float(grad_norm) if grad_norm is not None and math.isfinite(grad_norm) else None
        lr = scheduler.get_last_lr()[0] if scheduler is not None else t.lr
        loss_log = loss_mean if math.isfinite(loss_mean) else None  # JSON has no NaN
        if rank == 0:
            with open(log_path, "a") as f:
                f.write(json.dumps({"step": done, "loss": loss_log, "lr": lr,
                                    "grad_norm": grad_norm, "step_time": dt,
                                    **({"skipped": True} if skipped else {})}) + "\n")
            if skipped:
                monitor.text(f"step {done}: skipped (loss {loss_mean}, gradient not finite); "
                             f"{skips.total} skipped so far")
            if done % t.log_every == 0 or done == total_steps or skipped:
                monitor.scalars(done, {
                    **({"train/loss": loss_mean, "train/perplexity": math.exp(min(loss_mean, 50)),
                        "train/grad_norm": grad_norm} if not skipped else {}),
                    "train/lr": lr, "train/skipped_steps": float(skips.total),
                    "train/samples": float(done * t.batch_size),
                    "perf/tokens_per_s": tokens_per_step / dt, "perf/step_time_s": dt,
                    **memory_scalars()})
            monitor.progress(done, loss_mean, tokens_per_step / dt)
        stop_why = skips.stop_message(last_good)
        if stop_why is not None:
            summary.update(final_step=done, skipped_steps=skips.total, stopped=stop_why)
            _finish(engine, monitor, out, summary, rank)
            raise RunStopped(stop_why)
        if done % t.histogram_every == 0 or done == total_steps:
            dsee_histograms(engine.module, monitor, done)
        if corpus.eval is not None and (done % exp.eval.every == 0 or done == total_steps):
            eval_loss = evaluate(engine, corpus.eval, exp.eval.batch_size, rank, world)
            monitor.scalars(done, {"eval/loss": eval_loss,
                                   "eval/perplexity": math.exp(min(eval_loss, 50))})
            monitor.text(f"step {done}: eval loss {eval_loss:.4f} "
                         f"perplexity {math.exp(min(eval_loss, 50)):.2f}")
        stop_here = t.stop_at_step is not None and done >= t.stop_at_step
        # no checkpoint of a skipped step on schedule (the last good one stays `latest`); the
        # final one is written anyway: its state is the last good one's
        if (done % exp.checkpoint.every == 0 and not skipped) or done == total_steps or stop_here:
            last_good = str(ckpt.save(engine, exp, done, world, supports, rank))
        summary.update(final_step=done, final_loss=loss_log,
                       skipped_steps=skips.total)
        if stop_here:
            monitor.text(f"stopping at step {done} (train.stop_at_step); resume with --resume")
            break
    summary["eval_loss"] = eval_loss
    summary["inject_seconds"] = inject_s
    _finish(engine, monitor, out, summary, rank)
    return summary


def _finish(engine, monitor, out: Path, summary: dict, rank: int) -> None:
    summary["peak_rss_mb_per_rank"] = all_gather_objects(memory_scalars()["mem/rss_mb"])
    monitor.close()
    if rank == 0:
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
    engine.destroy()
    dist.barrier()
    dist.destroy_process_group()  # a clean exit: no gloo threads left to abort the process
