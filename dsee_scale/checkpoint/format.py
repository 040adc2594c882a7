"""The on-disk format of a dsee-scale run's checkpoints: names, tags, manifest, layer layout.

    <output_dir>/checkpoints/
        latest                       tag of the newest COMPLETE checkpoint (written last, atomically)
        step_<N>/                    engine.save_checkpoint(tag="step_<N>"): ZeRO-3 shards per rank
            zero_pp_rank_<r>_mp_rank_00_model_states.pt   (DeepSpeed's; reader.py reads them)
            [bf16_]zero_pp_rank_<r>_mp_rank_00_optim_states.pt
            dsee_meta.json           step, world size, tag, DSEE layer layout, and "base" when
                                     the frozen weights are referenced, not saved (base.py)
            dsee_supports.safetensors  the supports Omega (identical on every rank)
            experiment.yaml          the experiment that wrote it
            manifest.json            every file's size and sha256 (written last but `latest`;
                                     each rank hashes its own shards, and checks a share on load)
        step_<N>_universal/          made on demand to resume on another number of ranks

training/ writes it (checkpoint.py), export/ and pruning/ read it (reader.py); nobody else
spells these names.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
from pathlib import Path
from typing import Any, Literal, NotRequired, TypedDict

import torch
import yaml

from ..errors import UserError

LATEST = "latest"
META = "dsee_meta.json"
SUPPORTS = "dsee_supports.safetensors"
EXPERIMENT = "experiment.yaml"
MANIFEST = "manifest.json"
CHECKPOINTS = "checkpoints"  # under output_dir
CLIENT_STEP = "step"  # keys of DeepSpeed's client_state in each rank's model-states file
CLIENT_RNG = "dsee_rng"


class LayerInfo(TypedDict):
    kind: Literal["linear", "conv1d"]  # how the base weight is stored (Conv1D: in x out)
    slices: dict[str, list[int]]  # targeted slice -> [lo, hi) output rows


LayerLayout = dict[str, LayerInfo]  # DSEE layer name -> its layout


class Meta(TypedDict):
    step: int
    world_size: int
    tag: str
    dsee_layers: LayerLayout
    base: NotRequired[Any]  # base.BaseRecord: the frozen base referenced, not saved


def checkpoints_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / CHECKPOINTS


def tag_for(step: int) -> str:
    return f"step_{step}"


def universal_tag(tag: str) -> str:
    return f"{tag}_universal"


def tags(root: Path) -> list[str]:
    """The step_N checkpoint directories under root, oldest first."""
    found = [p.name for p in root.glob("step_*") if re.fullmatch(r"step_\d+", p.name)]
    return sorted(found, key=lambda t: int(t.split("_")[1]))


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    with open(tmp) as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def layer_layout(model) -> LayerLayout:
    """For each DSEE layer: its base kind (linear / conv1d) and targeted slices, so an export
    can merge without building the model."""
    from transformers.pytorch_utils import Conv1D

    from ..adapters import DSEELayer

    out: LayerLayout = {}
    for name, m in model.named_modules():
        if isinstance(m, DSEELayer):
            out[name] = {
                "kind": "conv1d" if isinstance(m.base_layer, Conv1D) else "linear",
                "slices": {s: list(m.bounds(s)) for s in m.dsee},
            }
    return out


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def sha256_files(paths: list[Path]) -> list[str]:
    """sha256 of each file, the files hashed on parallel threads (hashlib lets go of the GIL
    while it hashes, so a checkpoint of several large shards hashes at the disk's or all
    cores' speed instead of one core's)."""
    from concurrent.futures import ThreadPoolExecutor

    if len(paths) < 2:
        return [sha256_file(p) for p in paths]
    with ThreadPoolExecutor(min(len(paths), os.cpu_count() or 1)) as pool:
        return list(pool.map(sha256_file, paths))


def hash_files(d: Path, names: list[str]) -> dict[str, dict]:
    """{name: {bytes, sha256}} of some files of checkpoint d."""
    sums = sha256_files([d / n for n in names])
    return {n: {"bytes": (d / n).stat().st_size, "sha256": h} for n, h in zip(names, sums)}


def rank_files(d: Path, rank: int) -> list[str]:
    """The files of checkpoint d that rank `rank` wrote (its ZeRO shards)."""
    return sorted(p.name for p in d.glob(f"zero_pp_rank_{rank}_*") if p.is_file())


def write_manifest(d: Path, hashed: dict[str, dict] | None = None) -> None:
    """Files, sizes and sha256 of a complete checkpoint directory. `hashed`: entries the
    ranks already computed for their own files (the rest are hashed here)."""
    hashed = dict(hashed or {})
    rest = [
        p.name for p in sorted(d.iterdir()) if p.is_file() and p.name != MANIFEST and p.name not in hashed
    ]
    hashed.update(hash_files(d, rest))
    write_atomic(d / MANIFEST, json.dumps({"files": dict(sorted(hashed.items()))}, indent=1))


def manifest_problem(d: Path, share: tuple[int, int] = (0, 1)) -> str | None:
    """Why checkpoint d is not intact (a file missing, truncated or changed), or None. With
    share = (rank, world), every size is checked but only every world-th file's checksum,
    starting at the rank-th: the ranks together check every file once."""
    path = d / MANIFEST
    if not path.is_file():
        return f"{MANIFEST} is missing (the save did not finish)"
    rank, world = share
    files = json.loads(path.read_text())["files"]
    for name, want in files.items():
        f = d / name
        if not f.is_file():
            return f"{name} is missing (listed in {MANIFEST})"
        if f.stat().st_size != want["bytes"]:
            return f"{name} has {f.stat().st_size} bytes, {want['bytes']} expected (truncated or replaced)"
    mine = [name for i, name in enumerate(files) if i % world == rank]
    for name, h in zip(mine, sha256_files([d / n for n in mine])):
        if h != files[name]["sha256"]:
            return f"{name} does not match its checksum (corrupt)"
    return None


def shared_manifest_problem(d: Path) -> str | None:
    """manifest_problem with the checksums split over the ranks of a running process group
    and one verdict for all (every rank must call it); the whole check outside a group."""
    from ..zero import comm

    rank, world = comm.rank_and_world()
    if world == 1:
        return manifest_problem(d)
    problems = [p for p in comm.all_gather_objects(manifest_problem(d, (rank, world))) if p]
    return problems[0] if problems else None


def verify_manifest(d: Path) -> None:
    """Refuse a checkpoint whose files are missing, truncated or changed since it was written
    (collective inside a process group: every rank calls it)."""
    problem = shared_manifest_problem(d)
    if problem is not None:
        raise UserError(f"checkpoint {str(d)!r}: {problem}")


def read_meta(d: Path) -> Meta:
    path = d / META
    if not path.is_file():
        raise UserError(f"checkpoint {str(d)!r} is incomplete (no {META})")
    return json.loads(path.read_text())


def read_experiment(d: Path) -> dict:
    """The experiment (as a plain dict) that wrote checkpoint d."""
    path = d / EXPERIMENT
    if not path.is_file():
        raise UserError(f"{str(d)!r} has no {EXPERIMENT}: not a dsee-scale checkpoint")
    return yaml.safe_load(path.read_text())


# -- safetensors files (the model's own format, read by the base and written by the exporter) ---
SAFETENSORS_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16",
                      torch.bfloat16: "BF16", torch.int64: "I64", torch.int32: "I32", torch.int16: "I16",
                      torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL"}  # fmt: skip


def safetensors_entries(path: Path) -> dict[str, tuple[int, torch.dtype, list[int]]]:
    """{tensor: (its first byte in the file, dtype, shape)} from a safetensors file's header
    (an 8-byte little-endian length, then JSON with each tensor's [begin, end) in the data)."""
    by_code = {v: k for k, v in SAFETENSORS_DTYPES.items()}
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    return {k: (8 + n + v["data_offsets"][0], by_code[v["dtype"]], v["shape"])
            for k, v in header.items() if k != "__metadata__" and v["dtype"] in by_code}  # fmt: skip


def read_range(path: Path, offset: int, out: torch.Tensor) -> torch.Tensor:
    """Fill `out` with the bytes of `path` from `offset` with plain reads (no memory map: the pages
    stay in the page cache, not in this process's resident memory)."""
    view = out.reshape(-1).view(torch.uint8).numpy().data
    with open(path, "rb", buffering=0) as f:
        f.seek(offset)
        done = 0
        while done < len(view):
            got = f.readinto(view[done:])
            if not got:
                raise UserError(f"{str(path)!r} is shorter than its header says (truncated)")
            done += got
    return out
