"""Plain whole-tensor reference formulas for the merge methods, written from /work/shared/methods.md.

No blocks, no graph, no lazymerge code: straightforward float32 torch on whole tensors. Random methods take their
uniform draws `u` (one per element, same shape as the tensor, in [0, 1)) as an input; an element is kept when
`u < p` (Bernoulli with probability p).

Conventions fixed here where methods.md leaves a choice:
- magnitude top-k: ties in |d| at the k-th value are broken by flat index, lower index kept first (the order a
  stable descending sort gives; docs/DESIGN.md: "ties broken by flat index").
- breadcrumbs / della ranks: stable ascending argsort of |d| (equal magnitudes ranked by flat index).
- della on a row of a single element: r = 0 (the (max - min) range is empty).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

F32 = torch.float32


def _f(t: torch.Tensor) -> torch.Tensor:
    return t.to(F32)


# ----------------------------------------------------------------------------------------------------------------
# simple methods
# ----------------------------------------------------------------------------------------------------------------
def linear(xs: Sequence[torch.Tensor], weights: Sequence[float], normalize: bool = True) -> torch.Tensor:
    """y = sum_i w_i x_i  (/ sum_i w_i when normalize)."""
    y = torch.zeros_like(_f(xs[0]))
    for x, w in zip(xs, weights):
        y = y + float(w) * _f(x)
    if normalize:
        y = y / float(sum(weights))
    return y


def passthrough(x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    return _f(x) * float(scale)


def slerp(v0: torch.Tensor, v1: torch.Tensor, t: float, dot_threshold: float = 0.9995,
          eps: float = 1e-8) -> torch.Tensor:
    """Spherical interpolation from v0 (t=0, the base) to v1 (t=1) over the whole flattened tensors."""
    a = _f(v0)
    b = _f(v1)
    fa = a.reshape(-1)
    fb = b.reshape(-1)
    na = torch.linalg.vector_norm(fa)
    nb = torch.linalg.vector_norm(fb)
    u0 = fa / na if float(na) > eps else fa
    u1 = fb / nb if float(nb) > eps else fb
    dot = float((u0 * u1).sum())
    if abs(dot) > dot_threshold:
        return (1.0 - t) * a + t * b
    theta = math.acos(max(-1.0, min(1.0, dot)))
    s = math.sin(theta)
    return (math.sin((1.0 - t) * theta) / s) * a + (math.sin(t * theta) / s) * b


def _rows(t: torch.Tensor) -> torch.Tensor:
    """View as (rows, row_numel); a 0-d or 1-d tensor is one row."""
    if t.dim() <= 1:
        return t.reshape(1, -1)
    return t.reshape(t.shape[0], -1)


def model_stock(base: torch.Tensor, xs: Sequence[torch.Tensor], filter_wise: bool = False) -> torch.Tensor:
    """t = N cos / (1 + (N-1) cos), cos = mean pairwise cosine of the deltas; y = t mean(x) + (1-t) b."""
    b = _f(base)
    xs = [_f(x) for x in xs]
    n = len(xs)
    if n < 2:
        raise ValueError("model_stock needs at least two fine-tuned models")
    if filter_wise:
        ds = [_rows(x - b) for x in xs]
    else:
        ds = [(x - b).reshape(1, -1) for x in xs]
    cos_list = []
    for i in range(n):
        for j in range(i + 1, n):
            num = (ds[i] * ds[j]).sum(dim=1)
            den = (torch.linalg.vector_norm(ds[i], dim=1) * torch.linalg.vector_norm(ds[j], dim=1)).clamp(min=1e-6)
            cos_list.append((num / den).clamp(-1.0, 1.0))
    cos = torch.stack(cos_list).mean(dim=0)                 # (rows,)
    t = n * cos / (1 + (n - 1) * cos)
    mean = sum(xs) / n
    t_b = t.reshape(-1, *([1] * (_rows(b).dim() - 1)))     # (rows, 1)
    y = t_b * _rows(mean) + (1 - t_b) * _rows(b)
    return y.reshape(b.shape)


# ----------------------------------------------------------------------------------------------------------------
# sparsifiers (each returns the sparsified delta, float32)
# ----------------------------------------------------------------------------------------------------------------
def _rescale_norm(d: torch.Tensor, kept: torch.Tensor, norm: str) -> torch.Tensor:
    if norm == "l1":
        before, after = d.abs().sum(), kept.abs().sum()
    elif norm == "l2":
        before, after = torch.linalg.vector_norm(d), torch.linalg.vector_norm(kept)
    elif norm == "linf":
        before, after = d.abs().max(), kept.abs().max()
    else:
        raise ValueError(f"unknown rescale_norm {norm!r}")
    if float(before) < 1e-7 or float(after) < 1e-7:
        return kept
    return kept * (before / after)


def magnitude_mask(d: torch.Tensor, density: float) -> torch.Tensor:
    """Boolean mask of the k = int(density * numel) largest |d| (ties: lower flat index first)."""
    n = d.numel()
    if density >= 1:
        return torch.ones_like(d, dtype=torch.bool)
    k = int(density * n)
    if k <= 0:
        raise ValueError(f"density {density} keeps no entry of a tensor with {n} elements")
    a = _f(d).abs().reshape(-1)
    thr = torch.topk(a, k, largest=True, sorted=True).values[-1]
    mask = a > thr
    need = k - int(mask.sum())
    eq = torch.nonzero(a == thr).flatten()[:need]
    mask[eq] = True
    assert int(mask.sum()) == k
    return mask.reshape(d.shape)


def sparsify_magnitude(d: torch.Tensor, density: float, rescale_norm: str | None = None) -> torch.Tensor:
    d = _f(d)
    if density >= 1:
        return d
    kept = d * magnitude_mask(d, density)
    return _rescale_norm(d, kept, rescale_norm) if rescale_norm else kept


def sparsify_random(d: torch.Tensor, density: float, u: torch.Tensor, rescale: bool = True,
                    rescale_norm: str | None = None) -> torch.Tensor:
    """DARE: keep where u < density, then divide by density (or match the chosen norm)."""
    d = _f(d)
    if density >= 1:
        return d
    assert u.shape == d.shape
    kept = d * (u < density)
    if rescale_norm:
        return _rescale_norm(d, kept, rescale_norm)
    if rescale:
        return kept / density
    return kept


def magnitude_outliers_mask(d: torch.Tensor, density: float, gamma: float = 0.01) -> torch.Tensor:
    """Breadcrumbs: in ascending |d| order keep ranks [bot, n - top)."""
    n = d.numel()
    if density >= 1:
        return torch.ones_like(d, dtype=torch.bool)
    keep = int(density * n)
    top = int(gamma * n)
    bot = n - keep - top
    if bot < 0:
        top += bot
        bot = 0
    order = torch.argsort(_f(d).abs().reshape(-1), stable=True)
    mask = torch.zeros(n, dtype=torch.bool)
    mask[order[bot:n - top]] = True
    return mask.reshape(d.shape)


def sparsify_magnitude_outliers(d: torch.Tensor, density: float, gamma: float = 0.01,
                                rescale_norm: str | None = None) -> torch.Tensor:
    d = _f(d)
    if density >= 1:
        return d
    kept = d * magnitude_outliers_mask(d, density, gamma)
    return _rescale_norm(d, kept, rescale_norm) if rescale_norm else kept


def rank_magnitude_probs(d: torch.Tensor, density: float, epsilon: float = 0.15) -> torch.Tensor:
    """DELLA keep probabilities: p = density - eps + 2 eps r, r = normalised rank of |d| within its row."""
    if not (0 < density - epsilon and density + epsilon < 1):
        raise ValueError("density +/- epsilon must lie in (0, 1)")
    rows = _rows(_f(d)).abs()
    m = rows.shape[1]
    order = torch.argsort(rows, dim=1, stable=True)
    ranks = torch.empty_like(rows)
    ranks.scatter_(1, order, torch.arange(m, dtype=F32).expand(rows.shape[0], m).contiguous())
    r = ranks / (m - 1) if m > 1 else torch.zeros_like(ranks)
    p = (density - epsilon) + r * (2 * epsilon)
    return p.reshape(d.shape)


def sparsify_rank_magnitude(d: torch.Tensor, density: float, u: torch.Tensor, epsilon: float = 0.15,
                            rescale: bool = True, rescale_norm: str | None = None) -> torch.Tensor:
    d = _f(d)
    if density >= 1:
        return d
    p = rank_magnitude_probs(d, density, epsilon)
    assert u.shape == d.shape
    keep = u < p
    kept = d * keep
    if rescale_norm:
        return _rescale_norm(d, kept, rescale_norm)
    if rescale:
        return torch.where(keep, d / p, torch.zeros_like(d))
    return kept


# ----------------------------------------------------------------------------------------------------------------
# weight -> elect -> combine -> add
# ----------------------------------------------------------------------------------------------------------------
def elect_masks(es: Sequence[torch.Tensor], consensus: str = "sum") -> list[torch.Tensor]:
    """Majority sign s (+1 where the sum is >= 0); m_i = sign(e_i) == s (a zero never agrees)."""
    signs = [torch.sign(e) for e in es]
    if consensus == "sum":
        total = sum(es)
    elif consensus == "count":
        total = sum(signs)
    else:
        raise ValueError(consensus)
    s = torch.where(total >= 0, 1.0, -1.0)
    return [sg == s for sg in signs]


def combine(base: torch.Tensor, sparse_deltas: Sequence[torch.Tensor], weights: Sequence[float], *,
            elect: bool, normalize: bool, lambda_: float = 1.0, consensus: str = "sum") -> torch.Tensor:
    b = _f(base)
    es = [float(w) * _f(d) for w, d in zip(weights, sparse_deltas)]
    if elect:
        ms = elect_masks(es, consensus)
        D = sum(e * m for e, m in zip(es, ms))
        div = sum(float(w) * m.to(F32) for w, m in zip(weights, ms))
        div = torch.where(div == 0, torch.ones_like(div), div)
    else:
        D = sum(es)
        div = float(sum(weights))
        if abs(div) < 1e-8:
            div = 1.0
    if normalize:
        D = D / div
    return b + float(lambda_) * D


def _deltas(base, xs):
    b = _f(base)
    return [_f(x) - b for x in xs]


def task_arithmetic(base, xs, weights, lambda_=1.0, normalize=False):
    return combine(base, _deltas(base, xs), weights, elect=False, normalize=normalize, lambda_=lambda_)


def ties(base, xs, weights, densities, normalize=True, lambda_=1.0, consensus="sum", rescale_norm=None):
    sd = [sparsify_magnitude(d, dens, rescale_norm) for d, dens in zip(_deltas(base, xs), densities)]
    return combine(base, sd, weights, elect=True, normalize=normalize, lambda_=lambda_, consensus=consensus)


def _dare(base, xs, weights, densities, us, rescale, rescale_norm):
    return [sparsify_random(d, dens, u, rescale=rescale, rescale_norm=rescale_norm)
            for d, dens, u in zip(_deltas(base, xs), densities, us)]


def dare_linear(base, xs, weights, densities, us, rescale=True, normalize=False, lambda_=1.0, rescale_norm=None):
    sd = _dare(base, xs, weights, densities, us, rescale, rescale_norm)
    return combine(base, sd, weights, elect=False, normalize=normalize, lambda_=lambda_)


def dare_ties(base, xs, weights, densities, us, rescale=True, normalize=False, lambda_=1.0, consensus="sum",
              rescale_norm=None):
    sd = _dare(base, xs, weights, densities, us, rescale, rescale_norm)
    return combine(base, sd, weights, elect=True, normalize=normalize, lambda_=lambda_, consensus=consensus)


def breadcrumbs(base, xs, weights, densities, gammas, normalize=False, lambda_=1.0, rescale_norm=None):
    sd = [sparsify_magnitude_outliers(d, dens, g, rescale_norm)
          for d, dens, g in zip(_deltas(base, xs), densities, gammas)]
    return combine(base, sd, weights, elect=False, normalize=normalize, lambda_=lambda_)


def breadcrumbs_ties(base, xs, weights, densities, gammas, normalize=False, lambda_=1.0, consensus="sum",
                     rescale_norm=None):
    sd = [sparsify_magnitude_outliers(d, dens, g, rescale_norm)
          for d, dens, g in zip(_deltas(base, xs), densities, gammas)]
    return combine(base, sd, weights, elect=True, normalize=normalize, lambda_=lambda_, consensus=consensus)


def _della(base, xs, densities, epsilons, us, rescale, rescale_norm):
    return [sparsify_rank_magnitude(d, dens, u, eps, rescale=rescale, rescale_norm=rescale_norm)
            for d, dens, eps, u in zip(_deltas(base, xs), densities, epsilons, us)]


def della(base, xs, weights, densities, epsilons, us, rescale=True, normalize=True, lambda_=1.0,
          consensus="sum", rescale_norm=None):
    sd = _della(base, xs, densities, epsilons, us, rescale, rescale_norm)
    return combine(base, sd, weights, elect=True, normalize=normalize, lambda_=lambda_, consensus=consensus)


def della_linear(base, xs, weights, densities, epsilons, us, rescale=True, normalize=False, lambda_=1.0,
                 rescale_norm=None):
    sd = _della(base, xs, densities, epsilons, us, rescale, rescale_norm)
    return combine(base, sd, weights, elect=False, normalize=normalize, lambda_=lambda_)


# ----------------------------------------------------------------------------------------------------------------
# newer mergekit methods: sce, nearswap, arcee_fusion, ram, ramplus_tl (docs/methods.md)
# ----------------------------------------------------------------------------------------------------------------
def topk_mask_by(key: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of the k largest entries of `key` (ties: lower flat index first); k = 0 keeps nothing."""
    flat = key.reshape(-1)
    order = torch.sort(flat, descending=True, stable=True).indices
    mask = torch.zeros(flat.numel(), dtype=torch.bool)
    mask[order[:k]] = True
    return mask.reshape(key.shape)


