"""Physical removal of output rows / input columns from Linear, Conv1D and DSEE layers.

`keep_outputs(layer, rows)` keeps the given output rows (for a DSEE layer: the base weight and
bias rows, the rows of each update's B, and the entries of S whose row is kept, re-numbered).
`keep_inputs(layer, cols)` keeps input columns (W's columns, A's columns, S entries whose column
is kept). The result is a new, smaller module: the old tensors are not kept alive.
"""

from __future__ import annotations

from typing import cast

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..adapters.delta import SparseLowRankDelta
from ..adapters.layer import DSEELayer, slice_bounds, unwrap, weight_of


def _index(rows, device) -> torch.Tensor:
    return torch.as_tensor(sorted(rows), dtype=torch.long, device=device)


def _plain_keep(layer: nn.Module, rows: torch.Tensor | None, cols: torch.Tensor | None) -> nn.Module:
    weight, bias = weight_of(layer), cast(torch.Tensor | None, layer.bias)
    w, b = weight.detach(), None if bias is None else bias.detach()
    conv = isinstance(layer, Conv1D)
    w_oi = w.t() if conv else w  # out x in
    if rows is not None:
        w_oi = w_oi.index_select(0, rows)
        b = None if b is None else b.index_select(0, rows)
    if cols is not None:
        w_oi = w_oi.index_select(1, cols)
    out_f, in_f = w_oi.shape
    bias_grad = bias is not None and bias.requires_grad
    if conv:
        conv1d = Conv1D(out_f, in_f)
        conv1d.weight = nn.Parameter(w_oi.t().contiguous(), requires_grad=weight.requires_grad)
        conv1d.bias = nn.Parameter(
            b.clone() if b is not None else torch.zeros(out_f, dtype=w.dtype), requires_grad=bias_grad
        )
        return conv1d
    linear = nn.Linear(in_f, out_f, bias=b is not None, device=w.device, dtype=w.dtype)
    linear.weight = nn.Parameter(w_oi.contiguous(), requires_grad=weight.requires_grad)
    if b is not None:
        linear.bias = nn.Parameter(b.clone(), requires_grad=bias_grad)
    return linear


def _renumber(kept: torch.Tensor, size: int, ids: torch.Tensor) -> torch.Tensor:
    """New numbers of `ids` once only `kept` (sorted) of 0..size-1 remain; -1 for removed ones."""
    remap = torch.full((size,), -1, dtype=torch.long, device=ids.device)
    remap[kept] = torch.arange(len(kept), device=ids.device)
    return remap[ids]


def _delta_keep(
    d: SparseLowRankDelta, rows: torch.Tensor | None, cols: torch.Tensor | None
) -> SparseLowRankDelta:
    """The update restricted to kept rows (local to its slice) and kept columns."""
    A, B = d.lora_A.detach(), d.lora_B.detach()
    idx, vals = d.sparse_index, d.sparse_values.detach()
    keep = torch.ones(idx.shape[1], dtype=torch.bool, device=idx.device)
    new_r, new_c = idx[0], idx[1]
    if rows is not None:
        B = B.index_select(0, rows)
        new_r = _renumber(rows, d.out_features, idx[0])
        keep &= new_r >= 0
    if cols is not None:
        A = A.index_select(1, cols)
        new_c = _renumber(cols, d.in_features, idx[1])
        keep &= new_c >= 0
    index = torch.stack([new_r[keep], new_c[keep]])
    nd = SparseLowRankDelta(
        A.shape[1],
        B.shape[0],
        d.r,
        d.scaling * d.r,
        index,
        d.dropout.p if isinstance(d.dropout, nn.Dropout) else 0.0,
    )
    with torch.no_grad():
        nd.lora_A.copy_(A)
        nd.lora_B.copy_(B)
        nd.sparse_values.copy_(vals[keep])
    return nd.to(device=A.device, dtype=A.dtype)


def _keep(layer: nn.Module, rows=None, cols=None) -> nn.Module:
    """The layer with only the given output rows / input columns (None: all), as a new module."""
    base = unwrap(layer)
    device = weight_of(base).device
    rows_t = None if rows is None else _index(rows, device)
    cols_t = None if cols is None else _index(cols, device)
    new_base = _plain_keep(base, rows_t, cols_t)
    if not isinstance(layer, DSEELayer):
        return new_base
    deltas = {}
    for name, d in layer.updates():
        local = None  # the kept rows inside this update's slice, numbered from its start
        if rows_t is not None:
            lo, hi = slice_bounds(base, name)
            local = rows_t[(rows_t >= lo) & (rows_t < hi)] - lo
        deltas[name] = _delta_keep(d, local, cols_t)
    return DSEELayer(new_base, deltas, layer.keep_zeros)


def keep_outputs(layer: nn.Module, rows) -> nn.Module:
    """Keep output rows `rows` (global row numbers; for a fused q/k/v layer, rows of all three)."""
    return _keep(layer, rows=rows)


def keep_inputs(layer: nn.Module, cols) -> nn.Module:
    """Keep input columns `cols`."""
    return _keep(layer, cols=cols)
