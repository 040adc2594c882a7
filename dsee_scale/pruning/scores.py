"""Importance scores and the plans made from them (structured pruning).

Head scores (one per q head and layer), as DSEE_METHOD.md section 2:
  dsee:       sum over the head's rows of |B_q A_q + S_q| + |B_v A_v + S_v| (the learned update;
              a q head reads the v rows of its kv group)
  weight:     the same sums over |W_q| and |W_v|
  activation: mean |output| of the head (the input of the attention output projection) on
              calibration batches
MLP channel scores: weight (|W_up| row + |W_gate| row + |W_down| column, L1) or activation
(mean |input of the MLP output projection|). Projection names come from archs.py.
"""

from __future__ import annotations

import torch

from ..adapters.layer import DSEELayer, slice_bounds, unwrap, weight_out_in
from ..archs import arch_of, split_projection
from .structured import LayerPlan, Plan

HEAD_SCORES = ("dsee", "weight", "dsee+weight", "activation")
CHANNEL_SCORES = ("weight", "activation")


def _rows_of(layer, slice_name: str, use: str) -> torch.Tensor:
    """|update| or |W| of a projection's output rows (out x in), for one slice."""
    base = unwrap(layer)
    lo, hi = slice_bounds(base, slice_name)
    parts = []
    if "weight" in use:
        parts.append(weight_out_in(base)[lo:hi].detach().float().abs())
    if "dsee" in use:
        if not isinstance(layer, DSEELayer) or slice_name not in layer.dsee:
            raise ValueError("dsee head scores need DSEE updates on q and v")
        parts.append(layer.update(slice_name).delta_weight().detach().float().abs())
    return torch.stack(parts).sum(0)


def _projection(block, spec: str) -> tuple[torch.nn.Module, str]:
    """(module, slice) of a projection "module[:slice]" of a block."""
    module, part = split_projection(spec)
    return block.get_submodule(module), part


def block_head_scores(block, config, method: str) -> torch.Tensor:
    """(q heads,) importance in one decoder block (its weights must be whole: gathered)."""
    arch = arch_of(config)
    dims = arch.dims(config)
    q_rows = _rows_of(*_projection(block, arch.q), method).sum(1).view(dims.heads, dims.head_dim).sum(1)
    v_rows = _rows_of(*_projection(block, arch.v), method).sum(1).view(dims.kv_heads, dims.head_dim).sum(1)
    return q_rows + v_rows.repeat_interleave(dims.heads // dims.kv_heads)


def block_channel_scores(block, config) -> torch.Tensor:
    """(intermediate channels,) weight importance in one decoder block."""
    arch = arch_of(config)
    s = sum(_rows_of(block.get_submodule(m), "full", "weight").sum(1) for m in arch.mlp_in)
    down = unwrap(block.get_submodule(arch.mlp_out))
    return s + weight_out_in(down).detach().float().abs().sum(0)


def head_scores(model, method: str = "dsee", activations: dict | None = None) -> torch.Tensor:
    """(layers, q heads) importance."""
    if method not in HEAD_SCORES:
        raise ValueError(f"head score {method!r}; allowed: {', '.join(HEAD_SCORES)}")
    arch = arch_of(model)
    dims = arch.dims(model.config)
    if method == "activation":
        if activations is None:
            raise ValueError("activation head scores need collect_activations(...)")
        return torch.stack(
            [activations["heads"][i].view(dims.heads, dims.head_dim).sum(1) for i in range(dims.layers)]
        )
    return torch.stack([block_head_scores(b, model.config, method) for b in arch.block_list(model)])


def channel_scores(model, method: str = "weight", activations: dict | None = None) -> torch.Tensor:
    """(layers, intermediate channels) importance."""
    if method not in CHANNEL_SCORES:
        raise ValueError(f"channel score {method!r}; allowed: {', '.join(CHANNEL_SCORES)}")
    arch = arch_of(model)
    if method == "activation":
        if activations is None:
            raise ValueError("activation channel scores need collect_activations(...)")
        return torch.stack([activations["channels"][i] for i in range(arch.dims(model.config).layers)])
    return torch.stack([block_channel_scores(b, model.config) for b in arch.block_list(model)])


@torch.no_grad()
def collect_activations(model, batches) -> dict:
    """Mean |input| of every attention output projection (per head row) and MLP output
    projection (per channel)."""
    arch = arch_of(model)
    sums: dict = {"heads": {}, "channels": {}}
    count = 0
    handles = []

    def hook(store, i):
        def f(module, args):
            x = args[0].detach().float().abs()
            store[i] = store.get(i, 0) + x.reshape(-1, x.shape[-1]).sum(0)

        return f

    for i, block in enumerate(arch.block_list(model)):
        handles += [
            block.get_submodule(arch.o).register_forward_pre_hook(hook(sums["heads"], i)),
            block.get_submodule(arch.mlp_out).register_forward_pre_hook(hook(sums["channels"], i)),
        ]
    try:
        for ids in batches:
            model(input_ids=ids)
            count += ids.numel()
    finally:
        for h in handles:
            h.remove()
    return {k: {i: v / count for i, v in d.items()} for k, d in sums.items()}


def make_plan(
    model,
    head_scores_: torch.Tensor | None,
    prune_heads: int,
    channel_scores_: torch.Tensor | None = None,
    prune_channels: int = 0,
    gqa: str = "per_group",
) -> Plan:
    """Keep the best heads / channels in every layer, a uniform count per layer.

    prune_heads: heads removed per layer; with GQA and gqa="per_group" it is the number of q
    heads removed in EVERY kv group (so the q / kv ratio stays integral); with gqa="kv_groups"
    it is the number of whole kv groups removed (with their q heads). Ties go to the lower index.
    """
    H, KV, _, inter, layers, _ = arch_of(model).dims(getattr(model, "config", model))
    n_rep = H // KV
    plan = Plan()
    for i in range(layers):
        hs = head_scores_[i] if head_scores_ is not None else torch.zeros(H)
        if n_rep == 1:
            if prune_heads >= H:
                raise ValueError(f"cannot remove {prune_heads} of {H} heads")
            keep = _top(hs, H - prune_heads)
            kv = keep
        elif gqa == "per_group":
            if prune_heads >= n_rep:
                raise ValueError(f"cannot remove {prune_heads} of the {n_rep} q heads of a kv group")
            keep = sorted(
                g * n_rep + j
                for g in range(KV)
                for j in _top(hs[g * n_rep : (g + 1) * n_rep], n_rep - prune_heads)
            )
            kv = list(range(KV))
        elif gqa == "kv_groups":
            if prune_heads >= KV:
                raise ValueError(f"cannot remove {prune_heads} of {KV} kv groups")
            kv = _top(hs.view(KV, n_rep).sum(1), KV - prune_heads)
            keep = [g * n_rep + j for g in kv for j in range(n_rep)]
        else:
            raise ValueError(f"gqa: {gqa!r}; allowed: per_group, kv_groups")
        channels = None
        if prune_channels:
            cs = channel_scores_[i] if channel_scores_ is not None else torch.zeros(inter)
            channels = _top(cs, inter - prune_channels)
        plan.layers.append(LayerPlan(q_heads=keep, kv_heads=kv, channels=channels))
    return plan


def _top(scores: torch.Tensor, k: int) -> list[int]:
    order = torch.sort(scores.float(), descending=True, stable=True).indices[:k]
    return sorted(order.tolist())
