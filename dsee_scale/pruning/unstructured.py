"""Unstructured pruning of the frozen weights, DSEE's way (DSEE_METHOD.md section 2).

Scores of each weight entry (out x in):
  magnitude: |W|
  abs:       |(alpha/r)(BA + S)| on DSEE-targeted rows, |W| elsewhere (the authors' "ABS")
  wabs:      |W + (alpha/r)(BA + S)| on targeted rows, |W| elsewhere ("WABS")
  wanda:     |W| x ||x_j||_2, the input column's norm over calibration tokens (Sun et al. 2023)
Masks keep the top (1 - ratio) of the scores, pooled over all chosen matrices ("global"), in each
matrix ("layer") or in each output row of each matrix ("row": Wanda's comparison group, which its
authors show is much better than a global ranking on LLMs). An N:M pattern (`nm=(2, 4)`) keeps
the N highest scores of every M consecutive input columns of each row, the layout sparse tensor
cores run (sparsity 1 - N/M). ABS scores are relative to their matrix: a DSEE update is orders
of magnitude smaller than W, so raw |update| pooled globally with |W| elsewhere would prune every
targeted row first; each part (a targeted slice's |update|, a matrix's |W|) is divided by its
median (robust to the few large S entries among the small B A ones).
Applying a mask zeroes W; W is frozen, so the zeros stay through re-tuning and checkpoints. The
update (alpha/r)(BA + S) is dense on its rows, so merging refills zeros: `sparsity_report` tells
the real sparsity of the merged weights, and `mask_merged` prunes the merged weights again.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..adapters.layer import BASE, DSEELayer, is_dsee_name, slice_bounds, unwrap, weight_out_in
from ..archs import arch_of

Scores = Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]]  # a block's, by matrix name

UNSTRUCTURED_SCORES = ("magnitude", "abs", "wabs", "wanda")
SCOPES = ("global", "layer", "row")


def prunable(model, patterns: list[str] | None = None) -> dict[str, nn.Module]:
    """Linear / Conv1D / DSEE layers inside the transformer blocks (not embeddings, not lm_head),
    or those whose names match `patterns` (fnmatch, suffix match)."""
    out: dict[str, nn.Module] = {}
    arch = arch_of(model) if not patterns else None
    for name, m in model.named_modules():
        if isinstance(m, DSEELayer) or (
            isinstance(m, (nn.Linear, Conv1D)) and f".{BASE}" not in name and not is_dsee_name(name)
        ):
            if patterns:
                if not any(
                    fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(name, "*." + p) for p in patterns
                ):
                    continue
            elif arch is not None and arch.block_index(name) is None:
                continue
            out[name] = m
    return out


def _w(layer) -> torch.Tensor:
    return weight_out_in(unwrap(layer))


def dense_update(layer: DSEELayer) -> torch.Tensor:
    """The dense out x in update of a DSEE layer (zeros outside its slices)."""
    d = torch.zeros(_w(layer).shape, dtype=torch.float32)
    for name, delta in layer.updates():
        lo, hi = slice_bounds(layer.base_layer, name)
        d[lo:hi] = delta.delta_weight().detach().float()
    return d


def update_of(layer: nn.Module) -> torch.Tensor | None:
    """The dense update of a DSEE layer, or None for a plain layer."""
    return dense_update(layer) if isinstance(layer, DSEELayer) else None


def _targeted_rows(layer: DSEELayer) -> torch.Tensor:
    rows = torch.zeros(_w(layer).shape[0], dtype=torch.bool)
    for name in layer.dsee:
        lo, hi = slice_bounds(layer.base_layer, name)
        rows[lo:hi] = True
    return rows


def scores(
    layers: dict[str, nn.Module], method: str, input_norms: dict | None = None
) -> dict[str, torch.Tensor]:
    return dict(each_score(layers, method, input_norms))


@torch.no_grad()
def each_score(
    layers: dict[str, nn.Module], method: str, input_norms: dict | None = None
) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, float32 scores) of one matrix after the other: a caller that uses each and lets it
    go holds one matrix's scores, not a block's."""
    if method not in UNSTRUCTURED_SCORES:
        raise ValueError(f"unstructured score {method!r}; allowed: {', '.join(UNSTRUCTURED_SCORES)}")
    for name, layer in layers.items():
        w = _w(layer).detach().float()
        s = w.abs()
        if method in ("abs", "wabs") and isinstance(layer, DSEELayer):
            rows, d = _targeted_rows(layer), dense_update(layer)
            s[rows] = (d if method == "abs" else w + d)[rows].abs()
            if method == "abs":
                for name_ in layer.dsee:  # each update slice relative to its own scale
                    lo, hi = slice_bounds(layer.base_layer, name_)
                    s[lo:hi] = _relative(s[lo:hi])
                if not rows.all():
                    s[~rows] = _relative(s[~rows])
        elif method == "abs":
            s = _relative(s)
        elif method == "wanda":
            if input_norms is None or name not in input_norms:
                raise ValueError("wanda scores need input norms from calibration batches")
            s = s * input_norms[name].float()[None, :]
        del w
        yield name, s


