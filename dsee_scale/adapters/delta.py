"""The DSEE update, as in the paper:

    y = W x + b + (alpha / r) * (B A x + S x)

A (r x in) and B (out x r) are the low-rank factors; S is sparse with N non-zeros on a FIXED
support Omega chosen from W before tuning. Only A, B and the N values of S train.

S is stored compactly: `sparse_values` (N, trainable) and `sparse_index` (2 x N: rows, cols,
a buffer). S x is computed by gather / index_add inside one autograd Function with the low-rank
product, so S costs O(tokens x N) forward and backward and no dense out x in tensor ever
exists for S, its mask or its gradient. (The authors keep a
dense S and a mask; that makes S's gradient and optimizer state O(out x in).)
"""

from __future__ import annotations

import math

import torch
from torch import nn


class _SparseLowRankUpdate(torch.autograd.Function):
    """delta = (alpha/r) (B A x + S x) in one pass, with S in coordinate form (values, rows, cols).

    Forward:  h = A x;  delta = (s B) h;  delta[..., rows[i]] += s values[i] x[..., cols[i]]
    Backward: with g = dL/d delta,
      dB = s g^T h,  dh = s g B,  dA = dh^T x,
      dvalues[i] = s sum_tokens g[..., rows[i]] x[..., cols[i]]     (N numbers, never out x in)
      dx = dh A,  dx[..., cols[i]] += s values[i] g[..., rows[i]]
    It saves x and h (as LoRA does) and touches S only through its N coordinates.
    """

    @staticmethod
    def forward(ctx, x, A, B, values, rows, cols, scaling: float):
        h = x @ A.t()
        delta = h @ (B * scaling).t()
        delta.index_add_(-1, rows, x.index_select(-1, cols) * (values * scaling))
        ctx.save_for_backward(x, h, A, B, values, rows, cols)
        ctx.scaling = scaling
        return delta

    @staticmethod
    def backward(ctx, g):
        x, h, A, B, values, rows, cols = ctx.saved_tensors
        s = ctx.scaling
        g_rows = g.index_select(-1, rows)  # (..., N): the only entries of g that S sees
        dh = g @ (B * s)
        dA = dh.reshape(-1, dh.shape[-1]).t() @ x.reshape(-1, x.shape[-1])
        dB = s * (g.reshape(-1, g.shape[-1]).t() @ h.reshape(-1, h.shape[-1]))
        per_token = g_rows * x.index_select(-1, cols)  # (..., N)
        dvalues = s * per_token.flatten(0, -2).sum(0)  # (N,); N may be 0: then plain LoRA
        dx = None
        if ctx.needs_input_grad[0]:
            dx = (dh @ A).index_add_(-1, cols, g_rows * (values * s))
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return sparse_low_rank_update(
            self.dropout(x), self.lora_A, self.lora_B, self.sparse_values, self.sparse_index, self.scaling
        )

    def delta_weight(self) -> torch.Tensor:
        """The dense out x in update (alpha / r)(B A + S): for merging and export only."""
        w = self.lora_B @ self.lora_A
        flat = self.sparse_index[0] * self.in_features + self.sparse_index[1]
        w = w.reshape(-1).index_add(0, flat, self.sparse_values.to(w.dtype)).reshape(w.shape)
        return self.scaling * w
