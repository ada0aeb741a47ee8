"""Interpolation: one mechanism for slerp, nuslerp, multislerp, karcher and model_stock (Gram statistics of the
inputs turned into the coefficients of a linear combination)."""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor

from .rows import row_chunks, row_sum, rows2d


# ----------------------------------------------------------------------------------------------------------------
# Gram statistics: one mechanism for slerp, nuslerp, multislerp, karcher and model_stock
#
# Every one of these methods outputs a linear combination of its inputs whose coefficients depend only on the
# inputs' inner products.  Blocks emit per-row Gram matrices, `gram_total` sums them exactly, a solver turns the
# Gram matrix into coefficients and `lincomb` applies them block by block.
# ----------------------------------------------------------------------------------------------------------------


def row_gram(xs: Sequence[Tensor]) -> Tensor:
    """float64 ``[rows, n, n]``: inner products of the flattened rows of the n inputs (0-d/1-d: one row).

    Products of float32 values are exact in float64; each row's sum has a fixed order (see `row_sum`).
    """
    x2 = [rows2d(x) for x in xs]
    n = len(x2)
    out = torch.empty(x2[0].shape[0], n, n, dtype=torch.float64)
    for a, b in row_chunks(*x2[0].shape):          # per-row sums: any grouping of the rows gives the same bits
        ms = [x[a:b].to(torch.float64) for x in x2]
        for i in range(n):
            for j in range(i, n):
                s = row_sum(ms[i] * ms[j])
                out[a:b, i, j] = s
                out[a:b, j, i] = s
    return out


def gram_total(parts: Sequence[Tensor]) -> Tensor:
    """float64 ``[n, n]`` whole-tensor Gram matrix: each entry the exact (fsum) sum of all rows' values."""
    rows = torch.cat(list(parts))
    n = rows.shape[1]
    out = torch.empty(n, n, dtype=torch.float64)
    for i in range(n):
        for j in range(i, n):
            out[i, j] = out[j, i] = math.fsum(rows[:, i, j].tolist())
    return out


# Column Gram (mergekit nuslerp with nuslerp_row_wise, which interpolates the vectors along dim 0, i.e. the
# columns of the [rows, row_numel] view).  Column sums run across blocks, so each block's partial is an exact
# integer super-accumulator: every float64 product m * 2^e is split into 24-bit limbs at fixed bit positions and
# integer addition is associative, hence the total is exact whatever the blocking.
_LIMB = 24
_BIAS = 352  # smallest product of float32 subnormals is 2^-298; its 53-bit significand starts above 2^-352
COL_GRAM_LIMBS = (256 + _BIAS) // _LIMB + 4  # int64 limbs per column Gram entry (for the planner's nbytes)


def _limb_sums(p: Tensor) -> Tensor:
    """int64 ``[cols, NLIMBS]``: exact per-column sums of a float64 ``[rows, cols]`` tensor, as limbs."""
    rows, cols = p.shape
    mant, exp = torch.frexp(p)
    sig = (mant * 2.0**53).to(torch.int64)  # exact: |mant| < 1 has 53 significant bits
    sign = torch.sign(sig)
    mag = sig.abs()
    pos = exp.to(torch.int64) - 53 + _BIAS  # value = sig * 2^(pos - BIAS)
    limb, shift = pos // _LIMB, pos % _LIMB
    col_base = torch.arange(cols, dtype=torch.int64).expand(rows, cols) * COL_GRAM_LIMBS
    acc = torch.zeros(cols * COL_GRAM_LIMBS, dtype=torch.int64)
    mask = (1 << _LIMB) - 1
    for j in range(3):  # 53-bit significand = 3 chunks of 24 bits
        chunk = ((mag >> (_LIMB * j)) & mask) << shift
        for part, val in ((0, chunk & mask), (1, chunk >> _LIMB)):
            acc.index_add_(0, (col_base + limb + j + part).reshape(-1), (sign * val).reshape(-1))
    return acc.reshape(cols, COL_GRAM_LIMBS)


