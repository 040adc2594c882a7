"""The DSEE adapter: sparse + low-rank updates of frozen Linear / Conv1D weights."""

from .config import DSEEConfig
from .delta import SparseLowRankDelta, sparse_low_rank_update
from .inject import (
    Target,
    adapter_state_dict,
    choose_supports,
    compute_supports,
    dsee_layers,
    expected_trainable_count,
    inject,
    load_adapter,
    merge,
    merge_and_unload,
    resolve_targets,
    save_adapter,
    supports_of,
    trainable_parameter_count,
    unmerge,
)
from .layer import DSEELayer
from .support import METHODS as SUPPORT_METHODS
from .support import select_supports

__all__ = [
    "DSEEConfig",
    "DSEELayer",
    "SparseLowRankDelta",
    "SUPPORT_METHODS",
    "Target",
    "adapter_state_dict",
    "choose_supports",
    "compute_supports",
    "dsee_layers",
    "expected_trainable_count",
    "inject",
    "load_adapter",
    "merge",
    "merge_and_unload",
    "resolve_targets",
    "save_adapter",
    "select_supports",
    "sparse_low_rank_update",
    "supports_of",
    "trainable_parameter_count",
    "unmerge",
]
