#!/usr/bin/env python
"""Prune a DSEE-tuned model (DSEE's second sparsity), then re-tune A, B, S with W frozen.

    deepspeed launchers/prune.py --config configs/x.yaml --from runs/x/checkpoints \
        prune.heads_per_layer=1 prune.channels_per_layer=384 output_dir=runs/x-pruned
    deepspeed launchers/prune.py --config configs/x.yaml --from runs/x/checkpoints \
        prune.kind=unstructured prune.ratio=0.5 prune.score=wabs output_dir=runs/x-sparse
    deepspeed launchers/prune.py --config configs/x.yaml --resume       # the re-tuning run

--from: the tuning run's checkpoints directory (its `latest`) or one step_N directory. The
model and DSEE settings come from that checkpoint; the YAML gives prune, data, train, eval,
checkpoint, deepspeed and output_dir. The re-tuned checkpoints export with launchers/export.py.
"""
import argparse
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dsee_scale.errors import cli_main  # noqa: E402


@cli_main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, help="experiment YAML with a prune: section")
    ap.add_argument("--from", dest="from_dir", help="checkpoints of the tuning run")
    ap.add_argument("--deepspeed", help="engine JSON (overrides the YAML's deepspeed:)")
    ap.add_argument("--resume", action="store_true", help="continue the re-tuning run")
    ap.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("overrides", nargs="*", help="section.key=value")
    args = ap.parse_args()
    warnings.filterwarnings("ignore", category=FutureWarning)

    from dsee_scale.errors import UserError
    from dsee_scale.experiment import load_experiment
    from dsee_scale.training.distributed import exit_now
    from dsee_scale.training.trainer import run

    overrides = list(args.overrides) + ([f"deepspeed={args.deepspeed}"] if args.deepspeed else [])
    exp = load_experiment(args.config, overrides)
    if args.resume:  # the pruned architecture is in the re-tuning run's own checkpoint
        from dsee_scale.training import checkpoint as ckpt

        from dataclasses import replace

        root, tag, _ = ckpt.latest(exp)
        saved = load_experiment(str(root / tag / "experiment.yaml"))
        # the pruned model and its DSEE settings from the checkpoint, the rest from this command
        run(replace(exp, model=saved.model, dsee=saved.dsee), resume=True)
        exit_now(0)
    if not args.from_dir:
        raise UserError("--from: give the tuning run's checkpoints directory (or --resume)")

    import deepspeed
    import torch.distributed as dist

    from dsee_scale.pruning.run import prepare
    from dsee_scale.training.distributed import setup_env

    from datetime import timedelta

    setup_env()
    deepspeed.init_distributed(verbose=False, timeout=timedelta(seconds=exp.train.collective_timeout_s))
    pruned, build, summary = prepare(exp, args.from_dir, dist.get_rank())
    if dist.get_rank() == 0:
        import json

        out = Path(pruned.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "prune_plan.json").write_text(json.dumps(summary, indent=1))
        print(f"prune: {summary['kind']} from {summary['from']}, new sizes {summary['config']}, "
              f"decision {summary['decision_digest']} (plan in {out / 'prune_plan.json'})", flush=True)
    run(pruned, build=build)
    exit_now(0)


if __name__ == "__main__":
    main()
