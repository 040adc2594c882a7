"""Rank / world discovery for each way a run is launched, and Slurm node lists."""

import subprocess
import sys

import pytest

from dsee_scale.training.distributed import discover, expand_nodelist, hostfile

from helpers import ROOT


def test_deepspeed_launcher_and_torchrun_env():
    d = discover(
        {
            "RANK": "3",
            "LOCAL_RANK": "1",
            "WORLD_SIZE": "8",
            "MASTER_ADDR": "10.0.0.5",
            "MASTER_PORT": "29511",
            "SLURM_PROCID": "0",
            "SLURM_NTASKS": "2",
        }
    )
    assert (d.rank, d.local_rank, d.world_size, d.master_addr, d.master_port, d.source) == (
        3,
        1,
        8,
        "10.0.0.5",
        29511,
        "torch",
    )  # the launcher's variables win over Slurm's


def test_slurm_one_task_per_gpu():
    d = discover(
        {
            "SLURM_PROCID": "5",
            "SLURM_LOCALID": "1",
            "SLURM_NTASKS": "8",
            "SLURM_JOB_NODELIST": "gpu[07-10]",
            "MASTER_PORT": "12345",
        }
    )
    assert (d.rank, d.local_rank, d.world_size, d.master_addr, d.master_port, d.source) == (
        5,
        1,
        8,
        "gpu07",
        12345,
        "slurm",
    )


def test_single_process():
    d = discover({})
    assert (d.rank, d.world_size, d.master_addr, d.source) == (0, 1, "127.0.0.1", "single")
    assert d.master_port > 0
    # a one-task Slurm job is a single process too
    assert discover({"SLURM_PROCID": "0", "SLURM_NTASKS": "1"}).source == "single"


@pytest.mark.parametrize(
    "nodelist,hosts",
    [
        ("node1", ["node1"]),
        ("gpu[01-03,07],cpu5", ["gpu01", "gpu02", "gpu03", "gpu07", "cpu5"]),
        ("a[8-10]x,b[1,3]", ["a8x", "a9x", "a10x", "b1", "b3"]),
        ("rack[1-2]-node[01-02]", ["rack1-node01", "rack1-node02", "rack2-node01", "rack2-node02"]),
    ],
)
def test_expand_nodelist(nodelist, hosts):
    assert expand_nodelist(nodelist) == hosts
    assert hostfile(hosts, 4) == "".join(f"{h} slots=4\n" for h in hosts)


def test_hostfile_cli_needs_a_nodelist(monkeypatch):
    env = {k: v for k, v in __import__("os").environ.items() if not k.startswith("SLURM_")}
    r = subprocess.run(
        [sys.executable, "-m", "dsee_scale", "hostfile", "--slots", "8"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=env,
    )
    assert r.returncode == 2 and "SLURM_JOB_NODELIST" in r.stderr and "Traceback" not in r.stderr


def test_host_names_come_from_scontrol_where_slurm_is_installed(tmp_path, monkeypatch):
    """Slurm's own expansion is the authority (`scontrol show hostnames`, as the sbatch scripts
    use); ours is only the fallback."""
    import os
    import stat

    from dsee_scale.training.distributed import slurm_hostnames

    fake = tmp_path / "scontrol"
    fake.write_text('#!/bin/sh\n[ "$1 $2 $3" = "show hostnames n[1-2]" ] && printf "alpha\\nbeta\\n"\n')
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    assert slurm_hostnames("n[1-2]") == ["alpha", "beta"]
    r = subprocess.run(
        [sys.executable, "-m", "dsee_scale", "hostfile", "--slots", "4", "--nodelist", "n[1-2]"],
        cwd=ROOT, capture_output=True, text=True, env=dict(os.environ),
    )  # fmt: skip
    assert r.returncode == 0 and r.stdout == "alpha slots=4\nbeta slots=4\n", r.stderr


def test_ranks_on_one_machine_share_its_cores():
    from dsee_scale.training.distributed import threads_per_rank

    assert threads_per_rank({"LOCAL_SIZE": "2"}, cores=2) == 1  # the DeepSpeed launcher
    assert threads_per_rank({"LOCAL_WORLD_SIZE": "4"}, cores=16) == 4  # torchrun
    assert threads_per_rank({"SLURM_NTASKS_PER_NODE": "8(x2)"}, cores=64) == 8  # srun, 2 nodes
    assert threads_per_rank({"LOCAL_SIZE": "4"}, cores=2) == 1  # never 0
    assert threads_per_rank({"LOCAL_SIZE": "1"}, cores=2) is None  # one rank: torch's default
    assert threads_per_rank({"LOCAL_SIZE": "2", "OMP_NUM_THREADS": "2"}, cores=2) is None  # the user's
    assert threads_per_rank({}, cores=2) is None