def sce_mask(ds: Sequence[torch.Tensor], select_topk: float) -> torch.Tensor:
    """SCE "select": keep the k = int(nonzero * select_topk) entries of largest variance across the task vectors,
    where nonzero counts the entries of non-zero variance. The variance (population, over the models) is
    computed in float64 and rounded to float32; k is computed in float32 (mergekit multiplies a count tensor)."""
    if select_topk <= 0:
        return torch.zeros(ds[0].shape, dtype=torch.bool)
    if select_topk >= 1:
        return torch.ones(ds[0].shape, dtype=torch.bool)
    stack = torch.stack([_f(d).double() for d in ds])
    var = ((stack - stack.mean(dim=0)) ** 2).mean(dim=0).to(F32)
    nonzero = int((var != 0).sum())
    k = int(torch.tensor(float(nonzero), dtype=F32) * torch.tensor(select_topk, dtype=F32))
    return topk_mask_by(var, k)


def sce(base: torch.Tensor, xs: Sequence[torch.Tensor], select_topk: float = 1.0) -> torch.Tensor:
    """SCE: select (sce_mask), calculate (weights_i = mean(d_i^2) / sum_j mean(d_j^2), uniform 1/n when that sum
    is < 1e-6), erase (TIES sign election on the sum of the selected deltas), then
    y = b + sum_i w_i m_i d_i / max(sum_i w_i m_i, 1e-6)."""
    b = _f(base)
    ds = _deltas(base, xs)
    if select_topk < 1:
        mask = sce_mask(ds, select_topk)
        ds = [d * mask for d in ds]
    msq = [float((d.double() ** 2).sum()) / d.numel() for d in ds]
    total = sum(msq)
    ws = [1.0 / len(ds)] * len(ds) if abs(total) < 1e-6 else [m / total for m in msq]
    ms = elect_masks(ds, "sum")
    num = sum(d * (float(w) * m.to(F32)) for d, w, m in zip(ds, ws, ms))
    den = sum(float(w) * m.to(F32) for w, m in zip(ws, ms))
    return b + num / den.clamp(min=1e-6)


