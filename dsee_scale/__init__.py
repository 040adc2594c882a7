"""dsee-scale: DSEE (sparse + low-rank tuning, then pruning) on DeepSpeed ZeRO-3."""
__version__ = "0.1.0"

from .adapters import DSEEConfig, inject, load_adapter, merge, save_adapter, unmerge  # noqa: E402
from .errors import ConfigError, UserError  # noqa: E402

__all__ = ["ConfigError", "DSEEConfig", "UserError", "inject", "load_adapter", "merge",
           "save_adapter", "unmerge", "__version__"]
