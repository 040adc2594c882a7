"""The DSEE update, as in the paper:

    y = W x + b + (alpha / r) * (B A x + S x)

A (r x in) and B (out x r) are the low-rank factors; S is sparse with N non-zeros on a FIXED
support Omega chosen from W before tuning. Only A, B and the N values of S train.

S is stored compactly: `sparse_values` (N, trainable) and `sparse_index` (2 x N: rows, cols,
a buffer). S x is a sparse (CSR) x dense product inside one autograd Function with the low-rank
product, and S's gradient a sampled dense-dense product at its N positions, so S costs
O(tokens x N) forward and backward and no dense out x in tensor ever exists for S, its mask or
its gradient. (The authors keep a
dense S and a mask; that makes S's gradient and optimizer state O(out x in).)
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F
from torch import nn

# torch says so once per process on the first CSR tensor; the kernels used here are stable.
warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")


def _csr(rows: torch.Tensor, cols: torch.Tensor, values: torch.Tensor, shape: tuple[int, int]):
    """S as a CSR tensor from coordinates sorted by (row, col)."""
    crow = torch.zeros(shape[0] + 1, dtype=torch.int64, device=rows.device)
    crow[1:] = torch.bincount(rows, minlength=shape[0]).cumsum(0)
    return torch.sparse_csr_tensor(crow, cols, values, shape, check_invariants=False)  # sorted: valid


# Up to this many entries, S x and its gradients are gathers and index_add over the N positions
# (O(tokens x N), no fixed cost); above it, CPU / CUDA sparse kernels (CSR). Measured forward +
# backward, 512 tokens, 576 x 576, idle 2-core CPU: N=64 gather 1.6 ms vs CSR 3.4 ms (LoRA alone
# 0.9); N=512 3.1 vs 3.4; N=2,880 17.6 vs 5.3.
GATHER_MAX_N = 512


def _sparse_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The CPU's sparse kernels (MKL) take float32 / float64 only, and float32 is the one every
    CUDA version's cuSPARSE takes too: bf16 / fp16 inputs compute S's part in float32."""
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


class _SparseLowRankUpdate(torch.autograd.Function):
    """delta = (alpha/r) (B A x + S x) in one pass, with S in coordinate form (values, rows, cols
    sorted by flat position, as every support is).

    Forward:  h = A x;  delta = (s B) h + (s S) x             (S x: a CSR sparse x dense product)
    Backward: with g = dL/d delta (tokens x out) and x (tokens x in),
      dB = s g^T h,  dh = s g B,  dA = dh^T x,
      dvalues = s (g^T x) sampled at Omega    (sampled_addmm: N dot products, never out x in)
      dx = dh A + (s S)^T g                    (the CSR of S^T: the same entries sorted by col)
    It saves x and h (as LoRA does) and touches S only through its N coordinates. Up to
    GATHER_MAX_N entries the sparse products are gathers and index_add at the N positions; above
    it they run in the sparse kernels (MKL / cuSPARSE), whose fixed cost only pays off for large N.
    """

    @staticmethod
    def forward(ctx, x, A, B, values, rows, cols, scaling: float):
        h = x @ A.t()
        delta = h @ (B * scaling).t()
        out_f, in_f = B.shape[0], A.shape[1]
        if values.numel():
            sd = _sparse_dtype(x.dtype, x.device)
            x2 = x.reshape(-1, in_f).to(sd)
            if values.numel() <= GATHER_MAX_N:
                at = x2[:, cols] * (values.to(sd) * scaling)  # tokens x N
                sx = x2.new_zeros(x2.shape[0], out_f).index_add_(1, rows, at)
            else:
                sx = (_csr(rows, cols, values.to(sd) * scaling, (out_f, in_f)) @ x2.t()).t()
            delta = delta + sx.reshape(delta.shape).to(delta.dtype)
        ctx.save_for_backward(x, h, A, B, values, rows, cols)
        ctx.scaling = scaling
        return delta

    @staticmethod
    def backward(ctx, g):
        x, h, A, B, values, rows, cols = ctx.saved_tensors
        s = ctx.scaling
        out_f, in_f = B.shape[0], A.shape[1]
        dh = g @ (B * s)
        dA = dh.reshape(-1, dh.shape[-1]).t() @ x.reshape(-1, x.shape[-1])
        dB = s * (g.reshape(-1, g.shape[-1]).t() @ h.reshape(-1, h.shape[-1]))
        dvalues = torch.zeros_like(values)  # N may be 0: then plain LoRA
        dx = dh @ A if ctx.needs_input_grad[0] else None
        if values.numel():
            sd = _sparse_dtype(g.dtype, g.device)
            g2, x2 = g.reshape(-1, out_f).to(sd), x.reshape(-1, in_f).to(sd)
            if values.numel() <= GATHER_MAX_N:
                g_at = g2[:, rows]  # tokens x N
                dvalues = (s * (g_at * x2[:, cols]).sum(0)).to(values.dtype)
                if dx is not None:
                    sg = g2.new_zeros(g2.shape[0], in_f).index_add_(1, cols, g_at * (values.to(sd) * s))
                    dx = dx + sg.reshape(dx.shape).to(dx.dtype)
                return dx, dA, dB, dvalues, None, None, None
            pattern = _csr(
                rows, cols, torch.zeros(values.shape, dtype=sd, device=values.device), (out_f, in_f)
            )
            sampled = torch.sparse.sampled_addmm(pattern, g2.t().contiguous(), x2, beta=0.0)
            dvalues = (s * sampled.values()).to(values.dtype)
            if dx is not None:
                by_col = torch.argsort(cols, stable=True)
                St = _csr(cols[by_col], rows[by_col], values.to(sd)[by_col] * s, (in_f, out_f))
                dx = dx + (St @ g2.t()).t().reshape(dx.shape).to(dx.dtype)
        return dx, dA, dB, dvalues, None, None, None


