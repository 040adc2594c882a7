"""The frozen base of a run, referenced by its checkpoints instead of copied (`checkpoint.frozen_base`).

A DSEE run trains a few million values beside a frozen base of up to tens of GB, and DeepSpeed's
checkpoint holds every rank's fragment of every frozen parameter: each save rewrites the whole
base. When the base can be read again from where it came from (a Hugging Face directory of
safetensors files, or a GGUF file), the run saves without its frozen parameters
(`engine.save_checkpoint(exclude_frozen_parameters=True)`) and dsee_meta.json's "base" records:
  model   the model section the base was loaded from (path or gguf_file)
  dtype   the dtype the run holds the frozen weights in
  files   each source file's size and sha256 (hashed once per run, the files split over ranks)
  names   frozen parameter -> its tensor in the source's safetensors (DSEE's base_layer dropped)
  order   every state-dict name of the model, in order (DeepSpeed's files then lack the frozen)
Resume, export and pruning check the files against `files` (a changed base is refused, the
file named) and read the frozen tensors from them with plain reads, one tensor at a time.
"""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path
from typing import Any, TypedDict, cast

import torch

from ..config import from_dict
from ..errors import ConfigError, UserError
from ..models import DTYPES, ModelConfig, dequantized_once_per_node, resolve_preset
from . import format as fmt


class BaseRecord(TypedDict):
    model: dict
    dtype: str
    files: dict[str, dict]
    names: dict[str, str]
    order: list[str]


def source(mc: ModelConfig) -> ModelConfig:
    """The model section with a preset resolved to its file."""
    return resolve_preset(mc)


def files_of(mc: ModelConfig) -> list[Path]:
    """The files the base is read from: a directory's safetensors (and config), or the GGUF."""
    if mc.gguf_file is not None:
        return [Path(mc.gguf_file).resolve()]
    d = Path(str(mc.path)).resolve()
    return sorted(d.glob("*.safetensors")) + [p for p in (d / "config.json",) if p.is_file()]


def why_not_referable(mc: ModelConfig) -> str | None:
    """Why checkpoints of a run on this model cannot reference its base, or None."""
    mc = source(mc)
    if mc.config is not None:
        return "model.config builds random weights that no file holds"
    if mc.path is not None and not any(p.suffix == ".safetensors" for p in files_of(mc)):
        return f"model.path {mc.path!r} holds no .safetensors files"
    return None


def references_base(frozen_base: str, mc: ModelConfig, custom_build: bool) -> bool:
    """checkpoint.frozen_base resolved: auto references the base when it can be read again
    (not for a run whose model a custom builder made, e.g. a pruned re-tune)."""
    why = "the model is built by the pruning stage" if custom_build else why_not_referable(mc)
    if frozen_base == "from_source" and why is not None:
        raise ConfigError(
            f"checkpoint.frozen_base: from_source is not possible here ({why}); use auto or save"
        )
    return frozen_base == "from_source" or (frozen_base == "auto" and why is None)


_digests: dict[tuple, dict] = {}  # (file, size, mtime) -> its entry: hashed once per process


def digest(files: list[Path]) -> dict[str, dict]:
    """{file: {bytes, sha256}}, the files split over the ranks of a running process group (each
    rank hashes every world-th) and gathered; cached for the process."""
    from ..zero import comm

    rank, world = comm.rank_and_world()
    mine = {}
    for f in files[rank::world]:
        st = f.stat()
        key = (str(f), st.st_size, st.st_mtime_ns)
        if key not in _digests:
            _digests[key] = {"bytes": st.st_size, "sha256": fmt.sha256_file(f)}
        mine[str(f)] = _digests[key]
    out: dict[str, dict] = {}
    for part in comm.all_gather_objects(mine) if world > 1 else [mine]:
        out.update(part)
    return dict(sorted(out.items()))


def changed(rec: BaseRecord) -> str | None:
    """Why the base's files are not the ones the checkpoint was written with, or None (every
    rank of a process group calls it; they share the hashing)."""
    want = rec["files"]
    for f, entry in want.items():
        if not Path(f).is_file():
            return f"its base file {f!r} is missing"
        if Path(f).stat().st_size != entry["bytes"]:
            return f"its base file {f!r} has changed size"
    got = digest([Path(f) for f in want])
    for f, entry in want.items():
        if got[f]["sha256"] != entry["sha256"]:
            return f"its base file {f!r} does not match the sha256 it was trained on"
    return None


