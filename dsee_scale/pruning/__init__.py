"""DSEE's second sparsity: structured (heads, MLP channels) and unstructured pruning."""

from .pruned_models import DSEEGPT2Config, DSEEGPT2LMHeadModel, register
from .scores import channel_scores, collect_activations, head_scores, make_plan
from .structured import LayerPlan, Plan, apply_plan, mask_hooks

__all__ = [
    "DSEEGPT2Config",
    "DSEEGPT2LMHeadModel",
    "LayerPlan",
    "Plan",
    "apply_plan",
    "channel_scores",
    "collect_activations",
    "head_scores",
    "make_plan",
    "mask_hooks",
    "register",
]
