"""Steps with a non-finite loss or gradient: skipped, counted, and K in a row stop the run.

DeepSpeed's ZeRO optimizers already refuse a step whose global gradient norm is NaN or inf
(stage 3 for every dtype; stages 1-2 for fp32, and for bf16 with `check_grad_overflow`, on by
default): they drop the gradients and leave the parameters, the optimizer state and the LR
schedule as they were, and `engine.was_step_applied()` says so. What is left to us:

- a loss that is NaN/inf on one rank must reach the gradient, so that the (all-reduced) norm
  check skips the same step on every rank: `backward_loss` poisons it;
- count the skips, log them, and stop after `train.max_nonfinite_steps` in a row (`Skips`).
The tests' NaN fault is in dsee_scale/faults.py.
"""

from __future__ import annotations

import math

import torch

from ..errors import RunStopped


def backward_loss(loss: torch.Tensor) -> torch.Tensor:
    """The tensor to back-propagate: the loss, or, when it is NaN/inf, a loss whose every
    gradient is NaN (the optimizer's norm check then skips the step on all ranks)."""
    if bool(torch.isfinite(loss.detach()).all()):
        return loss
    return loss * float("nan")


class Skips:
    """Which steps were skipped; raises RunStopped after `limit` non-finite steps in a row.

    With fp16, a skipped step whose loss is finite is the loss scaler's overflow (expected while
    the scale settles): counted as skipped but not as non-finite."""

    def __init__(self, limit: int, fp16: bool):
        self.limit, self.fp16 = limit, fp16
        self.total = 0
        self.run: list[int] = []  # the current run of non-finite steps

    def update(self, step: int, applied: bool, loss_mean: float) -> bool:
        """Record step `step` (1-based); returns True when it was skipped."""
        finite = math.isfinite(loss_mean)
        if applied and not finite:
            raise RunStopped(
                f"step {step}: the loss was not finite but the engine applied the "
                "step (this DeepSpeed config does not skip such steps; use a ZeRO "
                "config from ds_configs/)"
            )
        if applied:
            self.run = []
            return False
        self.total += 1
        if finite and self.fp16:
            return True
        self.run.append(step)
        return True

    def stop_message(self, last_good: str | None) -> str | None:
        """None while the run may go on; else why it stops."""
        if len(self.run) < self.limit:
            return None
        keep = f"the last good checkpoint is {last_good}" if last_good else "no checkpoint was written"
        return (
            f"steps {self.run[0]}-{self.run[-1]}: {len(self.run)} steps in a row had a "
            f"non-finite loss or gradient and were skipped (train.max_nonfinite_steps="
            f"{self.limit}); the run stopped, {keep}"
        )
