"""A gradient-informed support (as RoSA chooses its masks): Omega = the top N of
sum over calibration micro-batches of (dL/dW)^2 for the frozen weight W (RoSA's "mean_squared"
gradient collection, Nikdan et al. 2024).

dL/dW is never materialised as a parameter gradient: for a target layer y = W x (+ the DSEE
update), dL/dW = sum over tokens of (dL/dy)^T x, computed from the layer's input x (a forward
hook) and dL/dy (a hook on its output) while `torch.autograd.grad` takes the loss down to the
targets' outputs only, so no parameter gradient is accumulated and an engine's state is
untouched. Each process accumulates only the targets it owns (`mine`), so scores take
O(model / ranks) memory; every process runs the same calibration batches (ZeRO-3's forward and
backward are collective).

The injected model's updates start with B = 0 and S = 0, so dL/dy is the frozen model's own.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from ..archs import FULL
from .layer import DSEELayer, slice_bounds
from .support import top_n


class _Tap(torch.autograd.Function):
    """Identity whose backward hands the gradient to a callback (a tensor hook on a layer's
    output crashed on GPT-2's fused projection, whose DSEE update writes into output slices)."""

    @staticmethod
    def forward(ctx, x, callback):
        ctx.callback = callback
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        ctx.callback(g)
        return g, None


def squared_gradient_scores(
    model: nn.Module,
    targets: Iterable[Any],
    batches: Iterable[dict[str, torch.Tensor]],
    forward: Callable[[dict[str, torch.Tensor]], torch.Tensor],
    mine: set[str] | None = None,
) -> dict[str, torch.Tensor]:
    """{target key: sum over batches of (dL/dW)^2, out x in, float32 on the CPU} for the
    targets in `mine` (default: all). Every target's output is differentiated on every
    process, so all ranks run the same backward (and ZeRO-3 the same gathers)."""
    by_module: dict[str, list[Any]] = {}
    for t in targets:
        by_module.setdefault(t.module, []).append(t)
    scores: dict[str, torch.Tensor] = {}
    outputs: list[torch.Tensor] = []
    handles = []

    def hook_for(name: str, layer: DSEELayer):
        def hook(module, args, out):
            x = args[0].detach()

            def on_grad(g: torch.Tensor) -> None:
                g2, x2 = g.reshape(-1, g.shape[-1]).float(), x.reshape(-1, x.shape[-1]).float()
                for t in by_module[name]:
                    if mine is not None and t.key not in mine:
                        continue
                    lo, hi = (0, g2.shape[1]) if t.slice == FULL else slice_bounds(layer.base_layer, t.slice)
                    grad_w = (g2[:, lo:hi].t() @ x2).cpu()  # (out, in): dL/dW of this micro-batch
                    scores[t.key] = scores.get(t.key, 0) + grad_w.pow(2)

            outputs.append(out)  # differentiated down to here, so every tap below runs
            return _Tap.apply(out, on_grad)  # the layer's output, now reporting its gradient

        return hook

    for name in by_module:
        layer = model.get_submodule(name)
        assert isinstance(layer, DSEELayer), name
        handles.append(layer.register_forward_hook(hook_for(name, layer)))
    try:
        for batch in batches:
            outputs.clear()
            loss = forward(batch)
            live = [o for o in outputs if o.requires_grad]
            if live:
                torch.autograd.grad(loss, live, allow_unused=True)
    finally:
        for h in handles:
            h.remove()
    return scores


def supports_from_scores(
    scores: dict[str, torch.Tensor], n_for: Callable[[int, int], int]
) -> dict[str, torch.Tensor]:
    """Omega = the top N of each score (ties by the lower flat index, as every selector)."""
    return {k: top_n(s, n_for(*s.shape)) for k, s in scores.items()}
