"""Choosing the support Omega of the sparse update S (N positions per weight matrix).

- grebsmo:   GreBsmo (Zhou & Tao 2013) splits W into low-rank + sparse; Omega = top-N |S|.
- svd:       S = W minus its top-k SVD reconstruction; Omega = top-N |S|.
- magnitude: Omega = top-N |W|.
- random:    N distinct positions, seeded.

Every selector returns exactly N positions as a (2, N) int64 tensor [rows; cols], sorted by
flat position; ties in the score are broken by the lower flat index, and every random choice is
seeded per matrix, so every rank and every run picks the same support.

GreBsmo here is the algorithm of DSEE_METHOD.md with three definitions the method leaves open,
shared with the test oracle (tests/reference_grebsmo.py):
  * the hard threshold is relative: |S| < threshold x RMS(W) -> 0, with threshold 0.25 by
    default (the authors' absolute 0.01 on BERT-base weights of RMS about 0.04). An absolute
    0.01 empties S on matrices with small entries, and "top N of |S|" then degenerates to the
    first N positions of row 0;
  * Omega = the top N of |S|. Where S has fewer than N non-zeros, Omega is S's non-zeros and
    then the largest |W| elsewhere, and `select_supports` reports the matrix (the caller warns).
    (Not the residual W - U V: when U V has absorbed the matrix, as on a matrix of rank below
    the cap, the residual is rounding noise, and its order is not reproducible);
  * the rank cap: V stops growing once its rank would pass `rank_fraction` x min(out, in)
    (default 0.65), and the iteration ends there. The method's 100 rounds of +5 reach rank 501 =
    0.65 x 768 on the authors' BERT-base matrices; the cap keeps that ratio on other shapes.
    Without it, LLaMA's 192 x 576 v_proj reaches full rank after 38 rounds, where U V reproduces
    W - S exactly and S collapses to rounding noise.
It always computes in float64 and, on the CPU, with one thread: the hard threshold makes the
iteration amplify rounding (an entry near the threshold flips in or out of S and changes every
later round), so float32 changed 60-80% of a top-16 support on generic matrices, and even in
float64 one vs two BLAS threads changed 3.6% of SmolLM2's q,v support positions (8 of 60
matrices). With float64 and one thread the implementation, the oracle, batched and one-by-one
runs, and the launcher on any number of ranks agree exactly. (The launcher spreads matrices
over ranks, so one thread per selection costs little there; a GPU computes its own rounding.)
Faster than the literal form:
  * the new rows of V are the first `step` rows of R in QR(E). Householder QR builds those from
    the first `step` columns of E alone, so QR(E[:, :step]) gives them without a full QR of E;
  * matrices of one shape run as one batch (batched matmul / QR);
  * the last round's growth of V is skipped (it cannot change S).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

METHODS = ("grebsmo", "svd", "magnitude", "random")


def top_n(scores: torch.Tensor, n: int) -> torch.Tensor:
    """Indices (2, n) [rows; cols] of the n largest entries of a 2-D score; ties -> lower index."""
    cols = scores.shape[-1]
    order = torch.sort(scores.reshape(-1), descending=True, stable=True).indices[:n]
    return flat_to_index(order, cols)


def complete_top_n(S: torch.Tensor, W: torch.Tensor, n: int) -> torch.Tensor:
    """The n largest |S|; where S has fewer than n non-zeros, those and then the largest |W|."""
    a = S.abs()
    if int(a.count_nonzero()) >= n:
        return top_n(a, n)
    w = W.abs().double()
    score = torch.where(a > 0, 2.0 + a / a.max().clamp_min(1e-300), w / (w.max() + 1e-300))
    return top_n(score, n)


def flat_to_index(flat: torch.Tensor, cols: int) -> torch.Tensor:
    flat = torch.sort(flat).values
    return torch.stack([flat // cols, flat % cols])


def initial_v(n_cols: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, n_cols, generator=g, dtype=torch.float64).float()


@torch.no_grad()
def grebsmo_sparse(
    W: torch.Tensor,
    seeds: list[int],
    rounds: int = 100,
    step: int = 5,
    inner: int = 2,
    threshold: float = 0.25,
    rank_fraction: float = 0.65,
) -> torch.Tensor:
    """The sparse part S of GreBsmo for a batch W (b, m, n) of same-shape matrices, in float64
    (|W - U V| < threshold x RMS(W) -> 0)."""
    W = W.double()
    b, m, n = W.shape
    V = torch.stack([initial_v(n, s) for s in seeds]).to(W.device, W.dtype)  # (b, 1, n), seeded on CPU
    tau = threshold * W.pow(2).mean(dim=(1, 2), keepdim=True).sqrt()  # per matrix
    max_rank = max(1, int(rank_fraction * min(m, n)))
    S = torch.zeros_like(W)
    for t in range(rounds):
        S = torch.zeros_like(W)
        for _ in range(inner):
            X = W - S
            U = torch.linalg.qr(X @ V.transpose(1, 2)).Q  # (b, m, k)
            V = U.transpose(1, 2) @ X  # (b, k, n)
            L = W - U @ V  # W minus the low-rank part
            S = L.masked_fill(L.abs() < tau, 0.0)
        k = V.shape[1]
        if t == rounds - 1 or k + step > max_rank:
            break  # the last round, or the rank cap: the iteration ends
        E = L - S  # = W - U V - S, reusing U V
        Q = torch.linalg.qr(E[:, :, :step]).Q  # first `step` columns of QR(E)'s Q
        V = torch.cat([V, Q.transpose(1, 2) @ E], dim=1)  # + first `step` rows of R
    return S


def _svd_sparse(W: torch.Tensor, k: int) -> torch.Tensor:
    U, s, Vh = torch.linalg.svd(W.float(), full_matrices=False)
    k = min(k, s.shape[0])
    return W.float() - (U[:, :k] * s[:k]) @ Vh[:k]


def select_supports(
    weights: dict[str, torch.Tensor],
    n: int | dict[str, int],
    method: str,
    seeds: dict[str, int],
    *,
    grebsmo_rounds: int = 100,
    grebsmo_threshold: float = 0.25,
    grebsmo_rank_fraction: float = 0.65,
    svd_rank: int = 16,
    batch_bytes: int = 8 << 20,
    short: dict[str, int] | None = None,
) -> dict[str, torch.Tensor]:
    """Omega for each named weight (out x in). Small same-shape matrices are batched for
    grebsmo (measured on 2 cores: batching 576 x 576 matrices is slower than one by one).
    `short`, when given, receives {name: non-zeros of S} for GreBsmo matrices whose S has
    fewer than n non-zeros (their Omega is completed by magnitude, see above)."""
    if method not in METHODS:
        raise ValueError(f"unknown support method {method!r}; allowed: {', '.join(METHODS)}")
    want = n if isinstance(n, dict) else {name: n for name in weights}  # N per matrix
    out: dict[str, torch.Tensor] = {}
    for name in weights:
        if want[name] == 0:  # no sparse part (plain LoRA through the same code): nothing to choose
            out[name] = torch.zeros(2, 0, dtype=torch.long)
    weights = {k: w for k, w in weights.items() if k not in out}
    if method == "grebsmo":
        with one_cpu_thread():
            _grebsmo_supports(weights, want, seeds, out, short, grebsmo_rounds, grebsmo_threshold,
                              grebsmo_rank_fraction, batch_bytes)  # fmt: skip
        return out
    for name, w in weights.items():
        if method == "svd":
            out[name] = top_n(_svd_sparse(w, svd_rank).abs(), want[name])
        elif method == "magnitude":
            out[name] = top_n(w.float().abs(), want[name])
        else:  # random
            g = torch.Generator().manual_seed(seeds[name])
            flat = torch.randperm(w.numel(), generator=g)[: want[name]]
            out[name] = flat_to_index(flat, w.shape[1])
    return out


@contextmanager
def one_cpu_thread():
    """torch on one CPU thread inside (restored after): a reproducible reduction order."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _grebsmo_supports(
    weights, want, seeds, out, short, rounds, threshold, rank_fraction, batch_bytes
) -> None:
    """GreBsmo supports into `out`, same-shape matrices batched; `short` as in select_supports."""
    by_shape: dict[tuple, list[str]] = {}
    for name, w in weights.items():
        by_shape.setdefault(tuple(w.shape), []).append(name)
    for shape, names in by_shape.items():
        per_batch = max(1, batch_bytes // (8 * shape[0] * shape[1] * 6))  # ~6 live float64 copies
        for i in range(0, len(names), per_batch):
            chunk = names[i : i + per_batch]
            S = grebsmo_sparse(
                torch.stack([weights[c] for c in chunk]),
                [seeds[c] for c in chunk],
                rounds=rounds,
                threshold=threshold,
                rank_fraction=rank_fraction,
            )
            for c, s in zip(chunk, S, strict=True):
                out[c] = complete_top_n(s, weights[c], want[c])
                nnz = int(s.count_nonzero())
                if short is not None and nnz < want[c]:
                    short[c] = nnz
