"""Structured pruning: whole attention heads and MLP channels, a uniform count per layer.

A plan says, per layer, which q heads, which kv heads and which MLP channels are KEPT. It is
made from scores (scores.py) and applied by surgery (surgery.py), then the config is updated.
Where each projection lives comes from the architecture table (archs.py):

- q heads: rows of q (and of its DSEE B and S), columns of o; kv heads: rows of k and v. With
  GQA, q heads are pruned evenly inside every kv group (so the q / kv ratio stays integral), or
  whole kv groups go with their q heads. A fused q|k|v projection (GPT-2's c_attn) loses the
  rows of all three slices at once.
- MLP channels: rows of the MLP input projections (gate/up, c_fc), columns of the output one.
- The pruned config is the standard class where transformers can express the new shape (LLaMA
  carries head_dim; GPT-2 only when head_dim still equals n_embd / n_head), else our registered
  dsee_gpt2 / dsee_llama type (pruned_models.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ..adapters.layer import slice_bounds, unwrap
from ..archs import Arch, Dims, arch_of, split_projection
from .surgery import keep_inputs, keep_outputs


@dataclass
class LayerPlan:
    q_heads: list[int]  # kept q heads
    kv_heads: list[int]  # kept kv heads (== q_heads without GQA)
    channels: list[int] | None = None  # kept MLP channels (None: all)


@dataclass
class Plan:
    layers: list[LayerPlan] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"layers": [vars(lp) for lp in self.layers]}


def _rows(heads: list[int], head_dim: int, offset: int = 0) -> list[int]:
    return [offset + h * head_dim + i for h in heads for i in range(head_dim)]


def apply_plan(model, plan: Plan) -> None:
    """Remove the heads / channels the plan does not keep; update the config. In place."""
    arch = arch_of(model)
    dims = arch.dims(model.config)
    nq, nkv, nch = plan_sizes(plan, dims.intermediate)
    for block, lp in zip(arch.block_list(model), plan.layers):
        prune_block(block, arch, lp, dims)
    old, new = model.config, pruned_config(model.config, nq, nkv, dims.head_dim, nch)
    for m in model.modules():  # the model, its base model and GPT-2's attention keep a config
        if getattr(m, "config", None) is old:
            m.config = new


def plan_sizes(plan: Plan, inter: int) -> tuple[int, int, int]:
    """(q heads, kv heads, channels) that every layer keeps; refuses non-uniform plans."""
    counts = {(len(lp.q_heads), len(lp.kv_heads)) for lp in plan.layers}
    ch_counts = {len(lp.channels) if lp.channels is not None else inter for lp in plan.layers}
    if len(counts) != 1 or len(ch_counts) != 1:
        raise ValueError("a plan must keep the same number of heads / channels in every layer")
    (nq, nkv), (nch,) = counts.pop(), ch_counts
    if nq % nkv:
        raise ValueError(f"{nq} q heads do not split evenly over {nkv} kv heads")
    return nq, nkv, nch


def prune_block(block: torch.nn.Module, arch: Arch, lp: LayerPlan, dims: Dims) -> None:
    """Surgery on one decoder block (plain or DSEE-injected), in place."""
    hd, nq, nkv = dims.head_dim, len(lp.q_heads), len(lp.kv_heads)
    rows: dict[str, list[int]] = {}  # kept output rows per projection module
    for spec, heads in ((arch.q, lp.q_heads), (arch.k, lp.kv_heads), (arch.v, lp.kv_heads)):
        module, part = split_projection(spec)
        lo, _ = slice_bounds(unwrap(block.get_submodule(module)), part)
        rows.setdefault(module, []).extend(_rows(heads, hd, lo))
    for module, kept in rows.items():
        block.set_submodule(module, keep_outputs(block.get_submodule(module), kept))
    block.set_submodule(arch.o, keep_inputs(block.get_submodule(arch.o), _rows(lp.q_heads, hd)))
    attn = block.get_submodule(arch.attention)
    for attr, value in (("num_heads", nq), ("split_size", nq * hd), ("num_key_value_groups", nq // nkv)):
        if hasattr(attn, attr):  # what each attention class reads in its forward
            setattr(attn, attr, value)
    if lp.channels is not None:
        for module in arch.mlp_in:
            block.set_submodule(module, keep_outputs(block.get_submodule(module), lp.channels))
        block.set_submodule(arch.mlp_out, keep_inputs(block.get_submodule(arch.mlp_out), lp.channels))


def pruned_config(c: Any, nq: int, nkv: int, hd: int, nch: int) -> Any:
    """A new config with the pruned sizes: the standard class where it can express the shape,
    else the registered dsee_gpt2 / dsee_llama type (pruned_models.py)."""
    from transformers import CONFIG_MAPPING

    from .pruned_models import CUSTOM_CLASSES

    arch = arch_of(c)
    hidden = getattr(c, arch.hidden_key)
    d = c.to_dict()
    for k in ("model_type", "transformers_version", "architectures", "head_dim"):
        d.pop(k, None)
    d.update({arch.heads_key: nq, arch.intermediate_key: nch})
    if arch.kv_heads_key:
        d[arch.kv_heads_key] = nkv
    standard = hidden % nq == 0 and (arch.config_has_head_dim or hidden // nq == hd)
    if standard:
        if arch.config_has_head_dim:
            d["head_dim"] = hd
        new, lm_class = CONFIG_MAPPING[arch.name](**d), arch.lm_class
    else:
        config_class, lm_class = CUSTOM_CLASSES[arch.name]
        new = config_class(head_dim=hd, **d)
    new._attn_implementation = c._attn_implementation
    new.architectures = [lm_class]
    return new


def mask_hooks(model, plan: Plan):
    """The reference for tests: the UNPRUNED model with the pruned heads' and channels' inputs to
    the output projections zeroed (forward pre-hooks). Returns the hook handles."""
    arch = arch_of(model)
    dims = arch.dims(model.config)
    handles = []

    def zeroing(keep: list[int], size: int):
        mask = torch.zeros(size)
        mask[keep] = 1.0

        def hook(module, args):
            return (args[0] * mask.to(args[0].dtype),) + tuple(args[1:])

        return hook

    for block, lp in zip(arch.block_list(model), plan.layers):
        width = dims.heads * dims.head_dim
        handles.append(
            block.get_submodule(arch.o).register_forward_pre_hook(
                zeroing(_rows(lp.q_heads, dims.head_dim), width)
            )
        )
        if lp.channels is not None:
            handles.append(
                block.get_submodule(arch.mlp_out).register_forward_pre_hook(
                    zeroing(lp.channels, dims.intermediate)
                )
            )
    return handles
