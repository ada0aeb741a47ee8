"""Fused CPU kernels (numba) for the hot chains of TIES-family merges: one pass where torch makes several.

Why: on CPU the exact top-k and the sign election are memory-bound chains of element-wise torch ops (abs, view,
shift, bincount; mask, sign, compare, multiply, add, divide), each a full pass over a block. Each kernel here does
one chain in a single pass that releases the GIL (`nogil=True`), so the scheduler's other workers keep running.

Serial on purpose: the scheduler already runs one worker per core (engine/run.py `choose_threads`), each on its own
block, so a kernel has no idle core to spread over. And numba's parallel kernels go through a threading layer that
is not always thread-safe: on the `workqueue` layer (numba's fallback where neither TBB nor OpenMP loads) two
scheduler threads launching parallel kernels at once abort the whole process (issue 26). A serial kernel never
touches a threading layer.

Bit-identity with the torch kernels (`engine.kernels`, the reference) is by construction:

* histograms are integer counts: any order, any chunking gives the same counts;
* per element, the same float32 operations in the same order as the torch chain (numba compiles float32 arithmetic
  on float32 values; every constant is a float32; no fastmath), so each element rounds exactly as torch does;
* signs follow torch.sign ((0 < x) - (x < 0): NaN and ±0 have sign 0), |x| is the bit pattern with the sign bit
  cleared, as torch.abs.

numba is a dependency; LAZYMERGE_FUSED=0 runs the torch kernels instead (the reference). tests/
test_fused.py compares every kernel with its torch chain with torch.equal.
"""
from __future__ import annotations

import os
from typing import Sequence

import numpy as np
import torch
from numba import njit, prange   # prange: a plain range in a serial kernel
from torch import Tensor

from .. import memory

_BINS = 65536
# below this many elements numba's call overhead beats the saving and torch runs (the env variable lets a test or
# benches/hash_corpus.py send every block through the fused kernels)
MIN_NUMEL = int(os.environ.get("LAZYMERGE_FUSED_MIN_NUMEL", 1 << 14))


def available() -> bool:
    """Whether the fused kernels run (not disabled with LAZYMERGE_FUSED=0)."""
    return os.environ.get("LAZYMERGE_FUSED", "1") != "0"


def use(*xs: Tensor) -> bool:
    """Whether to run the fused kernel on these blocks: CPU float32, contiguous, and big enough to pay off."""
    return (available() and all(x.device.type == "cpu" and x.dtype == torch.float32 and x.is_contiguous()
                                for x in xs) and xs[0].numel() >= MIN_NUMEL)


def _chunks(n: int) -> int:
    return 1                  # serial kernels (see the module docstring): one histogram, one scan


def _flat(x: Tensor) -> np.ndarray:
    return x.reshape(-1).numpy()


_ONE = np.float32(1.0)
_ZERO = np.float32(0.0)
_MINUS = np.float32(-1.0)
_ABS = np.int32(0x7FFFFFFF)

# Branch-free on purpose: the kernels often write in place (out is an input), where LLVM cannot vectorize, and
# the signs and masks of real deltas are random, so every data-dependent branch would be mispredicted half of
# the time (15 ns an element instead of 1). Booleans become 0/1 floats (exact), selects become arithmetic.


@njit(inline="always")
def _sign(x):  # torch.sign: (0 < x) - (x < 0), NaN -> 0
    return np.float32(x > _ZERO) - np.float32(x < _ZERO)


@njit(nogil=True, cache=True)
def _hist(bits, nchunks, high_bin):
    """high_bin < 0: histogram of the high 16 bits of |x|; else of the low 16 bits of the entries in that bin."""
    n = bits.size
    step = (n + nchunks - 1) // nchunks
    hs = np.zeros((nchunks, _BINS), np.uint32)         # a chunk has < 2**32 entries; half the cache of int64
    for c in prange(nchunks):
        h = hs[c]
        for i in range(c * step, min(n, (c + 1) * step)):
            b = bits[i] & _ABS
            if high_bin < 0:
                h[b >> 16] += 1
            elif (b >> 16) == high_bin:
                h[b & 0xFFFF] += 1
    out = np.zeros(_BINS, np.int64)
    for c in range(nchunks):
        out += hs[c]
    return out