def nearswap(base: torch.Tensor, x: torch.Tensor, t: float) -> torch.Tensor:
    """w = clamp(t / max(|b - x|, 1e-6), 0, 1) per entry; y = w x + (1 - w) b: entries where the two models are
    within t of each other take x, the others move toward x by t / |b - x|."""
    b, x = _f(base), _f(x)
    w = (t / (b - x).abs().clamp(min=1e-6)).clamp(0.0, 1.0)
    return w * x + (1 - w) * b


def fusion_importance(base: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """|x - b| times the KL divergence of softmax(x) from softmax(b) along the last dim (each + 1e-8)."""
    b, x = _f(base), _f(x)
    p = torch.softmax(x, dim=-1) + 1e-8
    q = torch.softmax(b, dim=-1) + 1e-8
    kl = (p * torch.log(p / q)).sum(dim=-1, keepdim=True)
    return (x - b).abs() * kl


def arcee_fusion(base: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Keep x's change where its importance reaches median + 1.5 IQR of all importances; the quantiles are order
    statistics of the sorted importances at index floor(q (n - 1)), q = 0.25, 0.5, 0.75 (no interpolation)."""
    b, x = _f(base), _f(x)
    imp = fusion_importance(b, x)
    s = torch.sort(imp.reshape(-1)).values
    n = s.numel()
    q1, med, q3 = s[(n - 1) // 4], s[(n - 1) // 2], s[3 * (n - 1) // 4]
    thr = med + 1.5 * (q3 - q1)
    return b + (x - b) * (imp >= thr).to(F32)


def _ram(base, xs, epsilon, lambdas):
    b = _f(base)
    ds = _deltas(base, xs)
    nz = [d.abs() > epsilon for d in ds]
    c = sum(m.to(torch.int64) for m in nz)
    unique, overlap = c == 1, c > 1
    y = torch.zeros_like(b)
    for d, m, lam in zip(ds, nz, lambdas):
        z = torch.where(m, d, 0.0)
        y = y + torch.where(unique, z * lam, 0.0) + torch.where(overlap, z / c.clamp(min=1), 0.0)
    return b + y


def ram(base: torch.Tensor, xs: Sequence[torch.Tensor], epsilon: float = 1e-5) -> torch.Tensor:
    """RAM: entries with |d_i| > epsilon contribute; where one model contributes its delta is taken whole,
    where several do their mean."""
    return _ram(base, xs, epsilon, [1.0] * len(xs))


def ramplus_lambdas(base, xs, r: float = 0.1, alpha: float = 0.2, epsilon: float = 1e-5) -> list[float]:
    """RAM+ (tensor-local): lambda_i = 1 + r * clamp(shared_i / max(unique_i, epsilon), 0, alpha), with shared_i
    (unique_i) the number of model i's contributing entries that other models (no other model) also contribute
    to, over the whole tensor; float32 as mergekit."""
    ds = _deltas(base, xs)
    nz = [d.abs() > epsilon for d in ds]
    c = sum(m.to(torch.int64) for m in nz)
    out = []
    for m in nz:
        shared = torch.tensor(float(int((m & (c > 1)).sum())), dtype=F32)
        uniq = torch.tensor(float(int((m & (c == 1)).sum())), dtype=F32)
        rho = shared / torch.maximum(uniq, torch.tensor(epsilon, dtype=F32))
        out.append(float(1 + torch.tensor(r, dtype=F32) * rho.clamp(0.0, alpha)))
    return out


def ramplus_tl(base, xs, r: float = 0.1, alpha: float = 0.2, epsilon: float = 1e-5) -> torch.Tensor:
    """RAM with each model's uniquely contributed entries scaled by its lambda_i (ramplus_lambdas)."""
    return _ram(base, xs, epsilon, ramplus_lambdas(base, xs, r, alpha, epsilon))


# ----------------------------------------------------------------------------------------------------------------
# parameters varying across layers
# ----------------------------------------------------------------------------------------------------------------
def gradient_value(values: Sequence[float], layer: int, num_layers: int) -> float:
    """Piecewise-linear interpolation of `values` spread evenly over [0, num_layers - 1]."""
    if len(values) == 1:
        return float(values[0])
    pos = 0.0 if num_layers <= 1 else layer / (num_layers - 1) * (len(values) - 1)
    i0 = min(int(math.floor(pos)), len(values) - 1)
    i1 = min(i0 + 1, len(values) - 1)
    frac = pos - i0
    return float((1 - frac) * values[i0] + frac * values[i1])


# ----------------------------------------------------------------------------------------------------------------
# Plain block kernels: the straightforward formulas the engine's lean kernels (engine/kernels.py, engine/ops/)
# replaced. Kept here as oracles: tests/test_kernels.py checks the lean versions against them bit for bit.
# ----------------------------------------------------------------------------------------------------------------
def elect_sign(es: Sequence[torch.Tensor], consensus: str = "sum", dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """TIES sign election: +1 where the consensus statistic is >= 0, else -1.

    ``sum`` uses the sum of the weighted deltas, ``count`` the sum of their signs (mergekit ``get_mask``); ties
    (statistic exactly 0) elect +1.  ``dtype`` may be int8 (mergekit's ``int8_mask``), the values are identical.
    """
    if consensus == "sum":
        terms = list(es)
    elif consensus == "count":
        terms = [torch.sign(e) for e in es]
    else:
        raise ValueError(f"elect_sign: unknown consensus {consensus!r} (expected 'sum' or 'count')")
    stat = terms[0]
    for t in terms[1:]:
        stat = stat + t
    return torch.where(stat >= 0, 1, -1).to(dtype)


def combine_block(
    es: Sequence[torch.Tensor],
    weights: Sequence[float],
    sign: torch.Tensor | None = None,
    normalize: bool = False,
) -> torch.Tensor:
    """Mix the weighted deltas ``e_i = w_i d_i'`` into one delta D (methods.md step 4).

    With ``sign`` (from `elect_sign`) only entries whose sign agrees are summed (a zero entry has sign 0 and never
    agrees) and the divisor is the per-element sum of the agreeing weights, exact 0 -> 1.  Without it the divisor
    is the scalar ``sum_i w_i`` with ``|.| < 1e-8 -> 1``.  The divisor is applied only when ``normalize``.
    """
    if len(es) != len(weights) or not es:
        raise ValueError(f"combine: {len(es)} deltas for {len(weights)} weights")
    if sign is None:
        mixed = es[0]
        for e in es[1:]:
            mixed = mixed + e
        if not normalize:
            return mixed
        divisor = torch.tensor(weights[0], dtype=torch.float32)
        for w in weights[1:]:
            divisor = divisor + torch.tensor(w, dtype=torch.float32)
        if abs(float(divisor)) < 1e-8:
            return mixed
        return mixed / divisor
    s = sign.to(torch.float32)
    mixed = None
    divisor = None
    for e, w in zip(es, weights):
        agree = torch.sign(e) == s
        term = torch.where(agree, e, 0.0)
        wterm = torch.where(agree, torch.tensor(w, dtype=torch.float32), 0.0)
        mixed = term if mixed is None else mixed + term
        divisor = wterm if divisor is None else divisor + wterm
    if not normalize:
        return mixed
    divisor = torch.where(divisor == 0, 1.0, divisor)
    return mixed / divisor


def random_mask(d: torch.Tensor, density: float, u: torch.Tensor) -> torch.Tensor:
    """DARE drop: keep an entry where its uniform ``u < density`` (probability ``density``), zero the rest.

    density >= 1 keeps everything, as mergekit returns the tensor untouched.
    """
    if density >= 1:
        return d
    return torch.where(u < density, d, 0.0)


def dare_rescale(d: torch.Tensor, density: float) -> torch.Tensor:
    """DARE's ``1/density`` rescale of the kept entries (skipped for density >= 1, which drops nothing).

    mergekit subtlety: recent mergekit replaced this by an L1-norm rescale (``rescale_norm: l1``); methods.md keeps
    the paper's ``1/density``, and ``rescale_norm`` is available separately through the norm kernels below.
    """
    if density >= 1:
        return d
    return d / density


def magnitude_k(numel: int, density: float) -> int:
    """Entries kept by ``magnitude`` (ties): ``int(density * numel)``, all for density >= 1; 0 is an error."""
    if density >= 1:
        return numel
    k = int(density * numel)
    if k <= 0:
        raise ValueError(f"density {density} keeps no entry of a tensor with {numel} elements")
    return k


def breadcrumbs_counts(numel: int, density: float, gamma: float) -> tuple[int, int]:
    """``(k_hi, k_top)``: keep the ``k_hi`` largest ``|d|`` minus the ``k_top`` largest.

    methods.md / mergekit: keep = int(density n), top = int(gamma n), bot = n - keep - top (negative -> top += bot,
    bot = 0); ascending ranks [bot, n - top) survive, i.e. k_hi = n - bot.  mergekit slices ``indices[bot:-top]``,
    which keeps nothing when top == 0; here k_top == 0 means "remove no outliers".  density >= 1 keeps everything
    (mergekit returns the tensor before looking at gamma).  A density keeping no entry is an error.
    """
    if density >= 1:
        return numel, 0
    keep = int(density * numel)
    if keep <= 0:
        raise ValueError(f"density {density} keeps no entry of a tensor with {numel} elements")
    top = int(gamma * numel)
    bot = numel - keep - top
    if bot < 0:
        top += bot
        bot = 0
    return numel - bot, top


def norm_rescale_factor(before: float, after: float, eps: float = 1e-7) -> float:
    """Factor restoring the pre-mask norm (mergekit ``rescaled_masked_tensor``); 1 when either norm < eps."""
    if before < eps or after < eps:
        return 1.0
    return before / after

