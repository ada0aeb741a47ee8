"""Fresh CPU buffers backed by transparent huge pages where the kernel allows it.

Why: every block the engine makes is a fresh allocation (glibc hands anything above 1 MiB out as its own mmap, so
that freed blocks leave RSS at once: engine/run.py), and its first touch faults in 4 KiB pages one by one. On a
VM that costs more than the conversion or kernel that fills the block (2.5 ns an element for a bf16->float32 copy
into new memory, 0.7 ns with huge pages). With THP in `madvise` mode (the usual default), asking for huge pages on
the buffer before it is touched makes each fault map 2 MiB. Contents are unaffected: this only changes how the
pages are mapped.
"""
from __future__ import annotations

import ctypes
from typing import Sequence

import torch

_HUGE = 1 << 21
_MIN_BYTES = 2 * _HUGE
_MADV_HUGEPAGE = 14

try:
    _libc = ctypes.CDLL("libc.so.6", use_errno=True)
    _madvise = _libc.madvise
    _madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
except (OSError, AttributeError):  # not glibc/Linux: plain allocations
    _madvise = None


def empty(shape: Sequence[int] | int, dtype: torch.dtype) -> torch.Tensor:
    """`torch.empty(shape, dtype=dtype)` on the CPU, its 2 MiB-aligned interior advised to use huge pages."""
    out = torch.empty(shape, dtype=dtype)
    nbytes = out.numel() * out.element_size()
    if _madvise is not None and nbytes >= _MIN_BYTES:
        p = out.data_ptr()
        start = (p + _HUGE - 1) & ~(_HUGE - 1)
        end = (p + nbytes) & ~(_HUGE - 1)
        if end > start:
            _madvise(start, end - start, _MADV_HUGEPAGE)     # advisory: failure leaves 4 KiB pages
    return out


def empty_like(x: torch.Tensor) -> torch.Tensor:
    return empty(tuple(x.shape), x.dtype)
