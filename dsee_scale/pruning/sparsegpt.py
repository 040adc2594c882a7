"""SparseGPT (Frantar & Alistarh, 2023): prune a weight and reconstruct its output on calibration
inputs, one layer at a time.

For a layer y = W x with calibration inputs X (cols x tokens), the Hessian of the reconstruction
error ||W X - W' X||^2 is H = 2 X X^T, shared by every row. Columns are visited left to right in
blocks of `block` columns. At the start of a block the mask is chosen from the current weights
by the OBS saliency w^2 / [H^-1]_cc^2 (the lowest `ratio` of the block's entries; or, for an N:M
pattern, the M - N lowest of every group of M columns of a row). Then each column is frozen:
its pruned entries are set to 0 and the error they cause, err = (w - q) / [H^-1]_cc, is pushed
onto the columns not yet visited through the row of the upper Cholesky factor of H^-1 (so the
remaining weights compensate). The Hessian is damped by `damp` x mean(diag H).

The layer-wise driver is in pruning/run.py (`sparsegpt_blocks`): block i's inputs come from the
already-pruned blocks 0..i-1, as in the paper.
"""

from __future__ import annotations

import torch


@torch.no_grad()
def sparsegpt_prune(
    W: torch.Tensor,
    H: torch.Tensor,
    ratio: float = 0.5,
    nm: tuple[int, int] | None = None,
    block: int = 128,
    damp: float = 0.01,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(pruned and reconstructed W, keep-mask) for W (rows x cols) and H = sum of x x^T (cols x
    cols) over the calibration tokens. Computes in float64."""
    W = W.detach().double().contiguous().clone()  # (a transposed Conv1D view too)
    H = H.detach().double().contiguous().clone()
    rows, cols = W.shape
    if nm is not None and cols % nm[1]:
        raise ValueError(f"N:M pattern {nm[0]}:{nm[1]}: {cols} input columns, not a multiple of {nm[1]}")
    dead = torch.diag(H) == 0  # inputs never seen: their weights cannot matter, drop them
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    H += damp * torch.diag(H).mean() * torch.eye(cols, dtype=H.dtype)
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    keep = torch.ones(rows, cols, dtype=torch.bool)
    for a in range(0, cols, block):
        b = min(a + block, cols)
        W1, U1 = W[:, a:b].clone(), U[a:b, a:b]
        d = torch.diag(U1)
        err = torch.zeros_like(W1)
        pruned = torch.zeros(W1.shape, dtype=torch.bool)
        if nm is None:
            saliency = (W1 / d).pow(2)
            n_prune = int(round(ratio * saliency.numel()))
            if n_prune:
                lowest = torch.sort(saliency.reshape(-1), stable=True).indices[:n_prune]
                pruned.view(-1)[lowest] = True
        for i in range(b - a):
            if nm is not None and i % nm[1] == 0:
                group = (W1[:, i : i + nm[1]] / d[i : i + nm[1]]).pow(2)
                lowest = torch.sort(group, dim=1, stable=True).indices[:, : nm[1] - nm[0]]
                pruned[:, i : i + nm[1]].scatter_(1, lowest, True)
            w = W1[:, i]
            q = w.masked_fill(pruned[:, i], 0.0)
            e = (w - q) / d[i]
            W1[:, i:] -= e[:, None] * U1[i, i:][None, :]
            W1[:, i] = q
            err[:, i] = e
        W[:, a:b] = W1
        W[:, b:] -= err @ U[a:b, b:]
        keep[:, a:b] = ~pruned
    W[~keep] = 0.0  # exact zeros (the updates above never touch a frozen column)
    return W, keep


def reconstruction_error(W: torch.Tensor, W_new: torch.Tensor, X: torch.Tensor) -> float:
    """||W X - W' X||_F^2 for inputs X (tokens x cols)."""
    return float(((X.double() @ (W.double() - W_new.double()).T) ** 2).sum())
