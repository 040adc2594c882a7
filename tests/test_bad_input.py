"""Bad input through the launchers: exit code 2, one line naming the problem, nothing written."""

import json

import pytest

from helpers import ROOT, launch, launch_many

TINY = ROOT / "configs" / "gpt2-tiny.yaml"


def files(tmp_path, kind):
    if kind == "corrupt_safetensors":
        d = tmp_path / "model"
        d.mkdir()
        (d / "config.json").write_text(
            json.dumps({"model_type": "gpt2", "n_layer": 1, "n_embd": 16, "n_head": 2, "vocab_size": 256})
        )
        (d / "model.safetensors").write_bytes(b"\x00\x01 not a safetensors file" * 10)
        return str(d)
    if kind == "corrupt_gguf":
        (tmp_path / "m.gguf").write_bytes(b"GGUF but not really" * 20)
        return str(tmp_path / "m.gguf")
    if kind == "empty":
        (tmp_path / "empty.txt").write_text("")
        return str(tmp_path / "empty.txt")
    if kind == "latin1":
        (tmp_path / "latin1.txt").write_bytes("caf\xe9 ".encode("latin-1") * 100)
        return str(tmp_path / "latin1.txt")
    if kind == "ds_conflict":
        (tmp_path / "ds.json").write_text(
            json.dumps({"train_batch_size": 64, "zero_optimization": {"stage": 3}})
        )
        return str(tmp_path / "ds.json")


CASES = [  # (overrides or extra args, files, what the message must name)
    (["train.lrr=1"], None, "train.lrr: unknown key"),
    (["train.max_steps=abc"], None, "train.max_steps"),
    (["dsee.r=0"], None, "dsee.r"),
    (["dsee.num_sparse=10000000"], None, "dsee.num_sparse"),
    (["dsee.target_modules=[nope]"], None, "matches no module"),
    (["model.config=null", "model.path=/no/such/model"], None, "model.path"),
    (["model.config=null", "model.path={}"], "corrupt_safetensors", "model.path: cannot load"),
    (["model.config=null", "model.gguf_file={}"], "corrupt_gguf", "not a readable GGUF"),
    (["data.source=null", "data.train_files=[{}]"], "empty", "fewer than block_size"),
    (["data.source=null", "data.train_files=[{}]"], "latin1", "not UTF-8"),
    (["data.block_size=4096"], None, "data.block_size"),
    (["deepspeed={}"], "ds_conflict", "train_batch_size=64 conflicts"),
    (["deepspeed=ds_configs/zero3_offload_nvme.json"], None, "nvme_path"),
    (["--resume"], None, "no checkpoint"),
    (["prune.kind=unstructured", "prune.ratio=1.5"], None, "prune.ratio"),
    (["prune.kind=unstructured", "prune.nm=2:4", "prune.ratio=0.3"], None, "prune.nm 2:4 prunes 0.5"),
    (["prune.kind=unstructured", "prune.nm=4:2"], None, "prune.nm: N:M pattern '4:2': needs 0 < N < M"),
    (["prune.kind=unstructured", "prune.nm=[2,4]"], None, "prune.nm: got [2, 4], expected a string"),
]


@pytest.fixture(scope="module")
def bad_runs(tmp_path_factory):
    """Every case run once, as `python launchers/train.py` would (forked from one interpreter
    that imported everything: tests/forked_cli.py); case -> (result, its output_dir)."""
    runs, outs = [], []
    for i, (args, kind, _) in enumerate(CASES):
        d = tmp_path_factory.mktemp(f"bad{i}")
        path = files(d, kind) if kind else None
        outs.append(d / "out")
        extra = [f"output_dir={d / 'out'}", f"data.cache_dir={d / 'cache'}"]
        runs.append(["train", "--config", str(TINY), *[a.format(path) for a in args], *extra])
    return dict(zip(range(len(CASES)), zip(launch_many(runs), outs, strict=True), strict=True))


@pytest.mark.parametrize("case", range(len(CASES)), ids=[c[2] for c in CASES])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(bad_runs, case):
    r, out = bad_runs[case]
    needle = CASES[case][2]
    assert r.returncode == 2, r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and needle in errors[0], r.stderr[-2000:]
    assert not out.exists()


def test_a_bad_input_through_the_launcher_script_itself(tmp_path):
    """The same contract for a real `python launchers/train.py` process (the forked runs above
    share its main; this one covers the script)."""
    out = tmp_path / "out"
    r = launch(TINY, 1, "train.lrr=1", f"output_dir={out}", f"data.cache_dir={tmp_path / 'cache'}")
    errors = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert r.returncode == 2 and "Traceback" not in r.stderr and len(errors) == 1, r.stderr[-2000:]
    assert "train.lrr: unknown key" in errors[0] and not out.exists()


def test_output_dir_that_holds_a_run_is_refused(tmp_path):
    out = tmp_path / "out"
    (out / "checkpoints").mkdir(parents=True)
    (out / "checkpoints" / "latest").write_text("step_7")
    before = sorted(p.name for p in out.rglob("*"))
    r = launch(TINY, 1, f"output_dir={out}", f"data.cache_dir={tmp_path / 'cache'}")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "already holds a run" in r.stderr and "--resume" in r.stderr
    assert sorted(p.name for p in out.rglob("*")) == before


def test_output_dir_that_is_a_file_is_refused_before_any_work(tmp_path):
    out = tmp_path / "out"
    out.write_text("not a directory")
    r = launch(TINY, 1, f"output_dir={out}", f"data.cache_dir={tmp_path / 'cache'}")
    errors = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert r.returncode == 2 and "Traceback" not in r.stderr and len(errors) == 1, r.stderr[-2000:]
    assert "output_dir" in errors[0] and "existing file" in errors[0]
    assert out.read_text() == "not a directory" and not (tmp_path / "cache").exists()  # no work done


def test_a_busy_master_port_is_one_line_naming_the_port_and_the_flag(tmp_path, monkeypatch):
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        monkeypatch.setenv("MASTER_PORT", str(port))
        r = launch(TINY, 1, f"output_dir={tmp_path / 'out'}", f"data.cache_dir={tmp_path / 'cache'}")
    errors = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert r.returncode == 2 and "Traceback" not in r.stderr and len(errors) == 1, r.stderr[-2000:]
    assert f"master port {port} is already in use" in errors[0] and "--master_port" in errors[0]
    assert not (tmp_path / "out").exists()