def col_gram(xs: Sequence[Tensor]) -> Tensor:
    """int64 ``[cols, n, n, NLIMBS]`` partial of the per-column Gram matrices of a block; reduce with
    `col_gram_total`.  Columns are those of the ``[rows, row_numel]`` view.  A 0-d/1-d tensor is a single
    vector for every mergekit mode, so it has no column Gram: use `row_gram`/`gram_total` for it."""
    if xs[0].dim() < 2:
        raise ValueError("col_gram: a 0-d/1-d tensor is one vector; use row_gram/gram_total")
    ms = [rows2d(x).to(torch.float64) for x in xs]
    n = len(ms)
    out = torch.empty(ms[0].shape[1], n, n, COL_GRAM_LIMBS, dtype=torch.int64)
    for i in range(n):
        for j in range(i, n):
            s = _limb_sums(ms[i] * ms[j])
            out[:, i, j] = s
            out[:, j, i] = s
    return out


def col_gram_total(parts: Sequence[Tensor]) -> Tensor:
    """float64 ``[cols, n, n]`` per-column Gram matrices, correctly rounded from the exact integer sums."""
    acc = torch.stack(list(parts)).sum(dim=0)
    cols, n = acc.shape[0], acc.shape[1]
    weights = [1 << (_LIMB * k) for k in range(COL_GRAM_LIMBS)]
    flat = [
        math.ldexp(float(sum(l * w for l, w in zip(limbs, weights))), -_BIAS)
        for limbs in acc.reshape(-1, COL_GRAM_LIMBS).tolist()
    ]
    return torch.tensor(flat, dtype=torch.float64).reshape(cols, n, n)


def lincomb_cols(xs: Sequence[Tensor], coeffs: Tensor) -> Tensor:
    """``y = sum_i c_i x_i`` with per-column float64 coefficients ``[cols, n]`` (columns of the ``[rows,
    row_numel]`` view), accumulated in float64."""
    shape = xs[0].shape
    if coeffs.dim() != 2 or coeffs.shape[1] != len(xs):
        raise ValueError(f"lincomb_cols: coefficients of shape {tuple(coeffs.shape)} for {len(xs)} tensors")
    c = coeffs.to(torch.float64)
    acc = None
    for i, x in enumerate(xs):
        term = rows2d(x).to(torch.float64) * c[:, i]
        acc = term if acc is None else acc + term
    return acc.to(torch.float32).reshape(shape)


def _per_matrix(G: Tensor, solve, width: int) -> Tensor:
    """Apply a 2-d Gram solver to ``[n, n]`` or to each matrix of ``[rows, n, n]``."""
    G = G.to(torch.float64)
    if G.dim() == 2:
        return solve(G)
    if G.shape[0] == 0:
        return torch.empty(0, width, dtype=torch.float64)
    return torch.stack([solve(g) for g in G])


def slerp_coeffs(G: Tensor, t: float) -> Tensor:
    """Coefficients ``[c0, c1]`` (float64 ``[2]`` or ``[rows, 2]``) of slerp between base v0 and v1 (methods.md).

    Norms <= 1e-8 leave a vector unnormalised; ``|dot| > 0.9995`` falls back to lerp; otherwise
    ``c0 = sin((1-t) theta)/sin theta``, ``c1 = sin(t theta)/sin theta`` on the unnormalised tensors.
    """

    def solve(g: Tensor) -> Tensor:
        n0, n1 = math.sqrt(g[0, 0]), math.sqrt(g[1, 1])
        s0 = 1.0 / n0 if n0 > 1e-8 else 1.0
        s1 = 1.0 / n1 if n1 > 1e-8 else 1.0
        dot = float(g[0, 1]) * s0 * s1
        if abs(dot) > 0.9995:
            return torch.tensor([1.0 - t, t], dtype=torch.float64)
        theta = math.acos(dot)
        sin_theta = math.sin(theta)
        theta_t = theta * t
        return torch.tensor([math.sin(theta - theta_t) / sin_theta, math.sin(theta_t) / sin_theta], dtype=torch.float64)

    return _per_matrix(G, solve, 2)


def nuslerp_t(weights: Sequence[float]) -> float:
    """mergekit nuslerp's interpolation factor from the two models' weights: ``w1/(w0+w1)``, 0.5 when the sum is
    ~0 (``|sum| < 1e-6``)."""
    if len(weights) != 2:
        raise ValueError(f"nuslerp needs exactly two weighted models, got {len(weights)}")
    total = weights[0] + weights[1]
    return 0.5 if abs(total) < 1e-6 else weights[1] / total


