"""Leave the page cache as we found it: drop the input pages a merge brought in, write the output behind.

Why: a merge streams inputs several times larger than the memory it may use. Pages it leaves in the cache are
not free: under a cgroup limit (``memcap``, containers) they count against the limit and must be reclaimed
under pressure, and on virtual machines every page the cache grows into is a fresh guest page that the host has
to fault in (on the reference 2-core VM, reading 6.6 GB of inputs through a growing cache cost 29 CPU-seconds;
reading them through a few recycled pages cost 8, in a one-off measurement recorded in issue 14's closing note;
the merge-level effect is in `benches/results/1b-io-*`). So:

* reads (`ResidentSnapshot`): which pages of a file were cached *before* we opened it is recorded once
  (``mincore``); after a block is read, the pages of its range that we brought in are dropped
  (``POSIX_FADV_DONTNEED``), the user's cached pages are left alone.
* writes (`WriteBehind`): written ranges are handed to writeback at once (``sync_file_range``) and dropped
  once they are on disk, a few tens of MiB behind the writer, instead of piling up dirty until the final fsync.

Everything here is advisory: where a call is unavailable (not Linux, not glibc) or refused, it does nothing, and
the data read or written is the same. Except a write error met on the way: that is raised (`WritebackError`).
"""
from __future__ import annotations

import collections
import ctypes
import errno
import mmap
import os
import threading

PAGE = mmap.PAGESIZE
_LOW_BIT = bytes(b & 1 for b in range(256))

_SYNC_WAIT_BEFORE, _SYNC_WRITE, _SYNC_WAIT_AFTER = 1, 2, 4

try:
    _libc = ctypes.CDLL(None, use_errno=True)
    _mincore = _libc.mincore
    _mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    _sync_file_range = _libc.sync_file_range
    _sync_file_range.argtypes = [ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong, ctypes.c_uint]
except (OSError, AttributeError):  # not Linux/glibc: nothing is dropped, writeback is the kernel's business
    _mincore = _sync_file_range = None


def drop(fd: int, offset: int, nbytes: int) -> None:
    """Ask the kernel to drop the cached pages wholly inside [offset, offset + nbytes) of `fd` (clean ones only)."""
    if nbytes > 0:
        try:
            os.posix_fadvise(fd, offset, nbytes, os.POSIX_FADV_DONTNEED)
        except (OSError, AttributeError):
            pass


def no_readahead(fd: int) -> None:
    """Read exactly what is asked for. The engine reads whole row blocks (MiBs) in one call, so readahead adds no
    throughput; but it reads past the end of each block, into data that may have been read and dropped already
    (tensors are not read in file order): with an 8 MiB window that was 25% more bytes read from disk on the 1b
    preset, and pages left behind in the cache."""
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
    except (OSError, AttributeError):
        pass


