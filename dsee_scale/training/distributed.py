"""Who am I: rank / world discovery for every way a run is launched, in one place.

- the DeepSpeed launcher and torchrun set RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR/PORT;
- Slurm `srun` (one task per process) sets SLURM_PROCID, SLURM_LOCALID, SLURM_NTASKS;
- `python launchers/train.py` alone is rank 0 of 1 on a free local port.
`setup_env()` fills the torch.distributed variables from whichever is present.
"""
from __future__ import annotations

import os
import re
import socket
from dataclasses import dataclass


@dataclass
class DistEnv:
    rank: int
    local_rank: int
    world_size: int
    master_addr: str
    master_port: int
    source: str  # "torch" (deepspeed / torchrun), "slurm" or "single"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def discover(env: dict | None = None) -> DistEnv:
    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:
        return DistEnv(int(env["RANK"]), int(env.get("LOCAL_RANK", 0)), int(env["WORLD_SIZE"]),
                       env.get("MASTER_ADDR", "127.0.0.1"), int(env.get("MASTER_PORT", 29500)),
                       "torch")
    if "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", 1)) > 1:
        addr = env.get("MASTER_ADDR") or _first_slurm_host(env.get("SLURM_JOB_NODELIST", ""))
        port = int(env.get("MASTER_PORT", 29500))
        return DistEnv(int(env["SLURM_PROCID"]), int(env.get("SLURM_LOCALID", 0)),
                       int(env["SLURM_NTASKS"]), addr, port, "slurm")
    return DistEnv(0, 0, 1, "127.0.0.1", int(env.get("MASTER_PORT", 0)) or free_port(), "single")


def expand_nodelist(nodelist: str) -> list[str]:
    """Slurm's compressed node list ('gpu[01-03,07],cpu5') as host names, in order: what
    `scontrol show hostnames` prints, without needing scontrol."""
    hosts: list[str] = []
    for item in re.findall(r"[^,\[]+(?:\[[^\]]*\])?[^,]*", nodelist):
        m = re.fullmatch(r"(.*?)\[([^\]]*)\](.*)", item)
        if not m:
            hosts.append(item)
            continue
        prefix, ranges, suffix = m.groups()
        for part in ranges.split(","):
            lo, _, hi = part.partition("-")
            for i in range(int(lo), int(hi or lo) + 1):
                hosts.append(f"{prefix}{str(i).zfill(len(lo))}{suffix}")
    return hosts


def _first_slurm_host(nodelist: str) -> str:
    hosts = expand_nodelist(nodelist)
    return hosts[0] if hosts else "127.0.0.1"


def hostfile(hosts: list[str], slots: int) -> str:
    """A DeepSpeed hostfile (`deepspeed --hostfile`): one 'host slots=N' line per node."""
    return "".join(f"{h} slots={slots}\n" for h in hosts)


def setup_env() -> DistEnv:
    d = discover()
    os.environ.update(RANK=str(d.rank), LOCAL_RANK=str(d.local_rank), WORLD_SIZE=str(d.world_size),
                      MASTER_ADDR=d.master_addr, MASTER_PORT=str(d.master_port))
    return d


def exit_now(code: int = 0) -> None:
    """Leave without the interpreter's teardown. After a finished run, C++ threads of the
    process group / DeepSpeed's shm comm op can abort the exit ("terminate called without an
    active exception", status -6) seen here now and then on 2-rank CPU runs; all our files
    are closed and flushed by then, so skipping the teardown loses nothing."""
    import sys

    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