@torch.no_grad()
def input_norms(model, layers: dict[str, nn.Module], batches) -> dict[str, torch.Tensor]:
    """||x_j||_2 over all calibration tokens, per input column of each layer."""
    sq: dict[str, torch.Tensor] = {}
    handles = []
    for name, layer in layers.items():

        def hook(module, args, name=name):
            x = args[0].detach().float()
            sq[name] = sq.get(name, 0) + x.reshape(-1, x.shape[-1]).pow(2).sum(0)

        handles.append(layer.register_forward_pre_hook(hook))
    try:
        for ids in batches:
            model(input_ids=ids)
    finally:
        for h in handles:
            h.remove()
    return {k: v.sqrt() for k, v in sq.items()}


def _relative(s: torch.Tensor) -> torch.Tensor:
    """Scores divided by their median (or their mean where the median is 0; zeros stay zero)."""
    scale = s.median()
    if scale <= 0:
        scale = s.mean()
    return s / scale if scale > 0 else s


def masks(
    score: dict[str, torch.Tensor], ratio: float, scope: str = "global", nm: tuple[int, int] | None = None
) -> dict[str, torch.Tensor]:
    """Boolean keep-masks removing `ratio` of the entries (ties: the lower index is kept), or
    keeping N of every M consecutive input columns of each row when `nm` = (N, M) is given."""
    if nm is not None:
        return {k: _keep_nm(s, *nm, name=k) for k, s in score.items()}
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"sparsity ratio {ratio}: must be in [0, 1)")
    if scope == "layer":
        return {k: _keep_top(s, ratio) for k, s in score.items()}
    if scope == "row":
        return {k: _keep_top_per_row(s, ratio) for k, s in score.items()}
    if scope != "global":
        raise ValueError(f"scope {scope!r}: allowed {', '.join(SCOPES)}")
    flat = torch.cat([s.reshape(-1) for s in score.values()])
    keep = _keep_top(flat, ratio)
    out, i = {}, 0
    for k, s in score.items():
        out[k] = keep[i : i + s.numel()].view(s.shape)
        i += s.numel()
    return out


class BlockMasks(Mapping[int, dict[str, torch.Tensor]]):
    """The keep-masks of every block, each computed when asked for, from the block's scores and
    a rule every rank shares (a global threshold found once, or a per-matrix ratio / N:M), so no
    rank holds or receives more than one block's masks (every mask of a 7B model is 6.5 GB of
    bools, per rank). The last block's masks are kept for the next ask."""

    def __init__(self, blocks: int, of_block: Callable[[int], dict[str, torch.Tensor]]):
        self.blocks, self.of_block = blocks, of_block
        self._last: tuple[int, dict[str, torch.Tensor]] | None = None

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if not 0 <= i < self.blocks:
            raise KeyError(i)
        if self._last is None or self._last[0] != i:
            self._last = (i, self.of_block(i))
        return self._last[1]

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.blocks))

    def __len__(self) -> int:
        return self.blocks


def streamed_global_masks(
    score_of_block: Callable[[int], Scores],
    blocks: int,
    ratio: float,
    mine: list[int] | None = None,
    gather: Callable[[Any], list[Any]] | None = None,
) -> BlockMasks:
    """masks(all scores, ratio, "global") without ever holding more than one block's scores:
    the k-th lowest score is found from two histograms of the float32 bit patterns (non-negative
    floats order as their bits do): the high 16 bits, then the low 16 bits inside the bin that
    holds the k-th; entries equal to it are pruned in the global order, as a stable sort would.
    `score_of_block(i)` is called three times per block to find the threshold (scores are
    recomputed, not kept), and once more when block i's masks are asked for (BlockMasks).
    Split over ranks: each rank scores only the blocks in `mine`, and `gather(x)` returns every
    rank's x (histograms are summed, tie counts exchanged); then any rank can compute any block's
    masks, and no masks travel. `score_of_block` may yield (name, scores) pairs one at a time
    (each_score): then no more than one matrix's scores are held."""
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"sparsity ratio {ratio}: must be in [0, 1)")
    mine = list(range(blocks)) if mine is None else mine
    gather = gather or (lambda x: [x])

    def bits_of(s: torch.Tensor) -> torch.Tensor:
        s = s.detach().float().reshape(-1)
        if bool((s < 0).any()) or bool(s.isnan().any()):
            raise ValueError("streamed global pruning needs non-negative, finite scores")
        return s.view(torch.int32) & 0x7FFFFFFF  # -0.0 -> 0.0 (no negative score is left)

    def pairs(i: int) -> Iterable[tuple[str, torch.Tensor]]:
        block = score_of_block(i)
        return block.items() if isinstance(block, Mapping) else block

    def each_mine():
        for i in mine:
            for name, sc in pairs(i):
                yield i, name, sc, bits_of(sc)

    high = torch.zeros(1 << 15, dtype=torch.long)
    for *_, b in each_mine():
        high += torch.bincount(b >> 16, minlength=1 << 15)
    high = sum(gather(high), torch.zeros_like(high))
    k = int(round(ratio * int(high.sum())))
    cum = high.cumsum(0)
    hb = int(torch.searchsorted(cum, max(k, 1)))  # the bin of the high bits that holds the k-th lowest
    below = int(cum[hb - 1]) if hb else 0
    low = torch.zeros(1 << 16, dtype=torch.long)
    for *_, b in each_mine():
        low += torch.bincount(b[(b >> 16) == hb] & 0xFFFF, minlength=1 << 16)
    low = sum(gather(low), torch.zeros_like(low))
    cum_low = low.cumsum(0) + below
    lb = int(torch.searchsorted(cum_low, max(k, 1)))
    value = (hb << 16) | lb if k else -1  # the bits of the k-th lowest score (k = 0: prune none)
    ties = k - (int(cum_low[lb - 1]) if lb else below) if k else 0  # equal entries that are pruned
    equal: dict[tuple[int, str], int] = {}  # entries equal to it, per matrix, in global order
    for part in gather({(i, n): int((b == value).sum()) for i, n, _, b in each_mine()}):
        equal.update(part)
    keys = list(equal)  # a block's matrices arrive together, in score_of_block's order
    order = sorted(keys, key=lambda key: (key[0], keys.index(key)))
    before, seen = {}, 0
    for key in order:  # how many of the pruned ties earlier matrices take
        before[key], seen = seen, seen + equal[key]

    def keep_of(i: int) -> dict[str, torch.Tensor]:
        out = {}
        for name, sc in pairs(i):
            b = bits_of(sc)
            keep = b > value
            eq = (b == value).nonzero().squeeze(1)
            keep[eq[max(0, ties - before[(i, name)]) :]] = True  # the first `ties` equal entries are pruned
            out[name] = keep.view(sc.shape)
        return out

    return BlockMasks(blocks, keep_of)