def nuslerp_coeffs(G: Tensor, weights: Sequence[float], eps: float = 1e-8) -> Tensor:
    """Coefficients ``[c0, c1]`` (float64 ``[2]`` / ``[rows, 2]`` / ``[cols, 2]``) of mergekit's nuslerp.

    mergekit (``nuslerp``): t = `nuslerp_t`; unit vectors with norms clamped to >= 1e-7; ``theta =
    acos(clamp(cos, -1, 1))``; lerp when ``|sin theta| < eps``, else the slerp weights.  Unlike slerp there is
    no 0.9995 threshold.  With a base model mergekit interpolates the task vectors and adds the base back: pass
    the Gram matrix of the deltas and use `with_base`.  Which Gram: ``nuslerp_flatten`` (default) -> whole tensor
    (`gram_total`); flatten off and row_wise off -> vectors along the last dim (`row_gram` of a 2-d tensor);
    flatten off and ``nuslerp_row_wise`` on -> vectors along dim 0, i.e. columns (`col_gram_total`,
    `lincomb_cols`).  A 1-d tensor is one vector in every mode.
    """
    t = nuslerp_t(weights)

    def solve(g: Tensor) -> Tensor:
        n0, n1 = max(math.sqrt(g[0, 0]), 1e-7), max(math.sqrt(g[1, 1]), 1e-7)
        cos_theta = min(max(float(g[0, 1]) / (n0 * n1), -1.0), 1.0)
        theta = math.acos(cos_theta)
        sin_theta = math.sin(theta)
        if abs(sin_theta) < eps:
            return torch.tensor([1.0 - t, t], dtype=torch.float64)
        return torch.tensor(
            [math.sin((1 - t) * theta) / sin_theta, math.sin(t * theta) / sin_theta], dtype=torch.float64
        )

    return _per_matrix(G, solve, 2)


def multislerp_coeffs(
    G: Tensor, weights: Sequence[float], normalize_weights: bool = True, eps: float = 1e-8
) -> Tensor:
    """Coefficients (float64 ``[n]`` / ``[rows, n]``) of mergekit's multislerp over the n inputs.

    mergekit: weights normalised to sum 1 (``normalize_weights``); units ``x_i/(||x_i|| + eps)``; weighted mean
    of units normalised; tangent vectors at the mean averaged with the weights; exponential map back with
    ``||tangent|| + eps``; scaled by ``sum_i w_i ||x_i||``.  A ~zero weighted mean falls back to ``w0 x0 + w1 x1``
    for two inputs and is an error otherwise.  With a base model pass the deltas' Gram and use `with_base`.
    """
    if len(weights) != G.shape[-1]:
        raise ValueError(f"multislerp: {len(weights)} weights for {G.shape[-1]} tensors")
    w = torch.tensor(list(weights), dtype=torch.float64)
    if normalize_weights:
        w = w / w.sum()

    def solve(g: Tensor) -> Tensor:
        norms = torch.sqrt(torch.diagonal(g).clamp(min=0))
        unit_scale = 1.0 / (norms + eps)
        mean = w * unit_scale
        mean_norm = math.sqrt(max(float(mean @ g @ mean), 0.0))
        if mean_norm < eps:
            if len(w) == 2:
                return w.clone()
            raise ValueError(
                "multislerp: the weighted sum of the inputs is zero (antipodal inputs with balancing weights)"
            )
        mean = mean / mean_norm
        dots = unit_scale * (g @ mean)
        tangent = w * unit_scale - float(w @ dots) * mean
        tangent_norm = math.sqrt(max(float(tangent @ g @ tangent), 0.0)) + eps
        result = mean * math.cos(tangent_norm) + tangent * (math.sin(tangent_norm) / tangent_norm)
        return result * float(norms @ w)

    return _per_matrix(G, solve, len(w))


