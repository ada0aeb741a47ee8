"""Pure tensor math for the merge methods: no I/O, no graph, no global state.

Every kernel sees a *block* of an output tensor: rows ``[a, b)`` of its first dimension (a 0-d or 1-d tensor is a
single row and always one whole block).  The contract that shapes this module is **bit-identical results whatever
the row blocking**, so:

* element-wise work uses only correctly rounded IEEE operations (no fused ``alpha=`` adds, no BLAS), which give the
  same bits for an element in any block;
* per-row reductions always reduce a 2-d ``[rows, cols]`` float64 view along dim 1, and a one-row block is padded
  with a zero row so that torch never switches to its split (parallel) single-output reduction;
* whole-tensor statistics are exact combinations of per-row (or per-block integer) partials: ``math.fsum`` over rows,
  integer histograms, integer super-accumulators;
* random numbers are drawn per fixed row group whose size depends on the tensor shape only.

Inputs are float32.  Where methods.md is silent the semantics are mergekit 0.1.5's; its quirks are noted inline.
"""
from __future__ import annotations

import hashlib
import math
from typing import Sequence

import torch
from torch import Tensor

from .. import memory, shapes
from . import fused

# ----------------------------------------------------------------------------------------------------------------
# Row layout helpers
# ----------------------------------------------------------------------------------------------------------------


def _rows2d(x: Tensor) -> Tensor:
    """View a block as ``[rows, row_numel]``; 0-d and 1-d tensors are one row."""
    if x.dim() <= 1:
        return x.reshape(1, -1)
    return x.reshape(x.shape[0], -1)


def _row_layout(shape: Sequence[int]) -> tuple[int, int]:
    """(rows, row_numel) of a full tensor (lazymerge.shapes: a 0-d/1-d tensor is one row, as in `_rows2d`)."""
    return shapes.rows(shape), shapes.row_numel(shape)


CHUNK_ELEMS = 1 << 16


