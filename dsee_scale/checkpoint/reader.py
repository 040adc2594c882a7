"""Reading a DeepSpeed ZeRO-3 checkpoint one parameter at a time, without DeepSpeed running.

A ZeRO-3 checkpoint written by W ranks holds, per rank r:
  zero_pp_rank_{r}_mp_rank_00_model_states.pt   buffers, frozen_param_shapes and this rank's
                                                fragment of every frozen parameter
  [bf16_]zero_pp_rank_{r}_mp_rank_00_optim_states.pt  fp32_flat_groups: this rank's partition
                                                of every trainable parameter, back to back
A checkpoint saved with checkpoint.frozen_base (base.py) has no frozen fragments: its frozen
parameters are read from the model's own files, which dsee_meta.json names and checksums.
A parameter of n elements is split in W partitions of ceil(n / W) (the last one padded), so
every rank's flat groups hold exactly the sum of ceil(n / W) over the trainable parameters:
anything else is refused, as DeepSpeed's own zero_to_fp32.py refuses it.

This is a private layout of DeepSpeed: file names and keys come from
`deepspeed.checkpoint.constants` where it defines them (the rest are spelled as zero_to_fp32.py
spells them), and it is checked against DEEPSPEED_LAYOUT below (pinned in setup.cfg).

Files are opened with torch.load(mmap=True, weights_only=True) (a short allowlist of DeepSpeed's
own classes, no arbitrary unpickling), so a tensor is read from disk only when asked for:
memory holds one parameter at a time, never the model. DeepSpeed's own
`zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint` is the reference the tests compare with.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from deepspeed.checkpoint.constants import (
    BF16_ZERO_FILE_PREFIX,
    BUFFER_NAMES,
    DS_VERSION,
    FP32_FLAT_GROUPS,
    FROZEN_PARAM_FRAGMENTS,
    FROZEN_PARAM_SHAPES,
    MODEL_FILE_PREFIX,
    MODEL_FILE_SUFFIX,
    OPTIM_FILE_SUFFIX,
    OPTIMIZER_STATE_DICT,
    PARAM_SHAPES,
    ZERO_FILE_PREFIX,
    ZERO_STAGE,
)

from ..errors import UserError
from . import format as fmt
from .base import open_base

DEEPSPEED_LAYOUT = ">=0.19,<0.20"  # the DeepSpeed versions whose checkpoint layout this reads
MODULE, SHARED_PARAMS = "module", "shared_params"  # keys zero_to_fp32.py spells out too


def model_file(rank: int) -> str:
    return f"{ZERO_FILE_PREFIX}{rank}_{MODEL_FILE_PREFIX}00{MODEL_FILE_SUFFIX}"


def optim_file(rank: int, bf16: bool) -> str:
    prefix = BF16_ZERO_FILE_PREFIX if bf16 else ZERO_FILE_PREFIX
    return f"{prefix}{rank}_{MODEL_FILE_PREFIX}00{OPTIM_FILE_SUFFIX}"


def _safe_load(path: Path):
    """torch.load with weights_only=True; DeepSpeed's enum / loss-scaler classes allowed."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    try:
        with torch.serialization.safe_globals([ZeroStageEnum, LossScaler, DynamicLossScaler]):
            return torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as e:  # truncated zip, not a torch file, a forbidden object ...
        raise UserError(
            f"checkpoint file {str(path)!r} cannot be read "
            f"({type(e).__name__}: {str(e).splitlines()[0][:200]})"
        ) from None


def partition_numel(numel: int, world: int) -> int:
    """Elements of one rank's partition of an n-element parameter (the last one padded)."""
    return math.ceil(numel / world)


