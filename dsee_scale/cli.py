"""`dsee-scale` (or `python -m dsee_scale`): small tools around an experiment config.

    dsee-scale inspect --config configs/gpt2-tiny.yaml [section.key=value ...]
    dsee-scale hostfile --slots 8 [--nodelist 'gpu[01-04]'] [--out hostfile]

`inspect` validates the config, builds the model, chooses the supports, injects DSEE and prints
what would train: each target, its shape, and the trainable parameter count.
"""
from __future__ import annotations

import argparse
import time

from .errors import cli_main


def _inspect(args) -> None:
    from .adapters import expected_trainable_count, inject, trainable_parameter_count
    from .adapters.inject import target_shape
    from .experiment import load_experiment
    from .models import load_model

    exp = load_experiment(args.config, args.overrides)
    model = load_model(exp.model)
    t0 = time.perf_counter()
    targets = inject(model, exp.dsee)
    elapsed = time.perf_counter() - t0
    total = sum(p.numel() for p in model.parameters())
    for t in targets:
        rows, cols = target_shape(model, t)
        print(f"{t.key:50s} {rows:6d} x {cols:<6d} r={exp.dsee.r} N={exp.dsee.num_sparse}")
    n = trainable_parameter_count(model)
    assert n == expected_trainable_count(model, targets, exp.dsee)
    print(f"targets: {len(targets)}  trainable: {n:,} of {total:,} ({100 * n / total:.3f}%)  "
          f"support: {exp.dsee.support} in {elapsed:.1f}s")


def _hostfile(args) -> None:
    import os

    from .errors import UserError
    from .training.distributed import expand_nodelist, hostfile

    nodelist = args.nodelist or os.environ.get("SLURM_JOB_NODELIST")
    if not nodelist:
        raise UserError("hostfile: give --nodelist or run inside a Slurm allocation "
                        "(SLURM_JOB_NODELIST is not set)")
    if args.slots < 1:
        raise UserError(f"hostfile: --slots must be >= 1, got {args.slots}")
    text = hostfile(expand_nodelist(nodelist), args.slots)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    else:
        print(text, end="")


@cli_main
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="dsee-scale", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("inspect", help="validate a config and show what DSEE would train")
    p.add_argument("--config", required=True, help="experiment YAML")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides")
    p.set_defaults(func=_inspect)
    h = sub.add_parser("hostfile", help="a DeepSpeed hostfile from a Slurm node list")
    h.add_argument("--slots", type=int, required=True, help="processes (GPUs) per node")
    h.add_argument("--nodelist", help="Slurm node list (default: $SLURM_JOB_NODELIST)")
    h.add_argument("--out", help="write here instead of stdout")
    h.set_defaults(func=_hostfile)
    args = parser.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
