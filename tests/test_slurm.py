"""Multi-node launch paths: a REAL Slurm on this machine, two deepspeed "nodes", NVMe offload."""

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import ROOT, check, free_port, launch, losses, save_tiny_model, write_config

DAEMONS = ("munge", "slurmd", "slurmctld", "slurm-client")


def _sh(*cmd, **kw):
    return subprocess.run(list(cmd), capture_output=True, text=True, **kw)


def _install_slurm() -> str | None:
    """None when Slurm and munge are (now) installed, else why not."""
    if all(shutil.which(b) for b in ("slurmctld", "slurmd", "sbatch", "munged")):
        return None
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return "Slurm is not installed and apt-get cannot be run here (needs root)"
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    r = _sh(
        "apt-get", "install", "-y", "-q", "slurmd", "slurmctld", "slurm-client", "munge", env=env, timeout=900
    )
    if r.returncode != 0:
        _sh("apt-get", "update", "-q", env=env, timeout=900)
        r = _sh(
            "apt-get",
            "install",
            "-y",
            "-q",
            "slurmd",
            "slurmctld",
            "slurm-client",
            "munge",
            env=env,
            timeout=900,
        )
    if r.returncode != 0:
        return "apt-get could not install slurmd/slurmctld/slurm-client/munge: " + r.stderr.strip()[-200:]
    return None


def _ports(n):
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    why = _install_slurm()
    if why:
        pytest.skip(why)
    if os.geteuid() != 0:
        pytest.skip("starting slurmd / munged needs root")
    d = tmp_path_factory.mktemp("slurm")
    started = []
    # munge: the key comes with the package; start munged unless one already answers
    if _sh("bash", "-c", "munge -n | unmunge").returncode != 0:
        if not Path("/etc/munge/munge.key").is_file():
            _sh("mungekey", "-c")
        Path("/run/munge").mkdir(parents=True, exist_ok=True)
        shutil.chown("/run/munge", "munge", "munge")
        r = _sh("runuser", "-u", "munge", "--", "munged")
        if r.returncode != 0:
            pytest.skip(f"munged does not start: {r.stderr.strip()[-200:]}")
        started.append("munged")
    host = socket.gethostname().split(".")[0]
    mem = int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**20) - 1024
    ctl_port, d_port = _ports(2)
    for sub in ("state", "spool", "log"):
        (d / sub).mkdir()
    conf = d / "slurm.conf"
    conf.write_text(f"""ClusterName=dseetest
SlurmctldHost={host}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd.pid
SlurmctldLogFile={d}/log/slurmctld.log
SlurmdLogFile={d}/log/slurmd.log
SlurmctldPort={ctl_port}
SlurmdPort={d_port}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
MpiDefault=none
MinJobAge=3600
NodeName={host} CPUs={os.cpu_count()} RealMemory={mem} State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
""")
    env = dict(os.environ, SLURM_CONF=str(conf))
    for daemon in ("slurmctld", "slurmd"):
        r = _sh(daemon, *(["-c"] if daemon == "slurmctld" else []), env=env)
        if r.returncode != 0:
            pytest.skip(f"{daemon} does not start here: {r.stderr.strip()[-200:]}")
        started.append(daemon)
    deadline = time.time() + 90
    while time.time() < deadline:
        state = _sh("sinfo", "-h", "-o", "%T", env=env).stdout.strip()
        if state == "idle":
            break
        time.sleep(1)
    else:
        pytest.fail(f"the Slurm node never became idle (state {state!r}); see {d}/log")
    yield env
    for daemon in ("slurmd", "slurmctld"):
        pid = d / f"{daemon}.pid"
        if pid.is_file():
            try:
                os.kill(int(pid.read_text().strip()), signal.SIGTERM)
            except (ProcessLookupError, ValueError):
                pass
    if "munged" in started:
        _sh("pkill", "-x", "munged")


def _wait(job: str, env, timeout=900) -> str:
    deadline = time.time() + timeout
    while time.time() < deadline:
        out = _sh("scontrol", "show", "job", job, env=env).stdout
        state = next((w.split("=", 1)[1] for w in out.split() if w.startswith("JobState=")), "?")
        if state in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
            return state
        time.sleep(2)
    return "WAITED_TOO_LONG"


def _sbatch(env, script, config, **extra) -> str:
    e = dict(env, CONFIG=str(config), GPUS_PER_NODE="2", DS_ACCELERATOR="cpu", **extra)
    r = _sh(
        "sbatch",
        "--parsable",
        "-p",
        "debug",
        "--gres=none",
        "-c",
        "1",
        "-o",
        str(Path(config).parent / "slurm-%j.out"),
        str(ROOT / "launchers" / "slurm" / script),
        cwd=ROOT,
        env=e,
    )
    assert r.returncode == 0, r.stderr
    return r.stdout.strip().split(";")[0]


