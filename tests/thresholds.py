"""Hard-threshold decisions compared across CPUs.

A method that keeps an entry where a computed quantity reaches a threshold (arcee_fusion's importance against its
fence, a top-k by magnitude or by variance, the sign of a sum) makes a yes/no decision. When that quantity comes out
of float32 arithmetic whose last bits differ between CPUs (vector widths change summation orders; exp and log
differ by an ulp), an entry whose quantity lies within rounding distance of the threshold may come out either way,
and a stored expectation made on one machine then holds there only. So a parity test compares such outputs in two
parts:

- the *decisive quantity* of every entry, computed by the independent reference in float64 (the decisions exact
  arithmetic makes), with its *rounding distance* (how far float32 rounding may move it relative to its threshold);
  entries within that distance are *ambiguous*;
- every entry that is not ambiguous must match the expectation; an ambiguous one may instead take the decision's
  other outcome (and nothing else), and the number of those flips is counted against the number of ambiguous
  entries, which the test bounds so that the data stays discriminating.

Where the decisive quantity is exact on every IEEE machine (|x - b| is one correctly rounded subtraction), the
distance is 0 and only an exact tie straddling a cut is ambiguous (another tool's unstable sort may break it either
way): the tests assert the data has none, so those comparisons stay exact.

arcee_fusion's importance, |x - b| * KL(softmax(x) + 1e-8 || softmax(b) + 1e-8), is the one decisive quantity here
that rounding moves: the KL of two nearly equal distributions is a small difference of much larger terms, and the
rounding of each softmax's normaliser shifts a whole row's KL (by 0.3% to 1.4% on the parity models). Its rounding
distance is measured on the reference itself: the formula evaluated in float32 with torch's reductions and with
sequential sums in both directions; twice the largest move of an entry's importance plus twice the largest move of
the threshold.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

U32 = 2.0 ** -24                      # float32 unit roundoff
F64 = torch.float64


@dataclass(frozen=True)
class Decisions:
    """Entry-wise keep decisions `key >= thr` in float64 and the rounding distance of `key - thr` per entry."""

    key: torch.Tensor
    thr: float
    dist: torch.Tensor

    @property
    def keep(self) -> torch.Tensor:
        return self.key >= self.thr

    @property
    def ambiguous(self) -> torch.Tensor:
        return (self.key - self.thr).abs() <= self.dist


def _sum_last(t: torch.Tensor, order: str) -> torch.Tensor:
    """Sum over the last dim (kept): torch's reduction, one element at a time left to right / right to left, or
    pairwise (halves summed recursively)."""
    if order == "torch":
        return t.sum(dim=-1, keepdim=True)
    if order == "pairwise":
        while t.shape[-1] > 1:
            half = t.shape[-1] // 2
            rest = t[..., 2 * half:]
            t = torch.cat([t[..., :half] + t[..., half:2 * half], rest], dim=-1)
        return t
    cols = range(t.shape[-1]) if order == "ltr" else reversed(range(t.shape[-1]))
    acc = torch.zeros(t.shape[:-1] + (1,), dtype=t.dtype)
    for j in cols:
        acc = acc + t[..., j:j + 1]
    return acc


def _softmax(v: torch.Tensor, order: str) -> torch.Tensor:
    if order == "torch":
        return torch.softmax(v, dim=-1)
    if order == "logsoftmax":
        return torch.log_softmax(v, dim=-1).exp()
    e = torch.exp(v - v.max(dim=-1, keepdim=True).values)
    return e / _sum_last(e, order)


def fusion_importance(base: torch.Tensor, x: torch.Tensor, dtype: torch.dtype = F64,
                      order: str = "torch") -> torch.Tensor:
    """tests/reference.py's arcee_fusion importance in `dtype`, its sums in `order` (torch | ltr | rtl | pairwise;
    logsoftmax: torch's sums, the softmax as exp(log_softmax))."""
    b, x = base.to(dtype), x.to(dtype)
    p = _softmax(x, order) + 1e-8
    q = _softmax(b, order) + 1e-8
    return (x - b).abs() * _sum_last(p * torch.log(p / q), "torch" if order == "logsoftmax" else order)


