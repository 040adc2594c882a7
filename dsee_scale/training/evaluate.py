"""What a run measures besides the training loss: held-out loss on the label tokens (all
tokens for text, answer tokens for prompt_completion / chat), the task metric from greedy
generations, and histograms of the DSEE values. Every rank takes part in each (ZeRO-3 gathers
parameters collectively)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from ..adapters import DSEELayer
from ..data import Blocks, batch_tokens, to_device
from ..generation import Sample, generate_one, input_ids, task_metrics
from ..zero import comm, gathered
from .monitor import Monitor


@torch.no_grad()
def evaluate(engine: Any, blocks: Blocks, batch_size: int) -> float:
    """Mean held-out loss per label token over all eval rows. Every rank runs the same number
    of forwards; a rank out of rows runs a dummy one."""
    rank, world = comm.rank_and_world()
    engine.eval()
    mine = list(range(rank, len(blocks), world))
    rounds = math.ceil(math.ceil(len(blocks) / world) / batch_size)
    loss_sum = torch.zeros((), dtype=torch.float64, device=engine.device)  # sum of token losses
    tokens = 0
    for i in range(rounds):
        idx = mine[i * batch_size : (i + 1) * batch_size]
        batch = blocks.rows(idx or [0])
        loss = engine(**to_device(batch, engine.device), use_cache=False).loss
        n = batch_tokens(batch) if idx else 0
        if n:
            loss_sum += loss.detach().double() * n
            tokens += n
    total = comm.sum_over_ranks([float(loss_sum), tokens])
    engine.train()
    return float(total[0] / total[1])


@torch.no_grad()
def generation_eval(
    engine: Any, tokenizer: Any, samples: list[Sample], template: str | None, max_new_tokens: int
) -> tuple[dict[str, float], list[tuple[Sample, str]]]:
    """Greedy answers to the held-out samples, split over ranks (synced: ZeRO-3 ranks keep
    forwarding until all are done); returns the task metrics and (sample, answer) pairs."""
    rank, world = comm.rank_and_world()
    engine.eval()
    mine = samples[rank::world]
    rounds = math.ceil(len(samples) / world)
    answers = []
    for i in range(rounds):
        s = mine[i] if i < len(mine) else samples[0]  # a dummy keeps the ranks in step
        g = generate_one(engine.module, tokenizer, input_ids(tokenizer, s, template), max_new_tokens,
                         synced=world > 1, device=engine.device)  # fmt: skip
        if i < len(mine):
            answers.append(g.text)
    engine.train()
    per_rank = comm.all_gather_objects(answers)
    ordered = [per_rank[i % world][i // world] for i in range(len(samples))]
    return task_metrics(ordered, [s.reference for s in samples]), list(zip(samples, ordered, strict=True))


def samples_markdown(pairs: list[tuple[Sample, str]]) -> str:
    """A few generations for TensorBoard's text tab (markdown)."""

    def block(text: str) -> str:
        return "\n".join("    " + line for line in (text or "(empty)").splitlines())

    parts = [
        f"**prompt**\n\n{block(s.prompt)}\n\n**reference**\n\n{block(s.reference)}\n\n"
        f"**generated**\n\n{block(a)}"
        for s, a in pairs
    ]
    return "\n\n---\n\n".join(parts)


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
