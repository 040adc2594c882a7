#!/usr/bin/env python
"""Tune a model with DSEE on DeepSpeed.

    deepspeed launchers/train.py --config configs/gpt2-tiny.yaml
    deepspeed --num_gpus 8 launchers/train.py --config configs/x.yaml \
        --deepspeed ds_configs/zero3_offload_cpu.json train.lr=3e-4 output_dir=runs/x
    deepspeed launchers/train.py --config configs/x.yaml --resume     # from <output_dir>/checkpoints/latest
    python launchers/train.py --config ...                            # one process, no launcher

Overrides are `section.key=value` (values parsed as YAML).
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
    ap.add_argument("--config", required=True, help="experiment YAML")
    ap.add_argument("--deepspeed", help="engine JSON (overrides the YAML's deepspeed:)")
    ap.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
    ap.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    ap.add_argument("overrides", nargs="*", help="section.key=value")
    args = ap.parse_args()
    warnings.filterwarnings("ignore", category=FutureWarning)  # torch.distributed deprecations

    from dsee_scale.experiment import load_experiment
    from dsee_scale.training.distributed import exit_now
    from dsee_scale.training.trainer import run

    overrides = list(args.overrides) + ([f"deepspeed={args.deepspeed}"] if args.deepspeed else [])
    run(load_experiment(args.config, overrides), resume=args.resume)
    exit_now(0)


if __name__ == "__main__":
    main()
