"""What a run reports: TensorBoard scalars / histograms and a progress bar, on rank 0 only.

DeepSpeed's own monitor does not write the training loss, so we write everything ourselves.
"""

from __future__ import annotations

import math
import resource
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

SCALARS = (
    "train/loss",
    "train/perplexity",
    "train/lr",
    "train/grad_norm",
    "train/samples",
    "perf/tokens_per_s",
    "perf/step_time_s",
    "mem/rss_mb",
    "mem/peak_gathered_params_mb",
    "model/trainable_params",
)


def rss_mb() -> float:
    """Peak resident set size of this process (MiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def resident_mb() -> float:
    """Resident set size of this process now (MiB)."""
    import psutil  # a DeepSpeed dependency

    return psutil.Process().memory_info().rss / 2**20


# stage -> {"resident_mb", "peak_mb"} of this process at that stage's end (see mark_stage)
_STAGES: dict[str, dict[str, float]] = {}


def mark_stage(stage: str, once: bool = False) -> None:
    """Record what this process holds as `stage` ends: resident now, and the peak so far. The
    peak only grows, so the first stage whose peak is the final one is where a rank's peak was
    reached, and "resident" shows what each stage leaves held (summary.json:
    memory_by_stage_mb). A stage marked again (every step, every eval) keeps its place and its
    last record; with `once`, its first record."""
    if once and stage in _STAGES:
        return
    _STAGES[stage] = {"resident_mb": round(resident_mb(), 1), "peak_mb": round(rss_mb(), 1)}


def stage_memory() -> dict[str, dict[str, float]]:
    return dict(_STAGES)


class Monitor:
    """TensorBoard + tqdm on rank 0. A resumed run (start_step > 0) purges what an earlier
    attempt logged after that step, so every step appears once (SummaryWriter's purge_step)."""

    def __init__(self, log_dir: Path, enabled: bool, total_steps: int, start_step: int):
        self.enabled = enabled
        self.writer: Any = None  # SummaryWriter and tqdm bar, on rank 0 only
        self.bar: Any = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter
            from tqdm import tqdm

            self.writer = SummaryWriter(str(log_dir), purge_step=start_step + 1 if start_step else None)
            self.bar = tqdm(
                total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True
            )

    def scalars(self, step: int, values: dict[str, float | None]) -> None:
        if not self.enabled:
            return
        for k, v in values.items():
            if v is not None and math.isfinite(v):
                self.writer.add_scalar(k, v, step)

    def histogram(self, step: int, name: str, values: torch.Tensor) -> None:
        if self.enabled and values.numel():
            self.writer.add_histogram(name, values.float().cpu(), step)

    def markdown(self, step: int, tag: str, text: str) -> None:
        if self.enabled:
            self.writer.add_text(tag, text, step)

    def progress(self, step: int, loss: float, tokens_per_s: float) -> None:
        if self.enabled:
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tokens_per_s:,.0f}")

    def text(self, msg: str) -> None:
        if self.enabled:
            (self.bar.write if self.bar is not None else print)(msg)

    def close(self) -> None:
        if self.enabled:
            self.bar.close()
            self.writer.flush()
            self.writer.close()


def release_freed_memory() -> None:
    """Hand memory that was freed back to the OS (glibc's malloc_trim; nothing elsewhere).
    glibc keeps freed chunks of up to 32 MiB in its heaps, one per thread that allocated, so a
    stage that reads and drops one block after another (the pruned fill, scoring) leaves
    GiBs resident that the next stage cannot use; called between such stages."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        trim = ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):  # not glibc
        trim = None
    if trim is not None:
        trim(0)


def memory_scalars() -> dict[str, float]:
    from deepspeed.accelerator import get_accelerator

    out = {"mem/rss_mb": rss_mb()}
    acc = get_accelerator()
    if acc.device_name() != "cpu":
        out["mem/gpu_allocated_mb"] = acc.max_memory_allocated() / 2**20
    return out


def progress_bar(desc: str, shown: bool, unit: str = "matrix") -> Callable[[int, int], None] | None:
    """A (done, total) progress callback drawing a tqdm bar (where `shown`: rank 0), else None."""
    if not shown:
        return None
    from tqdm import tqdm

    bar = None

    def update(done: int, total: int) -> None:
        nonlocal bar
        bar = bar or tqdm(total=total, desc=desc, unit=unit)
        bar.update(done - bar.n)
        if done == total:
            bar.close()

    return update
