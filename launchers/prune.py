#!/usr/bin/env python
"""Prune a DSEE-tuned model (DSEE's second sparsity), then re-tune A, B, S with W frozen:
`dsee-scale prune` on every rank the launcher starts.

    deepspeed launchers/prune.py --config configs/x.yaml --from runs/x/checkpoints \
        prune.heads_per_layer=1 prune.channels_per_layer=384 output_dir=runs/x-pruned
    deepspeed launchers/prune.py --config configs/x.yaml --from runs/x/checkpoints \
        prune.kind=unstructured prune.ratio=0.5 prune.score=wabs output_dir=runs/x-sparse
    deepspeed launchers/prune.py --config configs/x.yaml --resume       # the re-tuning run

--from: the tuning run's checkpoints directory (its `latest`) or one step_N directory. The
model and DSEE settings come from that checkpoint; the YAML gives prune, data, train, eval,
checkpoint, deepspeed and output_dir. Flags: `dsee-scale prune --help`.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a checkout runs without pip install

from dsee_scale.cli import main  # noqa: E402

if __name__ == "__main__":
    main(["prune", *sys.argv[1:]])