def _keep_top(s: torch.Tensor, ratio: float) -> torch.Tensor:
    n_prune = int(round(ratio * s.numel()))
    keep = torch.ones(s.numel(), dtype=torch.bool)
    if n_prune:
        order = torch.sort(s.reshape(-1), stable=True).indices  # ascending: lowest first
        keep[order[:n_prune]] = False
    return keep.view(s.shape)


def _keep_top_per_row(s: torch.Tensor, ratio: float) -> torch.Tensor:
    """Remove round(ratio x columns) lowest scores of every row (ties: the lower index is kept)."""
    n_prune = int(round(ratio * s.shape[1]))
    keep = torch.ones(s.shape, dtype=torch.bool)
    if n_prune:
        lowest = torch.sort(s, dim=1, stable=True).indices[:, :n_prune]
        keep.scatter_(1, lowest, False)
    return keep


def _keep_nm(s: torch.Tensor, n: int, m: int, name: str = "") -> torch.Tensor:
    """Keep the n highest of every m consecutive entries of each row (ties: the lower index)."""
    rows, cols = s.shape
    if cols % m:
        raise ValueError(f"N:M pattern {n}:{m}: {name or 'a matrix'} has {cols} input columns, "
                         f"not a multiple of {m}")  # fmt: skip
    groups = s.reshape(rows, cols // m, m)
    best = torch.sort(groups, dim=-1, descending=True, stable=True).indices[..., :n]
    keep = torch.zeros(groups.shape, dtype=torch.bool).scatter_(-1, best, True)
    return keep.reshape(rows, cols)


@torch.no_grad()
def apply_masks(layers: dict[str, nn.Module], keep: dict[str, torch.Tensor]) -> None:
    """Zero the pruned entries of each frozen weight."""
    for name, m in keep.items():
        w = _w(layers[name])
        w.mul_(m.to(w.dtype))


@torch.no_grad()
def mask_merged(layers: dict[str, nn.Module], keep: dict[str, torch.Tensor]) -> None:
    """For merged layers: zero the pruned entries again (the merged update had refilled them)."""
    for name, m in keep.items():
        layer = layers[name]
        if isinstance(layer, DSEELayer) and not layer.merged:
            raise ValueError(f"{name} is not merged; merge(model) first")
        w = _w(layer)
        w.mul_(m.to(w.dtype))


@torch.no_grad()
def sparsity_report(layers: dict[str, nn.Module]) -> dict:
    """Zero fraction of the frozen weights and of the weights a merged export would have."""
    total = zeros_w = zeros_merged = 0
    per = {}
    for name, layer in layers.items():
        w = _w(layer).detach().float()
        d = update_of(layer) if not (isinstance(layer, DSEELayer) and layer.merged) else None
        merged = w if d is None else w + d
        zw, zm = int((w == 0).sum()), int((merged == 0).sum())
        per[name] = {"weight": zw / w.numel(), "merged": zm / w.numel()}
        total += w.numel()
        zeros_w += zw
        zeros_merged += zm
    return {"weight_sparsity": zeros_w / total, "merged_sparsity": zeros_merged / total, "per_matrix": per}
