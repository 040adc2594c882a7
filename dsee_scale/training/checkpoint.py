"""Saving and resuming a run: DeepSpeed's sharded save plus what DSEE needs beside it.

The format (names, tags, manifest, layout) is dsee_scale/checkpoint/format.py. Here:
- `save`: engine.save_checkpoint, then supports, experiment, meta and manifest (rank 0), then
  `latest`, which therefore moves only after every rank finished writing. Each rank's RNG
  states ride in DeepSpeed's client_state (its own model-states file).
- `resume_point`: the checkpoint `--resume` continues from, verified, with a clear message
  naming the newest intact checkpoint when `latest` is not intact.
- `check_same_run`: a resumed run must be the run that wrote the checkpoint (same model, DSEE,
  data, batches, precision); only the keys in MAY_CHANGE may differ.
- `ensure_universal` / `restore_frozen`: resuming on another number of ranks.
- `frozen base`: with checkpoint.frozen_base from_source (auto where possible) the checkpoints
  hold no frozen parameters, only a record of the base's source files (checkpoint/base.py);
  a resume checks the files against it and loads the base from them as a fresh run does.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import functools
import json
import os
import random
import shutil
import subprocess
import sys
import time
import typing
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import yaml

from .. import zero
from ..checkpoint import ZeroCheckpoint
from ..checkpoint import format as fmt
from ..checkpoint.base import BaseRecord
from ..errors import ConfigError, UserError
from ..experiment import ExperimentConfig
from ..faults import kill_during_save
from ..zero import comm

# Experiment keys a resumed run may change: how long it runs, how it reports and saves, where
# things go. Anything else changes the run itself and is refused.
MAY_CHANGE = (
    "train.max_steps",
    "train.epochs",
    "train.stop_at_step",
    "train.log_every",
    "train.histogram_every",
    "train.collective_timeout_s",
    "train.max_nonfinite_steps",
    "eval.*",
    "checkpoint.*",
    "output_dir",
    "deepspeed",
    "nvme_path",
    "data.cache_dir",
    "data.max_eval_blocks",
    "prune.*",
)


def rng_state() -> dict[str, Any]:
    """This rank's random states: Python, torch CPU and the accelerator's (dropout masks)."""
    from deepspeed.accelerator import get_accelerator

    acc = get_accelerator()
    return {
        "python": random.getstate(),
        "torch": torch.get_rng_state(),
        "accelerator": acc.get_rng_state() if acc.device_name() != "cpu" else None,
    }


def set_rng_state(state: dict[str, Any]) -> None:
    from deepspeed.accelerator import get_accelerator

    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if state.get("accelerator") is not None:
        get_accelerator().set_rng_state(state["accelerator"])


def save(
    engine,
    exp: ExperimentConfig,
    step: int,
    world: int,
    supports: dict[str, torch.Tensor],
    rank: int,
    base: BaseRecord | None = None,
) -> Path:
    """A complete checkpoint of the run at `step`; with `base` (checkpoint.frozen_base), without
    the frozen parameters, which the record names in their source files instead."""
    from safetensors.torch import save_file

    root = fmt.checkpoints_dir(exp.output_dir)
    tag = fmt.tag_for(step)
    engine.save_checkpoint(
        str(root),
        tag=tag,
        save_latest=False,
        client_state={fmt.CLIENT_STEP: step, fmt.CLIENT_RNG: rng_state()},
        exclude_frozen_parameters=base is not None,
    )
    comm.barrier()  # every rank's shards are written
    kill_during_save(step, rank)
    d = root / tag
    hashed = {}  # each rank hashes the shards it wrote, all at once; rank 0 the rest
    for part in comm.all_gather_objects(fmt.hash_files(d, fmt.rank_files(d, rank))):
        hashed.update(part)
    if rank == 0:
        save_file({k: v.contiguous() for k, v in supports.items()}, str(d / fmt.SUPPORTS))
        (d / fmt.EXPERIMENT).write_text(yaml.safe_dump(asdict(exp), sort_keys=False))
        meta: fmt.Meta = {
            "step": step,
            "world_size": world,
            "tag": tag,
            "dsee_layers": fmt.layer_layout(engine.module),
        }
        if base is not None:
            meta["base"] = base
        fmt.write_atomic(d / fmt.META, json.dumps(meta))
        fmt.write_manifest(d, hashed)
        fmt.write_atomic(root / fmt.LATEST, tag)  # only now is this checkpoint the one to resume
        for old in fmt.tags(root)[: -exp.checkpoint.keep_last]:
            shutil.rmtree(root / old, ignore_errors=True)
            shutil.rmtree(root / fmt.universal_tag(old), ignore_errors=True)
    comm.barrier()
    return root / tag


def resume_point(exp: ExperimentConfig) -> tuple[Path, str, fmt.Meta]:
    """(checkpoints dir, tag, meta) of the checkpoint to resume; refuses one that is not intact."""
    root = fmt.checkpoints_dir(exp.output_dir)
    latest = root / fmt.LATEST
    if not latest.is_file():
        raise UserError(f"--resume: no checkpoint in {str(root)!r} (no '{fmt.LATEST}' file)")
    tag = latest.read_text().strip()
    problem = (
        f"{tag} does not exist" if not (root / tag).is_dir() else fmt.shared_manifest_problem(root / tag)
    )
    if problem is not None:
        intact = [t for t in reversed(fmt.tags(root)) if t != tag and fmt.manifest_problem(root / t) is None]
        hint = (
            f"the newest intact checkpoint is {intact[0]}: resume from it with "
            f"`echo {intact[0]} > {latest}` and --resume"
            if intact
            else "no intact checkpoint is left: start over in a new output_dir"
        )
        raise UserError(
            f"--resume: the latest checkpoint {str(root / tag)!r} is not intact ({problem}); {hint}"
        )
    return root, tag, fmt.read_meta(root / tag)


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


_NO_DEFAULT = object()


def default_of(key: str) -> Any:
    """The dataclass default of a dotted experiment key ("data.format" -> "text")."""
    cls: Any = ExperimentConfig
    *sections, leaf = key.split(".")
    for name in sections:
        hint = typing.get_type_hints(cls).get(name)
        cls = next((a for a in (typing.get_args(hint) or (hint,)) if dataclasses.is_dataclass(a)), None)
        if cls is None:
            return _NO_DEFAULT
    field = {f.name: f for f in dataclasses.fields(cls)}.get(leaf)
    if field is None:
        return _NO_DEFAULT
    if field.default is not dataclasses.MISSING:
        return field.default
    return field.default_factory() if field.default_factory is not dataclasses.MISSING else _NO_DEFAULT


def check_same_run(saved: dict, exp: ExperimentConfig, where: Path) -> None:
    """Refuse a resume whose experiment differs from the checkpoint's in a key outside MAY_CHANGE.
    A key the checkpoint does not have (added by a newer dsee-scale) at its default is the same
    run: a run saved before `data.format` existed resumes with format text."""
    now = yaml.safe_load(yaml.safe_dump(asdict(exp)))  # the same normal form as the saved file
    old_flat, new_flat = _flat(saved), _flat(now)
    for key in sorted(set(old_flat) | set(new_flat)):
        if any(fnmatch.fnmatchcase(key, p) for p in MAY_CHANGE):
            continue
        old, new = old_flat.get(key), new_flat.get(key)
        if key not in old_flat and new == default_of(key):
            continue
        if old != new:
            raise ConfigError(
                f"--resume: {key} was {old!r} in {str(where)!r}, now {new!r}; a "
                f"resumed run keeps the run's settings (it may change only "
                f"{', '.join(MAY_CHANGE)}): start a new output_dir for another run"
            )


def load_supports(root: Path, tag: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    path = root / tag / fmt.SUPPORTS
    if not path.is_file():
        raise UserError(f"--resume: {str(path)!r} is missing")
    return load_file(str(path))


def ensure_universal(root: Path, tag: str, rank: int, timeout_s: int = 7200) -> str:
    """Convert `tag` to a universal checkpoint once (rank 0, with DeepSpeed's converter on as
    many workers as the node has cores); returns the universal tag. The other ranks wait for
    the result on the filesystem under `timeout_s` (checkpoint.universal_timeout_s), not in a
    collective that the process group's timeout would end first."""
    utag = fmt.universal_tag(tag)
    done = root / utag / "zero"
    failed = root / f"{utag}.failed"
    started = time.time() - 60  # a failure marker older than this attempt (minus clock skew) is stale
    if rank == 0 and not done.is_dir():
        tmp = root / f"{utag}.partial"
        shutil.rmtree(tmp, ignore_errors=True)
        failed.unlink(missing_ok=True)
        workers = str(max(1, os.cpu_count() or 1))
        cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal",
               "--input_folder", str(root / tag), "--output_folder", str(tmp),
               "--num_extract_workers", workers, "--num_merge_workers", workers]  # fmt: skip
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
            why = (r.stderr.strip().splitlines() or [f"exit {r.returncode}"])[-1] if r.returncode else None
        except subprocess.TimeoutExpired:
            why = f"it took longer than checkpoint.universal_timeout_s={timeout_s}"
        if why is not None:
            fmt.write_atomic(failed, why)
            raise UserError(f"--resume: converting {tag} to a universal checkpoint failed: {why}")
        os.replace(tmp, root / utag)
    waited = 0.0
    while not done.is_dir():  # ranks > 0 (rank 0 has finished by now)
        if failed.is_file() and failed.stat().st_mtime >= started:
            raise UserError(f"--resume: converting {tag} to a universal checkpoint failed on rank 0: "
                            f"{failed.read_text().strip()}")  # fmt: skip
        if waited > timeout_s:
            raise UserError(f"--resume: rank 0's universal conversion of {tag} did not finish within "
                            f"checkpoint.universal_timeout_s={timeout_s}")  # fmt: skip
        time.sleep(1.0)
        waited += 1.0
    comm.barrier()
    return utag


def restore_frozen(model, root: Path, tag: str, rank: int) -> None:
    """DeepSpeed's universal checkpoints carry the trained (optimizer) parameters only: frozen
    weights would stay as the freshly built model has them (wrong for pruned or random-config
    models). Read them from the original checkpoint, one at a time, each by one rank (in turn)
    and broadcast."""
    ck = ZeroCheckpoint(root, tag)
    world = comm.rank_and_world()[1]
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad and n in ck.frozen_shapes]
    for i, name in enumerate(frozen):  # the reads spread over the ranks: rank i % world reads the i-th
        zero.copy_full_into(model, name, functools.partial(ck.tensor, name), rank, writer=i % world)
