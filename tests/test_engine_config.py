"""The DeepSpeed JSON filled from the experiment YAML (no engine is started here)."""

import json

import pytest

from dsee_scale.errors import ConfigError
from dsee_scale.experiment import load_experiment
from dsee_scale.training.engine import deepspeed_config

from helpers import ROOT


def exp(*overrides):
    return load_experiment(str(ROOT / "configs" / "gpt2-tiny.yaml"), list(overrides))


@pytest.mark.parametrize("name", ["zero2", "zero3", "zero3_offload_cpu", "zero3_offload_nvme"])
def test_shipped_configs_fill_every_auto(name, tmp_path):
    e = exp(
        f"deepspeed=ds_configs/{name}.json",
        f"nvme_path={tmp_path / 'nvme'}",
        "train.batch_size=16",
        "train.micro_batch_size=2",
        "train.lr=3e-4",
        "train.precision=bf16",
    )
    ds = deepspeed_config(e, world_size=4)
    assert "auto" not in json.dumps(ds)
    assert ds["train_batch_size"] == 16 and ds["train_micro_batch_size_per_gpu"] == 2
    assert ds["gradient_accumulation_steps"] == 2  # 16 / (2 x 4)
    assert ds["optimizer"]["params"]["lr"] == 3e-4 and ds["bf16"]["enabled"] is True
    assert ds["fp16"]["enabled"] is False
    if name == "zero3_offload_nvme":
        assert ds["zero_optimization"]["offload_param"]["nvme_path"] == str(tmp_path / "nvme")


def test_batch_not_divisible_by_ranks():
    with pytest.raises(ConfigError, match="not a multiple of micro_batch_size x ranks"):
        deepspeed_config(exp(), world_size=3)


def test_nvme_without_path():
    with pytest.raises(ConfigError, match="nvme_path"):
        deepspeed_config(exp("deepspeed=ds_configs/zero3_offload_nvme.json"), world_size=1)


def test_fixed_value_that_conflicts(tmp_path):
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"gradient_clipping": 5.0, "zero_optimization": {"stage": 3}}))
    with pytest.raises(ConfigError, match="gradient_clipping=5.0 conflicts with train.grad_clip=1.0"):
        deepspeed_config(exp(f"deepspeed={ds}"), world_size=1)


def test_missing_deepspeed_file():
    with pytest.raises(ConfigError, match="does not exist"):
        exp("deepspeed=nope.json")


@pytest.mark.parametrize(
    "overrides,needle",
    [
        (["prune.recovery.support=gradient"], "prune.recovery.support: gradient is not available"),
        (["prune.recovery.r=0"], "prune.recovery.r: got 0"),
        (["prune.distill.kl_weight=-1"], "prune.distill: kl_weight and lm_weight must be >= 0"),
        (["prune.distill.lm_weight=0"], "kl_weight and lm_weight are both 0"),
        (["prune.distill.kl_weight=1", "prune.distill.temperature=0"], "prune.distill.temperature"),
        (["prune.distill.tau=2"], "prune.distill.tau: unknown key"),
    ],
)
def test_recovery_and_distillation_settings_are_checked(overrides, needle):
    """prune.recovery is a dsee section (checked as one); prune.distill's weights and temperature."""
    base = ["prune.kind=unstructured", "prune.ratio=0.5"]
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        load_experiment(str(ROOT / "configs" / "gpt2-tiny.yaml"), base + overrides)
