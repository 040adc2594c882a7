"""The training run behind `dsee-scale train` (and `deepspeed launchers/train.py`), as a recipe:

    run = TrainingRun(exp, resume=False)
    run.setup()           # process group, resume point, model + DSEE, data, engine, logs
    summary = run.train()
    run.cleanup()         # summary.json, engine and process group down

Every rank runs it; only rank 0 writes logs, TensorBoard and checkpoint metadata. Setup is a
row of small named steps, each usable alone. Device rule (zero/comm.py): batches go to the
engine's device, every reduction goes through `comm`.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..adapters import choose_supports, inject
from ..adapters.inject import check_num_sparse, resolve_targets, target_shape
from ..checkpoint import format as fmt
from ..checkpoint.base import BaseRecord, references_base
from ..checkpoint.base import record as record_base
from ..checkpoint.base import verify as verify_base
from ..data import ByteTokenizer, Corpus, build_corpus, chat_template_of, micro_batch, packing_mode, to_device
from ..errors import ConfigError, RunStopped
from ..experiment import ExperimentConfig
from ..faults import exit_after_step, nan_fault
from ..generation import held_out_samples
from ..models import load_config, load_tokenizer
from ..zero import GatheredPeak, comm
from . import checkpoint as ckpt
from .distributed import setup_env, threads_per_rank
from .engine import (
    build_model,
    create_engine,
    deepspeed_config,
    enable_gradient_checkpointing,
    frozen_dtype,
    trainable_count,
)
from .evaluate import dsee_histograms, evaluate, generation_eval, samples_markdown
from .monitor import Monitor, mark_stage, memory_scalars, progress_bar, release_freed_memory, stage_memory
from .nonfinite import Skips, backward_loss

# build(exp, ds_config, rank, world) -> (model with DSEE injected, supports): a custom way to
# make the model of a fresh run (the pruning stage builds the pruned model with it)
Builder = Callable[[ExperimentConfig, dict, int, int], tuple[nn.Module, dict[str, torch.Tensor]]]
# teacher(exp, ds_config, rank, world) -> the partitioned distillation teacher (prune.distill)
TeacherBuilder = Callable[[ExperimentConfig, dict, int, int], nn.Module]


def supports_digest(supports: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for k in sorted(supports):
        h.update(k.encode())
        h.update(supports[k].to(torch.int64).contiguous().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def start_process_group(exp: ExperimentConfig) -> tuple[int, int]:
    """Rank discovery, this rank's device and the process group; seeds. Returns (rank, world).
    Safe to call again (the pruning stage calls it before the run does)."""
    env = setup_env()
    rank, world = comm.init(env.local_rank, env.master_port, exp.train.collective_timeout_s)
    threads = threads_per_rank() if comm.device().type == "cpu" else None
    if threads is not None:  # ranks on one machine share its cores (distributed.py)
        torch.set_num_threads(threads)
    torch.manual_seed(exp.train.seed)
    random.seed(exp.train.seed)
    mark_stage("start", once=True)  # imports and the process group (called twice by the prune stage)
    return rank, world


def check_model_fits_data(config: Any, tokenizer: Any, block_size: int) -> None:
    n_pos = getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)
    if n_pos is not None and block_size > n_pos:
        raise ConfigError(
            f"data.block_size: {block_size} is larger than the model's context ({n_pos} positions)"
        )
    tok_vocab = getattr(tokenizer, "vocab_size", None)
    if tok_vocab is not None and tok_vocab > config.vocab_size:
        raise ConfigError(
            f"model: the tokenizer has {tok_vocab} ids but the model's vocab_size is {config.vocab_size}"
        )


@dataclass
class ResumePoint:
    root: Path  # <output_dir>/checkpoints
    tag: str  # the checkpoint's own tag
    load_tag: str  # what the engine loads: the tag, or its universal form on another world size
    meta: fmt.Meta


class TrainingRun:
    def __init__(
        self,
        exp: ExperimentConfig,
        resume: bool = False,
        build: Builder | None = None,
        teacher: TeacherBuilder | None = None,
    ):
        if exp.data is None:
            raise ConfigError(
                "data: the experiment has no data section (train_files, source or "
                "hub_dataset); training needs one"
            )
        self.exp, self.data, self.resume_requested, self.build = exp, exp.data, resume, build
        self.teacher_builder, self.teacher = teacher, None
        self.out = Path(exp.output_dir)

    # ---- setup ---------------------------------------------------------------------------
    def setup(self) -> None:
        exp = self.exp
        self.rank, self.world = start_process_group(exp)
        self.config = load_config(exp.model)
        self.ds = deepspeed_config(exp, self.world, getattr(self.config, "hidden_size", None))
        self.resume = self.find_resume_point()
        custom = self.build is not None and self.resume is None
        self.reference_base = references_base(exp.checkpoint.frozen_base, exp.model, custom)
        self.base: BaseRecord | None = None
        self.model, self.supports, self.inject_s = self.build_model()
        mark_stage("model")  # partitions (the pruned fill, for a pruned re-tune), DSEE injected
        if self.teacher_builder is not None:
            self.create_teacher()
            mark_stage("teacher")
        self.corpus = self.load_data()
        mark_stage("data")
        self.create_engine()
        mark_stage("engine")  # optimizer state, DeepSpeed's buffers
        if self.gradient_pending:
            self.choose_gradient_supports()
        self.start = self.load_checkpoint()
        self.open_logs()
        models = [self.engine.module] + ([] if self.teacher is None else [self.teacher.module])
        self.gathered = GatheredPeak(models)  # the first steps and evals; summary.json
        release_freed_memory()  # what loading the model and data read and let go
        mark_stage("setup")

    def find_resume_point(self) -> ResumePoint | None:
        root = fmt.checkpoints_dir(self.exp.output_dir)
        if not self.resume_requested:
            if (root / fmt.LATEST).exists():
                raise ConfigError(
                    f"output_dir: {str(self.out)!r} already holds a run "
                    f"(checkpoints/{fmt.LATEST}); continue it with --resume or "
                    "choose another output_dir"
                )
            return None
        root, tag, meta = ckpt.resume_point(self.exp)
        ckpt.check_same_run(fmt.read_experiment(root / tag), self.exp, root / tag)
        if "base" in meta:  # its frozen weights are the model's files: they must be the same files
            verify_base(meta["base"], root / tag, "--resume: ")
        load_tag = tag
        if meta["world_size"] != self.world:
            load_tag = ckpt.ensure_universal(root, tag, self.rank, self.exp.checkpoint.universal_timeout_s)
            self.ds.setdefault("checkpoint", {})["load_universal"] = True
        return ResumePoint(root, tag, load_tag, meta)

    def build_model(self) -> tuple[nn.Module, dict[str, torch.Tensor], float]:
        """The partitioned model with DSEE injected: a custom builder's (fresh pruned runs),
        the checkpoint's supports (resume), or supports chosen now, spread over ranks."""
        exp, t0 = self.exp, time.perf_counter()
        self.gradient_pending, self.support_s = False, 0.0
        if self.build is not None and self.resume is None:
            model, supports = self.build(exp, self.ds, self.rank, self.world)
        else:
            model = build_model(exp, self.ds)
            check_num_sparse(model, resolve_targets(model, exp.dsee), exp.dsee)
            if self.resume is not None:
                supports = ckpt.load_supports(self.resume.root, self.resume.meta["tag"])
            elif exp.dsee.support == "gradient":  # chosen from data once the engine exists
                self.gradient_pending = True
                supports = {t.key: torch.zeros(2, exp.dsee.n_for(*target_shape(model, t)), dtype=torch.long)
                            for t in resolve_targets(model, exp.dsee)}  # fmt: skip
            else:
                t1 = time.perf_counter()
                supports = choose_supports(
                    model,
                    resolve_targets(model, exp.dsee),
                    exp.dsee,
                    self._progress(f"supports ({exp.dsee.support})"),
                )
                self.support_s = time.perf_counter() - t1
            inject(model, exp.dsee, supports)
        inject_s = 0.0 if self.resume is not None else time.perf_counter() - t0
        self.check_supports_agree(supports)
        if exp.train.gradient_checkpointing:
            enable_gradient_checkpointing(model)
        return model, supports, inject_s

    def check_supports_agree(self, supports: dict[str, torch.Tensor]) -> None:
        """Every rank holds the same supports (their digests, gathered)."""
        self.digests = comm.all_gather_objects(supports_digest(supports))
        if len(set(self.digests)) != 1:
            raise RuntimeError(f"supports differ between ranks: {self.digests}")

    def choose_gradient_supports(self) -> None:
        """dsee.support gradient: Omega = top N of sum (dL/dW)^2 over the first
        dsee.gradient_batches micro-batches of the train data (the same on every rank; each rank
        scores the targets it owns, adapters/gradient.py), written into the injected updates."""
        from ..adapters import dsee_layers
        from ..adapters.gradient import squared_gradient_scores, supports_from_scores
        from ..adapters.inject import Target

        exp, engine, t0 = self.exp, self.engine, time.perf_counter()
        t = exp.train
        targets = [Target(name, s) for name, layer in dsee_layers(engine.module) for s, _ in layer.updates()]
        mine = {x.key for i, x in enumerate(targets) if i % self.world == self.rank}
        batches = [micro_batch(self.corpus.train, s, 0, 0, 1, t.micro_batch_size, t.micro_batch_size, t.seed)
                   for s in range(exp.dsee.gradient_batches)]  # fmt: skip
        engine.eval()
        scores = squared_gradient_scores(
            engine.module, targets, batches,
            lambda b: engine(**to_device(b, engine.device), use_cache=False).loss, mine,
        )  # fmt: skip
        engine.train()
        supports: dict[str, torch.Tensor] = {}
        for part in comm.all_gather_objects(supports_from_scores(scores, exp.dsee.n_for)):
            supports.update(part)
        for name, layer in dsee_layers(engine.module):
            for s, delta in layer.updates():
                delta.sparse_index.copy_(supports[Target(name, s).key].to(delta.sparse_index.device))
        self.supports, self.gradient_pending = supports, False
        self.support_s = time.perf_counter() - t0
        self.inject_s += self.support_s
        self.check_supports_agree(supports)

    def _progress(self, desc: str) -> Callable[[int, int], None] | None:
        return progress_bar(desc, self.rank == 0)

    def load_data(self) -> Corpus:
        """Rows of block_size tokens; rank 0 tokenizes into the cache first, the others then
        read it (memory-mapped: each rank reads the rows it trains on)."""
        data = self.data
        self.tokenizer = load_tokenizer(self.exp.model) or ByteTokenizer()
        check_model_fits_data(self.model.config, self.tokenizer, data.block_size)
        mode = packing_mode(self.model.config, data.packing)
        corpus = build_corpus(data, self.tokenizer, mode) if self.rank == 0 else None
        comm.barrier()
        self.template = (
            chat_template_of(self.tokenizer, data.chat_template) if data.format == "chat" else None
        )
        self.eval_samples = held_out_samples(data, self.exp.eval.generate) if self.exp.eval.generate else []
        return corpus if corpus is not None else build_corpus(data, self.tokenizer, mode)

    def create_engine(self) -> None:
        t = self.exp.train
        if t.max_steps is not None:
            self.total_steps = t.max_steps
        else:  # validated: exactly one of max_steps, epochs
            epochs = float(t.epochs or 0)
            self.total_steps = max(1, math.ceil(epochs * len(self.corpus.train) / t.batch_size))
        self.n_trainable = trainable_count(self.model)
        self.engine, _, self.scheduler = create_engine(self.model, self.ds, self.exp, self.total_steps)
        self.accum = self.engine.gradient_accumulation_steps()

    def create_teacher(self) -> None:
        """prune.distill: the unpruned tuned model, forward only (training/distill.py)."""
        from .distill import teacher_engine

        assert self.teacher_builder is not None
        model = self.teacher_builder(self.exp, self.ds, self.rank, self.world)
        self.teacher = teacher_engine(model, self.ds)

    def base_record(self) -> BaseRecord | None:
        """What the checkpoints say of the frozen base instead of saving it (computed at the
        first save: the source files hashed over the ranks), or None: they save it."""
        if self.reference_base and self.base is None:
            self.base = record_base(self.engine.module, self.exp.model, frozen_dtype(self.exp))
            if self.base is None:
                self.reference_base = False
                self.monitor.text("checkpoint.frozen_base: a frozen parameter is not in the model's "
                                  "files under its name; checkpoints save the frozen weights")  # fmt: skip
        return self.base

    def load_checkpoint(self) -> int:
        """The resumed step (0 for a fresh run), with engine state, frozen weights, RNG."""
        r = self.resume
        if r is None:
            return 0
        referenced = r.meta.get("base")  # frozen weights not saved: this run loaded them from source
        path, client = self.engine.load_checkpoint(
            str(r.root), tag=r.load_tag, load_module_strict=referenced is None
        )
        if path is None:
            raise ConfigError(f"--resume: DeepSpeed could not load {r.root / r.load_tag}")
        if r.load_tag != r.tag and referenced is None:  # another world size: frozen weights and RNG
            ckpt.restore_frozen(self.engine.module, r.root, r.tag, self.rank)  # are not carried
        elif client and fmt.CLIENT_RNG in client:
            ckpt.set_rng_state(client[fmt.CLIENT_RNG])
        return int(r.meta["step"])

    def open_logs(self) -> None:
        t = self.exp.train
        self.log_path = self.out / "train_log.jsonl"
        if self.rank == 0:  # only now: a run stopped by bad input leaves nothing on disk
            self.out.mkdir(parents=True, exist_ok=True)
            self._truncate_log()
        self.monitor = Monitor(self.out / "tensorboard", self.rank == 0, self.total_steps, self.start)
        stage = self.ds.get("zero_optimization", {}).get("stage", 0)
        self.monitor.text(
            f"dsee-scale: {self.world} rank(s) on {comm.device()}, ZeRO stage {stage}, "
            f"{self.corpus.describe()}, {self.n_trainable:,} trainable parameters, "
            f"supports {self.digests[0]} (identical on {self.world} ranks, chosen in "
            f"{self.support_s:.1f}s with {torch.get_num_threads()} thread(s) per rank)"
        )
        if self.start == 0:
            self.monitor.scalars(0, {"model/trainable_params": float(self.n_trainable)})
        self.skips = Skips(t.max_nonfinite_steps, fp16=t.precision == "fp16")
        self.fault = nan_fault(self.engine.module, self.rank)
        self.last_good = str(self.resume.root / self.resume.tag) if self.resume else None
        self.eval_loss: float | None = None
        self.summary: dict[str, Any] = {
            "world_size": self.world,
            "total_steps": self.total_steps,
            "start_step": self.start,
            "supports_digest": self.digests[0],
            "trainable_params": self.n_trainable,
            "inject_seconds": self.inject_s,
            "support_seconds": self.support_s,
            "torch_threads_per_rank": torch.get_num_threads(),
        }

    def _truncate_log(self) -> None:
        """Forget steps an earlier attempt logged after the resumed checkpoint (each step once)."""
        if not self.log_path.is_file():
            return
        keep = [
            line
            for line in self.log_path.read_text().splitlines()
            if line.strip() and json.loads(line)["step"] <= self.start
        ]
        fmt.write_atomic(self.log_path, "".join(line + "\n" for line in keep))

    # ---- the loop ------------------------------------------------------------------------
    def train(self) -> dict[str, Any]:
        exp, t = self.exp, self.exp.train
        self.engine.train()
        for step in range(self.start, self.total_steps):
            done = step + 1
            with self.gathered.sampling("step"):
                loss, seconds = self.train_step(step)
            mark_stage("first step" if step == self.start else "steps")
            skipped = self.skips.update(done, self.engine.was_step_applied(), loss)
            self.log_step(done, loss, seconds, skipped)
            exit_after_step(done)
            stop_why = self.skips.stop_message(self.last_good)
            if stop_why is not None:
                self.summary.update(final_step=done, skipped_steps=self.skips.total, stopped=stop_why)
                self.cleanup()
                raise RunStopped(stop_why)
            if done % t.histogram_every == 0 or done == self.total_steps:
                dsee_histograms(self.engine.module, self.monitor, done)
            if self.corpus.eval is not None and (done % exp.eval.every == 0 or done == self.total_steps):
                self.run_eval(done)
                mark_stage("eval")
            stop_here = t.stop_at_step is not None and done >= t.stop_at_step
            # no scheduled checkpoint of a skipped step (the last good one stays `latest`); the
            # final one is written anyway: its state is the last good one's
            if (done % exp.checkpoint.every == 0 and not skipped) or done == self.total_steps or stop_here:
                saved = ckpt.save(
                    self.engine, exp, done, self.world, self.supports, self.rank, self.base_record()
                )
                self.last_good = str(saved)
                mark_stage("checkpoint")
            self.summary.update(
                final_step=done,
                final_loss=loss if math.isfinite(loss) else None,
                skipped_steps=self.skips.total,
            )
            if stop_here:
                self.monitor.text(f"stopping at step {done} (train.stop_at_step); resume with --resume")
                break
        self.summary["eval_loss"] = self.eval_loss
        return self.summary

    def train_step(self, step: int) -> tuple[float, float]:
        """One optimizer step (accum micro-batches); returns (loss mean over ranks, seconds)."""
        t, engine = self.exp.train, self.engine
        t0 = time.perf_counter()
        loss_sum = torch.zeros((), dtype=torch.float64, device=engine.device)
        for micro in range(self.accum):
            batch = micro_batch(self.corpus.train, step, micro, self.rank, self.world,
                                t.micro_batch_size, t.batch_size, t.seed)  # fmt: skip
            with self.fault(step + 1, micro):
                loss = self.loss(to_device(batch, engine.device))
            engine.backward(backward_loss(loss))
            engine.step()
            loss_sum += loss.detach().double()
        mean = float(comm.sum_over_ranks(loss_sum.reshape(1))[0]) / (self.accum * self.world)
        return mean, time.perf_counter() - t0

    def loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The micro-batch's training loss: the LM loss, or with a teacher prune.distill's mix."""
        out = self.engine(**batch, use_cache=False)
        if self.teacher is None:
            return out.loss
        from .distill import distillation_kl

        assert self.exp.prune is not None
        d = self.exp.prune.distill
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        with torch.no_grad():
            teacher = self.teacher(**inputs, use_cache=False).logits
        kl = distillation_kl(out.logits, teacher, batch["labels"], d.temperature)
        del teacher
        return d.lm_weight * out.loss + d.kl_weight * kl

    def log_step(self, done: int, loss: float, seconds: float, skipped: bool) -> None:
        """train_log.jsonl, TensorBoard and the progress bar (rank 0)."""
        if self.rank != 0:
            return
        t = self.exp.train
        norm = self.engine.get_global_grad_norm()
        grad_norm = float(norm) if norm is not None and math.isfinite(norm) else None
        lr = self.scheduler.get_last_lr()[0] if self.scheduler is not None else t.lr
        record = {"step": done, "loss": loss if math.isfinite(loss) else None, "lr": lr,
                  "grad_norm": grad_norm, "step_time": seconds}  # fmt: skip
        if skipped:
            record["skipped"] = True
            self.monitor.text(f"step {done}: skipped (loss {loss}, gradient not finite); "
                              f"{self.skips.total} skipped so far")  # fmt: skip
        with open(self.log_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        tokens_per_s = t.batch_size * self.data.block_size / seconds
        if done % t.log_every == 0 or done == self.total_steps or skipped:
            scalars = {"train/lr": lr, "train/skipped_steps": float(self.skips.total),
                       "train/samples": float(done * t.batch_size), "perf/tokens_per_s": tokens_per_s,
                       "perf/step_time_s": seconds, **memory_scalars(),
                       "mem/peak_gathered_params_mb": self.gathered.peak / 2**20}  # fmt: skip
            if not skipped:
                scalars.update({"train/loss": loss, "train/grad_norm": grad_norm,
                                "train/perplexity": math.exp(min(loss, 50))})  # fmt: skip
            self.monitor.scalars(done, scalars)
        self.monitor.progress(done, loss, tokens_per_s)

    def run_eval(self, done: int) -> None:
        """Held-out loss (answer tokens for instruction data) and, with eval.generate, the
        task metric from greedy answers, plus a few of them in TensorBoard's text tab."""
        assert self.corpus.eval is not None
        ev = self.exp.eval
        with self.gathered.sampling("eval"):
            self.eval_loss = evaluate(self.engine, self.corpus.eval, ev.batch_size)
        ppl = math.exp(min(self.eval_loss, 50))
        self.monitor.scalars(done, {"eval/loss": self.eval_loss, "eval/perplexity": ppl})
        line = f"step {done}: eval loss {self.eval_loss:.4f} perplexity {ppl:.2f}"
        if self.eval_samples:
            metrics, pairs = generation_eval(self.engine, self.tokenizer, self.eval_samples,
                                             self.template, ev.max_new_tokens)  # fmt: skip
            self.monitor.scalars(done, {f"eval/{k}": v for k, v in metrics.items()})
            self.monitor.markdown(done, "eval/generations", samples_markdown(pairs[: ev.show]))
            self.summary["eval_task"] = metrics
            line += f", exact match {metrics['exact_match']:.1f}%, chrF {metrics['chrf']:.1f}"
        self.monitor.text(line)

    # ---- cleanup -------------------------------------------------------------------------
    def cleanup(self) -> None:
        mine = {**memory_scalars(), "mem/peak_gathered_params_mb": self.gathered.peak / 2**20}
        memory = comm.all_gather_objects(mine)  # per rank: RSS, accelerator memory, gathered parameters
        self.summary["peak_rss_mb_per_rank"] = [m["mem/rss_mb"] for m in memory]
        self.summary["peak_memory_mb_per_rank"] = memory
        self.summary["memory_by_stage_mb"] = comm.all_gather_objects(stage_memory())  # per rank
        self.monitor.close()
        if self.rank == 0:
            (self.out / "summary.json").write_text(json.dumps(self.summary, indent=2))
        if self.teacher is not None:
            self.teacher.destroy()
        self.engine.destroy()
        comm.shutdown()


def run(
    exp: ExperimentConfig,
    resume: bool = False,
    build: Builder | None = None,
    teacher: TeacherBuilder | None = None,
) -> dict[str, Any]:
    """Train `exp` (setup, train, cleanup); returns the summary on every rank."""
    training = TrainingRun(exp, resume, build, teacher)
    training.setup()
    summary = training.train()
    training.cleanup()
    return summary
