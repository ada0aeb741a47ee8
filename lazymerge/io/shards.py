"""One safetensors file: strict header parsing and positional row reads.

The header is untrusted input: every inconsistency (a length past the end of the file, a size that contradicts
the dtype, overlapping ranges) is rejected here, so that later reads never reach beyond the data the header
declares; a file truncated after it was opened is reported, not read short.
"""
from __future__ import annotations

import errno
import json
import math
import mmap
import os
import struct
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Self

import torch

from lazymerge import dtypes, memory, shapes
from lazymerge.io import pagecache
from lazymerge.dtypes import DTYPES
from lazymerge.errors import CheckpointError

MAX_HEADER_BYTES = 100 * 1000 * 1000
ALIGNMENT = 64                 # what torch's CPU allocator guarantees, and what its kernels may rely on
DIRECT_ALIGN = 4096             # O_DIRECT: file offsets, lengths and buffer addresses in whole blocks
STAGING_BYTES = 16 << 20       # per reading thread; outside the --memory budget, like the interpreter
_local = threading.local()


class ShapedTensor:
    """Sizes derived from `shape` and `dtype`, shared by tensors on disk (`TensorInfo`) and planned outputs."""

    shape: tuple[int, ...]
    dtype: str

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def rows(self) -> int:
        """Row blocks split dim 0; a 0-d or 1-d tensor is a single row (lazymerge.shapes)."""
        return shapes.rows(self.shape)

    @property
    def row_numel(self) -> int:
        return shapes.row_numel(self.shape)

    @property
    def torch_dtype(self) -> torch.dtype:
        """The dtype its rows are handed over in (uint8 bytes for a GGUF block type)."""
        return torch.uint8 if self.dtype in dtypes.BLOCK_CODES else DTYPES[self.dtype][0]

    @property
    def itemsize(self) -> int:
        return DTYPES[self.dtype][1]

    @property
    def row_nbytes(self) -> int:
        return dtypes.row_nbytes(self.dtype, self.row_numel)


@dataclass(frozen=True)
class TensorInfo(ShapedTensor):
    """Where a tensor lives and what it looks like; planners work from these alone, without reading data."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    file: Path
    start: int
    nbytes: int


def row_span(info: TensorInfo, rows: tuple[int, int] | None) -> tuple[int, int, tuple[int, ...]]:
    """Where rows [a, b) of a tensor lie in its file (all of them when `rows` is None): the byte offset, the
    byte count, and the block's shape; rows outside the tensor are a ValueError (a planner bug, not bad input)."""
    a, b = (0, info.rows) if rows is None else rows
    if not 0 <= a <= b <= info.rows:
        raise ValueError(f"{info.name}: rows {rows} out of range for {info.rows} rows")
    return info.start + a * info.row_nbytes, (b - a) * info.row_nbytes, shapes.block_shape(info.shape, a, b)


def _fail(path: Path | str, what: str) -> CheckpointError:
    return CheckpointError(f"{path}: {what}")


def _no_duplicate_keys(pairs: list[tuple[str, object]]) -> dict:
    """JSON allows repeated keys (last wins); in a header that would silently hide a tensor, so refuse it."""
    out: dict = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _parse_entry(path: Path | str, name: str, entry: object, data_start: int, data_size: int,
                 file: Path) -> TensorInfo:
    if not isinstance(entry, dict):
        raise _fail(path, f"tensor {name!r}: header entry is not an object")
    dtype = entry.get("dtype")
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise _fail(path, f"tensor {name!r}: unknown or unsupported dtype {dtype!r}")
    shape = entry.get("shape")
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
        raise _fail(path, f"tensor {name!r}: shape {shape!r} is not a list of non-negative integers")
    offsets = entry.get("data_offsets")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) and o >= 0 for o in offsets)):
        raise _fail(path, f"tensor {name!r}: data_offsets {offsets!r} is not [begin, end] of non-negative integers")
    begin, end = offsets
    if begin > end:
        raise _fail(path, f"tensor {name!r}: data_offsets begin {begin} > end {end}")
    expected = math.prod(shape) * DTYPES[dtype][1]
    if end - begin != expected:
        raise _fail(path, f"tensor {name!r}: {end - begin} bytes of data but dtype {dtype} and shape {shape} "
                          f"need {expected}")
    if end > data_size:
        raise _fail(path, f"tensor {name!r}: data ends at byte {end} of a {data_size}-byte data section "
                          "(file truncated?)")
    return TensorInfo(name=name, dtype=dtype, shape=tuple(shape), file=file, start=data_start + begin,
                      nbytes=end - begin)


