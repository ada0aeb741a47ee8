"""GGML's legacy quantizers (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1) on row blocks: pure tensor code, no I/O.

The reference is the `gguf` package's quantizer (`gguf.quants.quantize`), which llama.cpp's converter uses. Its
numpy code runs at 100-200 MB/s of float32 on one core and holds the GIL between its many small passes, which
would make writing Q8_0 cost about as much as the merge itself. So with numba (the `fast` extra) each type runs as
one parallel pass per block of 32 values that releases the GIL (engine.fused's rules: per value the same float32
operations in the same order as gguf's numpy code, every constant a float32, no fastmath; the block scales are
rounded to float16 by torch, as numpy does, round to nearest even). The bytes are gguf's, bit for bit, for finite
values (tests/test_gguf_write.py compares them on random, tied and extreme values). Without numba, or with
LAZYMERGE_FUSED=0, gguf's own code runs.
"""
from __future__ import annotations

import numpy as np
import torch

from .. import memory
from ..dtypes import BLOCK_CODES
from . import fused

CHUNK_VALUES = 1 << 20          # values per call of gguf's quantizer (its temporaries are a few of these)

try:  # pragma: no cover - exercised when the extra is installed
    from numba import njit, prange
except ImportError:  # pragma: no cover
    njit = None


def quantize(x: torch.Tensor, code: str) -> torch.Tensor:
    """Rows of `x` ([rows, row values], float) as GGML blocks of type `code`: [rows, row bytes] uint8."""
    per, nbytes = BLOCK_CODES[code]
    rows, n = x.shape
    out = memory.empty((rows, n // per * nbytes), torch.uint8)
    if fused.available() and njit is not None:
        blocks = x.float().contiguous().view(-1, per)
        scales = torch.empty((blocks.shape[0], 2), dtype=torch.float32)
        _KERNELS[code](blocks.numpy(), out.view(-1, nbytes).numpy(), scales.numpy())
        _put_scales(out.view(-1, nbytes), scales, code)
        return out
    import gguf

    qtype = gguf.GGMLQuantizationType[code]
    step = max(1, CHUNK_VALUES // max(1, n))
    for a in range(0, rows, step):
        out[a:a + step] = torch.from_numpy(gguf.quants.quantize(x[a:a + step].float().numpy(), qtype))
    return out


def _put_scales(out: torch.Tensor, scales: torch.Tensor, code: str) -> None:
    """The block scales (d, and m for the _1 types) as float16 at the start of each block."""
    half = scales.to(torch.float16).view(torch.uint8)      # [blocks, 4]: d then m
    width = 4 if code in ("Q4_1", "Q5_1") else 2
    out[:, :width] = half[:, :width]


if njit is not None:
    _F0 = np.float32(0.0)
    _F1 = np.float32(1.0)
    _F2 = np.float32(2.0)
    _HALF = np.float32(0.5)

    @njit(inline="always")
    def _inverse(d):           # np.where(d == 0, 0, 1 / d), float32
        return _F0 if d == _F0 else _F1 / d

    @njit(parallel=True, nogil=True, cache=True)
    def _q8_0(blocks, out, scales):
        for b in prange(blocks.shape[0]):
            amax = _F0
            for i in range(32):
                amax = max(amax, abs(blocks[b, i]))
            d = amax / np.float32(127.0)
            inv = _inverse(d)
            scales[b, 0] = d
            for i in range(32):
                v = blocks[b, i] * inv
                a = abs(v)
                f = np.floor(a)
                r = f + np.floor(_F2 * (a - f))          # np_roundf: half away from zero
                q = np.int32(-r) if v < _F0 else np.int32(r)
                out[b, 2 + i] = np.uint8(q & 0xFF)

    @njit(inline="always")
    def _signed_max(blocks, b):    # the first value of largest magnitude (numpy's argmax), signed
        best, at = np.float32(-1.0), 0
        for i in range(32):
            a = abs(blocks[b, i])
            if a > best:
                best, at = a, i
        return blocks[b, at]

    @njit(inline="always")
    def _level(v, top):            # np.trunc(v).astype(np.uint8).clip(0, top), v >= 0
        return min(np.int32(np.trunc(v)), top)

    @njit(inline="always")
    def _pack(q, out, b, at, high):
        for j in range(16):
            out[b, at + j] = np.uint8((q[j] & 0x0F) | ((q[j + 16] << 4) & 0xF0))
        if high >= 0:
            for k in range(4):
                byte = 0
                for bit in range(8):
                    byte |= ((q[8 * k + bit] >> 4) & 1) << bit
                out[b, high + k] = np.uint8(byte)

    @njit(parallel=True, nogil=True, cache=True)
    def _symmetric(blocks, out, scales, div, bias, top, high, at):
        for b in prange(blocks.shape[0]):
            d = _signed_max(blocks, b) / div
            inv = _inverse(d)
            scales[b, 0] = d
            q = np.empty(32, dtype=np.int32)
            for i in range(32):
                q[i] = _level(blocks[b, i] * inv + bias, top)
            _pack(q, out, b, at, high)

    @njit(parallel=True, nogil=True, cache=True)
    def _affine(blocks, out, scales, div, top, high, at):
        for b in prange(blocks.shape[0]):
            hi, lo = blocks[b, 0], blocks[b, 0]
            for i in range(1, 32):
                hi = max(hi, blocks[b, i])
                lo = min(lo, blocks[b, i])
            d = (hi - lo) / div
            inv = _inverse(d)
            scales[b, 0], scales[b, 1] = d, lo
            q = np.empty(32, dtype=np.int32)
            for i in range(32):
                q[i] = _level((blocks[b, i] - lo) * inv + _HALF, top)
            _pack(q, out, b, at, high)

    _KERNELS = {
        "Q8_0": _q8_0,
        "Q4_0": lambda x, o, s: _symmetric(x, o, s, np.float32(-8.0), np.float32(8.5), 15, -1, 2),
        "Q5_0": lambda x, o, s: _symmetric(x, o, s, np.float32(-16.0), np.float32(16.5), 31, 2, 6),
        "Q4_1": lambda x, o, s: _affine(x, o, s, np.float32(15.0), 15, -1, 4),
        "Q5_1": lambda x, o, s: _affine(x, o, s, np.float32(31.0), 31, 4, 8),
    }
