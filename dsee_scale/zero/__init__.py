"""The only module that knows about ZeRO-3 partitioned parameters.

Under ZeRO-3 each rank holds a shard of every parameter; outside `gathered(...)` a parameter
has shape [0] and its real shape in `ds_shape`. Everything here also works on a plain model
(no DeepSpeed, or ZeRO stage < 3), where it does nothing special.
"""
from __future__ import annotations

import contextlib
from typing import Iterable

import torch
import torch.distributed as dist
from torch import nn


def is_partitioned(p: torch.Tensor) -> bool:
    return hasattr(p, "ds_id")


def full_numel(p: torch.Tensor) -> int:
    return int(getattr(p, "ds_numel", p.numel()))


@contextlib.contextmanager
def gathered(params: Iterable[torch.Tensor], modifier_rank: int | None = None):
    """Inside: the full parameters on every rank. With modifier_rank, that rank's in-place
    changes are broadcast to all and re-partitioned on exit (DeepSpeed's rule for edits)."""
    params = [p for p in params if is_partitioned(p)]
    if not params:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(params, modifier_rank=modifier_rank):
        yield


def rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_gather_objects(obj):
    """[obj of rank 0, obj of rank 1, ...] (a list of one outside a process group)."""
    rank, world = rank_and_world()
    if world == 1:
        return [obj]
    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


def distributed_supports(model: nn.Module, targets, cfg, progress=None) -> dict[str, torch.Tensor]:
    """Choose every target's support with the work spread over ranks; all ranks get all supports.

    Targets go in waves of `world` targets. In a wave every rank takes part in gathering each
    target's weight (a collective) and keeps a float32 copy of its own one only, so a rank holds
    at most one gathered layer beyond its shard. Then each rank selects its target's support in
    parallel with the others, and the wave's supports are exchanged.
    """
    from ..adapters.inject import base_layer, compute_supports, target_weight

    rank, world = rank_and_world()
    supports: dict[str, torch.Tensor] = {}
    for start in range(0, len(targets), world):
        wave = targets[start:start + world]
        mine = None
        for j, t in enumerate(wave):
            with gathered([base_layer(model, t).weight]):
                if j == rank:
                    mine = (t, target_weight(model, t).detach().float().clone())
        local = {}
        if mine is not None:
            t, w = mine
            local = {k: v.cpu() for k, v in compute_supports({t.key: w}, [t], cfg).items()}
            del w
        for part in all_gather_objects(local):
            supports.update(part)
        if progress is not None:
            progress(min(start + world, len(targets)), len(targets))
    return supports


def copy_full_into(model: nn.Module, name: str, src: torch.Tensor, rank: int) -> None:
    """Write the full tensor `src` into parameter / buffer `name` (partitioned or not): gathered
    alone, written by rank 0, re-partitioned on exit."""
    try:
        target = model.get_parameter(name)
    except AttributeError:
        target = model.get_buffer(name)
    with torch.no_grad(), gathered([target], modifier_rank=0):
        if rank == 0 or not is_partitioned(target):
            if tuple(target.shape) != tuple(src.shape):
                raise RuntimeError(f"{name}: source shape {tuple(src.shape)} != model {tuple(target.shape)}")
            target.copy_(src.to(target.dtype))