def karcher_coeffs(
    G: Tensor, weights: Sequence[float] | None = None, max_iter: int = 10, tol: float = 1e-5
) -> Tensor:
    """Coefficients (float64 ``[n]`` / ``[rows, n]``) of mergekit's Karcher mean, iterated in coefficient space.

    Every iterate is a combination of the inputs, so it is tracked by its coefficients and all inner products
    come from G.  mergekit (``karcher_merge_tensors``): ``weights`` default to 1/n (mergekit has no per-model
    weights); inputs with norm <= tol are dropped and the others' weights renormalised for the direction; start
    at the normalised weighted mean of units (first unit if that is < tol); each step sums
    ``a_i theta_i/sin(theta_i) (u_i - dot_i u)`` over inputs with ``theta_i >= tol``, stops when the tangent norm
    < tol, moves along the geodesic and renormalises; the result is scaled by ``sum_i w_i ||x_i||`` with the raw
    weights (zero-norm inputs included).  One input returns it unchanged; all-zero inputs give zero.
    """
    if weights is not None and len(weights) != G.shape[-1]:
        raise ValueError(f"karcher: {len(weights)} weights for {G.shape[-1]} tensors")

    def solve(g: Tensor) -> Tensor:
        n = g.shape[0]
        alphas = [1.0 / n] * n if weights is None else list(weights)
        eye = torch.eye(n, dtype=torch.float64)
        if n == 1:
            return eye[0]
        norms = [math.sqrt(max(float(g[i, i]), 0.0)) for i in range(n)]
        valid = [i for i in range(n) if norms[i] > tol]
        if not valid:
            return torch.zeros(n, dtype=torch.float64)
        alpha_sum = sum(alphas[i] for i in valid)
        a = {i: alphas[i] / alpha_sum for i in valid}
        units = {i: eye[i] / norms[i] for i in valid}

        def norm_of(c: Tensor) -> float:
            return math.sqrt(max(float(c @ g @ c), 0.0))

        u = sum((a[i] * units[i] for i in valid), torch.zeros(n, dtype=torch.float64))
        u_norm = norm_of(u)
        u = units[valid[0]].clone() if u_norm < tol else u / u_norm
        for _ in range(max_iter):
            gu = g @ u
            tangent = torch.zeros(n, dtype=torch.float64)
            for i in valid:
                dot = min(max(float(gu[i]) / norms[i], -1.0), 1.0)
                theta = math.acos(dot)
                if theta < tol:
                    continue
                tangent = tangent + a[i] * (theta / math.sin(theta)) * (units[i] - dot * u)
            t_norm = norm_of(tangent)
            if t_norm < tol:
                break
            u = math.cos(t_norm) * u + math.sin(t_norm) * (tangent / t_norm)
            u_norm = norm_of(u)
            if u_norm > tol:
                u = u / u_norm
        return u * sum(alpha * nrm for alpha, nrm in zip(alphas, norms))

    return _per_matrix(G, solve, G.shape[-1])


def model_stock_t(G_deltas: Tensor) -> Tensor:
    """Model-stock interpolation ratio t (float64 0-d, or ``[rows]`` for filter_wise) from the deltas' Gram.

    mergekit: each pair's ``cos = <d_i, d_j> / max(||d_i|| ||d_j||, 1e-6)`` is clamped to [-1, 1], the pairs are
    averaged, ``t = N cos / (1 + (N-1) cos)`` (no guard for ``cos = -1/(N-1)``, as in mergekit).
    """
    G = G_deltas.to(torch.float64)
    N = G.shape[-1]
    if N < 2:
        raise ValueError(f"model_stock needs at least two fine-tuned models, got {N}")
    norms = torch.sqrt(torch.diagonal(G, dim1=-2, dim2=-1).clamp(min=0))
    cosines = []
    for i in range(N):
        for j in range(i + 1, N):
            prod = (norms[..., i] * norms[..., j]).clamp(min=1e-6)
            cosines.append((G[..., i, j] / prod).clamp(-1, 1))
    cos = torch.stack(cosines).mean(dim=0)
    return N * cos / (1 + (N - 1) * cos)


def model_stock_coeffs(t: Tensor, n: int) -> Tensor:
    """`lincomb` coefficients over ``[base, x_1..x_n]``: ``[1 - t, t/n, ..., t/n]`` (``[n+1]`` or ``[rows, n+1]``),
    i.e. ``y = t mean_i(x_i) + (1 - t) b``."""
    t = t.to(torch.float64)
    return torch.cat([(1 - t).unsqueeze(-1), (t / n).unsqueeze(-1).expand(*t.shape, n)], dim=-1)


def with_base(coeffs: Tensor) -> Tensor:
    """Turn coefficients over deltas ``d_i = x_i - b`` into coefficients over ``[b, x_1..x_n]``:
    ``b + sum c_i d_i = (1 - sum c_i) b + sum c_i x_i``, so the combination needs no delta tensors."""
    c = coeffs.to(torch.float64)
    return torch.cat([(1 - c.sum(dim=-1)).unsqueeze(-1), c], dim=-1)
