"""A literal, slow GreBsmo, line by line as DSEE_METHOD.md states it: the test oracle.

One addition shared with dsee_scale's implementation: V stops growing once its rank would pass
rank_fraction x min(out, in) (see dsee_scale/adapters/support.py for why).
"""

import torch

from dsee_scale.adapters.support import initial_v


def grebsmo_reference(W, seed, rounds=100, threshold=0.01, rank_fraction=0.65):
    U = torch.randn(W.shape[0], 1)  # noqa: F841  (the method's U init; the first QR overwrites it)
    V = initial_v(W.shape[1], seed).to(W.dtype)
    for _ in range(rounds):
        S = torch.zeros_like(W)
        for _ in range(2):
            U = torch.linalg.qr((W - S) @ V.T, mode="reduced").Q
            V = U.T @ (W - S)
            S = W - U @ V
            S[S.abs() < threshold] = 0
        E = W - U @ V - S
        if V.shape[0] + 5 > max(1, int(rank_fraction * min(W.shape))):
            continue  # (shared addition) no more growth
        R = torch.linalg.qr(E, mode="reduced").R
        V = torch.cat([V, R[:5]])
    return S


def top_n_reference(S, n):
    """Indices of the n largest |S|, ties broken by flat index: a plain Python sort."""
    flat = S.abs().reshape(-1).tolist()
    order = sorted(range(len(flat)), key=lambda i: (-flat[i], i))[:n]
    return sorted(order)