def resident_pages(mapping: mmap.mmap) -> bytes | None:
    """One byte per page of a mapped file, 1 where the page is in the page cache (``mincore``); None where that
    cannot be asked. The map must be writable (ACCESS_COPY) for ctypes to take its address; nothing is touched."""
    size = len(mapping)
    if _mincore is None or size == 0:
        return None
    try:
        anchor = ctypes.c_char.from_buffer(mapping)
    except TypeError:
        return None
    try:
        vec = (ctypes.c_ubyte * ((size + PAGE - 1) // PAGE))()
        if _mincore(ctypes.addressof(anchor), size, vec) != 0:
            return None
        return bytes(vec).translate(_LOW_BIT)                # bit 0 = resident; the others are reserved
    finally:
        del anchor                                           # release the export so the map can close


def cached_fraction(path: str | os.PathLike) -> float | None:
    """The share of a file's pages now in the page cache (tests and benchmarks check what a run left behind)."""
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            return 0.0
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) as m:
            pages = resident_pages(m)
    return None if pages is None else pages.count(1) / len(pages)


class ResidentSnapshot:
    """Which pages of a mapped file were in the page cache when it was opened.

    `forget(fd, offset, nbytes)` drops the pages of a range that were *not* cached then: the ones our reads
    brought in, readahead included. A file that was wholly cached (a warm re-run) is left wholly cached.
    """

    def __init__(self, mapping: mmap.mmap) -> None:
        resident = resident_pages(mapping)
        # b"": nothing was cached (the usual cold start), so a range is dropped whole without a scan
        self._resident = resident if resident is None or b"\x01" in resident else b""

    def cold(self, offset: int, nbytes: int) -> bool:
        """No page of the range was cached at open (and the kernel could tell us so)."""
        if self._resident is None:
            return False
        return not self._resident or self._resident.find(b"\x01", offset // PAGE,
                                                         (offset + nbytes - 1) // PAGE + 1) < 0

    def forget(self, fd: int, offset: int, nbytes: int) -> None:
        if self._resident is None or nbytes <= 0:
            return
        if not self._resident:                               # nothing was cached: drop the whole range
            drop(fd, offset, nbytes)
            return
        first, last = offset // PAGE, (offset + nbytes - 1) // PAGE + 1
        page = first
        while page < last:                                   # runs of pages that were not cached at open
            start = self._resident.find(b"\x00", page, last)
            if start < 0:
                break
            end = self._resident.find(b"\x01", start, last)
            end = last if end < 0 else end
            lo, hi = max(offset, start * PAGE), min(offset + nbytes, end * PAGE)
            drop(fd, lo, hi - lo)
            page = end


class WritebackError(OSError):
    """Writeback of a written range failed (EIO, ENOSPC on a thin-provisioned or network disk...). `fd` is the
    file's descriptor. Fatal: the data did not reach the disk, and the kernel reports such an error once per
    open file, so the final fsync may no longer see it."""

    def __init__(self, fd: int, err: int) -> None:
        super().__init__(err, os.strerror(err))
        self.fd = fd


LAG = 64 << 20          # bytes written but not yet waited for, per writer

# sync_file_range's answers that mean "not supported here" (a pipe, a file system without it), not a lost write
_UNSUPPORTED = {errno.EINVAL, errno.ESPIPE, errno.ENOSYS, errno.EOPNOTSUPP}


class WriteBehind:
    """Start writeback of each written range at once and drop it from the cache once it is on disk.

    At most `lag` bytes are in flight; older ranges are waited for (the disk is slower than the kernels, so
    this is where the writer would wait anyway at the final fsync) and dropped. Durability is still the final
    fsync's job: ``sync_file_range`` flushes no metadata.

    Errors are not advisory. Waiting on a range (``SYNC_FILE_RANGE_WAIT_AFTER``) reports a writeback error of
    the file *and consumes it* for this open file, so the final fsync succeeds on a file with missing data.
    Any error is therefore raised (`WritebackError`) by the call that met it and again by `forget_fd` for that
    file, and a range is never settled after its file was forgotten (its descriptor may name another file by
    then): `forget_fd` waits for the settles in flight.
    """

    def __init__(self, lag: int | None = None) -> None:
        self.lag = LAG if lag is None else lag
        self._ranges: collections.deque[tuple[int, int, int]] = collections.deque()
        self._pending = 0
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._settling: collections.Counter[int] = collections.Counter()
        self._failed: dict[int, int] = {}          # fd -> errno of its first writeback error

    def wrote(self, fd: int, offset: int, nbytes: int) -> None:
        """`nbytes` at `offset` of `fd` were written: start their writeback, and settle the oldest ranges beyond
        the lag. Raises `WritebackError` when a range of any file failed."""
        if _sync_file_range is None or nbytes <= 0:
            return
        self._check(fd, _sync_file_range(fd, offset, nbytes, _SYNC_WRITE))
        done: list[tuple[int, int, int]] = []
        with self._lock:
            self._ranges.append((fd, offset, nbytes))
            self._pending += nbytes
            while self._pending > self.lag and self._ranges:
                old = self._ranges.popleft()
                self._pending -= old[2]
                done.append(old)
                self._settling[old[0]] += 1
        try:
            for fd_, off, n in done:
                self._settle(fd_, off, n)
        finally:                          # after an error, the ranges not reached are settled by nobody
            with self._lock:
                for fd_, _, _ in done:
                    self._settling[fd_] -= 1
                self._idle.notify_all()

    def forget_fd(self, fd: int) -> None:
        """`fd` is about to be fsynced and closed: stop tracking its ranges (the caller drops the whole file), once
        no range of it is being settled. Raises `WritebackError` if a writeback of this file failed."""
        with self._lock:
            while self._settling[fd]:
                self._idle.wait()
            del self._settling[fd]
            kept = [r for r in self._ranges if r[0] != fd]
            self._pending = sum(r[2] for r in kept)
            self._ranges = collections.deque(kept)
            err = self._failed.pop(fd, None)
        if err is not None:
            raise WritebackError(fd, err)

    def _check(self, fd: int, result: int) -> None:
        if result == 0:
            return
        err = ctypes.get_errno()
        if err in _UNSUPPORTED:
            return
        with self._lock:
            self._failed.setdefault(fd, err)
        raise WritebackError(fd, err)

    def _settle(self, fd: int, offset: int, nbytes: int) -> None:
        self._check(fd, _sync_file_range(fd, offset, nbytes, _SYNC_WAIT_BEFORE | _SYNC_WRITE | _SYNC_WAIT_AFTER))
        drop(fd, offset, nbytes)
