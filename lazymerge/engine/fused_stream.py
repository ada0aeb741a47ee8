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

Tile loops index slices (`src[lo:lo + m]`, `tile[:m]`) with the loop counter alone, never `a[lo + j]`: LLVM
vectorizes the first form and not the second (a signed sum index keeps numba's negative-index wraparound in the
loop), 4-5x slower per element (issue 22: the fused chains were slower than the torch path they replaced).
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
def _widen(src, bits):
    """bits[:src.size] = the bfloat16 tile `src` as float32 bits (src: a slice of the stored block)."""
    for j in range(src.size):
        bits[j] = np.uint32(src[j]) << np.uint32(16)


@njit(inline="always")
def _store(vbits, vf, lo, m, out16, out32, to16):
    """Write a float32 tile to the output at [lo, lo + m): as bfloat16 (round to nearest even) or as float32.
    Returns how many entries are NaN (the caller then converts the block with torch: see the module docstring)."""
    nan = 0
    if to16:
        o = out16[lo:lo + m]
        for j in range(m):
            u = np.uint64(vbits[j])
            nan += (u & np.uint64(0x7FFFFFFF)) > np.uint64(0x7F800000)
            o[j] = np.uint16((u + (((u >> np.uint64(16)) & np.uint64(1)) + np.uint64(0x7FFF))) >> np.uint64(16))
    else:
        o32 = out32[lo:lo + m]
        for j in range(m):
            o32[j] = vf[j]
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
    """Model k's task vector on the tile [lo, lo + m) into ef[:m] (eb: its bits; x: model k's stored tile, bf:
    the base's tile as float32): x - base, sparsified as the ops do it (trim: d * mask; drop: d * (u < p), then
    / p with rescale), then each rescale (d * s), in that order."""
    mode = modes[k]
    if mode == PRECOMPUTED:
        p = pre[lo:lo + m]
        for j in range(m):
            ef[j] = p[j]
    else:
        _widen(x, eb)
        for j in range(m):
            ef[j] = ef[j] - bf[j]
    if mode == MAGNITUDE:
        t, cut = thr[k, 0], cuts[k, 0] - lo           # tie cuts are flat indices: made relative to the tile
        for j in range(m):
            ef[j] = ef[j] * np.float32(_mask(eb[j] & np.uint32(0x7FFFFFFF), t, cut, j))
    elif mode == OUTLIERS:
        t0, c0, t1, c1 = thr[k, 0], cuts[k, 0] - lo, thr[k, 1], cuts[k, 1] - lo
        upto, top = flags[k, 0], flags[k, 1]
        for j in range(m):
            a = eb[j] & np.uint32(0x7FFFFFFF)
            keep = True
            if upto:
                keep = _mask(a, t0, c0, j)
            if top:
                keep = keep & (not _mask(a, t1, c1, j))
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
    (`ops.combine`). Returns how many output entries are NaN.

    Long because the whole chain runs tile by tile in one pass: its scratch tiles are allocated once here, and a
    helper per step would need them all passed in."""
    n = len(xs)
    size = base.size
    bb = np.empty(T, np.uint32)
    bfa = bb.view(np.float32)
    eba = np.empty(n * T, np.uint32)          # model k's tile at [k T, k T + m)
    efa = eba.view(np.float32)
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
        _widen(base[lo:lo + m], bb)
        bf = bfa[:m]
        for k in range(n):
            _task_vector(k, xs[k][lo:lo + m], pres[k], bf, lo, m, modes, thr, cuts, flags, dens, scales, nscales,
                         st, gst, seeds, ginfo, u[:m], eba[k * T:k * T + m], efa[k * T:k * T + m])
        mx = mixed[:m]
        v = vf[:m]
        if elect == 0:
            e = efa[:m]
            for j in range(m):
                mx[j] = e[j]
            for k in range(1, n):
                e = efa[k * T:k * T + m]
                for j in range(m):
                    mx[j] = mx[j] + e[j]
            for j in range(m):
                y = mx[j]
                if use_total:
                    y = y / total
                if use_lam:
                    y = y * lam
                v[j] = bf[j] + y
        else:
            ev = el[:m]
            dv = div[:m]
            e = efa[:m]
            if elect == 2:
                for j in range(m):
                    ev[j] = _sign(e[j])
            else:
                for j in range(m):
                    ev[j] = e[j]
            for k in range(1, n):
                e = efa[k * T:k * T + m]
                if elect == 2:
                    for j in range(m):
                        ev[j] = ev[j] + _sign(e[j])
                else:
                    for j in range(m):
                        ev[j] = ev[j] + e[j]
            for j in range(m):
                ev[j] = np.float32(ev[j] >= _ZERO) * _TWO - _ONE
            e = efa[:m]
            w0 = w[0]
            for j in range(m):
                x = e[j]
                a = np.float32(_sign(x) == ev[j])       # a zero entry (sign 0) never agrees
                mx[j] = x * a
                dv[j] = a * w0
            for k in range(1, n):
                e = efa[k * T:k * T + m]
                wk = w[k]
                for j in range(m):
                    x = e[j]
                    a = np.float32(_sign(x) == ev[j])
                    mx[j] = mx[j] + x * a
                    dv[j] = dv[j] + a * wk
            for j in range(m):
                y = mx[j]
                if normalize:
                    d = dv[j]
                    y = y / (d + np.float32(d == _ZERO))
                if use_lam:
                    y = y * lam
                v[j] = bf[j] + y
        nan += _store(vb, vf, lo, m, out16, out32, to16)
    return nan


@njit(nogil=True, cache=True)
def task_vector(x, base, pre, modes, thr, cuts, flags, dens, scales, nscales, seeds, ginfo, out):
    """One model's task vector (as `family` computes it) into a float32 block: for a consumer that needs it."""
    size = base.size
    bb = np.empty(T, np.uint32)
    bfa = bb.view(np.float32)
    eb = np.empty(T, np.uint32)
    ef = eb.view(np.float32)
    u = np.empty(T, np.float32)
    st = np.zeros((1, STREAM_WORDS), np.uint32)
    gst = np.zeros((1, 2), np.int64)
    _start_streams(modes, seeds, ginfo, st, gst)
    for lo in range(0, size, T):
        m = min(T, size - lo)
        _widen(base[lo:lo + m], bb)
        _task_vector(0, x[lo:lo + m], pre, bfa[:m], lo, m, modes, thr, cuts, flags, dens, scales, nscales, st, gst,
                     seeds, ginfo, u[:m], eb[:m], ef[:m])
        o = out[lo:lo + m]
        for j in range(m):
            o[j] = ef[j]


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
        _widen(x[lo:lo + m], xb)
        _widen(base[lo:lo + m], bb)
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
        _widen(x[lo:lo + m], xb)
        _widen(base[lo:lo + m], bb)
        for j in range(m):
            xf[j] = xf[j] - bf[j]
        k = 0                                   # a vectorized count first: most tiles hold fewer than needed
        for j in range(m):
            k += np.int64(xb[j] & np.uint32(0x7FFFFFFF)) == t
        if seen + k < quota:
            seen += k
            continue
        for j in range(m):
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
        v = vf[:m]
        _widen(xs[0][lo:lo + m], xb)
        w0 = w[0]
        for j in range(m):
            v[j] = xf[j] * w0
        for k in range(1, n):
            _widen(xs[k][lo:lo + m], xb)
            wk = w[k]
            for j in range(m):
                v[j] = v[j] + xf[j] * wk
        if normalize:
            for j in range(m):
                v[j] = v[j] / total
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
        a = acc[:m]
        for k in range(n):
            _widen(xs[k][lo:lo + m], xb)
            if per_row:                         # the tile row segment by row segment, each with its coefficient
                s = 0
                while s < m:
                    r = (lo + s) // row_numel
                    end = min(m, (r + 1) * row_numel - lo)
                    c = coeffs[row0 + r, k]
                    xs_ = xf[s:end]
                    as_ = a[s:end]
                    if k == 0:
                        for j in range(end - s):
                            as_[j] = np.float64(xs_[j]) * c
                    else:
                        for j in range(end - s):
                            as_[j] = as_[j] + np.float64(xs_[j]) * c
                    s = end
            else:
                c = coeffs[0, k]
                if k == 0:
                    for j in range(m):
                        a[j] = np.float64(xf[j]) * c
                else:
                    for j in range(m):
                        a[j] = a[j] + np.float64(xf[j]) * c
        v = vf[:m]
        for j in range(m):
            v[j] = np.float32(a[j])
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
    _widen(xa[lo:hi], ab)
    if ba.size:
        _widen(ba[lo:hi], tb)
        for j in range(m):
            af[j] = af[j] - tf[j]
    _widen(xb_[lo:hi], tb)
    if bb_.size:
        cb = np.empty(m, np.uint32)
        cf = cb.view(np.float32)
        _widen(bb_[lo:hi], cb)
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
    tf = tmp.view(np.float32)
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
        _widen(x[lo:lo + m], d)
        _widen(base[lo:lo + m], tmp)
        for j in range(m):
            df[j] = df[j] - tf[j]
            # |d| as bits orders like the value; every NaN one key (torch sorts NaNs last, by index)
            keys[j] = np.int32(min(d[j] & np.uint32(0x7FFFFFFF), np.uint32(0x7F800001)))
        if m > 1:
            _stable_ranks(keys, m, idx, idx2, cnt, ranks)
        _draw(st[0], gst[0], seeds[0], ginfo[0, 0], u, m)
        o = out[lo:lo + m]
        for j in range(m):
            rn = np.float32(0.5) if m == 1 else np.float32(ranks[j]) / denom
            p = lo_p + (rn * _TWO) * eps
            v = df[j] / p if rescale else df[j]
            o[j] = v if u[j] < p else _ZERO


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
    ms = np.empty(n * T, np.float64)          # model k's deltas at [k T, k T + m)
    mean = np.empty(T, np.float64)
    acc = np.empty(T, np.float64)
    fn = np.float64(n)
    for lo in range(0, size, T):
        m = min(T, size - lo)
        _widen(base[lo:lo + m], bb)
        for k in range(n):
            _widen(xs[k][lo:lo + m], xb)
            mk = ms[k * T:k * T + m]
            for j in range(m):
                mk[j] = np.float64(xf[j] - bf[j])
        mn = mean[:m]
        m0 = ms[:m]
        for j in range(m):
            mn[j] = m0[j]
        for k in range(1, n):
            mk = ms[k * T:k * T + m]
            for j in range(m):
                mn[j] = mn[j] + mk[j]
        for j in range(m):
            mn[j] = mn[j] / fn
        ac = acc[:m]
        for k in range(n):
            mk = ms[k * T:k * T + m]
            for j in range(m):
                dev = mk[j] - mn[j]
                dev = dev * dev
                ac[j] = dev if k == 0 else ac[j] + dev
        o = out[lo:lo + m]
        for j in range(m):
            o[j] = np.float32(ac[j] / fn)
