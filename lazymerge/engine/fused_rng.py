"""torch's CPU random stream, bit for bit, inside numba kernels: so that DARE and DELLA draw their masks in the
same pass that applies them, without a float32 block of uniforms per model.

The reference is `kernels.uniform_rows`: a tensor's rows are cut into fixed row groups, and group g is drawn
whole with `torch.rand` from a `torch.Generator` seeded with `derive_seed(seed, "row-group", g)`. torch's CPU
generator is MT19937 seeded with the low 32 bits of the seed (`at::mt19937`, `init_with_uint32`), and
`torch.rand` turns each 32-bit draw r into the float32 `(r & 0xFFFFFF) * 2**-24` (`uniform_real_distribution`,
one draw per element, in order). So a kernel that seeds MT19937 the same way, skips to the block's first element
and draws in order gets the same numbers; tests/test_fused_stream.py checks them against `torch.rand`.

A stream is a small uint32 array: the 624 words of state, then the read position (`POS`).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from . import kernels as K

from numba import njit

N = 624
POS = N                      # index of the read position in a stream array
STREAM_WORDS = N + 1
_U24 = np.float32(2.0 ** -24)


@njit(nogil=True, cache=True)
def mt_seed(st, seed):
    """Seed stream `st` with the low 32 bits of `seed` (at::mt19937's init_with_uint32); the next draw twists."""
    s = np.uint64(seed) & np.uint64(0xFFFFFFFF)
    st[0] = s
    for i in range(1, N):
        s = (np.uint64(1812433253) * (s ^ (s >> np.uint64(30))) + np.uint64(i)) & np.uint64(0xFFFFFFFF)
        st[i] = s
    st[POS] = N


@njit(nogil=True, cache=True)
def _twist(st):
    for i in range(N):
        y = (np.uint64(st[i]) & np.uint64(0x80000000)) | (np.uint64(st[(i + 1) % N]) & np.uint64(0x7FFFFFFF))
        v = np.uint64(st[(i + 397) % N]) ^ (y >> np.uint64(1))
        if y & np.uint64(1):
            v ^= np.uint64(0x9908B0DF)
        st[i] = v
    st[POS] = 0


@njit(nogil=True, cache=True)
def mt_skip(st, k):
    """Advance the stream by k draws (whole states are twisted without being tempered)."""
    pos = np.int64(st[POS])
    if k <= N - pos:
        st[POS] = pos + k
        return
    k -= N - pos
    while True:
        _twist(st)
        if k <= N:
            st[POS] = k
            return
        k -= N


@njit(nogil=True, cache=True)
def mt_uniform(st, out, m):
    """out[:m] = the next m float32 uniforms of the stream, as torch.rand draws them."""
    pos = np.int64(st[POS])
    for j in range(m):
        if pos >= N:
            _twist(st)
            pos = 0
        y = np.uint64(st[pos])
        pos += 1
        y ^= y >> np.uint64(11)
        y ^= (y << np.uint64(7)) & np.uint64(0x9D2C5680)
        y ^= (y << np.uint64(15)) & np.uint64(0xEFC60000)
        y ^= y >> np.uint64(18)
        out[j] = np.float32(y & np.uint64(0xFFFFFF)) * _U24
    st[POS] = pos


@njit(nogil=True, cache=True)
def rows_uniform(st, seeds, first, group_numel, skip, out, n):
    """out[:n] = the uniforms of a block: groups `seeds[first:]` in order, the first entered `skip` draws in
    (the block's offset inside it), each group `group_numel` draws long. Returns nothing; `st` is scratch."""
    g = first
    mt_seed(st, seeds[g])
    mt_skip(st, skip)
    left = group_numel - skip
    done = 0
    while done < n:
        if left == 0:
            g += 1
            mt_seed(st, seeds[g])
            left = group_numel
        m = min(left, n - done)
        mt_uniform(st, out[done:], m)
        done += m
        left -= m


def new_stream() -> np.ndarray:
    return np.zeros(STREAM_WORDS, np.uint32)


def block_stream(seed_parts: Sequence, shape: Sequence[int], rows: tuple[int, int]) -> tuple[np.ndarray, int, int]:
    """What a kernel needs to draw `kernels.uniform_rows(derive_seed(*seed_parts), shape, rows)` itself: the seeds of
    the row groups the block overlaps (uint32, low bits of each group's seed), the draws per group, and how far into
    its first group the block starts."""
    seed = K.derive_seed(*seed_parts)
    total_rows, row_numel = K.row_layout(tuple(shape))
    a, b = rows
    group_rows = max(1, K.GROUP_NUMEL // max(1, row_numel))
    g0, g1 = a // group_rows, max(a, b - 1) // group_rows
    seeds = np.array([K.derive_seed(seed, "row-group", g) & 0xFFFFFFFF for g in range(g0, g1 + 1)], np.uint32)
    return seeds, group_rows * row_numel, (a - g0 * group_rows) * row_numel
