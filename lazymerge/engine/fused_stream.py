"""One pass over the stored bytes: numba kernels that read bfloat16 input blocks as stored, compute a merge's
per-element chain in float32 (float64 where the reference does) in registers and small tiles, and write the
output block once, in bfloat16 when that is what the output is.

Why: the torch chain widens every input to a float32 block, then makes a full float32 block per step (delta,
trim, rescale, combine) and converts the result once more for the writer: tens of bytes of memory traffic per
element where the work is a few flops. On 2 cores that, not the disk, set the wall time.

Bit-identity with the torch kernels (`engine.kernels`, `engine.ops`: the reference) is by construction, as in
`engine/fused.py`: bfloat16 -> float32 is exact (a shift); per element the same IEEE operations in the same order,
every constant rounded to float32 as torch rounds a Python scalar for a float32 tensor, no fast-math and no fused
multiply-add; float64 sums that torch reduces (Gram partials) are still reduced by torch, on the same products;
float32 -> bfloat16 is round-to-nearest-even as torch's conversion, and a block holding a NaN is converted by torch
instead (NaN payloads differ between torch's scalar and vector paths). Random masks draw torch's own stream
(`engine.fused_rng`). tests/test_fused_stream.py checks each kernel against its torch chain with torch.equal.

Every kernel is serial (see engine/fused.py): the scheduler runs one block per core.
"""
from __future__ import annotations

import numpy as np

from .fused_rng import STREAM_WORDS, mt_seed, mt_skip, mt_uniform

from numba import njit

T = 4096                     # elements per tile: a few scratch rows stay in L1/L2

NONE, MAGNITUDE, OUTLIERS, RANDOM, PRECOMPUTED = 0, 1, 2, 3, 4   # how a task vector is sparsified
NEVER = np.int64(1 << 31)    # a threshold no |x| bit pattern reaches: keep nothing ("none")


_ONE = np.float32(1.0)
_ZERO = np.float32(0.0)
_TWO = np.float32(2.0)


@njit(inline="always")
def _sign(x):            # torch.sign: (0 < x) - (x < 0), NaN -> 0
    return np.float32(x > _ZERO) - np.float32(x < _ZERO)


@njit(inline="always")
def _widen(src, lo, m, bits):
    for j in range(m):
        bits[j] = np.uint32(src[lo + j]) << np.uint32(16)


@njit(inline="always")
def _store(vbits, vf, lo, m, out16, out32, to16):
    """Write a float32 tile to the output: as bfloat16 (round to nearest even) or as float32. Returns how many
    entries are NaN (the caller then converts the block with torch: see the module docstring)."""
    nan = 0
    if to16:
        for j in range(m):
            u = np.uint64(vbits[j])
            nan += (u & np.uint64(0x7FFFFFFF)) > np.uint64(0x7F800000)
            out16[lo + j] = np.uint16((u + (((u >> np.uint64(16)) & np.uint64(1)) + np.uint64(0x7FFF)))
                                      >> np.uint64(16))
    else:
        for j in range(m):
            out32[lo + j] = vf[j]
    return nan


@njit(inline="always")
def _mask(a, t, cut, i):
    """The top-k mask: |x| bits above the threshold, or equal to it before the block's tie cut (flat index)."""
    return (np.int64(a) > t) | ((np.int64(a) == t) & (i < cut))


@njit(nogil=True, cache=True)
def _draw(st, gst, seeds, group_numel, u, m):
    """u[:m] = the next m uniforms of a block's stream, crossing into the next row group where one ends."""
    done = 0
    while done < m:
        if gst[1] == 0:
            gst[0] += 1
            mt_seed(st, seeds[gst[0]])
            gst[1] = group_numel
        c = min(gst[1], m - done)
        mt_uniform(st, u[done:], c)
        done += c
        gst[1] -= c


