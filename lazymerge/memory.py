"""CPU buffers for the engine's blocks: recycled within a run, backed by transparent huge pages.

Why: every block the engine makes is a fresh allocation (glibc hands anything above 1 MiB out as its own mmap, so
that freed blocks leave RSS at once: engine/run.py), and its first touch faults in 4 KiB pages one by one. On a
VM that costs more than the conversion or kernel that fills the block (2.5 ns an element for a bf16->float32 copy
into new memory, 0.7 ns with huge pages). With THP in `madvise` mode (the usual default), asking for huge pages on
the buffer before it is touched makes each fault map 2 MiB. Contents are unaffected: this only changes how the
pages are mapped.

Better still is not to fault at all: inside `pooled()` (one merge run), a buffer whose tensors have all died is
handed out again for the next block of the same size, so its pages are faulted and zeroed once per run instead of
once per block (the kernel's page zeroing was 14% of the 1b TIES merge's CPU time). A buffer counts as free only
when no tensor references its storage any more (torch's storage use count), so reuse can never alias live data.
The scheduler keeps idle buffers within the budget's headroom (`trim`), so RSS stays what the budget promises.
"""
from __future__ import annotations

import contextlib
import ctypes
import math
import threading
from typing import Iterator, Sequence

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


def _fresh(shape: Sequence[int] | int, dtype: torch.dtype) -> torch.Tensor:
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


def _use_count(base: torch.Tensor) -> int:
    storage = base.untyped_storage()          # this wrapper holds one reference while we look
    return torch._C._storage_Use_Count(storage._cdata) - 1


class BufferPool:
    """Buffers (flat uint8 tensors) that the pool owns and lends out as typed views.

    A buffer is idle when the pool's own tensor is the only reference to its storage. `take` lends the smallest
    idle buffer that is big enough (a 16 MiB block may reuse a 44 MiB one: its pages are resident already, and
    blocks of different tensors alternate), else a fresh one of the requested size; `trim` frees idle buffers,
    least recently lent first, down to a byte limit.
    """

    def __init__(self) -> None:
        self._buffers: list[torch.Tensor] = []           # least recently lent first
        self._lock = threading.Lock()

    def take(self, nbytes: int) -> torch.Tensor:
        with self._lock:
            best = None
            for k, buf in enumerate(self._buffers):
                if buf.numel() >= nbytes and (best is None or buf.numel() < self._buffers[best].numel()) \
                        and _use_count(buf) == 1:
                    best = k
            buf = self._buffers.pop(best) if best is not None else _fresh(nbytes, torch.uint8)
            self._buffers.append(buf)
            return buf[:nbytes]

    def idle_bytes(self) -> int:
        with self._lock:
            return sum(b.numel() for b in self._buffers if _use_count(b) == 1)

    def trim(self, limit: int) -> None:
        """Free idle buffers until at most `limit` bytes are idle (the budget's headroom)."""
        with self._lock:
            excess = sum(b.numel() for b in self._buffers if _use_count(b) == 1) - max(0, limit)
            if excess <= 0:
                return
            kept = []
            for b in self._buffers:
                if excess > 0 and _use_count(b) == 1:
                    excess -= b.numel()
                else:
                    kept.append(b)
            self._buffers = kept

    def clear(self) -> None:
        with self._lock:
            self._buffers.clear()


_pool: BufferPool | None = None
_POOLABLE = hasattr(torch._C, "_storage_Use_Count")


@contextlib.contextmanager
def pooled() -> Iterator[BufferPool | None]:
    """Recycle `empty`'s buffers until the block ends (one engine run); yields the pool (None where this torch
    cannot count storage references, and `empty` allocates afresh)."""
    global _pool
    if not _POOLABLE or _pool is not None:      # nested runs share the outer pool
        yield _pool
        return
    _pool = BufferPool()
    try:
        yield _pool
    finally:
        pool, _pool = _pool, None
        pool.clear()


def empty(shape: Sequence[int] | int, dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised CPU tensor: a recycled buffer inside `pooled()`, else a fresh one on huge pages."""
    pool = _pool
    if pool is None:
        return _fresh(shape, dtype)
    dims = (shape,) if isinstance(shape, int) else tuple(shape)
    nbytes = math.prod(dims) * dtype.itemsize
    if nbytes < _MIN_BYTES:                   # small blocks: the allocator's own reuse is fine
        return _fresh(dims, dtype)
    return pool.take(nbytes).view(dtype).view(dims)


def empty_like(x: torch.Tensor) -> torch.Tensor:
    return empty(tuple(x.shape), x.dtype)
