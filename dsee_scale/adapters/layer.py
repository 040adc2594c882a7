"""DSEELayer: a frozen nn.Linear or GPT-2 Conv1D plus one DSEE update per targeted output slice.

A plain projection (LLaMA q_proj) has one slice, "full". GPT-2's fused c_attn holds q, k and v
as three equal output slices; "q and v" puts an update on slices "q" and "v" only.
The base weight is always read as out x in (`weight_out_in`), whatever the layer stores
(Conv1D stores in x out).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import cast

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..archs import FULL
from ..zero import full_shape
from .delta import SparseLowRankDelta

FUSED_QKV = ("q", "k", "v")
# Names: a DSEE layer's frozen projection is `<layer>.base_layer`, its updates
# `<layer>.dsee.<slice>.{lora_A, lora_B, sparse_values, sparse_index}`.
BASE = "base_layer"
MARKER = ".dsee."


def is_dsee_name(name: str) -> bool:
    """A parameter / buffer / module name that belongs to a DSEE update."""
    return MARKER in name


def delta_name(layer: str, slice_name: str) -> str:
    """The module name of one update, e.g. 'model.layers.0.self_attn.q_proj.dsee.full'."""
    return f"{layer}{MARKER}{slice_name}"


def unwrap(layer: nn.Module) -> nn.Module:
    """The plain Linear / Conv1D of a layer, DSEE-wrapped or not."""
    return layer.base_layer if isinstance(layer, DSEELayer) else layer


def weight_of(layer: nn.Module) -> torch.Tensor:
    """A Linear's / Conv1D's weight parameter, as stored."""
    return cast(torch.Tensor, layer.weight)


def layer_dims(layer: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a Linear or Conv1D (its full shape under ZeRO-3)."""
    shape = full_shape(weight_of(layer))
    if isinstance(layer, Conv1D):
        return shape[0], shape[1]
    return shape[1], shape[0]


def slice_bounds(layer: nn.Module, slice_name: str) -> tuple[int, int]:
    """Output rows [lo, hi) of a named slice: "full", or q/k/v of a fused qkv layer."""
    _, out = layer_dims(layer)
    if slice_name == FULL:
        return 0, out
    i = FUSED_QKV.index(slice_name)
    width = out // 3
    return i * width, (i + 1) * width


def weight_out_in(layer: nn.Module) -> torch.Tensor:
    """The layer's weight as out x in (a view for Linear, a transpose for Conv1D)."""
    weight = weight_of(layer)
    return weight.t() if isinstance(layer, Conv1D) else weight


def kept_update(delta: SparseLowRankDelta, w: torch.Tensor) -> torch.Tensor:
    """The dense update (alpha/r)(BA + S) where the frozen slice `w` (out x in) is non-zero,
    0 where it is zero: a pruned W keeps its zeros when the update is added (dsee.keep_zeros)."""
    return delta.delta_weight(w != 0)


class DSEELayer(nn.Module):
    """y = base(x) + sum over slices s of (alpha/r)(B_s A_s x + S_s x) written to rows of s.

    keep_zeros (a pruned model's re-tuning, `dsee.keep_zeros`): the update is masked by W's
    non-zeros, y = base(x) + ((alpha/r)(B_s A_s + S_s) * [W_s != 0]) x, so merging keeps W's
    sparsity. This forms the dense out x in update (as a merged weight would) instead of the
    O(tokens x (r + N)) path; the mask is W itself, so it costs no memory of its own."""

    base_layer: nn.Module

    def __init__(
        self, base_layer: nn.Module, deltas: dict[str, SparseLowRankDelta], keep_zeros: bool = False
    ):
        super().__init__()
        self.base_layer = base_layer
        self.dsee = nn.ModuleDict(deltas)
        self.merged = False
        self.keep_zeros = keep_zeros

    @property
    def weight(self):  # transformers code sometimes reads module.weight (dtype checks)
        return self.base_layer.weight

    def updates(self) -> Iterator[tuple[str, SparseLowRankDelta]]:
        """(slice name, its update) pairs."""
        for name, delta in self.dsee.items():
            yield name, cast(SparseLowRankDelta, delta)

    def update(self, slice_name: str) -> SparseLowRankDelta:
        return cast(SparseLowRankDelta, self.dsee[slice_name])

    def bounds(self, name: str) -> tuple[int, int]:
        return slice_bounds(self.base_layer, name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        if self.merged:
            return y
        for name, delta in self.dsee.items():  # the hot path: the ModuleDict itself, no wrapper
            lo, hi = self.bounds(name)
            keep = weight_out_in(self.base_layer)[lo:hi] != 0 if self.keep_zeros else None
            d = delta(x, keep).to(y.dtype)  # through the module: ZeRO-3 gathers A, B, S for it
            if hi - lo == y.shape[-1]:
                y = y + d
            else:  # addmm does not keep its output for backward, so adding in place is safe
                y.narrow(-1, lo, hi - lo).add_(d)
        return y

    @torch.no_grad()
    def _fold(self, sign: float) -> None:
        w = weight_out_in(self.base_layer)
        for name, delta in self.updates():
            lo, hi = self.bounds(name)
            update = kept_update(delta, w[lo:hi]) if self.keep_zeros else delta.delta_weight()
            w[lo:hi] += sign * update.to(w.dtype)

    def merge(self) -> None:
        """W <- W + (alpha/r)(BA + S), exactly, for every slice; forward then uses W alone."""
        if not self.merged:
            self._fold(+1.0)
            self.merged = True

    def unmerge(self) -> None:
        if self.merged:
            self._fold(-1.0)
            self.merged = False
