"""A literal, slow GreBsmo, line by line as DSEE_METHOD.md states it: the test oracle.

The definitions the method leaves open are shared with dsee_scale's implementation (see
dsee_scale/adapters/support.py): the threshold is relative to the matrix's RMS, Omega is the top
N of |S| completed by the largest |W| where S has fewer than N non-zeros, and the iteration ends
once V's rank would pass rank_fraction x min(out, in).
"""

import torch

from dsee_scale.adapters.support import initial_v


def grebsmo_reference(W, seed, rounds=100, threshold=0.25, rank_fraction=0.65):
    """(S, L): the sparse part and the residual W - U V it was thresholded from."""
    W = W.double()
    tau = threshold * W.pow(2).mean().sqrt()
    U = torch.randn(W.shape[0], 1)  # noqa: F841  (the method's U init; the first QR overwrites it)
    V = initial_v(W.shape[1], seed).to(W.dtype)
    for _ in range(rounds):
        S = torch.zeros_like(W)
        for _ in range(2):
            U = torch.linalg.qr((W - S) @ V.T, mode="reduced").Q
            V = U.T @ (W - S)
            S = W - U @ V
            L = S.clone()
            S[S.abs() < tau] = 0
        E = W - U @ V - S
        if V.shape[0] + 5 > max(1, int(rank_fraction * min(W.shape))):
            break  # (shared definition) the rank cap ends the iteration
        R = torch.linalg.qr(E, mode="reduced").R
        V = torch.cat([V, R[:5]])
    return S, L


def top_n_reference(S, n, W=None):
    """Flat indices of the n largest |S|, ties broken by flat index (a plain Python sort); with
    W, S's non-zeros first, then the largest |W| among the other positions."""
    s = S.abs().reshape(-1).tolist()
    w = [0.0] * len(s) if W is None else W.double().abs().reshape(-1).tolist()
    order = sorted(range(len(s)), key=lambda i: (s[i] == 0, -s[i], -w[i], i))[:n]
    return sorted(order)