def fusion_threshold(imp: torch.Tensor) -> float:
    """median + 1.5 IQR of the importances, the quantiles order statistics at floor(q (n - 1))."""
    s = torch.sort(imp.reshape(-1)).values
    n = s.numel()
    return float(s[(n - 1) // 2] + 1.5 * (s[3 * (n - 1) // 4] - s[(n - 1) // 4]))


def fusion_decisions(base: torch.Tensor, x: torch.Tensor) -> Decisions:
    """arcee_fusion's keep decisions (importance >= threshold) in float64, with their rounding distance."""
    imp = fusion_importance(base, x).reshape(base.shape)
    thr = fusion_threshold(imp)
    move, move_thr = torch.zeros_like(imp), 0.0
    for order in ("torch", "ltr", "rtl"):
        imp32 = fusion_importance(base, x, torch.float32, order).reshape(base.shape).to(F64)
        move = torch.maximum(move, (imp32 - imp).abs())
        move_thr = max(move_thr, abs(fusion_threshold(imp32) - thr))
    return Decisions(imp, thr, 2 * (move + move_thr))


def slerp(a: torch.Tensor, b: torch.Tensor, t: float, dtype: torch.dtype = F64, order: str = "torch",
          dot_threshold: float = 0.9995) -> torch.Tensor:
    """tests/reference.py's slerp (whole flattened tensors; a lerp when the directions are nearly parallel) in
    `dtype`, its norms and dot product summed in `order`."""
    a, b = a.to(dtype), b.to(dtype)
    fa, fb = a.reshape(1, -1), b.reshape(1, -1)
    ua = fa / _sum_last(fa * fa, order).sqrt()
    ub = fb / _sum_last(fb * fb, order).sqrt()
    dot = float(_sum_last(ua * ub, order))
    if abs(dot) > dot_threshold:
        return (1.0 - t) * a + t * b
    theta = math.acos(max(-1.0, min(1.0, dot)))
    return (math.sin((1.0 - t) * theta) / math.sin(theta)) * a + (math.sin(t * theta) / math.sin(theta)) * b


def slerp_values(a: torch.Tensor, b: torch.Tensor, t: float) -> tuple[torch.Tensor, torch.Tensor]:
    """A slerp stage's output in float64 and its rounding distance per entry: twice the largest difference from it
    among float32 evaluations summing with torch's reductions and sequentially in both directions."""
    y = slerp(a, b, t)
    move = torch.zeros_like(y)
    for order in ("torch", "ltr", "rtl"):
        move = torch.maximum(move, (slerp(a, b, t, torch.float32, order).to(F64) - y).abs())
    return y, 2 * move


def topk_ambiguous(key: torch.Tensor, k: int, dist: "torch.Tensor | float" = 0.0) -> torch.Tensor:
    """Entries of a top-k by `key` (float64) that could cross the cut if each key moved by up to `dist`: none when
    the k-th and (k+1)-th largest keys are more than twice the largest distance apart."""
    flat = key.reshape(-1).to(F64)
    if k <= 0 or k >= flat.numel():
        return torch.zeros(key.shape, dtype=torch.bool)
    d = float(torch.as_tensor(dist, dtype=F64).max())
    top = torch.topk(flat, k + 1).values
    lo_keep, hi_drop = float(top[k - 1]), float(top[k])
    if lo_keep - hi_drop > 2 * d:
        return torch.zeros(key.shape, dtype=torch.bool)
    return ((flat >= hi_drop - 2 * d) & (flat <= lo_keep + 2 * d)).reshape(key.shape)


def sign_ambiguous(terms: list[torch.Tensor]) -> torch.Tensor:
    """Entries whose sum of float32 `terms` (each one rounded product) is within rounding distance of 0, in any
    order of summation: |sum| <= (n + 1) u sum |terms| (all-zero terms sum to 0 exactly everywhere)."""
    exact = sum(t.to(F64) for t in terms)
    mag = sum(t.to(F64).abs() for t in terms)
    return (exact.abs() <= (len(terms) + 1) * U32 * mag) & (mag > 0)


def compare(got: torch.Tensor, expected: torch.Tensor, ambiguous: torch.Tensor,
            outcomes: tuple[torch.Tensor, torch.Tensor], tol: float) -> tuple[int, int]:
    """(entries that are wrong, ambiguous entries that took the other outcome). An entry is right when it is
    within `tol` of the expectation, or when it is ambiguous and within `tol` of one of the decision's
    `outcomes` (kept, dropped)."""
    g, e = got.to(F64), expected.to(F64)
    near = (g - e).abs() <= tol
    other = torch.zeros_like(near)
    for o in outcomes:
        other |= (g - o.to(F64)).abs() <= tol
    flipped = ~near & ambiguous & other
    return int((~near & ~flipped).sum()), int(flipped.sum())