@njit(nogil=True, cache=True)
def _start_streams(modes, seeds, ginfo, st, gst):
    for k in range(modes.size):
        if modes[k] == RANDOM:
            mt_seed(st[k], seeds[k, 0])
            mt_skip(st[k], ginfo[k, 1])
            gst[k, 0] = 0
            gst[k, 1] = ginfo[k, 0] - ginfo[k, 1]


@njit(nogil=True, cache=True)
def _task_vector(k, x, pre, bf, lo, m, modes, thr, cuts, flags, dens, scales, nscales, st, gst, seeds, ginfo,
                 u, eb, ef):
    """Model k's task vector on one tile into ef[:m] (eb: its bits): x - base, sparsified as the ops do it
    (trim: d * mask; drop: d * (u < p), then / p with rescale), then each rescale (d * s), in that order."""
    mode = modes[k]
    if mode == PRECOMPUTED:
        for j in range(m):
            ef[j] = pre[lo + j]
    else:
        _widen(x, lo, m, eb)
        for j in range(m):
            ef[j] = ef[j] - bf[j]
    if mode == MAGNITUDE:
        t, cut = thr[k, 0], cuts[k, 0]
        for j in range(m):
            ef[j] = ef[j] * np.float32(_mask(eb[j] & np.uint32(0x7FFFFFFF), t, cut, lo + j))
    elif mode == OUTLIERS:
        for j in range(m):
            a = eb[j] & np.uint32(0x7FFFFFFF)
            keep = True
            if flags[k, 0]:
                keep = _mask(a, thr[k, 0], cuts[k, 0], lo + j)
            if flags[k, 1]:
                keep = keep & (not _mask(a, thr[k, 1], cuts[k, 1], lo + j))
            ef[j] = ef[j] * np.float32(keep)
    elif mode == RANDOM:
        _draw(st[k], gst[k], seeds[k], ginfo[k, 0], u, m)
        p = dens[k]
        for j in range(m):
            ef[j] = ef[j] * np.float32(u[j] < p)
        if flags[k, 0]:
            for j in range(m):
                ef[j] = ef[j] / p
    for s in range(nscales[k]):
        f = scales[k, s]
        for j in range(m):
            ef[j] = ef[j] * f


@njit(nogil=True, cache=True)
def family(base, xs, pres, modes, thr, cuts, flags, dens, scales, nscales, seeds, ginfo, w, elect, normalize,
           lam, use_lam, total, use_total, out16, out32, to16):
    """base + lam * D over the task vectors of xs (each against `base`): D their TIES mix (elect 1: sum, 2:
    count; `engine/fused.py` `_combine`) or their plain sum (elect 0), divided by `total` when `use_total`
    (`ops.combine`). Returns how many output entries are NaN."""
    n = len(xs)
    size = base.size
    bb = np.empty(T, np.uint32)
    bf = bb.view(np.float32)
    eb = np.empty((n, T), np.uint32)
    ef = eb.view(np.float32)
    el = np.empty(T, np.float32)
    mixed = np.empty(T, np.float32)
    div = np.empty(T, np.float32)
    vb = np.empty(T, np.uint32)
    vf = vb.view(np.float32)
    u = np.empty(T, np.float32)
    st = np.zeros((n, STREAM_WORDS), np.uint32)
    gst = np.zeros((n, 2), np.int64)
    _start_streams(modes, seeds, ginfo, st, gst)
    nan = 0
    for lo in range(0, size, T):
        m = min(T, size - lo)
        _widen(base, lo, m, bb)
        for k in range(n):
            _task_vector(k, xs[k], pres[k], bf, lo, m, modes, thr, cuts, flags, dens, scales, nscales, st, gst,
                         seeds, ginfo, u, eb[k], ef[k])
        if elect == 0:
            for j in range(m):
                mixed[j] = ef[0, j]
            for k in range(1, n):
                for j in range(m):
                    mixed[j] = mixed[j] + ef[k, j]
            for j in range(m):
                v = mixed[j]
                if use_total:
                    v = v / total
                if use_lam:
                    v = v * lam
                vf[j] = bf[j] + v
        else:
            for j in range(m):
                el[j] = _sign(ef[0, j]) if elect == 2 else ef[0, j]
            for k in range(1, n):
                for j in range(m):
                    el[j] = el[j] + (_sign(ef[k, j]) if elect == 2 else ef[k, j])
            for j in range(m):
                el[j] = np.float32(el[j] >= _ZERO) * _TWO - _ONE
            for j in range(m):
                x = ef[0, j]
                a = np.float32(_sign(x) == el[j])       # a zero entry (sign 0) never agrees
                mixed[j] = x * a
                div[j] = a * w[0]
            for k in range(1, n):
                wk = w[k]
                for j in range(m):
                    x = ef[k, j]
                    a = np.float32(_sign(x) == el[j])
                    mixed[j] = mixed[j] + x * a
                    div[j] = div[j] + a * wk
            for j in range(m):
                v = mixed[j]
                if normalize:
                    d = div[j]
                    v = v / (d + np.float32(d == _ZERO))
                if use_lam:
                    v = v * lam
                vf[j] = bf[j] + v
        nan += _store(vb, vf, lo, m, out16, out32, to16)
    return nan


