#!/usr/bin/env python
"""Tune a model with DSEE on DeepSpeed: `dsee-scale train` on every rank the launcher starts.

    deepspeed launchers/train.py --config configs/gpt2-tiny.yaml
    deepspeed --num_gpus 8 launchers/train.py --config configs/x.yaml \
        --deepspeed ds_configs/zero3_offload_cpu.json train.lr=3e-4 output_dir=runs/x
    deepspeed launchers/train.py --config configs/x.yaml --resume   # from <output_dir>/checkpoints/latest
    python launchers/train.py --config ...                          # one process, no launcher

Flags: `dsee-scale train --help`.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a checkout runs without pip install

from dsee_scale.cli import main  # noqa: E402

if __name__ == "__main__":
    main(["train", *sys.argv[1:]])
