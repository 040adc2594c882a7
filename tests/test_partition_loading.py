"""Model directories load under ZeRO-3 straight into each rank's partitions (issue #15): every
rank reads only its 1/world share of each parameter from the safetensors files, with no gather.
Reference: plain `from_pretrained` of the same directory, loaded whole, compared tensor by
tensor after gathering."""

import json
import os
import subprocess
import sys

import pytest

from helpers import LAUNCH_ENV, ROOT, free_port, save_tiny_model


def test_each_rank_reads_its_own_partitions_and_matches_from_pretrained(tmp_path):
    gpt2 = save_tiny_model(tmp_path, "gpt2", initializer_range=0.1)  # tied embeddings, Conv1D
    llama = save_tiny_model(tmp_path, "llama", initializer_range=0.1)  # untied lm_head, odd sizes
    specs = [f"{gpt2}:float32", f"{llama}:bfloat16"]
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port",
           str(free_port()), str(ROOT / "tests" / "partition_loading_worker.py"), *specs]  # fmt: skip
    r = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, **LAUNCH_ENV), capture_output=True, text=True,
                       timeout=600)  # fmt: skip
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    report = json.loads(r.stdout.split("REPORT ", 1)[1].splitlines()[0])
    assert report["world"] == 2
    for spec in specs:
        got = report[spec]
        assert got["mismatched"] == [], spec
        assert got["full"] / 2 <= got["shard"] < got["full"] / 2 + 1000  # half of the model, padded
        assert not got["training"]
    assert report[specs[0]]["tied"] and not report[specs[1]]["tied"]


@pytest.mark.parametrize("why", ["nvme", "no safetensors"])
def test_other_models_fall_back_to_from_pretrained(tmp_path, why):
    from dsee_scale.models import ModelConfig
    from dsee_scale.training.engine import load_into_partitions

    d = save_tiny_model(tmp_path, "llama")
    ds = {"zero_optimization": {"stage": 3, "offload_param": {"device": "nvme" if why == "nvme" else "cpu"}}}
    if why == "no safetensors":
        for f in d.glob("*.safetensors"):
            f.unlink()
    assert load_into_partitions(ModelConfig(path=str(d)), ds) is None