def read_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse and validate a safetensors header; returns the tensors and the `__metadata__` strings."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            # only the header: readahead would pull megabytes of tensor data into the cache, which reads that go
            # around the cache (O_DIRECT) then fetch from disk a second time (1.5% more bytes read on the 1b preset)
            pagecache.no_readahead(f.fileno())
            file_size = os.fstat(f.fileno()).st_size
            n = header_length(f.read(8), file_size, path)
            raw = f.read(n)
    except OSError as exc:
        raise _fail(path, f"cannot read: {exc.strerror or exc}") from None
    return parse_header(raw, file_size, path)


def header_length(first8: bytes, file_size: int, path: Path | str) -> int:
    """The header's byte length from a file's first 8 bytes, checked against the file's size."""
    if file_size < 8 or len(first8) < 8:
        raise _fail(path, f"file is {file_size} bytes, too short for a safetensors header")
    (n,) = struct.unpack("<Q", first8[:8])
    if n > MAX_HEADER_BYTES:
        raise _fail(path, f"header length {n} exceeds the {MAX_HEADER_BYTES}-byte limit")
    if n > file_size - 8:
        raise _fail(path, f"header length {n} exceeds file size {file_size}")
    return n


def parse_header(raw: bytes, file_size: int, path: Path,
                 label: str | None = None) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Validate a header's JSON (`raw`, the bytes after the length) of a `file_size`-byte file: wherever those
    bytes came from (a local file, or range reads of a hub file), the same checks. `path` is the TensorInfo's
    `file`; messages name `label` when given (a hub file: its repository, commit and name)."""
    where: Path | str = label if label is not None else path
    n = len(raw)
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicate_keys)
    except (UnicodeDecodeError, ValueError) as exc:
        raise _fail(where, f"header is not valid UTF-8 JSON ({exc})") from None
    except RecursionError:
        raise _fail(where, "header is not a safetensors header (JSON nested too deeply)") from None
    if not isinstance(header, dict):
        raise _fail(where, "header is not a JSON object")

    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise _fail(where, "__metadata__ is not an object of string values")

    data_start = 8 + n
    data_size = file_size - data_start
    file = Path(path)
    tensors = {name: _parse_entry(where, name, entry, data_start, data_size, file) for name, entry in header.items()}

    ordered = sorted(tensors.values(), key=lambda t: (t.start, t.nbytes))
    previous: TensorInfo | None = None
    for info in ordered:
        if info.nbytes and previous is not None and info.start < previous.start + previous.nbytes:
            raise _fail(where, f"tensors {previous.name!r} and {info.name!r} overlap")
        if info.nbytes:
            previous = info
    _check_tiling(where, ordered, data_start, data_size)
    return tensors, metadata


def _check_tiling(path: Path | str, ordered: list[TensorInfo], data_start: int, data_size: int) -> None:
    """The format requires the tensors' offsets to tile the data section exactly (safetensors' own validation):
    a hole or trailing bytes are data that no tensor accounts for, the mark of a corrupt or tampered file."""
    end, last = 0, None
    for info in ordered:
        begin = info.start - data_start
        if begin != end:
            after = f"the end of tensor {last!r} at byte {end}" if last is not None else "the data section's start"
            raise _fail(path, f"tensor {info.name!r}: data starts at byte {begin}, leaving a {begin - end}-byte hole "
                              f"after {after} (safetensors offsets must tile the data section)")
        end, last = begin + info.nbytes, info.name
    if end != data_size:
        after = f"the last tensor {last!r}" if last is not None else "the header (the file has no tensors)"
        raise _fail(path, f"{data_size - end} trailing byte(s) after {after}, which ends at byte {end} of a "
                          f"{data_size}-byte data section (safetensors offsets must tile the data section)")


class ShardReader:
    """One safetensors file, read with positional reads.

    Reads return fresh tensors: callers may keep or mutate them freely. Input pages that a read brought into the
    page cache are dropped right after it (`lazymerge.io.pagecache`), so streaming a model leaves neither our
    RSS nor the cache bigger than it found them. The file is also memory-mapped, but only to ask the kernel which
    of its pages were cached at open (pages are never touched through the map).
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        try:
            self._fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except OSError as exc:
            raise _fail(self.path, f"cannot open: {exc.strerror or exc}") from None
        try:
            # ACCESS_COPY: mincore's address comes from a writable buffer; nothing is ever written or read here
            self._map = mmap.mmap(self._fd, 0, access=mmap.ACCESS_COPY)
        except (OSError, ValueError) as exc:
            os.close(self._fd)
            raise _fail(self.path, f"cannot memory-map: {exc}") from None
        self._size = len(self._map)
        self._cached_at_open = pagecache.ResidentSnapshot(self._map)
        pagecache.no_readahead(self._fd)
        self._closed = False
        self._lock = threading.Lock()
        # ranges with no page cached at open are read around the cache (O_DIRECT) where the file system allows:
        # no copy out of the cache, no pages to add and drop (2.5 vs 4 CPU-seconds of kernel time for the 1b
        # preset's inputs); cached ranges, and ranges a later phase reads again, go through the cache
        self._direct_fd: int | None = None
        self._direct_ok = hasattr(os, "O_DIRECT")
        self._kept: set[tuple[int, int]] = set()     # ranges read with evict=False: a later read finds them cached

    def read(self, info: TensorInfo, rows: tuple[int, int] | None = None,
             dtype: torch.dtype | None = torch.float32, device: str | torch.device = "cpu",
             evict: bool = True, aligned: bool = True) -> torch.Tensor:
        """Rows [a, b) of `info` as a new tensor in `dtype` (None keeps the stored dtype). `evict=False` leaves
        the pages in the page cache, for a range that will be read again soon. `aligned=False` accepts a tensor
        whose data does not start on a 64-byte boundary (a direct read's view of its buffer), for a caller that
        converts it at once; otherwise such a view is copied, because matrix kernels round differently on
        unaligned data (an evaluation would then not match the same weights read another way)."""
        offset, nbytes, shape = row_span(info, rows)
        if info.start + info.nbytes > self._size:
            raise _fail(self.path, f"tensor {info.name!r} lies beyond the end of the file")
        stored = info.torch_dtype
        out_dtype = stored if dtype is None else dtype
        count = nbytes // info.itemsize
        if count == 0:
            return torch.empty(shape, dtype=out_dtype, device=device)
        on_cpu = torch.device(device).type == "cpu"
        if out_dtype == stored:
            out = self.read_bytes(offset, nbytes, evict=evict, aligned=aligned, what=info.name,
                                  direct=on_cpu and offset % info.itemsize == 0).view(stored).view(shape)
            return out if on_cpu else out.to(device)
        self._keep(offset, nbytes, evict)
        out = memory.empty(count, out_dtype)     # huge pages: see lazymerge/memory.py
        # through a small per-thread buffer that stays mapped: the bytes are converted while still in cache
        stage = _staging(nbytes, info.itemsize)
        per = len(stage) // info.itemsize
        for i in range(0, count, per):
            n = min(per, count - i)
            self._pread(info.name, stage[: n * info.itemsize], offset + i * info.itemsize)
            out[i:i + n].copy_(torch.frombuffer(stage, dtype=stored, count=n))
        if evict:
            self._cached_at_open.forget(self._fd, offset, nbytes)
        out = out.reshape(shape)
        return out if on_cpu else out.to(device)

    def read_bytes(self, offset: int, nbytes: int, *, evict: bool = True, aligned: bool = True, what: str = "",
                   direct: bool = True) -> torch.Tensor:
        """Bytes [offset, offset + nbytes) of the file as a uint8 CPU tensor, with the page-cache policy of
        `read` (which reads its stored-dtype blocks through here; GGUF blocks are byte ranges too). `what` names
        the tensor in errors; `direct=False` never reads around the cache."""
        if offset < 0 or offset + nbytes > self._size:
            raise _fail(self.path, f"tensor {what!r}: bytes [{offset}, {offset + nbytes}) lie beyond the end of "
                                   "the file")
        was_kept = self._keep(offset, nbytes, evict)
        if direct and evict and not was_kept and nbytes and self._cached_at_open.cold(offset, nbytes):
            raw = self._read_direct(what, offset, nbytes)
            if raw is not None:
                if not aligned or raw.data_ptr() % ALIGNMENT == 0:
                    return raw
                out = memory.empty(nbytes, torch.uint8)
                out.copy_(raw)
                return out
        out = memory.empty(nbytes, torch.uint8)   # huge pages: see lazymerge/memory.py
        self._pread(what, _bytes_of(out), offset)
        if evict:
            self._cached_at_open.forget(self._fd, offset, nbytes)
        return out

    def _keep(self, offset: int, nbytes: int, evict: bool) -> bool:
        """Record whether a range stays cached for a later read; returns whether an earlier read kept it (a range
        kept for a later phase is read through the cache)."""
        with self._lock:
            was_kept = (offset, nbytes) in self._kept
            if evict:
                self._kept.discard((offset, nbytes))
            else:
                self._kept.add((offset, nbytes))
        return was_kept

    def _read_direct(self, what: str, offset: int, nbytes: int) -> torch.Tensor | None:
        """Bytes [offset, offset + nbytes) read with O_DIRECT: the enclosing aligned span goes into an aligned
        buffer, and the result is a view of it (no copy). None where the file system refuses direct reads."""
        fd = self._direct()
        if fd is None:
            return None
        lo = offset - offset % DIRECT_ALIGN
        need = offset + nbytes - lo
        span = -(-need // DIRECT_ALIGN) * DIRECT_ALIGN
        raw = memory.empty(span + DIRECT_ALIGN, torch.uint8)
        shift = -raw.data_ptr() % DIRECT_ALIGN
        view = _bytes_of(raw)[shift:shift + span]
        got = 0
        while got < need:
            try:
                n = os.preadv(fd, [view[got:]], lo + got)
            except OSError as exc:
                if exc.errno == errno.EINVAL and got == 0:       # alignment or file system: read through the cache
                    self._direct_ok = False
                    return None
                raise _fail(self.path, f"tensor {what!r}: read failed: {exc.strerror or exc}") from None
            if n <= 0:
                break
            got += n
            if n % DIRECT_ALIGN:                                 # the end of the file: nothing more to read
                break
        if got < need:
            raise _fail(self.path, f"tensor {what!r}: the file ends before its data does (truncated?)")
        start = shift + offset - lo
        return raw[start:start + nbytes]

    def _direct(self) -> int | None:
        with self._lock:
            if self._direct_fd is None and self._direct_ok and not self._closed:
                try:
                    self._direct_fd = os.open(self.path, os.O_RDONLY | os.O_DIRECT | getattr(os, "O_CLOEXEC", 0))
                except OSError:
                    self._direct_ok = False
            return self._direct_fd if self._direct_ok else None

    def _pread(self, what: str, view: memoryview, offset: int) -> None:
        while view:
            try:
                n = os.preadv(self._fd, [view], offset)
            except OSError as exc:
                raise _fail(self.path, f"tensor {what!r}: read failed: {exc.strerror or exc}") from None
            if n <= 0:
                raise _fail(self.path, f"tensor {what!r}: the file ends before its data does (truncated?)")
            view, offset = view[n:], offset + n

    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                self._map.close()
                os.close(self._fd)
                if self._direct_fd is not None:
                    os.close(self._direct_fd)

    def __enter__(self) -> "ShardReader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ReaderPool:
    """One `ShardReader` per file of a model, opened on first use from any thread, closed together; a model (a
    checkpoint, a GGUF) is also a context manager that closes its pool."""

    def __init__(self) -> None:
        self._readers: dict[Path, ShardReader] = {}
        self._lock = threading.Lock()

    def reader(self, file: Path) -> ShardReader:
        with self._lock:
            reader = self._readers.get(file)
            if reader is None:
                reader = self._readers[file] = ShardReader(file)
            return reader

    def close(self) -> None:
        with self._lock:
            for reader in self._readers.values():
                reader.close()
            self._readers.clear()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _bytes_of(t: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor, writable, without a copy."""
    return memoryview(t.view(torch.uint8).numpy()) if t.dtype != torch.uint8 else memoryview(t.numpy())


def _staging(nbytes: int, itemsize: int) -> memoryview:
    """This thread's conversion buffer, at most STAGING_BYTES: reused for every read, so that its pages are
    faulted in once (in a one-off measurement, 4 MiB chunks cost more CPU per byte than 16 MiB ones)."""
    want = min(max(nbytes, 1 << 16), STAGING_BYTES)
    buf = getattr(_local, "staging", None)
    if buf is None or len(buf) < want:
        buf = _local.staging = memoryview(memory.empty(want, torch.uint8).numpy())
    return buf[: len(buf) - len(buf) % itemsize]
