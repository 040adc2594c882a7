"""Gradient scores of attention heads and MLP channels (as LLM-Pruner / Kwon et al. 2022 do):
the loss change when a head or channel is masked, from one backward pass per calibration
micro-batch through the whole tuned model (partitioned under ZeRO-3).

A head h of block i feeds the output projection through its columns of o_proj's input z; a
channel c is column c of the down projection's input. Put a mask m (= 1) on that column; then
dL/dm = sum over tokens of z[:, cols] * dL/dz[:, cols], the first-order change of the loss when
the group is removed (its vector-wise Taylor term, sum over the group of W * dL/dW). Per
micro-batch b:  s_b = dL/dm.
    taylor = | sum_b s_b |    (LLM-Pruner's first-order, vector-wise importance)
    fisher = sum_b s_b^2      (the mask's empirical Fisher information, Kwon et al. 2022)
Only z and dL/dz are read (a hook on the projection's input): no parameter gradient is formed,
so memory is one block's activations beyond the forward pass. Each rank takes its share of the
micro-batches (data parallel; a rank short of one runs batch 0 with weight 0, so ZeRO-3's
collectives stay matched) and the sums are added over ranks.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import cast

import torch

from ..adapters.gradient import _Tap
from ..zero import comm

GRADIENT_SCORES = ("taylor", "fisher")


def mask_gradient_scores(
    model: torch.nn.Module,
    groups: dict[str, tuple[int, int]],
    batches: list[dict[str, torch.Tensor]],
    forward: Callable[[dict[str, torch.Tensor]], torch.Tensor],
) -> dict[str, dict[str, torch.Tensor]]:
    """{"taylor" | "fisher": {module name: scores (groups,)}} for each module in `groups`
    (module name -> (number of groups, columns per group) of its input)."""
    rank, world = comm.rank_and_world()
    sums = {n: torch.zeros(k, dtype=torch.float64) for n, (k, _) in groups.items()}
    squares = {n: torch.zeros(k, dtype=torch.float64) for n, (k, _) in groups.items()}
    current: dict[str, torch.Tensor] = {}
    leaves: list[torch.Tensor] = []

    def tap(name: str, k: int, width: int):
        def pre_hook(module, args):
            z = args[0]
            if not z.requires_grad:
                return None
            zd = z.detach()

            def on_grad(g: torch.Tensor) -> None:
                per_col = (zd.float() * g.float()).reshape(-1, k, width).sum((0, 2))
                current[name] = current.get(name, 0) + per_col.double().cpu()

            return (_Tap.apply(z, on_grad), *args[1:])

        return pre_hook

    def leaf(module, args, out):  # the embeddings' output: where the backward stops
        out = out.detach().requires_grad_()
        leaves.append(out)
        return out

    embeddings = cast(torch.nn.Module, model.get_input_embeddings())  # type: ignore[operator]
    handles = [embeddings.register_forward_hook(leaf)]
    for n, (k, w) in groups.items():
        handles.append(model.get_submodule(n).register_forward_pre_hook(tap(n, k, w)))
    rounds = -(-len(batches) // world)
    try:
        for j in range(rounds):
            idx = j * world + rank
            weight = 1.0 if idx < len(batches) else 0.0
            current.clear()
            leaves.clear()
            loss = forward(batches[idx if weight else 0])
            torch.autograd.grad(loss, leaves)
            for n, s in current.items():
                sums[n] += weight * s
                squares[n] += weight * s.pow(2)
    finally:
        for h in handles:
            h.remove()
    return {
        "taylor": {n: comm.sum_over_ranks(v).abs().float() for n, v in sums.items()},
        "fisher": {n: comm.sum_over_ranks(v).float() for n, v in squares.items()},
    }
