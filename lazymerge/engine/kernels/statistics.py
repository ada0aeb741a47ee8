"""Whole-tensor statistics from per-block partials: norms for rescale_norm, SCE's variance key and weights,
arcee_fusion's importance and the quantile ranks it is cut at."""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor

from .rows import row_sum, rows2d


# ----------------------------------------------------------------------------------------------------------------
# Norms for rescale_norm
# ----------------------------------------------------------------------------------------------------------------

_NORM_KINDS = ("l1", "l2", "linf")


def norm_partials(x_block: Tensor, kind: str) -> Tensor:
    """float64 ``[rows]`` per-row partial of the chosen norm: sum |x|, sum x^2, or max |x|."""
    if kind not in _NORM_KINDS:
        raise ValueError(f"unknown norm {kind!r} (expected one of {', '.join(_NORM_KINDS)})")
    m = rows2d(x_block).to(torch.float64)
    if kind == "linf":
        return m.abs().amax(dim=1) if m.shape[1] else torch.zeros(m.shape[0], dtype=torch.float64)
    return row_sum(m.abs() if kind == "l1" else m * m)


def norm_from_partials(parts: Sequence[Tensor], kind: str) -> float:
    """The whole tensor's norm from all blocks' partials, exactly (fsum), whatever the grouping into blocks."""
    if kind not in _NORM_KINDS:
        raise ValueError(f"unknown norm {kind!r} (expected one of {', '.join(_NORM_KINDS)})")
    values = torch.cat([p.reshape(-1) for p in parts]).tolist()
    if kind == "linf":
        return max(values, default=0.0)
    total = math.fsum(values)
    return math.sqrt(total) if kind == "l2" else total


# ----------------------------------------------------------------------------------------------------------------
# SCE and arcee_fusion (docs/methods.md): SCE's weights are exact sums of squares (`norm_partials`); its variance
# key is selected by the radix top-k (`topk`), arcee_fusion's quantiles by the exact order statistics there.
# Element-wise parts repeat mergekit 0.1.5's float32 operations in its order, so they are the same bits in any block.
# ----------------------------------------------------------------------------------------------------------------


def variance_key(ds: Sequence[Tensor]) -> Tensor:
    """float32 population variance (``unbiased=False``) of the task vectors at every entry: the mean and the
    squared deviations in float64 (products of float32 values are exact there), rounded once to float32.  The
    selection key of SCE; mergekit computes it in float32 with ``torch.var``, which may differ in the last bit
    and so, at an exact tie of two variances, in which entry is kept."""
    ms = [d.to(torch.float64) for d in ds]
    total = ms[0].clone()
    for m in ms[1:]:
        total.add_(m)
    mean = total.div_(len(ms))
    acc = None
    for m in ms:
        dev = (m - mean).square_()
        acc = dev if acc is None else acc.add_(dev)
    assert acc is not None
    return acc.div_(len(ms)).to(torch.float32)


def sce_weights(sq_partials: Sequence[Sequence[Tensor]], numel: int) -> list[float]:
    """SCE "calculate": ``mean(d_i^2) / sum_j mean(d_j^2)`` per model, from each model's per-row float64 sums of
    squares of its selected task vector (`norm_partials(.., "l2")` of every block) summed exactly (fsum); ``1/n``
    each when that sum is < 1e-6 (mergekit's absolute threshold)."""
    sq_sums = [math.fsum(torch.cat([p.reshape(-1) for p in parts]).tolist()) for parts in sq_partials]
    means = [s / numel for s in sq_sums] if numel else [0.0] * len(sq_sums)
    total = sum(means)
    if abs(total) < 1e-6:
        return [1.0 / len(means)] * len(means)
    return [m / total for m in means]


def fusion_importance(x: Tensor, base: Tensor) -> Tensor:
    """arcee_fusion importance: ``|x - b| * KL(softmax(x) + 1e-8 || softmax(b) + 1e-8)``, the divergence summed
    along the last dim (per row of a 2-d tensor; a 1-d tensor is one row).  The sum runs per row with a padding
    row (`row_sum`), so its order does not depend on how many rows a block has."""
    shape = x.shape
    last = shape[-1] if x.dim() else 1
    p = torch.softmax(x, dim=-1) + 1e-8
    q = torch.softmax(base, dim=-1) + 1e-8
    terms = (p * torch.log(p / q)).reshape(-1, last)
    kl = row_sum(terms).reshape(*shape[:-1], 1) if x.dim() else row_sum(terms).reshape(())
    return (x - base).abs() * kl


def fusion_quantile_ranks(numel: int) -> list[int]:
    """Ranks of arcee_fusion's q1, median and q3: ``floor(q (n - 1))`` for q = 0.25, 0.5, 0.75 (mergekit indexes
    the sorted importances with ``(q * (n - 1)).long()``: no interpolation)."""
    return [(numel - 1) // 4, (numel - 1) // 2, 3 * (numel - 1) // 4]


def fusion_apply(x: Tensor, base: Tensor, importance: Tensor, quantiles: Sequence[float]) -> Tensor:
    """arcee_fusion: keep x's change where ``importance >= median + 1.5 (q3 - q1)`` (float32, as mergekit)."""
    q1, med, q3 = (torch.tensor(v, dtype=torch.float32) for v in quantiles)
    threshold = med + 1.5 * (q3 - q1)
    return base + (x - base) * (importance >= threshold).to(torch.float32)