def resolve_tag_dir(ckpt_dir: str | Path, tag: str | None) -> tuple[Path, str]:
    """(the tag directory, its tag) of <output_dir>/checkpoints (+ tag or `latest`), or of a
    step_N directory given directly."""
    root = Path(ckpt_dir)
    available = f"(available: {', '.join(fmt.tags(root)) or 'none'})"
    if (root / fmt.LATEST).is_file() or fmt.tags(root):
        if tag is None:
            if not (root / fmt.LATEST).is_file():
                raise UserError(f"{str(root)!r} has no '{fmt.LATEST}' file; pass --tag {available}")
            tag = (root / fmt.LATEST).read_text().strip()
        d = root / tag
    else:  # given the tag directory itself
        d, tag = root, root.name
    if not d.is_dir():
        raise UserError(f"checkpoint tag {tag!r} not found in {str(root)!r} {available}")
    return d, tag


class ZeroCheckpoint:
    def __init__(self, ckpt_dir: str | Path, tag: str | None = None):
        self.dir, self.tag = resolve_tag_dir(ckpt_dir, tag)
        d = self.dir
        fmt.verify_manifest(d)  # files, sizes, checksums as written
        self.meta = fmt.read_meta(d)
        self.world = self.meta["world_size"]
        self.bf16 = (d / optim_file(0, bf16=True)).is_file()
        for r in range(self.world):
            for name in (model_file(r), optim_file(r, self.bf16)):
                if not (d / name).is_file():
                    raise UserError(f"checkpoint {str(d)!r} was written by {self.world} ranks but "
                                    f"{name} is missing")  # fmt: skip
        self._open()
        ms = self.model_states[0]
        self.ds_version = str(ms.get(DS_VERSION, "unknown"))
        self.frozen_shapes = dict(ms.get(FROZEN_PARAM_SHAPES) or {})
        self.base, self.base_names = None, {}  # frozen weights referenced in their source (base.py)
        if "base" in self.meta:
            self.base, self.base_names = open_base(self.meta["base"], d), self.meta["base"]["names"]
            self.frozen_shapes = {n: self.base.shape(b) for n, b in self.base_names.items()}
        self.trainable_shapes: dict[str, torch.Size] = {}
        for group in ms[PARAM_SHAPES]:
            self.trainable_shapes.update(group)
        self.offsets: dict[str, int] = {}  # where each trainable parameter starts in a partition
        offset = 0
        for name, shape in self.trainable_shapes.items():
            self.offsets[name] = offset
            offset += partition_numel(shape.numel(), self.world)
        self._check_layout(offset)
        self.buffer_names = list(ms.get(BUFFER_NAMES, []))
        self.shared = dict(ms.get(SHARED_PARAMS) or {})  # alias -> name
        order = self.meta["base"]["order"] if self.base is not None else ms[MODULE]
        self.order = [k for k in order if k not in self.shared]

    def _check_layout(self, trainable_numel: int) -> None:
        """Every rank holds exactly its partitions, as DeepSpeed's zero_to_fp32 insists."""
        for r in range(self.world):
            if self.flat[r].numel() != trainable_numel:
                raise UserError(f"{optim_file(r, self.bf16)} in {str(self.dir)!r} holds "
                                f"{self.flat[r].numel()} trainable values, {trainable_numel} expected: "
                                "truncated or mismatched")  # fmt: skip
        for name, shape in self.frozen_shapes.items() if self.base is None else ():
            part = partition_numel(shape.numel(), self.world)
            for r, rank_states in enumerate(self.model_states):
                fragment = rank_states[FROZEN_PARAM_FRAGMENTS].get(name)
                if fragment is None or fragment.numel() != part:
                    have = None if fragment is None else fragment.numel()
                    raise UserError(f"{model_file(r)} in {str(self.dir)!r}: the frozen fragment of "
                                    f"{name} holds {have} values, {part} expected: truncated or "
                                    "mismatched")  # fmt: skip

    def _open(self) -> None:
        """Map every rank's files (again): pages read so far are let go with the old maps."""
        d, world = self.dir, self.world
        self.model_states = [_safe_load(d / model_file(r)) for r in range(world)]
        optim = [_safe_load(d / optim_file(r, self.bf16)) for r in range(world)]
        stage = int(optim[0][OPTIMIZER_STATE_DICT].get(ZERO_STAGE, 0))
        if stage != 3:
            raise UserError(
                f"{str(d)!r} is a ZeRO stage {stage} checkpoint; this reader streams "
                "stage 3 (use DeepSpeed's zero_to_fp32.py for others)"
            )
        flat = []  # per rank: one flat fp32 tensor of all its trainable partitions
        for o in optim:
            groups = o[OPTIMIZER_STATE_DICT][FP32_FLAT_GROUPS]
            flat.append(groups[0] if len(groups) == 1 else torch.cat(groups))
        self.flat = flat  # swapped whole: a reader on another thread sees old maps or new ones

    def release(self) -> None:
        """Drop the pages read so far (the exporter calls this after each written shard), so
        resident memory stays near one shard instead of growing to the whole checkpoint."""
        self._open()

    def experiment(self) -> dict:
        """The experiment.yaml that dsee-scale saved beside the shards."""
        return fmt.read_experiment(self.dir)

    def names(self) -> list[str]:
        """All tensor names (parameters and buffers) in the model's order, aliases left out."""
        return self.order

    def tensor(self, name: str) -> torch.Tensor:
        """The full tensor `name`, read now (frozen in its saved dtype, trainable in fp32)."""
        if name in self.shared:
            name = self.shared[name]
        if name in self.trainable_shapes:
            shape = self.trainable_shapes[name]
            part = partition_numel(shape.numel(), self.world)
            o = self.offsets[name]
            pieces = [self.flat[r].narrow(0, o, part) for r in range(self.world)]
            return torch.cat(pieces).narrow(0, 0, shape.numel()).view(shape)  # cat made the copy
        if self.base is not None and name in self.base_names:
            return self.base.tensor(self.base_names[name])
        if name in self.frozen_shapes:
            return torch.cat(self.pieces(name)).view(self.frozen_shapes[name])  # cat made the copy
        if name in self.model_states[0][MODULE]:
            return self.model_states[0][MODULE][name].clone()  # a buffer
        raise KeyError(name)

    def shape_of(self, name: str) -> torch.Size:
        name = self.shared.get(name, name)
        for shapes in (self.trainable_shapes, self.frozen_shapes):
            if name in shapes:
                return torch.Size(shapes[name])
        return self.model_states[0][MODULE][name].shape

    def pieces(self, name: str) -> list[torch.Tensor]:
        """The tensor `name` as flat pieces whose concatenation is its data in row-major order:
        a frozen parameter saved in the checkpoint comes as every rank's fragment, viewed in the
        memory map (no copy; the last one's padding cut off), anything else as one piece."""
        name = self.shared.get(name, name)
        if self.base is not None or name not in self.frozen_shapes:
            return [self.tensor(name).reshape(-1)]
        left, out = self.frozen_shapes[name].numel(), []
        for ms in self.model_states:
            fragment = ms[FROZEN_PARAM_FRAGMENTS][name].reshape(-1)
            take = min(left, fragment.numel())
            if take:
                out.append(fragment.narrow(0, 0, take))
            left -= take
        return out

    def dsee_delta(self, prefix: str, cfg):
        """The trained update at `prefix` (adapters.layer.delta_name(layer, slice))."""
        from ..adapters.delta import SparseLowRankDelta

        A, B = self.tensor(f"{prefix}.lora_A"), self.tensor(f"{prefix}.lora_B")
        d = SparseLowRankDelta(
            A.shape[1], B.shape[0], cfg.r, cfg.alpha, self.tensor(f"{prefix}.sparse_index"), cfg.dropout
        )
        with torch.no_grad():
            d.lora_A.copy_(A)
            d.lora_B.copy_(B)
            d.sparse_values.copy_(self.tensor(f"{prefix}.sparse_values"))
        return d

    def dtype_of(self, name: str) -> torch.dtype:
        if name in self.trainable_shapes:
            return torch.float32
        if self.base is not None and name in self.base_names:
            return self.base.dtype
        if name in self.frozen_shapes:
            return self.model_states[0][FROZEN_PARAM_FRAGMENTS][name].dtype
        return self.model_states[0][MODULE][name].dtype
