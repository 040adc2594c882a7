"""One experiment = one YAML file with sections; CLI `section.key=value` overrides any key."""
from __future__ import annotations

from dataclasses import dataclass, field

from .adapters.config import DSEEConfig
from .config import apply_overrides, from_dict, load_yaml
from .models import ModelConfig


@dataclass
class ExperimentConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    dsee: DSEEConfig = field(default_factory=DSEEConfig)


def load_experiment(path: str, overrides: list[str] | None = None) -> ExperimentConfig:
    data = apply_overrides(load_yaml(path), overrides or [])
    if "model" not in data:
        from .errors import ConfigError
        raise ConfigError(f"{path}: the model section is required")
    return from_dict(ExperimentConfig, data, "")
