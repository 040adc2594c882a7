"""One rank of tests/test_partition_loading.py: load model directories straight into this
rank's ZeRO-3 partitions and compare every gathered parameter and buffer with plain
`from_pretrained` of the same directory (the reference, loaded whole). Prints one JSON line."""

import json
import os
import sys

import torch

from dsee_scale import zero
from dsee_scale.models import ModelConfig, load_model
from dsee_scale.training.distributed import exit_now
from dsee_scale.training.engine import load_into_partitions
from dsee_scale.zero import comm


def main() -> None:
    rank, world = comm.init(int(os.environ.get("LOCAL_RANK", 0)), int(os.environ["MASTER_PORT"]), 300)
    report = {}
    for spec in [a for a in sys.argv[1:] if not a.startswith("--")]:  # the launcher adds --local_rank
        path, dtype = spec.split(":")
        ds = {
            "train_micro_batch_size_per_gpu": 1,
            "zero_optimization": {"stage": 3},
            "bf16": {"enabled": dtype == "bfloat16"},
        }  # zero.Init builds in the engine's dtype
        zero.partitioned_loading(ds)
        model = load_into_partitions(ModelConfig(path=path, dtype=dtype), ds)
        assert model is not None, f"{path}: not loaded into partitions"
        with zero.whole_loading():
            ref = load_model(ModelConfig(path=path, dtype=dtype))
        shard = sum(p.ds_tensor.numel() for p in model.parameters())
        mismatched = []
        for name, p in model.named_parameters():
            with zero.gathered([p]):
                want = ref.get_parameter(name)
                if p.dtype != want.dtype or not torch.equal(p, want):
                    mismatched.append(
                        f"{name} {p.dtype} {want.dtype} {(p.float() - want.float()).abs().max():.3g}"
                    )
        for name, b in model.named_buffers():
            if not torch.equal(b, ref.get_buffer(name)):
                mismatched.append(name)
        tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
        full = sum(p.numel() for p in ref.parameters())
        report[spec] = {"mismatched": mismatched, "shard": shard, "full": full, "tied": tied,
                        "training": model.training}  # fmt: skip
    if rank == 0:
        print("REPORT " + json.dumps({"world": world, **report}), flush=True)
    comm.shutdown()
    exit_now(0)  # as the launchers leave: no teardown for C++ threads to abort (distributed.py)


if __name__ == "__main__":
    main()