@njit(nogil=True, cache=True)
def task_vector(x, base, pre, modes, thr, cuts, flags, dens, scales, nscales, seeds, ginfo, out):
    """One model's task vector (as `family` computes it) into a float32 block: for a consumer that needs it."""
    size = base.size
    bb = np.empty(T, np.uint32)
    bf = bb.view(np.float32)
    eb = np.empty(T, np.uint32)
    ef = eb.view(np.float32)
    u = np.empty(T, np.float32)
    st = np.zeros((1, STREAM_WORDS), np.uint32)
    gst = np.zeros((1, 2), np.int64)
    _start_streams(modes, seeds, ginfo, st, gst)
    for lo in range(0, size, T):
        m = min(T, size - lo)
        _widen(base, lo, m, bb)
        _task_vector(0, x, pre, bf, lo, m, modes, thr, cuts, flags, dens, scales, nscales, st, gst, seeds,
                     ginfo, u, eb, ef)
        for j in range(m):
            out[lo + j] = ef[j]


@njit(nogil=True, cache=True)
def delta_hist(x, base, high_bin):
    """`fused._hist` of |x - base|: high_bin < 0, the high 16 bits; else the low 16 bits inside that bin."""
    h = np.zeros(65536, np.int64)
    xb = np.empty(T, np.uint32)
    xf = xb.view(np.float32)
    bb = np.empty(T, np.uint32)
    bf = bb.view(np.float32)
    size = base.size
    for lo in range(0, size, T):
        m = min(T, size - lo)
        _widen(x, lo, m, xb)
        _widen(base, lo, m, bb)
        for j in range(m):
            xf[j] = xf[j] - bf[j]
        if high_bin < 0:
            for j in range(m):
                h[(xb[j] & np.uint32(0x7FFFFFFF)) >> np.uint32(16)] += 1
        else:
            for j in range(m):
                a = xb[j] & np.uint32(0x7FFFFFFF)
                if np.int64(a >> np.uint32(16)) == high_bin:
                    h[a & np.uint32(0xFFFF)] += 1
    return h


@njit(nogil=True, cache=True)
def delta_cut(x, base, t, quota):
    """One past the flat index of the `quota`-th entry whose |x - base| bits equal `t` (0 when quota is 0)."""
    if quota <= 0:
        return 0
    xb = np.empty(T, np.uint32)
    xf = xb.view(np.float32)
    bb = np.empty(T, np.uint32)
    bf = bb.view(np.float32)
    size = base.size
    seen = 0
    for lo in range(0, size, T):
        m = min(T, size - lo)
        _widen(x, lo, m, xb)
        _widen(base, lo, m, bb)
        for j in range(m):
            xf[j] = xf[j] - bf[j]
            if np.int64(xb[j] & np.uint32(0x7FFFFFFF)) == t:
                seen += 1
                if seen == quota:
                    return lo + j + 1
    return size