@njit(nogil=True, cache=True)
def _cut(bits, t, quota, nchunks):
    """One past the flat index of the `quota`-th entry whose |x| bits equal `t` (0 when quota is 0)."""
    n = bits.size
    if quota <= 0:
        return 0
    step = (n + nchunks - 1) // nchunks
    counts = np.zeros(nchunks, np.int64)
    for c in prange(nchunks):
        k = 0
        for i in range(c * step, min(n, (c + 1) * step)):
            if (bits[i] & _ABS) == t:
                k += 1
        counts[c] = k
    seen = 0
    for c in range(nchunks):
        if seen + counts[c] >= quota:
            for i in range(c * step, min(n, (c + 1) * step)):
                if (bits[i] & _ABS) == t:
                    seen += 1
                    if seen == quota:
                        return i + 1
        seen += counts[c]
    return n


@njit(nogil=True, cache=True)
def _nonfinite(bits, exp):
    """How many entries of a float block (its bits) are NaN or +-Inf: all bits of the exponent `exp` set."""
    k = 0
    for i in prange(bits.size):
        k += (bits[i] & exp) == exp
    return k


@njit(nogil=True, cache=True)
def _widen_bf16(src, dst):
    """dst = src as float32 bits (bfloat16 is the top half of a float32: the shift is exact, NaN payloads
    included, which is what torch's conversion does) and how many entries are NaN or +-Inf."""
    k = 0
    for i in prange(src.size):
        v = np.uint32(src[i])
        dst[i] = v << np.uint32(16)
        k += (v & np.uint32(0x7F80)) == np.uint32(0x7F80)
    return k


_TILE = 4096


