#!/usr/bin/env python
"""Export a dsee-scale ZeRO-3 checkpoint (any number of ranks) to a loadable model:
`dsee-scale export`, no DeepSpeed launch, no GPU.

    python launchers/export.py <checkpoint-dir> <out-dir> [--tag step_N] [--mode merged|adapter]
                               [--dtype auto|bf16|fp16|fp32] [--max-shard-size 2GB] [--force]

merged: a Hugging Face directory for AutoModelForCausalLM.from_pretrained; adapter: DSEE's A, B,
S for dsee_scale.load_adapter(base_model, out_dir). Flags: `dsee-scale export --help`.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a checkout runs without pip install

from dsee_scale.cli import main  # noqa: E402

if __name__ == "__main__":
    main(["export", *sys.argv[1:]])
