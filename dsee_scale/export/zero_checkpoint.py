"""Reading a DeepSpeed ZeRO-3 checkpoint one parameter at a time, without DeepSpeed running.

A ZeRO-3 checkpoint written by W ranks holds, per rank r:
  zero_pp_rank_{r}_mp_rank_00_model_states.pt   buffers, frozen_param_shapes and this rank's
                                                fragment of every frozen parameter
  zero_pp_rank_{r}_mp_rank_00_optim_states.pt   fp32_flat_groups: this rank's partition of every
                                                trainable parameter, back to back (fp32 masters)
A parameter of n elements is split in W partitions of ceil(n / W) (the last one padded).

Files are opened with torch.load(mmap=True, weights_only=True) (a short allowlist of DeepSpeed's
own classes, no arbitrary unpickling), so a tensor is read from disk only when asked for:
memory holds one parameter at a time, never the model. DeepSpeed's own
`zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint` is the reference the tests compare with.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch

from ..errors import UserError

MODEL_FILE = "zero_pp_rank_{}_mp_rank_00_model_states.pt"
OPTIM_FILE = "zero_pp_rank_{}_mp_rank_00_optim_states.pt"  # "bf16_" in front for bf16 runs


def _safe_load(path: Path):
    """torch.load with weights_only=True; DeepSpeed's enum / loss-scaler classes allowed."""
    allowed = []
    try:
        from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
        from deepspeed.runtime.zero.config import ZeroStageEnum

        allowed = [ZeroStageEnum, LossScaler, DynamicLossScaler]
    except ImportError:  # reading still works for files without those objects
        pass
    try:
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as e:  # truncated zip, not a torch file, a forbidden object ...
        raise UserError(f"checkpoint file {str(path)!r} cannot be read "
                        f"({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None


class ZeroCheckpoint:
    def __init__(self, ckpt_dir: str | Path, tag: str | None = None):
        root = Path(ckpt_dir)
        if (root / "latest").is_file() or any(root.glob("step_*")):
            if tag is None:
                if not (root / "latest").is_file():
                    raise UserError(f"{str(root)!r} has no 'latest' file; pass --tag "
                                    f"(available: {', '.join(self._tags(root)) or 'none'})")
                tag = (root / "latest").read_text().strip()
            d = root / tag
        else:  # given the tag directory itself
            d, tag = root, root.name
        if not d.is_dir():
            raise UserError(f"checkpoint tag {tag!r} not found in {str(root)!r} "
                            f"(available: {', '.join(self._tags(root)) or 'none'})")
        self.dir, self.tag = d, tag
        from ..training.checkpoint import verify_manifest

        verify_manifest(d)  # files, sizes, checksums as written, when the checkpoint has a manifest
        meta = d / "dsee_meta.json"
        self.meta = json.loads(meta.read_text()) if meta.is_file() else {}
        model_files = sorted(d.glob(MODEL_FILE.format("*")))
        if not model_files:
            raise UserError(f"{str(d)!r} holds no DeepSpeed model-state files ({MODEL_FILE.format('N')})")
        world = self.meta.get("world_size", len(model_files))
        optim_file = ("bf16_" + OPTIM_FILE) if list(d.glob("bf16_" + OPTIM_FILE.format("*"))) else OPTIM_FILE
        for r in range(world):
            for pattern in (MODEL_FILE, optim_file):
                if not (d / pattern.format(r)).is_file():
                    raise UserError(f"checkpoint {str(d)!r} was written by {world} ranks but "
                                    f"{pattern.format(r)} is missing")
        self.world, self.optim_file = world, optim_file
        self._open()
        ms = self.model_states[0]
        self.frozen_shapes = dict(ms.get("frozen_param_shapes") or {})
        self.trainable_shapes: dict[str, torch.Size] = {}
        for group in ms["param_shapes"]:
            self.trainable_shapes.update(group)
        self.offsets: dict[str, int] = {}
        offset = 0
        for name, shape in self.trainable_shapes.items():
            self.offsets[name] = offset
            offset += math.ceil(shape.numel() / world)
        for r in range(world):
            if self.flat[r].numel() < offset:
                raise UserError(f"{optim_file.format(r)} in {str(d)!r} holds {self.flat[r].numel()} "
                                f"trainable values, {offset} expected: truncated or mismatched")
        self.buffer_names = list(ms.get("buffer_names", []))
        self.shared = dict(ms.get("shared_params") or {})  # alias -> name
        self.order = [k for k in ms["module"] if k not in self.shared]

    def _open(self) -> None:
        """Map every rank's files (again): pages read so far are let go with the old maps."""
        d, world, optim_file = self.dir, self.world, self.optim_file
        self.model_states = [_safe_load(d / MODEL_FILE.format(r)) for r in range(world)]
        stage = self.model_states[0].get("ds_config", {}).get("zero_optimization", {}).get("stage", 0)
        if int(stage) != 3:
            raise UserError(f"{str(d)!r} is a ZeRO stage {stage} checkpoint; this reader streams "
                            "stage 3 (use DeepSpeed's zero_to_fp32.py for others)")
        optim = [_safe_load(d / optim_file.format(r)) for r in range(world)]
        self.flat = []  # per rank: one flat fp32 tensor of all its trainable partitions
        for r, o in enumerate(optim):
            groups = o["optimizer_state_dict"]["fp32_flat_groups"]
            self.flat.append(groups[0] if len(groups) == 1 else torch.cat(groups))

    def release(self) -> None:
        """Drop the pages read so far (the exporter calls this after each written shard), so
        resident memory stays near one shard instead of growing to the whole checkpoint."""
        self._open()

    @staticmethod
    def _tags(root: Path) -> list[str]:
        return sorted((p.name for p in root.glob("step_*") if re.fullmatch(r"step_\d+", p.name)),
                      key=lambda t: int(t.split("_")[1]))

    def experiment(self) -> dict:
        """The experiment.yaml that dsee-scale saved beside the shards."""
        import yaml

        path = self.dir / "experiment.yaml"
        if not path.is_file():
            raise UserError(f"{str(self.dir)!r} has no experiment.yaml: not a dsee-scale checkpoint")
        return yaml.safe_load(path.read_text())

    def names(self) -> list[str]:
        """All tensor names (parameters and buffers) in the model's order, aliases left out."""
        return self.order

    def is_trainable(self, name: str) -> bool:
        return name in self.trainable_shapes

    def tensor(self, name: str) -> torch.Tensor:
        """The full tensor `name`, read now (frozen in its saved dtype, trainable in fp32)."""
        if name in self.shared:
            name = self.shared[name]
        if name in self.trainable_shapes:
            shape = self.trainable_shapes[name]
            part = math.ceil(shape.numel() / self.world)
            o = self.offsets[name]
            pieces = [self.flat[r].narrow(0, o, part) for r in range(self.world)]
            return torch.cat(pieces).narrow(0, 0, shape.numel()).view(shape).clone()
        if name in self.frozen_shapes:
            shape = self.frozen_shapes[name]
            frags = [ms["frozen_param_fragments"][name] for ms in self.model_states]
            return torch.cat(frags).narrow(0, 0, shape.numel()).view(shape).clone()
        if name in self.model_states[0]["module"]:
            return self.model_states[0]["module"][name].clone()  # a buffer
        raise KeyError(name)

    def dsee_delta(self, prefix: str, cfg):
        """The trained update at `prefix` (e.g. 'model.layers.0.self_attn.q_proj.dsee.full')."""
        from ..adapters.delta import SparseLowRankDelta

        A, B = self.tensor(f"{prefix}.lora_A"), self.tensor(f"{prefix}.lora_B")
        d = SparseLowRankDelta(A.shape[1], B.shape[0], cfg.r, cfg.alpha,
                               self.tensor(f"{prefix}.sparse_index"), cfg.dropout)
        with torch.no_grad():
            d.lora_A.copy_(A)
            d.lora_B.copy_(B)
            d.sparse_values.copy_(self.tensor(f"{prefix}.sparse_values"))
        return d

    def dtype_of(self, name: str) -> torch.dtype:
        if name in self.trainable_shapes:
            return torch.float32
        if name in self.frozen_shapes:
            return self.model_states[0]["frozen_param_fragments"][name].dtype
        return self.model_states[0]["module"][name].dtype
