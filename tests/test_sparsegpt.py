"""SparseGPT against independent references: the least-squares optimum for its own mask, and
magnitude pruning without reconstruction, on correlated calibration inputs."""

import pytest
import torch

from dsee_scale.pruning.sparsegpt import reconstruction_error, sparsegpt_prune

ROWS, COLS, TOKENS = 24, 64, 400


def problem(seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(COLS, COLS, generator=g) / COLS**0.5 + torch.eye(COLS)
    X = (torch.randn(TOKENS, COLS, generator=g) @ mix).double()  # correlated inputs, as in an LLM
    W = torch.randn(ROWS, COLS, generator=g).double()
    return W, X, X.T @ X


def least_squares_for_mask(W, X, keep):
    """The best weights with this zero pattern: per row, min ||X w - X_K w_K||."""
    out = torch.zeros_like(W)
    for r in range(W.shape[0]):
        k = keep[r]
        sol = torch.linalg.lstsq(X[:, k], X @ W[r]).solution
        out[r, k] = sol
    return out


@pytest.mark.parametrize("nm", [None, (2, 4)])
def test_sparsegpt_beats_magnitude_and_is_bounded_by_the_optimum_for_its_mask(nm):
    W, X, H = problem()
    W_new, keep = sparsegpt_prune(W, H, 0.5, nm=nm, block=16, damp=1e-4)
    assert torch.equal(W_new == 0, ~keep)
    assert int((~keep).sum()) == W.numel() // 2
    if nm:
        assert ((~keep).reshape(ROWS, -1, 4).sum(-1) == 2).all()
    err = reconstruction_error(W, W_new, X)
    best = reconstruction_error(W, least_squares_for_mask(W, X, keep), X)
    mag_keep = torch.ones_like(keep)
    if nm:
        low = W.abs().reshape(ROWS, -1, 4).argsort(-1)[..., :2]
        mag_keep = (
            torch.ones(ROWS, COLS // 4, 4, dtype=torch.bool).scatter_(-1, low, False).reshape(ROWS, COLS)
        )
    else:
        mag_keep.view(-1)[W.abs().reshape(-1).argsort()[: W.numel() // 2]] = False
    magnitude = reconstruction_error(W, W * mag_keep, X)
    assert best <= err * (1 + 1e-9)  # the optimum for the mask is a lower bound
    assert err <= 0.8 * magnitude, (err, magnitude)  # reconstruction pays off (0.71x, 0.78x here)


def sequential_obs(W, H, keep):
    """The process SparseGPT computes with one Cholesky factor, written out: visit columns in
    order, zero the pruned entries of column i, and move the columns after i to the optimum
    of ||(w - w0)^T H (w - w0)|| with columns <= i held (one linear solve per column)."""
    W0, W = W.clone(), W.clone()
    for i in range(W.shape[1]):
        delta = torch.where(keep[:, i], 0.0, -W[:, i])
        W[:, i] += delta
        if i + 1 < W.shape[1]:
            W[:, i + 1 :] -= delta[:, None] * torch.linalg.solve(H[i + 1 :, i + 1 :], H[i + 1 :, i])[None, :]
    assert W0.shape == W.shape
    return W


@pytest.mark.parametrize("nm,block", [(None, 64), (None, 16), ((2, 4), 16)])
def test_sparsegpt_equals_sequential_obs_with_its_mask(nm, block):
    W, _, H = problem(2)
    damp = 0.01
    W_new, keep = sparsegpt_prune(W, H, 0.5, nm=nm, block=block, damp=damp)
    Hd = H + damp * torch.diag(H).mean() * torch.eye(COLS, dtype=H.dtype)
    torch.testing.assert_close(W_new, sequential_obs(W, Hd, keep), rtol=1e-8, atol=1e-8)


def test_no_pruning_changes_nothing_and_unseen_inputs_are_dropped():
    W, X, H = problem(1)
    W_new, keep = sparsegpt_prune(W, H, 0.0)
    assert keep.all()
    torch.testing.assert_close(W_new, W)
    H[:, 3] = 0
    H[3, :] = 0  # input 3 never fires
    W_new, keep = sparsegpt_prune(W, H, 0.0)
    assert (W_new[:, 3] == 0).all()


def test_nm_needs_whole_groups():
    W, _, H = problem()
    with pytest.raises(ValueError, match="not a multiple of 3"):
        sparsegpt_prune(W, H, nm=(1, 3))
