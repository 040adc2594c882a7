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
from collections.abc import Mapping
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


def discover(environ: Mapping[str, str] | None = None) -> DistEnv:
    env: Mapping[str, str] = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return DistEnv(
            int(env["RANK"]),
            int(env.get("LOCAL_RANK", 0)),
            int(env["WORLD_SIZE"]),
            env.get("MASTER_ADDR", "127.0.0.1"),
            int(env.get("MASTER_PORT", 29500)),
            "torch",
        )
    if "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", 1)) > 1:
        addr = env.get("MASTER_ADDR") or _first_slurm_host(env.get("SLURM_JOB_NODELIST", ""))
        port = int(env.get("MASTER_PORT", 29500))
        return DistEnv(
            int(env["SLURM_PROCID"]),
            int(env.get("SLURM_LOCALID", 0)),
            int(env["SLURM_NTASKS"]),
            addr,
            port,
            "slurm",
        )
    return DistEnv(0, 0, 1, "127.0.0.1", int(env.get("MASTER_PORT", 0)) or free_port(), "single")


def threads_per_rank(environ: Mapping[str, str] | None = None, cores: int | None = None) -> int | None:
    """CPU threads for one of several ranks on this machine: its cores divided among the local
    ranks (LOCAL_SIZE from the DeepSpeed launcher, LOCAL_WORLD_SIZE from torchrun,
    SLURM_NTASKS_PER_NODE), or None to keep torch's choice (one rank, or OMP_NUM_THREADS set).
    torch's default gives every process all cores: two ranks on two cores then ran four
    threads, and GreBsmo support selection took 3.4x as long as in one process."""
    env: Mapping[str, str] = os.environ if environ is None else environ
    if env.get("OMP_NUM_THREADS"):
        return None
    local = next(
        (env[k] for k in ("LOCAL_SIZE", "LOCAL_WORLD_SIZE", "SLURM_NTASKS_PER_NODE") if env.get(k)), "1"
    )
    try:
        n_local = int(local.split("(")[0])
    except ValueError:
        return None
    if n_local <= 1:
        return None
    return max(1, (cores or os.cpu_count() or 1) // n_local)


def expand_nodelist(nodelist: str) -> list[str]:
    """Slurm's compressed node list as host names, in order ('gpu[01-03,07],cpu5' ->
    gpu01 gpu02 gpu03 gpu07 cpu5; 'rack[1-2]-node[01-02]' -> rack1-node01 rack1-node02
    rack2-node01 rack2-node02): what `scontrol show hostnames` prints, for where it is absent."""
    hosts: list[str] = []
    for item in _split_top_level(nodelist):
        hosts += _expand_item(item)
    return hosts


def _split_top_level(text: str) -> list[str]:
    """Split at commas outside brackets."""
    parts, depth, current = [], 0, ""
    for ch in text:
        depth += ch == "["
        depth -= ch == "]"
        if ch == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += ch
    return [p for p in parts + [current] if p]


def _expand_item(item: str) -> list[str]:
    m = re.match(r"([^\[]*)\[([^\]]*)\](.*)", item)
    if not m:
        return [item]
    prefix, ranges, rest = m.groups()
    tails = _expand_item(rest)
    out = []
    for part in ranges.split(","):
        lo, _, hi = part.partition("-")
        for i in range(int(lo), int(hi or lo) + 1):
            out += [f"{prefix}{str(i).zfill(len(lo))}{tail}" for tail in tails]
    return out


def slurm_hostnames(nodelist: str) -> list[str]:
    """Host names of a Slurm node list: `scontrol show hostnames` where Slurm is installed (the
    authority), else expand_nodelist."""
    import shutil
    import subprocess

    if shutil.which("scontrol"):
        r = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True)
        if r.returncode == 0 and r.stdout.split():
            return r.stdout.split()
    return expand_nodelist(nodelist)


def _first_slurm_host(nodelist: str) -> str:
    hosts = slurm_hostnames(nodelist)
    return hosts[0] if hosts else "127.0.0.1"


def hostfile(hosts: list[str], slots: int) -> str:
    """A DeepSpeed hostfile (`deepspeed --hostfile`): one 'host slots=N' line per node."""
    return "".join(f"{h} slots={slots}\n" for h in hosts)


def setup_env() -> DistEnv:
    d = discover()
    os.environ.update(
        RANK=str(d.rank),
        LOCAL_RANK=str(d.local_rank),
        WORLD_SIZE=str(d.world_size),
        MASTER_ADDR=d.master_addr,
        MASTER_PORT=str(d.master_port),
    )
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
