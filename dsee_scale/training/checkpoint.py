"""Checkpoints: DeepSpeed's own sharded save, plus what DSEE needs beside it.

    <output_dir>/checkpoints/
        latest                     tag of the newest COMPLETE checkpoint (written last, atomically)
        step_<N>/                  engine.save_checkpoint(tag="step_<N>"): ZeRO shards per rank
            dsee_meta.json         step, world size, data position
            dsee_supports.safetensors   the supports (identical on every rank)
            experiment.yaml        the experiment that wrote it
        step_<N>_universal/        made on demand to resume on a different number of ranks

The last `keep_last` checkpoints are kept. Resuming on the same number of ranks loads the tag
directly; on another number it converts it once to a DeepSpeed universal checkpoint
(deepspeed.checkpoint.ds_to_universal) and loads that.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist
import yaml

from ..errors import UserError

META = "dsee_meta.json"
SUPPORTS = "dsee_supports.safetensors"
MANIFEST = "manifest.json"
FAULT_ENV = "DSEE_FAULT_KILL_DURING_SAVE"  # tests: die after the shards, before `latest`


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def write_manifest(d: Path) -> None:
    """files, sizes and sha256 of a complete checkpoint directory (written last but `latest`)."""
    files = {p.name: {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
             for p in sorted(d.iterdir()) if p.is_file() and p.name != MANIFEST}
    _write_atomic(d / MANIFEST, json.dumps({"files": files}, indent=1))


def verify_manifest(d: Path) -> None:
    """Refuse a checkpoint whose files are missing, truncated or changed since it was written."""
    path = d / MANIFEST
    if not path.is_file():
        return  # written before manifests existed
    for name, want in json.loads(path.read_text())["files"].items():
        f = d / name
        if not f.is_file():
            raise UserError(f"checkpoint {str(d)!r}: {name} is missing (listed in {MANIFEST})")
        if f.stat().st_size != want["bytes"]:
            raise UserError(f"checkpoint {str(d)!r}: {name} has {f.stat().st_size} bytes, "
                            f"{want['bytes']} expected (truncated or replaced)")
        if sha256_file(f) != want["sha256"]:
            raise UserError(f"checkpoint {str(d)!r}: {name} does not match its checksum (corrupt)")


def ckpt_root(exp) -> Path:
    return Path(exp.output_dir) / "checkpoints"


def _barrier():
    if dist.is_initialized():
        dist.barrier()


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    with open(tmp) as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def tags(root: Path) -> list[str]:
    found = [p.name for p in root.glob("step_*") if re.fullmatch(r"step_\d+", p.name)]
    return sorted(found, key=lambda t: int(t.split("_")[1]))


def layer_layout(model) -> dict:
    """For each DSEE layer: its base kind (linear / conv1d) and targeted slices, so an export
    can merge without building the model."""
    from transformers.pytorch_utils import Conv1D

    from ..adapters import DSEELayer

    out = {}
    for name, m in model.named_modules():
        if isinstance(m, DSEELayer):
            out[name] = {"kind": "conv1d" if isinstance(m.base_layer, Conv1D) else "linear",
                         "slices": {s: list(m.bounds(s)) for s in m.dsee}}
    return out


def save(engine, exp, step: int, world: int, supports: dict, rank: int) -> Path:
    from safetensors.torch import save_file

    root = ckpt_root(exp)
    tag = f"step_{step}"
    engine.save_checkpoint(str(root), tag=tag, client_state={"step": step}, save_latest=False)
    _barrier()  # every rank's shards are written
    if os.environ.get(FAULT_ENV) == str(step) and rank == 0:
        os._exit(137)  # a deterministic "killed in the middle of a save"
    if rank == 0:
        d = root / tag
        save_file({k: v.contiguous() for k, v in supports.items()}, str(d / SUPPORTS))
        (d / "experiment.yaml").write_text(yaml.safe_dump(asdict(exp), sort_keys=False))
        _write_atomic(d / META, json.dumps({"step": step, "world_size": world, "tag": tag,
                                            "dsee_layers": layer_layout(engine.module)}))
        write_manifest(d)
        _write_atomic(root / "latest", tag)  # only now is this checkpoint the one to resume
        for old in tags(root)[: -exp.checkpoint.keep_last]:
            shutil.rmtree(root / old, ignore_errors=True)
            shutil.rmtree(root / f"{old}_universal", ignore_errors=True)
    _barrier()
    return root / tag


def latest(exp) -> tuple[Path, str, dict]:
    root = ckpt_root(exp)
    f = root / "latest"
    if not f.is_file():
        raise UserError(f"--resume: no checkpoint in {str(root)!r} (no 'latest' file)")
    tag = f.read_text().strip()
    meta_path = root / tag / META
    if not meta_path.is_file():
        raise UserError(f"--resume: checkpoint {str(root / tag)!r} is incomplete (no {META})")
    verify_manifest(root / tag)
    return root, tag, json.loads(meta_path.read_text())


def load_supports(root: Path, tag: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    path = root / tag / SUPPORTS
    if not path.is_file():
        raise UserError(f"--resume: {str(path)!r} is missing")
    return load_file(str(path))


def ensure_universal(root: Path, tag: str, rank: int) -> str:
    """Convert `tag` to a universal checkpoint once (rank 0); returns the universal tag."""
    utag = f"{tag}_universal"
    if rank == 0 and not (root / utag / "zero").is_dir():
        tmp = root / f"{utag}.partial"
        shutil.rmtree(tmp, ignore_errors=True)
        r = subprocess.run([sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal",
                            "--input_folder", str(root / tag), "--output_folder", str(tmp),
                            "--num_extract_workers", "1", "--num_merge_workers", "1"],
                           capture_output=True, text=True)
        if r.returncode != 0:
            raise UserError(f"--resume: converting {tag} to a universal checkpoint failed: "
                            f"{r.stderr.strip().splitlines()[-1] if r.stderr.strip() else r.returncode}")
        os.replace(tmp, root / utag)
    _barrier()
    return utag
