"""What a run measures besides the training loss: held-out loss (every rank takes part, as
ZeRO-3 gathers parameters collectively) and histograms of the DSEE values."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from ..adapters import DSEELayer
from ..zero import comm, gathered
from .monitor import Monitor


@torch.no_grad()
def evaluate(engine: Any, blocks: torch.Tensor, batch_size: int) -> float:
    """Mean held-out token loss over all eval blocks. Every rank runs the same number of
    forwards (ZeRO-3 gathers parameters collectively); a rank out of blocks runs a dummy one."""
    rank, world = comm.rank_and_world()
    engine.eval()
    mine = blocks[rank::world]
    rounds = math.ceil(math.ceil(blocks.shape[0] / world) / batch_size)
    loss_sum = torch.zeros((), dtype=torch.float64, device=engine.device)  # sum of token losses
    tokens = 0
    for i in range(rounds):
        ids = mine[i * batch_size : (i + 1) * batch_size]
        weight = ids.shape[0]
        ids = (ids if weight else blocks[:1]).to(engine.device)
        loss = engine(input_ids=ids, labels=ids).loss
        if weight:
            n = ids.shape[0] * (ids.shape[1] - 1)
            loss_sum += loss.detach().double() * n
            tokens += n
    total = comm.sum_over_ranks([float(loss_sum), tokens])
    engine.train()
    return float(total[0] / total[1])


def dsee_histograms(model: nn.Module, monitor: Monitor, step: int) -> None:
    """Histograms of the DSEE values (gathered: a collective, so every rank calls it)."""
    groups: dict[str, list[torch.Tensor]] = {"lora_A": [], "lora_B": [], "sparse_values": []}
    for m in model.modules():
        if isinstance(m, DSEELayer):
            for _, d in m.updates():
                groups["lora_A"].append(d.lora_A)
                groups["lora_B"].append(d.lora_B)
                groups["sparse_values"].append(d.sparse_values)
    for name, params in groups.items():
        with gathered(params):
            if monitor.enabled and params:
                monitor.histogram(
                    step, f"dsee/{name}", torch.cat([p.detach().reshape(-1).float().cpu() for p in params])
                )