@njit(nogil=True, cache=True)
def _keep_mul(d, bits, t, cut, out):
    """out = d * keep (keep: |d| above the threshold, or equal to it before `cut`), as `d.mul_(bool mask)`;
    tile by tile through a scratch array, as `_combine` (out is usually d)."""
    size = d.size
    for c in prange((size + _TILE - 1) // _TILE):
        lo = c * _TILE
        hi = min(size, lo + _TILE)
        tmp = np.empty(hi - lo, np.float32)
        x = d[lo:hi]
        bb = bits[lo:hi]
        for j in range(hi - lo):
            b = bb[j] & _ABS
            tmp[j] = x[j] * np.float32((b > t) | ((b == t) & (lo + j < cut)))
        out[lo:hi] = tmp


@njit(nogil=True, cache=True)
def _elect(es, count, out):
    """out = (sum of the e_k, or of their signs, in list order) >= 0."""
    n = len(es)
    for i in prange(out.size):
        s = _sign(es[0][i]) if count else es[0][i]
        for k in range(1, n):
            s = s + (_sign(es[k][i]) if count else es[k][i])
        out[i] = s >= _ZERO


@njit(nogil=True, cache=True)
def _combine(es, w, nonneg, elect, normalize, lam, scale, base, out):
    """base + lam * (sum_k agree_k e_k) / (sum_k agree_k w_k), each step the float32 op of the torch chain.

    Tile by tile through small scratch arrays: `out` is usually `base` (donated), and a loop that stores into
    one of its inputs is not vectorized (15 ns an element); loops into fresh scratch are (1 ns)."""
    n = len(es)
    size = out.size
    for c in prange((size + _TILE - 1) // _TILE):
        lo = c * _TILE
        hi = min(size, lo + _TILE)
        m = hi - lo
        el = np.empty(m, np.float32)
        mixed = np.empty(m, np.float32)
        div = np.empty(m, np.float32)
        if elect == 0:
            nb = nonneg[lo:hi]
            for j in range(m):
                el[j] = np.float32(nb[j]) * np.float32(2.0) - _ONE    # elected sign: +1 / -1
        else:                     # elect here: (sum of e_k or of their signs) >= 0, as `_elect`
            e = es[0][lo:hi]
            for j in range(m):
                el[j] = _sign(e[j]) if elect == 2 else e[j]
            for k in range(1, n):
                e = es[k][lo:hi]
                for j in range(m):
                    el[j] = el[j] + (_sign(e[j]) if elect == 2 else e[j])
            for j in range(m):
                el[j] = np.float32(el[j] >= _ZERO) * np.float32(2.0) - _ONE
        e = es[0][lo:hi]
        w0 = w[0]
        for j in range(m):
            x = e[j]
            a = np.float32(_sign(x) == el[j])                        # a zero entry (sign 0) never agrees
            mixed[j] = x * a
            div[j] = a * w0
        for k in range(1, n):
            e = es[k][lo:hi]
            wk = w[k]
            for j in range(m):
                x = e[j]
                a = np.float32(_sign(x) == el[j])
                mixed[j] = mixed[j] + x * a
                div[j] = div[j] + a * wk
        b = base[lo:hi]
        for j in range(m):
            v = mixed[j]
            if normalize:
                # masked_fill(div == 0, 1): adding 1 to a zero (of either sign) gives 1; adding +0 changes no
                # other value (nonzero, inf or NaN)
                d = div[j]
                v = v / (d + np.float32(d == _ZERO))
            if scale:
                v = v * lam
            mixed[j] = b[j] + v
        out[lo:hi] = mixed


_EXPONENTS = {torch.float32: (np.int32, 0x7F800000), torch.bfloat16: (np.int16, 0x7F80),
              torch.float16: (np.int16, 0x7C00)}


def finite_checkable(x: Tensor) -> bool:
    """Whether `all_finite` can check this block: a float32/bf16/f16 contiguous CPU block, big enough."""
    return (available() and x.dtype in _EXPONENTS and x.device.type == "cpu" and x.is_contiguous()
            and x.numel() >= MIN_NUMEL)


def finite_checkable_dtype(dtype: torch.dtype) -> bool:
    """`finite_checkable` for a block not read yet (its size aside)."""
    return available() and dtype in _EXPONENTS


def all_finite(x: Tensor) -> bool:
    """`torch.isfinite(x).all()` in one vectorized pass over the bits (the check every loaded block gets)."""
    itype, exp = _EXPONENTS[x.dtype]
    return _nonfinite(x.reshape(-1).view(torch.int32 if itype is np.int32 else torch.int16).numpy(),
                      itype(exp)) == 0


def widen_checked(raw: Tensor) -> tuple[Tensor, bool]:
    """`raw.float()` of a bfloat16 block and whether it is all finite, in one pass (a load's conversion and its
    check, which otherwise each read the block)."""
    out = memory.empty(tuple(raw.shape), torch.float32)
    bad = _widen_bf16(raw.reshape(-1).view(torch.int16).numpy().view(np.uint16),
                      out.reshape(-1).view(torch.int32).numpy().view(np.uint32))
    return out, bad == 0


def topk_hist(d: Tensor, high_bin: int = -1) -> Tensor:
    """`kernels.topk_pass1` (high_bin < 0) or `topk_pass2`'s histogram for bin `high_bin`, in one pass."""
    bits = _flat(d).view(np.int32)
    return torch.from_numpy(_hist(bits, _chunks(bits.size), high_bin))


def keep_mul(d: Tensor, threshold: int, quota: int, out: Tensor, all_equal: bool = False) -> Tensor:
    """`d * topk_mask(d, ...)` into `out` (may be `d`): the threshold's bit pattern and this block's tie quota
    (`all_equal`: the quota is every entry equal to the threshold, so no scan for the cut is needed)."""
    bits = _flat(d).view(np.int32)
    cut = bits.size if all_equal else _cut(bits, np.int32(threshold), quota, _chunks(bits.size))
    _keep_mul(_flat(d), bits, np.int32(threshold), cut, _flat(out))
    return out


def elect_nonneg(es: Sequence[Tensor], consensus: str) -> Tensor:
    """`kernels.elect_nonneg` in one pass."""
    out = memory.empty(tuple(es[0].shape), torch.bool)
    _elect(tuple(_flat(e) for e in es), consensus == "count", _flat(out))
    return out


class Deferred:
    """The sign election left to the combine kernel (`elect_later`): what the `elect` task returns when the fused
    kernels run, so that the election costs no pass and no bool block of its own. Any other consumer gets the bool
    block from `resolve` (before it modifies the task vectors)."""

    def __init__(self, consensus: str, es: Sequence[Tensor]) -> None:
        self.consensus = consensus
        self.es = list(es)


def elect_later(consensus: str, es: Sequence[Tensor]) -> Deferred:
    return Deferred(consensus, es)


def resolve(nonneg: "Tensor | Deferred") -> Tensor:
    """The bool election block, computing a deferred one now."""
    return elect_nonneg(nonneg.es, nonneg.consensus) if isinstance(nonneg, Deferred) else nonneg


_NO_SIGN = np.zeros(0, dtype=np.bool_)


def combine_elected(es: Sequence[Tensor], weights: Sequence[float], nonneg: "Tensor | Deferred", normalize: bool,
                    lam: float, base: Tensor, out: Tensor) -> Tensor:
    """`base + lam * kernels.combine_elected(es, weights, nonneg, ...)` in one pass, into `out` (may be `base`);
    with a `Deferred` election, `kernels.elect_nonneg` is computed in the same pass."""
    w = np.array(weights, dtype=np.float32)        # torch rounds a Python scalar to the tensor's float32
    if isinstance(nonneg, Deferred):
        sign, elect = _NO_SIGN, 2 if nonneg.consensus == "count" else 1
    else:
        sign, elect = _flat(nonneg.contiguous()), 0
    _combine(tuple(_flat(e) for e in es), w, sign, elect, normalize, np.float32(lam), lam != 1.0, _flat(base),
             _flat(out))
    return out
