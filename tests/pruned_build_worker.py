"""One rank of test_pruned_build_splits_blocks_over_ranks (tests/test_prune_launcher.py): decide
a pruning, build the pruned model under ZeRO-3 as the prune launcher does, and report which
blocks this rank read and cut (and, with SparseGPT, whose reconstructed weights it kept), and a
digest of every gathered parameter and buffer.

    python tests/pruned_build_worker.py --config x.yaml --from <checkpoints> [overrides...]
Prints one JSON line "REPORT {...}" on rank 0."""

import argparse
import hashlib
import json

from dsee_scale import zero
from dsee_scale.experiment import load_experiment
from dsee_scale.pruning import run
from dsee_scale.training.distributed import exit_now
from dsee_scale.training.engine import deepspeed_config
from dsee_scale.training.trainer import start_process_group
from dsee_scale.zero import comm


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", required=True)
    ap.add_argument("--from", dest="from_dir", required=True)
    ap.add_argument("--local_rank", type=int)  # the deepspeed launcher adds it
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    exp = load_experiment(args.config, args.overrides)
    rank, world = start_process_group(exp)
    held: list[int] = []  # the blocks whose SparseGPT weights this rank keeps for the fill
    sparsegpt = run.sparsegpt_blocks

    def recording(*a, **kw):
        keep, weights = sparsegpt(*a, **kw)
        held.extend(sorted(weights))
        return keep, weights

    run.sparsegpt_blocks = recording
    pruned, build, _ = run.prepare(exp, args.from_dir, rank)

    built: list[int] = []  # the blocks this rank read and cut while building
    original = run.pruned_block

    def counting(cm, i, *a, **kw):
        built.append(i)
        return original(cm, i, *a, **kw)

    run.pruned_block = counting
    model, _ = build(pruned, deepspeed_config(pruned, world), rank, world)
    run.pruned_block = original

    h = hashlib.sha256()
    for name, p in sorted(model.named_parameters()):
        with zero.gathered([p]):
            h.update(name.encode() + p.detach().float().numpy().tobytes())
    for name, b in sorted(model.named_buffers()):
        h.update(name.encode() + b.detach().cpu().numpy().tobytes())
    per_rank = comm.all_gather_objects(built)
    held_per_rank = comm.all_gather_objects(held)
    if rank == 0:
        report = {"world": world, "built": per_rank, "held": held_per_rank, "digest": h.hexdigest()}
        print("REPORT " + json.dumps(report), flush=True)
    comm.shutdown()
    exit_now(0)  # as the launchers leave: no teardown for C++ threads to abort (distributed.py)


if __name__ == "__main__":
    main()
