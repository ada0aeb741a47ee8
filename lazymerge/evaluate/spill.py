"""A temporary file for tensors that do not fit the budget between two uses: a merged layer read again at the next
decoding step, a request's KV cache between steps.

Appends and positional reads of raw tensor bytes. Written ranges go to disk behind the writer and leave the page
cache (`io.pagecache.WriteBehind`), and ranges read back are dropped from it, so the file costs disk, not memory:
under a cgroup limit the cache would count against it. The file is unlinked at once (nothing is left behind even
after a crash); its directory is the system's temporary directory (TMPDIR).
"""
from __future__ import annotations

import os
import tempfile
import threading

import torch

from ..io import pagecache


class SpillFile:
    """Raw tensors appended to an anonymous temporary file and read back by (offset, shape, dtype)."""

    def __init__(self, directory: "str | None" = None):
        fd, path = tempfile.mkstemp(prefix="lazymerge-spill-", dir=directory)
        os.unlink(path)
        self._fd = fd
        self._end = 0
        self._behind = pagecache.WriteBehind()
        self._lock = threading.Lock()
        self.bytes_written = 0

    def append(self, tensor: torch.Tensor) -> int:
        """Write `tensor`'s bytes at the end of the file; returns their offset."""
        data = tensor.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy()
        with self._lock:
            offset = self._end
            self._end += data.nbytes
        view = memoryview(data)
        done = 0
        while done < data.nbytes:
            done += os.pwrite(self._fd, view[done:], offset + done)
        self._behind.wrote(self._fd, offset, data.nbytes)
        self.bytes_written += data.nbytes
        return offset

    def read(self, offset: int, shape: "tuple[int, ...] | torch.Size", dtype: torch.dtype) -> torch.Tensor:
        """The tensor of `shape` and `dtype` stored at `offset` (a new tensor)."""
        out = torch.empty(shape, dtype=dtype)
        buf = memoryview(out.reshape(-1).view(torch.uint8).numpy())
        done = 0
        while done < len(buf):
            n = os.preadv(self._fd, [buf[done:]], offset + done)
            if n <= 0:
                raise OSError(f"spill file: short read at {offset + done}")
            done += n
        pagecache.drop(self._fd, offset, len(buf))
        return out

    def close(self) -> None:
        if self._fd >= 0:
            self._behind.forget_fd(self._fd)
            os.close(self._fd)
            self._fd = -1