def sparse_low_rank_update(x, A, B, values, index, scaling: float) -> torch.Tensor:
    """(alpha/r)(B A x + S x) for S = (values at index=[rows; cols]); x is (..., in).
    Under torch.autocast it computes in the autocast dtype (as autocast's own matmuls do), with
    autocast off inside: forward and backward then see one dtype, as custom_fwd(cast_inputs) does."""
    dev = x.device.type
    dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype
    with torch.autocast(dev, enabled=False):
        return _SparseLowRankUpdate.apply(
            x.to(dtype), A.to(dtype), B.to(dtype), values.to(dtype), index[0], index[1], scaling
        )


class SparseLowRankDelta(nn.Module):
    """(alpha / r) * (B A + S) applied to x, for one weight matrix (or one slice of a fused one)."""

    sparse_index: torch.Tensor  # (2, N) int64 buffer: rows; cols of Omega

    def __init__(
        self,
        in_features: int,
        out_features: int,
        r: int,
        alpha: float,
        index: torch.Tensor,
        dropout: float = 0.0,
    ):
        super().__init__()
        if index.shape[1] > 1 and not bool((index[0, 1:] >= index[0, :-1]).all()):
            raise ValueError("a DSEE support must list its positions by row (sorted by flat position)")
        self.in_features, self.out_features, self.r = in_features, out_features, r
        self.scaling = alpha / r
        self.lora_A = nn.Parameter(torch.empty(r, in_features))
        self.lora_B = nn.Parameter(torch.zeros(out_features, r))  # update is 0 at step 0
        self.sparse_values = nn.Parameter(torch.zeros(index.shape[1]))  # S = 0 at step 0
        self.register_buffer("sparse_index", index.to(torch.long).clone())  # Omega: rows, cols
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    @property
    def num_sparse(self) -> int:
        return self.sparse_index.shape[1]

    def reset_parameters(self, generator: torch.Generator | None = None, init: str = "kaiming"):
        """A random (seeded, so every rank agrees), B = 0, S values = 0."""
        with torch.no_grad():
            a = torch.empty(self.lora_A.shape)
            if init == "kaiming":  # what LoRA / PEFT do: kaiming_uniform_(a=sqrt(5))
                bound = 1.0 / math.sqrt(self.in_features)
                a.uniform_(-bound, bound, generator=generator)
            else:  # "normal": the DSEE authors' N(0, 0.02)
                a.normal_(0.0, 0.02, generator=generator)
            self.lora_A.copy_(a)
            self.lora_B.zero_()
            self.sparse_values.zero_()

    def forward(self, x: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        """The update applied to x; with `keep` (a boolean out x in mask, dsee.keep_zeros) only
        its kept entries, through the dense masked update (as a merged weight would be)."""
        if keep is not None:
            return F.linear(self.dropout(x), self.delta_weight(keep).to(x.dtype))
        return sparse_low_rank_update(
            self.dropout(x), self.lora_A, self.lora_B, self.sparse_values, self.sparse_index, self.scaling
        )

    def delta_weight(self, keep: torch.Tensor | None = None) -> torch.Tensor:
        """The dense out x in update (alpha / r)(B A + S), times the boolean mask `keep` where
        given: for merging, export and the keep_zeros forward."""
        w = self.lora_B @ self.lora_A
        flat = self.sparse_index[0] * self.in_features + self.sparse_index[1]
        w = w.reshape(-1).index_add(0, flat, self.sparse_values.to(w.dtype)).reshape(w.shape)
        return self.scaling * (w if keep is None else w * keep.to(w.dtype))