def _row_chunks(rows: int, row_numel: int) -> list[tuple[int, int]]:
    """Row ranges of about CHUNK_ELEMS elements (at least one row) for float64 work on a float32 block.

    Why: a whole block's float64 temporaries are fresh allocations several times the block's size, each faulted
    in and zeroed by the kernel (a third of a slerp merge's CPU time); 512 KiB ones stay below glibc's mmap
    threshold and are reused. Only for work whose per-row (or per-element) results do not depend on which rows
    are computed together."""
    step = max(1, CHUNK_ELEMS // max(1, row_numel))
    return [(a, min(rows, a + step)) for a in range(0, rows, step)]


def _row_sum(m: Tensor) -> Tensor:
    """Sum a 2-d tensor along dim 1 with a reduction order that depends on the row length only.

    With a single output element torch splits the reduced dimension across threads, which changes the order of
    the additions; a padding row keeps it on the per-row path used for every other block size.
    """
    if m.shape[0] == 1:
        return torch.cat([m, torch.zeros_like(m)]).sum(dim=1)[:1]
    return m.sum(dim=1)


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
    time (`_row_chunks`): the same bits with small float64 temporaries.
    """
    n = len(xs)
    if coeffs.shape[-1] != n or coeffs.dim() not in (1, 2):
        raise ValueError(f"lincomb: coefficients of shape {tuple(coeffs.shape)} for {n} tensors")
    c = coeffs.to(torch.float64)
    x2 = [_rows2d(x) for x in xs]
    rows = x2[0].shape[0]
    if c.dim() == 2:
        if c.shape[0] != rows:
            raise ValueError(f"lincomb: {c.shape[0]} coefficient rows for a block of {rows} rows")
        c = c.reshape(rows, 1, n)          # each row's coefficient broadcast over the row's elements
    out = torch.empty(x2[0].shape, dtype=torch.float32)
    for a, b in _row_chunks(*x2[0].shape):
        cc = c[a:b] if c.dim() == 3 else c
        acc = None
        for i, x in enumerate(x2):
            term = x[a:b].to(torch.float64) * cc[..., i]
            acc = term if acc is None else acc + term
        out[a:b] = acc
    return out.reshape(xs[0].shape)


# ----------------------------------------------------------------------------------------------------------------
# Randomness (block-invariant)
# ----------------------------------------------------------------------------------------------------------------

_GROUP_NUMEL = 2**20
_SEED_MASK = (1 << 63) - 1


def derive_seed(run_seed: int, *parts: str | int) -> int:
    """A 63-bit seed from the run seed and names (tensor, model index, row group, ...).

    Hashing instead of drawing from one stream is what makes a tensor's random numbers independent of which
    tensors were processed before it, of the schedule and of the device.
    """
    h = hashlib.blake2b(digest_size=8, person=b"lazymerge-seed")
    for part in (run_seed, *parts):
        if isinstance(part, bool) or not isinstance(part, (int, str)):
            raise TypeError(f"derive_seed: parts must be int or str, got {type(part).__name__}")
        tag, data = (b"i", str(part).encode()) if isinstance(part, int) else (b"s", part.encode("utf-8"))
        h.update(tag + len(data).to_bytes(8, "little") + data)
    return int.from_bytes(h.digest(), "little") & _SEED_MASK


def uniform_rows(seed: int, shape: tuple[int, ...], rows: tuple[int, int]) -> Tensor:
    """Float32 uniforms in [0, 1) for rows ``[a, b)`` of a tensor of ``shape``, shaped like that block.

    The tensor's rows are cut into fixed groups of ``max(1, 2**20 // row_numel)`` rows; group g is drawn whole
    from its own generator seeded with ``derive_seed(seed, "row-group", g)``.  A block draws the groups it
    overlaps and slices, so an element's number never depends on the blocking.  0-d/1-d tensors are one row:
    ``rows`` must be ``(0, 1)``.
    """
    total_rows, row_numel = _row_layout(shape)
    a, b = rows
    if not 0 <= a <= b <= total_rows:
        raise ValueError(f"uniform_rows: rows {rows} out of range for shape {tuple(shape)}")
    block_shape = tuple(shape) if len(shape) <= 1 else (b - a, *shape[1:])
    if a == b or row_numel == 0:
        return torch.empty(block_shape, dtype=torch.float32)
    group_rows = max(1, _GROUP_NUMEL // row_numel)
    chunks = []
    for g in range(a // group_rows, (b - 1) // group_rows + 1):
        g0, g1 = g * group_rows, min((g + 1) * group_rows, total_rows)
        gen = torch.Generator().manual_seed(derive_seed(seed, "row-group", g))
        draw = torch.rand((g1 - g0) * row_numel, generator=gen, dtype=torch.float32)
        lo, hi = max(a, g0) - g0, min(b, g1) - g0
        chunks.append(draw[lo * row_numel : hi * row_numel])
    return torch.cat(chunks).reshape(block_shape)


# ----------------------------------------------------------------------------------------------------------------
# Magnitude top-k: exact two-pass radix select over blocks
#
# |d| as float32 is non-negative, so its bit pattern read as int32 orders exactly like the value.  Pass 1
# histograms the high 16 bits of every block, reduce 1 finds the high bin holding the k-th largest; pass 2
# histograms the low 16 bits inside that bin, reduce 2 fixes the exact threshold and hands each block a quota of
# threshold-equal entries so that exactly k are kept, ties going to the lowest flat index (earlier blocks first).
# mergekit breaks ties by an unstable argsort, i.e. arbitrarily.
# ----------------------------------------------------------------------------------------------------------------

_BINS = 65536


def _abs_bits(d: Tensor) -> Tensor:
    return d.abs().contiguous().view(torch.int32).reshape(-1)


def topk_pass1(d_block: Tensor) -> Tensor:
    """int64 ``[65536]`` histogram of the high 16 bits of ``|d|`` in this block."""
    if fused.use(d_block):
        return fused.topk_hist(d_block)
    return torch.bincount(_abs_bits(d_block) >> 16, minlength=_BINS)


def topk_reduce1(hists: Sequence[Tensor], k: int) -> dict:
    """Locate the high bin of the k-th largest ``|d|``: ``{"all", "k", "bin", "above"}`` (plain ints).

    ``above`` counts entries in strictly higher bins.  ``k >= numel`` gives ``{"all": True, ...}`` (keep all);
    k <= 0 is an error.
    """
    if k <= 0:
        raise ValueError(f"top-k with k={k}: at least one entry must be kept")
    total = torch.stack(list(hists)).sum(dim=0)
    numel = int(total.sum())
    if k >= numel:
        return {"all": True, "k": k}
    at_or_above = torch.flip(torch.cumsum(torch.flip(total, [0]), 0), [0])  # entries in bins >= i
    b = int(torch.nonzero(at_or_above >= k).max())
    return {"all": False, "k": k, "bin": b, "above": int(at_or_above[b] - total[b])}


def topk_pass2(d_block: Tensor, state1: dict) -> Tensor:
    """int64 ``[65536]`` histogram of the low 16 bits of the block's entries that fall in the selected high bin."""
    if state1["all"] or state1.get("none"):
        return torch.zeros(_BINS, dtype=torch.int64)
    if fused.use(d_block):
        return fused.topk_hist(d_block, state1["bin"])
    bits = _abs_bits(d_block)
    low = bits[(bits >> 16) == state1["bin"]] & 0xFFFF
    return torch.bincount(low, minlength=_BINS)


def topk_reduce2(hists: Sequence[Tensor], state1: dict) -> dict:
    """Exact threshold and tie quotas: ``{"all", "threshold", "quota"}``.

    ``threshold`` is the int32 bit pattern of the k-th largest ``|d|``; every entry above it is kept, and block j
    keeps its first ``quota[j]`` entries equal to it (``hists`` must be in block order).  A first state with
    ``none`` (k = 0, see `topk_reduce1_fraction`) gives ``{"all": False, "none": True}``: keep nothing.
    """
    if state1["all"]:
        return {"all": True}
    if state1.get("none"):
        return {"all": False, "none": True}
    stacked = torch.stack(list(hists))
    total = stacked.sum(dim=0)
    need = state1["k"] - state1["above"]
    at_or_above = torch.flip(torch.cumsum(torch.flip(total, [0]), 0), [0])
    low = int(torch.nonzero(at_or_above >= need).max())
    ties = need - int(at_or_above[low] - total[low])
    quota = []
    equal = stacked[:, low].tolist()
    for eq in equal:
        q = min(eq, ties)
        quota.append(q)
        ties -= q
    # `equal`: how many entries of each block equal the threshold (a block keeping all of them needs no scan)
    return {"all": False, "threshold": (state1["bin"] << 16) | low, "quota": quota, "equal": equal}


def topk_keep(d_block: Tensor, state2: dict, block_index: int, owned: bool = False) -> Tensor:
    """``d * topk_mask(d, ...)`` (a dropped negative entry becomes -0.0), overwriting ``d`` when ``owned``."""
    if not state2["all"] and fused.use(d_block):
        out = d_block if owned else memory.empty_like(d_block)
        quota = state2["quota"][block_index]
        return fused.keep_mul(d_block, state2["threshold"], quota, out,
                              all_equal=quota == state2.get("equal", [None] * (block_index + 1))[block_index])
    keep = topk_mask(d_block, state2, block_index)
    return d_block.mul_(keep) if owned else d_block * keep


def topk_mask(d_block: Tensor, state2: dict, block_index: int) -> Tensor:
    """Bool mask (shaped like the block) of the entries of this block among the tensor's top k by ``|d|``."""
    if state2["all"]:
        return torch.ones(d_block.shape, dtype=torch.bool, device=d_block.device)
    if state2.get("none"):
        return torch.zeros(d_block.shape, dtype=torch.bool, device=d_block.device)
    bits = _abs_bits(d_block)
    t = state2["threshold"]
    quota = state2["quota"][block_index]
    keep = bits > t
    if quota > 0:
        # the first `quota` entries equal to the threshold, by flat index (few: a scan of their positions only)
        keep[torch.nonzero(bits == t).squeeze(1)[:quota]] = True
    return keep.reshape(d_block.shape)


# ----------------------------------------------------------------------------------------------------------------
# DELLA rank-magnitude sampling
# ----------------------------------------------------------------------------------------------------------------


def rank_magnitude_sampling(
    d_block: Tensor, u_block: Tensor, density: float, epsilon: float, rescale: bool = True
) -> Tensor:
    """DELLA magprune: keep entry with probability ``p = density - eps + 2 eps r``, r its normalised |d| rank.

    Follows mergekit ``della_magprune`` / ``rank_magnitude``: ranks run along dim 1 (for a 2-d tensor: within each
    row; a 0-d/1-d tensor is one row; for >2-d tensors mergekit ranks along dim 1 too), rank = position in an
    ascending sort of |d| (ties by index here, arbitrary in mergekit), ``r = (rank - 1)/(m - 1)`` computed in
    float32 exactly as mergekit's ``(ranks - min)/(max - min)``.  A row of one entry has r = 0/0 in mergekit (its
    ``bernoulli`` then raises); here it gets r = 1/2, i.e. p = density.  Kept where ``u < p``; with ``rescale``
    kept entries are divided by their own p.  density >= 1 returns ``d`` (mergekit).
    """
    if density >= 1:
        return d_block
    if not (0 < density - epsilon and density + epsilon < 1):
        raise ValueError(f"della: density +/- epsilon must lie in (0, 1), got density={density} epsilon={epsilon}")
    shape = d_block.shape
    d = d_block.reshape(1, -1) if d_block.dim() < 2 else d_block
    u = u_block.reshape(d.shape)
    m = d.shape[1]
    if m == 1:
        rank_norm = torch.full(d.shape, 0.5, dtype=torch.float32)
    else:
        order = torch.argsort(d.abs(), dim=1, stable=True)
        ranks = torch.empty_like(order)
        positions = torch.arange(m).reshape(1, m, *([1] * (d.dim() - 2))).expand_as(order)
        ranks.scatter_(1, order, positions)
        rank_norm = ranks.to(torch.float32) / (m - 1)
    probs = (density - epsilon) + rank_norm * 2 * epsilon
    keep = u < probs
    kept = d / probs if rescale else d
    return torch.where(keep, kept, 0.0).reshape(shape)


# ----------------------------------------------------------------------------------------------------------------
# Norms for rescale_norm
# ----------------------------------------------------------------------------------------------------------------

_NORM_KINDS = ("l1", "l2", "linf")


def norm_partials(x_block: Tensor, kind: str) -> Tensor:
    """float64 ``[rows]`` per-row partial of the chosen norm: sum |x|, sum x^2, or max |x|."""
    if kind not in _NORM_KINDS:
        raise ValueError(f"unknown norm {kind!r} (expected one of {', '.join(_NORM_KINDS)})")
    m = _rows2d(x_block).to(torch.float64)
    if kind == "linf":
        return m.abs().amax(dim=1) if m.shape[1] else torch.zeros(m.shape[0], dtype=torch.float64)
    return _row_sum(m.abs() if kind == "l1" else m * m)


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
# Gram statistics: one mechanism for slerp, nuslerp, multislerp, karcher and model_stock
#
# Every one of these methods outputs a linear combination of its inputs whose coefficients depend only on the
# inputs' inner products.  Blocks emit per-row Gram matrices, `gram_total` sums them exactly, a solver turns the
# Gram matrix into coefficients and `lincomb` applies them block by block.
# ----------------------------------------------------------------------------------------------------------------


def row_gram(xs: Sequence[Tensor]) -> Tensor:
    """float64 ``[rows, n, n]``: inner products of the flattened rows of the n inputs (0-d/1-d: one row).

    Products of float32 values are exact in float64; each row's sum has a fixed order (see `_row_sum`).
    """
    x2 = [_rows2d(x) for x in xs]
    n = len(x2)
    out = torch.empty(x2[0].shape[0], n, n, dtype=torch.float64)
    for a, b in _row_chunks(*x2[0].shape):          # per-row sums: any grouping of the rows gives the same bits
        ms = [x[a:b].to(torch.float64) for x in x2]
        for i in range(n):
            for j in range(i, n):
                s = _row_sum(ms[i] * ms[j])
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
    ms = [_rows2d(x).to(torch.float64) for x in xs]
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
        term = _rows2d(x).to(torch.float64) * c[:, i]
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


# ----------------------------------------------------------------------------------------------------------------
# TIES election and mixing, lean: the same bits as the plain formulas (tests/reference.py `elect_sign`,
# `combine_block`, which tests/test_kernels.py checks them against) with fewer and smaller temporaries.
#
# `own=True` means the caller donates the first tensor argument (nobody else will read it), so it may be
# overwritten; in-place float ops round exactly like their out-of-place twins, so results stay bit-identical.
# ----------------------------------------------------------------------------------------------------------------


def elect_nonneg(es: Sequence[Tensor], consensus: str = "sum") -> Tensor:
    """TIES sign election as a bool tensor (True where the elected sign is +1; a statistic of exactly 0 elects +1):
    ``sum`` sums the weighted deltas, ``count`` their signs (mergekit ``get_mask``). 1 byte per entry."""
    if consensus in ("sum", "count") and fused.use(*es):
        return fused.elect_nonneg(es, consensus)
    if consensus == "sum":
        stat = es[0] + es[1] if len(es) > 1 else es[0].clone()
        for e in es[2:]:
            stat.add_(e)
    elif consensus == "count":
        stat = torch.sign(es[0])
        for e in es[1:]:
            stat.add_(torch.sign(e))
    else:
        raise ValueError(f"elect_sign: unknown consensus {consensus!r} (expected 'sum' or 'count')")
    return stat >= 0


def combine_elected(es: Sequence[Tensor], weights: Sequence[float], nonneg: Tensor, normalize: bool,
                    own: Sequence[bool] = ()) -> Tensor:
    """methods.md step 4 with a sign from `elect_nonneg`: sum the entries whose sign agrees with the elected one, divided
    (with `normalize`) by the sum of the agreeing models' weights, an exact 0 read as 1."""
    mixed: Tensor | None = None
    divisor: Tensor | None = None
    elected = nonneg.to(torch.float32).mul_(2.0).sub_(1.0)         # +1 / -1
    for i, (e, w) in enumerate(zip(es, weights)):
        agree = torch.sign(e) == elected                         # a zero entry (sign 0) never agrees
        owned = i < len(own) and own[i]
        term = e.mul_(agree) if owned else e * agree             # both: ours to modify
        if mixed is None:
            mixed = term
        else:
            mixed.add_(term)
        if normalize:
            wterm = agree.to(torch.float32).mul_(w)
            divisor = wterm if divisor is None else divisor.add_(wterm)
    assert mixed is not None
    if not normalize:
        return mixed
    assert divisor is not None
    return mixed.div_(divisor.masked_fill_(divisor == 0, 1.0))


def sum_into(es: Sequence[Tensor], own0: bool = False) -> Tensor:
    """``e_0 + e_1 + ...`` in list order, accumulating into e_0 when it is donated."""
    acc = es[0] if own0 else es[0].clone()
    for e in es[1:]:
        acc.add_(e)
    return acc


# ----------------------------------------------------------------------------------------------------------------
# Newer mergekit methods: sce, nearswap, arcee_fusion, ram / ramplus_tl (docs/methods.md)
#
# Their whole-tensor statistics reuse the mechanisms above: SCE's variance top-k is the radix select on a float32
# key; its weights are exact sums of squares (`norm_partials`); arcee_fusion's quantiles are exact order
# statistics by the same two-pass radix histograms, on signed keys; RAM+'s counts are integers.  Element-wise
# parts repeat mergekit 0.1.5's float32 operations in its order, so they are the same bits in any block.
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


def count_nonzero(x: Tensor) -> int:
    """Entries of a block that are not exactly zero (for SCE's k, which counts non-zero variances)."""
    return int(torch.count_nonzero(x))


def topk_reduce1_fraction(hists: Sequence[Tensor], nonzero: Sequence[int], fraction: float) -> dict:
    """`topk_reduce1` for ``k = int(nonzero * fraction)``, the count summed over blocks (mergekit's SCE multiplies
    the int64 count tensor by the fraction, i.e. in float32; so is it here).  k = 0 keeps nothing: ``{"all":
    False, "none": True}``, which the other top-k kernels understand."""
    k = int(torch.tensor(sum(int(c) for c in nonzero), dtype=torch.int64) * fraction)
    if k <= 0:
        return {"all": False, "none": True}
    return topk_reduce1(hists, k)


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


def sce_combine(base: Tensor, ds: Sequence[Tensor], weights: Sequence[float], nonneg: Tensor) -> Tensor:
    """SCE "erase" and merge: with ``a_i = w_i`` where ``sign(d_i)`` agrees with the elected sign (`elect_nonneg`
    on the selected deltas, consensus "sum") and 0 elsewhere, ``b + sum_i a_i d_i / max(sum_i a_i, 1e-6)``."""
    elected = nonneg.to(torch.float32).mul_(2.0).sub_(1.0)
    num: Tensor | None = None
    den: Tensor | None = None
    for d, w in zip(ds, weights):
        a = (torch.sign(d) == elected).to(torch.float32).mul_(torch.tensor(w, dtype=torch.float32))
        term = d * a
        num = term if num is None else num.add_(term)
        den = a if den is None else den.add_(a)
    assert num is not None and den is not None
    return base + num.div_(den.clamp_(min=1e-6))


def nearswap(base: Tensor, x: Tensor, t: float) -> Tensor:
    """NearSwap: ``w = clamp(t / max(|b - x|, 1e-6), 0, 1)``, ``y = w x + (1 - w) b``: entries where the models are
    within ``t`` of each other take x, the others move toward x by ``t / |b - x|``."""
    w = (t / (base - x).abs().clamp(min=1e-6)).clamp(0, 1)
    return w * x + (1 - w) * base


def fusion_importance(x: Tensor, base: Tensor) -> Tensor:
    """arcee_fusion importance: ``|x - b| * KL(softmax(x) + 1e-8 || softmax(b) + 1e-8)``, the divergence summed
    along the last dim (per row of a 2-d tensor; a 1-d tensor is one row).  The sum runs per row with a padding
    row (`_row_sum`), so its order does not depend on how many rows a block has."""
    shape = x.shape
    last = shape[-1] if x.dim() else 1
    p = torch.softmax(x, dim=-1) + 1e-8
    q = torch.softmax(base, dim=-1) + 1e-8
    terms = (p * torch.log(p / q)).reshape(-1, last)
    kl = _row_sum(terms).reshape(*shape[:-1], 1) if x.dim() else _row_sum(terms).reshape(())
    return (x - base).abs() * kl


# Exact order statistics of a signed float32 tensor over blocks: the same two radix passes as the top-k above, on
# keys that order like the values (positive floats: bits + 2^31; negative: 2^31 - 1 - |bits|, so -0.0 sorts just
# below +0.0 and NaNs at the ends).


def _order_keys(x: Tensor) -> Tensor:
    bits = x.contiguous().view(torch.int32).reshape(-1).to(torch.int64)
    return torch.where(bits >= 0, bits + 2**31, -1 - bits)


def _key_value(key: int) -> float:
    bits = key - 2**31 if key >= 2**31 else -1 - key
    return float(torch.tensor([bits], dtype=torch.int32).view(torch.float32)[0])


def order_pass1(x_block: Tensor) -> Tensor:
    """int64 ``[65536]`` histogram of the high 16 bits of the block's order keys."""
    return torch.bincount(_order_keys(x_block) >> 16, minlength=_BINS)


def order_reduce1(hists: Sequence[Tensor], ranks: Sequence[int]) -> dict:
    """For each 0-based ascending rank, the high bin holding it and the entries below that bin."""
    total = torch.stack(list(hists)).sum(dim=0)
    numel = int(total.sum())
    if any(not 0 <= r < numel for r in ranks):
        raise ValueError(f"order statistics: ranks {list(ranks)} out of range for {numel} entries")
    cum = torch.cumsum(total, 0)
    bins = [int(torch.searchsorted(cum, r, right=True)) for r in ranks]
    return {"ranks": list(ranks), "bins": bins, "below": [int(cum[b] - total[b]) for b in bins]}


def order_pass2(x_block: Tensor, state1: dict) -> Tensor:
    """int64 ``[len(distinct bins), 65536]`` histograms of the low 16 bits inside each selected high bin."""
    keys = _order_keys(x_block)
    high = keys >> 16
    distinct = sorted(set(state1["bins"]))
    return torch.stack([torch.bincount(keys[high == b] & 0xFFFF, minlength=_BINS) for b in distinct])


def order_reduce2(hists: Sequence[Tensor], state1: dict) -> list[float]:
    """The exact values (float32, as Python floats) at the requested ranks."""
    total = torch.stack(list(hists)).sum(dim=0)
    distinct = sorted(set(state1["bins"]))
    out = []
    for r, b, below in zip(state1["ranks"], state1["bins"], state1["below"]):
        cum = torch.cumsum(total[distinct.index(b)], 0)
        low = int(torch.searchsorted(cum, r - below, right=True))
        out.append(_key_value((b << 16) | low))
    return out


def fusion_quantile_ranks(numel: int) -> list[int]:
    """Ranks of arcee_fusion's q1, median and q3: ``floor(q (n - 1))`` for q = 0.25, 0.5, 0.75 (mergekit indexes
    the sorted importances with ``(q * (n - 1)).long()``: no interpolation)."""
    return [(numel - 1) // 4, (numel - 1) // 2, 3 * (numel - 1) // 4]


def fusion_apply(x: Tensor, base: Tensor, importance: Tensor, quantiles: Sequence[float]) -> Tensor:
    """arcee_fusion: keep x's change where ``importance >= median + 1.5 (q3 - q1)`` (float32, as mergekit)."""
    q1, med, q3 = (torch.tensor(v, dtype=torch.float32) for v in quantiles)
    threshold = med + 1.5 * (q3 - q1)
    return base + (x - base) * (importance >= threshold).to(torch.float32)


def ram_counts(ds: Sequence[Tensor], epsilon: float) -> Tensor:
    """int64 ``[n, 2]``: per model, its entries of this block with ``|d_i| > epsilon`` that another model also
    has (shared) and that no other model has (unique).  Integers: they add exactly over blocks."""
    nz = [d.abs() > epsilon for d in ds]
    count = torch.stack(nz).sum(dim=0)
    shared, unique = count > 1, count == 1
    return torch.tensor([[int((m & shared).sum()), int((m & unique).sum())] for m in nz], dtype=torch.int64)


def ramplus_lambdas(counts: Tensor, r: float, alpha: float, epsilon: float) -> list[float]:
    """RAM+ (tensor-local) per-model factor ``1 + r * clamp(shared / max(unique, epsilon), 0, alpha)`` from the
    whole tensor's `ram_counts`, in float32 as mergekit computes it."""
    shared, unique = counts[:, 0], counts[:, 1]
    rho = shared / unique.clamp(min=epsilon)
    return [float(v) for v in 1 + r * rho.clamp(min=0, max=alpha)]


def ram_merge(base: Tensor, ds: Sequence[Tensor], epsilon: float, lambdas: Sequence[float] | None = None) -> Tensor:
    """RAM: an entry of d_i contributes when ``|d_i| > epsilon``; where exactly one model contributes its delta is
    added whole (times its RAM+ lambda), where several do each adds ``d_i / count``."""
    nz = [d.abs() > epsilon for d in ds]
    count = torch.stack(nz).sum(dim=0)
    unique, overlap, divisor = count == 1, count > 1, count.clamp(min=1)
    acc: Tensor | None = None
    for i, (d, m) in enumerate(zip(ds, nz)):
        z = d * m
        own = z * unique
        if lambdas is not None:
            own = own * torch.tensor(lambdas[i], dtype=torch.float32)
        term = own + z * overlap / divisor
        acc = term if acc is None else acc.add_(term)
    assert acc is not None
    return base + acc
