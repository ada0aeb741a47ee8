"""Element-wise linear combinations: task-vector deltas, scaling, weighted sums (linear, task arithmetic), the
Gram methods' `lincomb`, Fisher-weighted averaging and nearswap."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from .rows import row_chunks, rows2d


# ----------------------------------------------------------------------------------------------------------------
# Element-wise / per-row
# ----------------------------------------------------------------------------------------------------------------


def delta(x: Tensor, b: Tensor) -> Tensor:
    """Task vector of a model against the base."""
    return x - b


def scale(x: Tensor, factor: float) -> Tensor:
    """Multiply by a scalar (the scalar is rounded to float32 first, as torch does for a float32 tensor)."""
    return x * factor


def weighted_sum(xs: Sequence[Tensor], weights: Sequence[float]) -> Tensor:
    """``sum_i w_i x_i`` accumulated in list order with separate multiply and add, so every element is the same
    sequence of rounded float32 operations in any block."""
    if len(xs) != len(weights) or not xs:
        raise ValueError(f"weighted_sum: {len(xs)} tensors for {len(weights)} weights")
    acc = xs[0] * weights[0]
    for x, w in zip(xs[1:], weights[1:]):
        acc = acc + x * w
    return acc


def lincomb(xs: Sequence[Tensor], coeffs: Tensor) -> Tensor:
    """``y = sum_i c_i x_i`` with float64 coefficients, accumulated in float64 and rounded once to float32.

    ``coeffs`` is ``[n]`` (one combination for the whole tensor) or ``[rows, n]`` for the rows of this block
    (row-wise variants; a 0-d/1-d tensor is one row).  Float64 accumulation keeps slerp-style combinations of
    nearly opposite terms accurate; it is element-wise, hence blocking-invariant, and is computed a few rows at a
    time (`row_chunks`): the same bits with small float64 temporaries.
    """
    n = len(xs)
    if coeffs.shape[-1] != n or coeffs.dim() not in (1, 2):
        raise ValueError(f"lincomb: coefficients of shape {tuple(coeffs.shape)} for {n} tensors")
    c = coeffs.to(torch.float64)
    x2 = [rows2d(x) for x in xs]
    rows = x2[0].shape[0]
    if c.dim() == 2:
        if c.shape[0] != rows:
            raise ValueError(f"lincomb: {c.shape[0]} coefficient rows for a block of {rows} rows")
        c = c.reshape(rows, 1, n)          # each row's coefficient broadcast over the row's elements
    out = torch.empty(x2[0].shape, dtype=torch.float32)
    for a, b in row_chunks(*x2[0].shape):
        cc = c[a:b] if c.dim() == 3 else c
        acc = None
        for i, x in enumerate(x2):
            term = x[a:b].to(torch.float64) * cc[..., i]
            acc = term if acc is None else acc + term
        out[a:b] = acc
    return out.reshape(xs[0].shape)


# ----------------------------------------------------------------------------------------------------------------
# Fisher-weighted averaging
# ----------------------------------------------------------------------------------------------------------------


def fisher_merge(xs: Sequence[Tensor], fs: Sequence[Tensor], weights: Sequence[float]) -> Tensor:
    """``sum_i w_i F_i x_i / sum_i w_i F_i`` element-wise; where the denominator is exactly 0 (no model has any
    importance there) the plain weighted mean ``sum_i w_i x_i / sum_i w_i`` is used instead."""
    num = None
    den = None
    for x, f, w in zip(xs, fs, weights):
        wf = f * w
        num = wf * x if num is None else num + wf * x
        den = wf if den is None else den + wf
    assert num is not None and den is not None
    mean = weighted_sum(xs, weights) / sum(weights)
    return torch.where(den == 0, mean, num / torch.where(den == 0, 1.0, den))


def nearswap(base: Tensor, x: Tensor, t: float) -> Tensor:
    """NearSwap: ``w = clamp(t / max(|b - x|, 1e-6), 0, 1)``, ``y = w x + (1 - w) b``: entries where the models are
    within ``t`` of each other take x, the others move toward x by ``t / |b - x|``."""
    w = (t / (base - x).abs().clamp(min=1e-6)).clamp(0, 1)
    return w * x + (1 - w) * base
