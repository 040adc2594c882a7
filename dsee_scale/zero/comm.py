"""The process group, the device rule and every collective dsee-scale issues.

Device rule: every tensor that enters a collective, or the DeepSpeed engine, lives on the
accelerator's current device, `device()` = DeepSpeed's
`get_accelerator().current_device_name()`: `cuda:<local rank>` on GPUs, where NCCL refuses CPU
tensors, and `cpu` on DeepSpeed's CPU accelerator (gloo). `init()` selects that device from
the local rank BEFORE the process group exists, so NCCL, torch's object collectives (they
stage their bytes on the current CUDA device) and the DeepSpeed engine all agree on it.

Callers pass Python values (or tensors on any device) to the helpers below and get CPU values
back; the moves happen here and nowhere else. No other module calls torch.distributed
collectives (tests/test_architecture.py checks it). Outside a process group (one process, no
launcher) every helper does the single-process thing.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from ..errors import UserError


def device() -> torch.device:
    """The accelerator device of this rank (where engine inputs and collectives live)."""
    from deepspeed.accelerator import get_accelerator

    return torch.device(get_accelerator().current_device_name())


def init(local_rank: int, master_port: int, timeout_s: int) -> tuple[int, int]:
    """Select this rank's device, then bring up the process group (DeepSpeed picks nccl on
    CUDA, gloo on its CPU accelerator). Returns (rank, world size)."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    if accelerator.device_name() != "cpu":
        accelerator.set_device(local_rank)  # before any collective: see the module docstring
    try:
        deepspeed.init_distributed(verbose=False, timeout=timedelta(seconds=timeout_s))
    except dist.DistNetworkError as e:
        if "listen" in str(e) or "address already in use" in str(e).lower():
            raise UserError(
                f"master port {master_port} is already in use; pick another with "
                "`deepspeed --master_port N` (or MASTER_PORT=N for python / srun "
                "launches)"
            ) from None
        raise
    rank, world = dist.get_rank(), dist.get_world_size()
    if accelerator.device_name() == "cpu":
        release_shm_name(rank, world)
    return rank, world


def release_shm_name(rank: int, world: int) -> None:
    """DeepSpeed's CPU accelerator gives every rank a 66 MB /dev/shm buffer for its
    shared-memory all-reduce and never unlinks it (shm.cpp never calls shared_close), so each
    multi-rank run on a machine leaves its buffers in RAM-backed /dev/shm: 19 GB after a day of
    tests here. Once every rank has mapped every buffer (init_distributed has returned on all
    ranks: the barrier), the names are no longer needed; the mappings stay valid until exit.
    (A one-rank `deepspeed --num_gpus 1` run makes one too.)"""
    if world > 1:
        dist.barrier()
    addr, port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
    try:
        os.unlink(f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_{rank}")
    except FileNotFoundError:  # not all ranks on this node: DeepSpeed made no buffer
        pass


def rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def sum_over_ranks(values: Sequence[float] | torch.Tensor) -> torch.Tensor:
    """Element-wise sum over ranks of a tensor (or a list of numbers), as float64 on the CPU."""
    t = torch.as_tensor(values, dtype=torch.float64).to(device())
    if rank_and_world()[1] > 1:
        dist.all_reduce(t)
    return t.cpu()


def mean_over_ranks(value: float) -> float:
    """The mean of one number over ranks (every rank gets it)."""
    return float(sum_over_ranks([value])[0]) / rank_and_world()[1]


def broadcast_into(t: torch.Tensor, src: int) -> None:
    """Overwrite t on every rank with rank src's t (in place, any device)."""
    if rank_and_world()[1] == 1:
        return
    buf = t.detach().to(device())
    dist.broadcast(buf, src)
    if buf.data_ptr() != t.data_ptr():
        t.detach().copy_(buf)


def all_gather_objects(obj: Any) -> list[Any]:
    """[obj of rank 0, obj of rank 1, ...] (picklable objects; a list of one outside a group)."""
    world = rank_and_world()[1]
    if world == 1:
        return [obj]
    out: list[Any] = [None] * world
    dist.all_gather_object(out, obj)
    return out


def my_share(n: int) -> list[int]:
    """This rank's items of range(n) when n items are split over the ranks (round robin)."""
    rank, world = rank_and_world()
    return list(range(rank, n, world))


def merged_over_ranks(mine: dict) -> dict:
    """The union of every rank's dict (picklable values); every rank gets it."""
    out: dict = {}
    for part in all_gather_objects(mine):
        out.update(part)
    return out


def barrier() -> None:
    if rank_and_world()[1] == 1:
        return
    d = device()
    if d.type == "cuda":  # tell NCCL which device: it otherwise guesses from the rank
        dist.barrier(device_ids=[d.index if d.index is not None else torch.cuda.current_device()])
    else:
        dist.barrier()


def shutdown() -> None:
    """Leave the process group cleanly (no gloo / NCCL threads left to abort the exit)."""
    if dist.is_available() and dist.is_initialized():
        barrier()
        dist.destroy_process_group()