@njit(nogil=True, cache=True)
def weighted_sum(xs, w, normalize, total, out16, out32, to16):
    """`ops.weighted_sum`: x_0 w_0 + x_1 w_1 + ... in list order, then / total (linear)."""
    n = len(xs)
    size = xs[0].size
    xb = np.empty(T, np.uint32)
    xf = xb.view(np.float32)
    vb = np.empty(T, np.uint32)
    vf = vb.view(np.float32)
    nan = 0
    for lo in range(0, size, T):
        m = min(T, size - lo)
        _widen(xs[0], lo, m, xb)
        w0 = w[0]
        for j in range(m):
            vf[j] = xf[j] * w0
        for k in range(1, n):
            _widen(xs[k], lo, m, xb)
            wk = w[k]
            for j in range(m):
                vf[j] = vf[j] + xf[j] * wk
        if normalize:
            for j in range(m):
                vf[j] = vf[j] / total
        nan += _store(vb, vf, lo, m, out16, out32, to16)
    return nan


@njit(nogil=True, cache=True)
def lincomb(xs, coeffs, row_numel, row0, out16, out32, to16):
    """`kernels.lincomb`: sum_i c_i x_i in float64 (products and sums in list order), rounded once to float32.
    `coeffs` is [1, n] (one combination) or [rows, n] (per row; this block starts at row `row0`)."""
    n = len(xs)
    size = xs[0].size
    per_row = coeffs.shape[0] > 1
    xb = np.empty(T, np.uint32)
    xf = xb.view(np.float32)
    acc = np.empty(T, np.float64)
    vb = np.empty(T, np.uint32)
    vf = vb.view(np.float32)
    nan = 0
    for lo in range(0, size, T):
        m = min(T, size - lo)
        for k in range(n):
            _widen(xs[k], lo, m, xb)
            if per_row:
                for j in range(m):
                    c = coeffs[row0 + (lo + j) // row_numel, k]
                    t = np.float64(xf[j]) * c
                    acc[j] = t if k == 0 else acc[j] + t
            else:
                c = coeffs[0, k]
                if k == 0:
                    for j in range(m):
                        acc[j] = np.float64(xf[j]) * c
                else:
                    for j in range(m):
                        acc[j] = acc[j] + np.float64(xf[j]) * c
        for j in range(m):
            vf[j] = np.float32(acc[j])
        nan += _store(vb, vf, lo, m, out16, out32, to16)
    return nan


@njit(nogil=True, cache=True)
def products(xa, ba, xb_, bb_, lo, hi, out):
    """out[:hi-lo] = float64(a) * float64(b) over entries [lo, hi), a and b each an input (ba empty) or a task
    vector x - base in float32 (the Gram partials' products; torch then sums them per row)."""
    m = hi - lo
    ab = np.empty(m, np.uint32)
    af = ab.view(np.float32)
    tb = np.empty(m, np.uint32)
    tf = tb.view(np.float32)
    _widen(xa, lo, m, ab)
    if ba.size:
        _widen(ba, lo, m, tb)
        for j in range(m):
            af[j] = af[j] - tf[j]
    _widen(xb_, lo, m, tb)
    if bb_.size:
        cb = np.empty(m, np.uint32)
        cf = cb.view(np.float32)
        _widen(bb_, lo, m, cb)
        for j in range(m):
            tf[j] = tf[j] - cf[j]
    for j in range(m):
        out[j] = np.float64(af[j]) * np.float64(tf[j])


@njit(nogil=True, cache=True)
def _stable_ranks(keys, m, idx, idx2, cnt, ranks):
    """ranks[j] = the position of entry j in a stable ascending sort of keys[:m] (non-negative int32): an LSD
    radix sort of the indices in three 11-bit digits (a digit all entries share is skipped), what a stable
    argsort of |d| gives, in O(m)."""
    for p in range(m):
        idx[p] = p
    for shift in (0, 11, 22):
        cnt[:] = 0
        for p in range(m):
            cnt[((keys[p] >> shift) & 2047) + 1] += 1
        if cnt.max() == m:
            continue
        for b in range(1, 2049):
            cnt[b] += cnt[b - 1]
        for p in range(m):
            q = idx[p]
            dgt = (keys[q] >> shift) & 2047
            idx2[cnt[dgt]] = q
            cnt[dgt] += 1
        for p in range(m):
            idx[p] = idx2[p]
    for p in range(m):
        ranks[idx[p]] = p


@njit(nogil=True, cache=True)
def della(x, base, row_numel, seeds, ginfo, lo_p, eps, rescale, out):
    """`kernels.rank_magnitude_sampling` of the task vector x - base, row by row, into a float32 block: ranks of
    |d| in a stable sort, p = (density - eps) + (rank / (m - 1)) * 2 * eps, kept where u < p (d / p with
    rescale), +0.0 elsewhere."""
    size = base.size
    rows = size // row_numel
    m = row_numel
    d = np.empty(m, np.uint32)
    df = d.view(np.float32)
    tmp = np.empty(m, np.uint32)
    keys = np.empty(m, np.int32)
    ranks = np.empty(m, np.int64)
    idx = np.empty(m, np.int64)
    idx2 = np.empty(m, np.int64)
    cnt = np.empty(2049, np.int64)
    u = np.empty(m, np.float32)
    st = np.zeros((1, STREAM_WORDS), np.uint32)
    gst = np.zeros((1, 2), np.int64)
    modes = np.array([RANDOM])
    _start_streams(modes, seeds, ginfo, st, gst)
    denom = np.float32(m - 1)
    for r in range(rows):
        lo = r * m
        _widen(x, lo, m, d)
        _widen(base, lo, m, tmp)
        tf = tmp.view(np.float32)
        for j in range(m):
            df[j] = df[j] - tf[j]
            # |d| as bits orders like the value; every NaN one key (torch sorts NaNs last, by index)
            keys[j] = np.int32(min(d[j] & np.uint32(0x7FFFFFFF), np.uint32(0x7F800001)))
        if m > 1:
            _stable_ranks(keys, m, idx, idx2, cnt, ranks)
        _draw(st[0], gst[0], seeds[0], ginfo[0, 0], u, m)
        for j in range(m):
            rn = np.float32(0.5) if m == 1 else np.float32(ranks[j]) / denom
            p = lo_p + (rn * _TWO) * eps
            v = df[j] / p if rescale else df[j]
            out[lo + j] = v if u[j] < p else _ZERO


@njit(nogil=True, cache=True)
def variance(xs, base, out):
    """`kernels.variance_key` of the task vectors x_k - base: in float64, the mean of the n deltas, then the
    mean of their squared deviations, rounded once to float32 (SCE's selection key)."""
    n = len(xs)
    size = base.size
    bb = np.empty(T, np.uint32)
    bf = bb.view(np.float32)
    xb = np.empty(T, np.uint32)
    xf = xb.view(np.float32)
    ms = np.empty((n, T), np.float64)
    mean = np.empty(T, np.float64)
    acc = np.empty(T, np.float64)
    fn = np.float64(n)
    for lo in range(0, size, T):
        m = min(T, size - lo)
        _widen(base, lo, m, bb)
        for k in range(n):
            _widen(xs[k], lo, m, xb)
            for j in range(m):
                ms[k, j] = np.float64(xf[j] - bf[j])
        for j in range(m):
            mean[j] = ms[0, j]
        for k in range(1, n):
            for j in range(m):
                mean[j] = mean[j] + ms[k, j]
        for j in range(m):
            mean[j] = mean[j] / fn
        for k in range(n):
            for j in range(m):
                dev = ms[k, j] - mean[j]
                dev = dev * dev
                acc[j] = dev if k == 0 else acc[j] + dev
        for j in range(m):
            out[lo + j] = np.float32(acc[j] / fn)