def _model_dir(mc: ModelConfig, dtype: str) -> Path:
    """The safetensors directory holding the base (a GGUF: dequantized once per node)."""
    if mc.gguf_file is None:
        return Path(str(mc.path))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    in_dtype = dataclasses.replace(mc, dtype=cast(Any, dtype))
    return Path(str(dequantized_once_per_node(in_dtype, local_rank).path))


class BaseWeights:
    """The base's tensors by name, read from their safetensors files with plain reads at the
    header's offsets (no memory map: a process that read the whole base does not keep its pages
    resident). safetensors opens each file once to check it and list its tensors."""

    def __init__(self, mc: ModelConfig, dtype: str):
        from safetensors import safe_open

        self.dtype = DTYPES[dtype]
        self.files = {}  # tensor name -> open file
        self.paths: dict[str, Path] = {}  # tensor name -> its file
        self.entries: dict[str, tuple[int, torch.dtype, list[int]]] = {}  # read on first use
        for f in sorted(_model_dir(mc, dtype).glob("*.safetensors")):
            h = safe_open(str(f), framework="pt")
            self.files.update(dict.fromkeys(h.keys(), h))
            self.paths.update(dict.fromkeys(h.keys(), f))

    def __contains__(self, name: str) -> bool:
        return name in self.files

    def shape(self, name: str) -> torch.Size:
        return torch.Size(self.files[name].get_slice(name).get_shape())

    def _entry(self, name: str) -> tuple[int, torch.dtype, list[int]] | None:
        if name not in self.entries:
            self.entries.update(fmt.safetensors_entries(self.paths[name]))
        return self.entries.get(name)  # None: a dtype outside format.SAFETENSORS_DTYPES

    def tensor(self, name: str) -> torch.Tensor:
        """The tensor as the run held it (loaded in the run's dtype, as from_pretrained does)."""
        entry = self._entry(name)
        if entry is None:
            return self.files[name].get_tensor(name).to(self.dtype)
        shape = entry[2]
        return self.flat_range(name, 0, math.prod(shape)).reshape(shape)

    def flat_range(self, name: str, start: int, end: int) -> torch.Tensor:
        """Elements [start, end) of the flattened tensor, in the run's dtype (a ZeRO-3 rank's
        partition of a parameter), read from exactly its bytes in the file without mapping it:
        a rank that loads its partitions holds them, not the file pages it read."""
        entry = self._entry(name)
        if entry is None:
            return self.files[name].get_tensor(name).reshape(-1)[start:end].to(self.dtype)
        offset, dtype, _ = entry
        out = torch.empty(end - start, dtype=dtype)
        return fmt.read_range(self.paths[name], offset + start * dtype.itemsize, out).to(self.dtype)


def name_in(base: BaseWeights, param: str) -> str | None:
    """A frozen parameter's tensor name in the base: DSEE's `.base_layer` dropped, and the
    model's own prefix (transformer. / model.) tried off and on, as from_pretrained matches."""
    plain = param.replace(".base_layer.", ".")
    for cand in (plain, plain.partition(".")[2]):
        if cand in base:
            return cand
    return next((n for n in base.files if n.partition(".")[2] == plain), None)  # a prefix it lacks


def record(module, mc: ModelConfig, dtype: str) -> BaseRecord | None:
    """What the checkpoints of this run say of its base; None when a frozen parameter cannot be
    found in the source's files (then they save the frozen parameters as before). Every rank
    of a process group calls it (the hashing is shared)."""
    mc = source(mc)
    base = BaseWeights(mc, dtype)
    names = {}
    for n, p in module.named_parameters():
        if not p.requires_grad:
            found = name_in(base, n)
            if found is None:
                return None
            names[n] = found
    return {
        "model": {k: v for k, v in dataclasses.asdict(mc).items() if v is not None},
        "dtype": dtype,
        "files": digest(files_of(mc)),
        "names": names,
        "order": list(module.state_dict().keys()),
    }


def verify(rec: BaseRecord, where: Path, action: str = "") -> None:
    """Refuse a checkpoint whose base files changed since it was written (one line, the file
    named; every rank of a process group calls it)."""
    problem = changed(rec)
    if problem is not None:
        raise UserError(
            f"{action}checkpoint {str(where)!r} saved no frozen weights (checkpoint.frozen_base) and "
            f"{problem}; restore that file, or use a checkpoint saved with checkpoint.frozen_base: save"
        )


def open_base(rec: BaseRecord, where: Path) -> BaseWeights:
    """The base a checkpoint references, checked against its record."""
    verify(rec, where)
    return BaseWeights(from_dict(ModelConfig, rec["model"], "base.model"), rec["dtype"])
