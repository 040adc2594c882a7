"""The DSEE update, as in the paper:

    y = W x + b + (alpha / r) * (B A x + S x)

A (r x in) and B (out x r) are the low-rank factors; S is sparse with N non-zeros on a FIXED
support Omega chosen from W before tuning. Only A, B and the N values of S train.

S is stored compactly: `sparse_values` (N, trainable) and `sparse_index` (2 x N: rows, cols,
a buffer). S x is computed by gather / index_add, so forward and backward cost O(tokens x N)
and no dense out x in tensor ever exists for S, its mask or its gradient. (The authors keep a
dense S and a mask; that makes S's gradient and optimizer state O(out x in).)
"""
from __future__ import annotations

import math

import torch
from torch import nn


class _SparseMatmul(torch.autograd.Function):
    """out[..., rows[i]] += values[i] * x[..., cols[i]]  (S x with S in coordinate form)."""

    @staticmethod
    def forward(ctx, x, values, rows, cols, out_features: int):
        ctx.save_for_backward(x, values, rows, cols)
        out = x.new_zeros(*x.shape[:-1], out_features)
        return out.index_add_(-1, rows, x.index_select(-1, cols) * values)

    @staticmethod
    def backward(ctx, grad_out):
        x, values, rows, cols = ctx.saved_tensors
        g = grad_out.index_select(-1, rows)  # (..., N): the only gradient entries S touches
        grad_x = grad_values = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.zeros_like(x).index_add_(-1, cols, g * values)
        if ctx.needs_input_grad[1]:
            grad_values = (g * x.index_select(-1, cols)).reshape(-1, values.numel()).sum(0)
        return grad_x, grad_values, None, None, None


def sparse_matmul(x: torch.Tensor, values: torch.Tensor, index: torch.Tensor, out_features: int):
    """S x for S given as (values, index=[rows; cols]); x is (..., in)."""
    return _SparseMatmul.apply(x, values.to(x.dtype), index[0], index[1], out_features)


class SparseLowRankDelta(nn.Module):
    """(alpha / r) * (B A + S) applied to x, for one weight matrix (or one slice of a fused one)."""

    def __init__(self, in_features: int, out_features: int, r: int, alpha: float,
                 index: torch.Tensor, dropout: float = 0.0):
        super().__init__()
        self.in_features, self.out_features, self.r = in_features, out_features, r
        self.scaling = alpha / r
        self.lora_A = nn.Parameter(torch.empty(r, in_features))
        self.lora_B = nn.Parameter(torch.zeros(out_features, r))           # update is 0 at step 0
        self.sparse_values = nn.Parameter(torch.zeros(index.shape[1]))     # S = 0 at step 0
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
        x = self.dropout(x)
        low_rank = nn.functional.linear(nn.functional.linear(x, self.lora_A), self.lora_B)  # B A x
        sparse = sparse_matmul(x, self.sparse_values, self.sparse_index, self.out_features)  # S x
        return self.scaling * (low_rank + sparse)

    def delta_weight(self) -> torch.Tensor:
        """The dense out x in update (alpha / r)(B A + S): for merging and export only."""
        w = self.lora_B @ self.lora_A
        flat = self.sparse_index[0] * self.in_features + self.sparse_index[1]
        w = w.reshape(-1).index_add(0, flat, self.sparse_values.to(w.dtype)).reshape(w.shape)
        return self.scaling * w
