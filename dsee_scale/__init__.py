"""dsee-scale: DSEE (sparse + low-rank tuning, then pruning) on DeepSpeed ZeRO-3."""

__version__ = "0.1.0"

from .adapters import DSEEConfig, inject, load_adapter, merge, save_adapter, unmerge  # noqa: E402
from .errors import ConfigError, UserError  # noqa: E402
from .pruning.pruned_models import register as _register_pruned_gpt2  # noqa: E402

_register_pruned_gpt2()  # head-pruned GPT-2 exports load with AutoModelForCausalLM

__all__ = [
    "ConfigError",
    "DSEEConfig",
    "UserError",
    "inject",
    "load_adapter",
    "merge",
    "save_adapter",
    "unmerge",
    "__version__",
]
