"""Deterministic faults for the tests, each off unless its environment variable is set.

DSEE_FAULT_KILL_DURING_SAVE=<step>   rank 0 dies after the shards of that step's checkpoint
                                     are written, before `latest` moves
DSEE_FAULT_NAN_AT_STEPS=<s>,<s>...   rank 0's first micro-batch of those steps yields NaN
DSEE_FAULT_EXIT_AFTER_STEP=<step>    every rank dies right after that step is logged (a
                                     crash between two checkpoints)
"""

from __future__ import annotations

import contextlib
import os

KILL_DURING_SAVE = "DSEE_FAULT_KILL_DURING_SAVE"
NAN_AT_STEPS = "DSEE_FAULT_NAN_AT_STEPS"
EXIT_AFTER_STEP = "DSEE_FAULT_EXIT_AFTER_STEP"
KILLED = 137  # the exit status of a process killed by SIGKILL, as the launchers report it


def _steps(var: str) -> set[int]:
    return {int(s) for s in os.environ.get(var, "").split(",") if s.strip()}


def kill_during_save(step: int, rank: int) -> None:
    if rank == 0 and step in _steps(KILL_DURING_SAVE):
        os._exit(KILLED)


def exit_after_step(step: int) -> None:
    if step in _steps(EXIT_AFTER_STEP):
        import sys

        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(KILLED)


def nan_fault(model, rank: int):
    """fault(step, micro) -> a context in which the forward yields NaN (only for the steps in
    $DSEE_FAULT_NAN_AT_STEPS, rank 0, micro-batch 0); a no-op context otherwise."""
    steps = _steps(NAN_AT_STEPS)

    @contextlib.contextmanager
    def fault(step: int, micro: int):
        if rank != 0 or micro != 0 or step not in steps:
            yield
            return
        hook = model.get_input_embeddings().register_forward_hook(lambda m, i, o: o * float("nan"))
        try:
            yield
        finally:
            hook.remove()

    return fault