def test_train_sbatch_on_real_slurm_then_requeue_resume_and_export(slurm, tmp_path):
    model = save_tiny_model(tmp_path, "gpt2")
    out = tmp_path / "run"
    cfg = write_config(tmp_path / "cfg.yaml", model, out, tmp_path / "cache")
    job = _sbatch(slurm, "train.sbatch", cfg, OVERRIDES="train.stop_at_step=3")
    state = _wait(job, slurm)
    log = (tmp_path / f"slurm-{job}.out").read_text() if (tmp_path / f"slurm-{job}.out").exists() else ""
    assert state == "COMPLETED", log[-3000:]
    assert (out / "checkpoints" / "latest").read_text() == "step_3"
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert (out / "logs" / f"slurm-{job}-0.log").is_file()
    assert sorted(losses(out)) == [1, 2, 3]
    assert "identical on 2 ranks" in log

    # the same job submitted again (as a requeue would) continues from the checkpoint
    job2 = _sbatch(slurm, "train.sbatch", cfg)
    assert _wait(job2, slurm) == "COMPLETED", (tmp_path / f"slurm-{job2}.out").read_text()[-3000:]
    assert "(resuming)" in (tmp_path / f"slurm-{job2}.out").read_text()
    assert sorted(losses(out)) == [1, 2, 3, 4, 5, 6]

    job3 = _sbatch(slurm, "export.sbatch", cfg)
    assert _wait(job3, slurm) == "COMPLETED", (tmp_path / f"slurm-{job3}.out").read_text()[-3000:]
    assert (out / "export-merged" / "config.json").is_file()

    job4 = _sbatch(
        slurm,
        "prune.sbatch",
        cfg,
        PRUNE="prune.heads_per_layer=1 prune.channels_per_layer=16",
        OVERRIDES="train.max_steps=2",
    )
    assert _wait(job4, slurm) == "COMPLETED", (tmp_path / f"slurm-{job4}.out").read_text()[-3000:]
    pruned = tmp_path / "run-pruned"
    assert (pruned / "checkpoints" / "latest").read_text() == "step_2"
    assert (pruned / "prune_plan.json").is_file() and sorted(losses(pruned)) == [1, 2]


def test_two_deepspeed_nodes_match_one_launcher(tmp_path):
    model = save_tiny_model(tmp_path, "llama")
    one = write_config(tmp_path / "one.yaml", model, tmp_path / "one", tmp_path / "cache")
    check(launch(one, 2))
    two = write_config(tmp_path / "two.yaml", model, tmp_path / "two", tmp_path / "cache")
    port = free_port()
    hostfile = tmp_path / "hostfile"  # two "nodes" (names only: --no_ssh never connects)
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "dsee_scale",
            "hostfile",
            "--slots",
            "1",
            "--nodelist",
            "node[0-1]",
            "--out",
            str(hostfile),
        ],
        cwd=ROOT,
    )
    assert r.returncode == 0 and hostfile.read_text() == "node0 slots=1\nnode1 slots=1\n"
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "deepspeed.launcher.runner",
                "--hostfile",
                str(hostfile),
                "--no_ssh",
                "--num_nodes",
                "2",
                "--node_rank",
                str(rank),
                "--num_gpus",
                "1",
                "--master_addr",
                "127.0.0.1",
                "--master_port",
                str(port),
                str(ROOT / "launchers" / "train.py"),
                "--config",
                str(two),
            ],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in (0, 1)
    ]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][-3000:] + outs[1][-3000:]
    a, b = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert sorted(a) == sorted(b) == list(range(1, 7))
    for s in a:
        assert b[s] == pytest.approx(a[s], rel=1e-6, abs=1e-6)


def test_nvme_offload_trains(tmp_path):
    from deepspeed.ops.op_builder import AsyncIOBuilder

    from dsee_scale.training.engine import preload_libaio

    if not AsyncIOBuilder().is_compatible(verbose=False):
        pytest.skip("DeepSpeed's async_io op cannot build here (libaio-dev missing)")
    try:
        preload_libaio()
        AsyncIOBuilder().load(verbose=False)
    except Exception as e:
        pytest.skip(f"DeepSpeed's async_io op does not load here: {e}")
    model = save_tiny_model(tmp_path, "gpt2", initializer_range=0.1)
    kw = dict(train={"lr": 3e-2})  # a loss that moves in 6 steps
    cfg = write_config(
        tmp_path / "nvme.yaml",
        model,
        tmp_path / "run",
        tmp_path / "cache",
        deepspeed=str(ROOT / "ds_configs" / "zero3_offload_nvme.json"),
        nvme_path=str(tmp_path / "nvme"),
        **kw,
    )
    check(launch(cfg, 1))
    assert any((tmp_path / "nvme").rglob("*.swp")) or any((tmp_path / "nvme").iterdir())
    # the same run without offload: the same losses (the optimizer state only lives elsewhere)
    plain = write_config(tmp_path / "plain.yaml", model, tmp_path / "plain", tmp_path / "cache", **kw)
    check(launch(plain, 1))
    offloaded, reference = losses(tmp_path / "run"), losses(tmp_path / "plain")
    assert sorted(offloaded) == sorted(reference) == list(range(1, 7))
    assert reference[6] < reference[1] - 0.05
    for s in reference:
        assert offloaded[s] == pytest.approx(reference[s], rel=1e-5, abs=1e-5), (s, offloaded, reference)
