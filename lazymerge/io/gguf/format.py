"""The GGUF container: a strict parser of one file's header (metadata and tensor table), nothing else.

A GGUF file is `GGUF`, a version, the counts, the metadata key/value pairs, the tensor table (name, dims with the
fastest-moving first, ggml type, offset into the data section), padding to `general.alignment`, the data. The
header is untrusted input: every length and count is checked against the file before it is used, so a truncated
or corrupt file is a one-line error naming it (and the tensor), never a numpy or struct traceback, and no tensor's
data can reach outside the file or overlap another's. Values are parsed with `struct`; arrays of strings (a
vocabulary, the merges) are walked but not decoded, since only transformers' tokenizer conversion reads them, and
numeric arrays stay numpy views.
"""
from __future__ import annotations

import hashlib
import math
import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lazymerge.errors import CheckpointError

MAGIC = b"GGUF"
VERSIONS = (2, 3)                        # v1 counted in 32 bits; llama.cpp itself no longer reads it
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4                             # GGML_MAX_DIMS
# fixed-size value types (gguf.GGUFValueType): struct format
_SCALAR = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_NUMPY = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "<u1", 10: "<u8", 11: "<i8",
          12: "<f8"}
STRING, ARRAY = 8, 9


@dataclass(frozen=True)
class StringArray:
    """An array of strings left undecoded (its element count): vocabularies are for the tokenizer converter."""

    count: int


@dataclass(frozen=True)
class StoredTensor:
    """One entry of a GGUF tensor table, with its data's absolute place in the file."""

    name: str
    dims: tuple[int, ...]                 # ggml order: dims[0] is the row length (fastest-moving)
    ggml_type: int
    start: int                            # absolute file offset of the data
    nbytes: int
    file: Path

    @property
    def shape(self) -> tuple[int, ...]:
        """torch order (Hugging Face's): the dims reversed."""
        return tuple(reversed(self.dims))

    @property
    def rows(self) -> int:
        """Stored rows: every dimension but the row length, flattened."""
        return math.prod(self.dims[1:])

    @property
    def row_nbytes(self) -> int:
        return self.nbytes // max(1, self.rows)


@dataclass(frozen=True)
class GGUFHeader:
    path: Path
    version: int
    metadata: dict[str, Any]
    tensors: dict[str, StoredTensor]      # in file order
    data_start: int
    size: int
    digest: str                           # sha256 of every header byte (metadata and tensor table)

    @property
    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture", ""))


def _gguf() -> Any:
    try:
        import gguf
    except ImportError:
        raise CheckpointError("reading GGUF files needs the gguf package: pip install 'lazymerge[gguf]'") from None
    return gguf


def type_name(ggml_type: int) -> str:
    gguf = _gguf()
    try:
        return gguf.GGMLQuantizationType(ggml_type).name
    except ValueError:
        return f"type {ggml_type}"


def block_of(ggml_type: int) -> tuple[int, int] | None:
    """(values per block, bytes per block) of a ggml type, None for a type gguf does not know."""
    gguf = _gguf()
    try:
        return gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(ggml_type)]
    except (ValueError, KeyError):
        return None


class _Cursor:
    """Bounds-checked little-endian reads from the mapped file; running past the end is `truncated`."""

    def __init__(self, buf: mmap.mmap, path: Path) -> None:
        self.buf, self.pos, self.path, self.size = buf, 0, path, len(buf)

    def fail(self, what: str) -> CheckpointError:
        return CheckpointError(f"{self.path}: {what}")

    def need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > self.size:
            raise self.fail(f"truncated or corrupt GGUF header: {what} runs past the end of the "
                            f"{self.size}-byte file (at byte {self.pos})")

    def scalar(self, fmt: str, what: str) -> Any:
        n = struct.calcsize(fmt)
        self.need(n, what)
        (v,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += n
        return v

    def string(self, what: str, decode: bool = True) -> str:
        n = self.scalar("<Q", what)
        self.need(n, what)
        raw = self.buf[self.pos:self.pos + n] if decode else b""
        self.pos += n
        if not decode:
            return ""
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise self.fail(f"{what} is not valid UTF-8") from None

    def value(self, vtype: int, key: str) -> Any:
        if vtype in _SCALAR:
            return self.scalar(_SCALAR[vtype], f"metadata {key!r}")
        if vtype == STRING:
            return self.string(f"metadata {key!r}")
        if vtype != ARRAY:
            raise self.fail(f"metadata {key!r} has unknown value type {vtype}")
        etype = self.scalar("<I", f"metadata {key!r}")
        count = self.scalar("<Q", f"metadata {key!r}")
        if etype in _NUMPY:
            width = np.dtype(_NUMPY[etype]).itemsize
            self.need(count * width, f"metadata {key!r}")
            arr = np.frombuffer(self.buf, dtype=_NUMPY[etype], count=count, offset=self.pos).copy()
            self.pos += count * width
            return arr.astype(bool) if etype == 7 else arr
        if etype == STRING:
            if count > self.size:                # every string takes at least its 8-byte length
                raise self.fail(f"metadata {key!r}: array of {count} strings cannot fit in the file")
            for _ in range(count):
                self.string(f"metadata {key!r}", decode=False)
            return StringArray(count)
        raise self.fail(f"metadata {key!r} is an array of unsupported type {etype}")


def read_gguf_header(path: Path | str) -> GGUFHeader:
    """Parse and validate one GGUF file's header: its metadata and where each tensor's data lies."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < 24:
                raise CheckpointError(f"{path}: file is {size} bytes, too short for a GGUF header")
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
                return _parse(buf, path, size)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read: {exc.strerror or exc}") from None


def _parse(buf: mmap.mmap, path: Path, size: int) -> GGUFHeader:
    c = _Cursor(buf, path)
    magic = bytes(buf[:4])
    if magic != MAGIC:
        raise c.fail(f"not a GGUF file (magic {magic!r}, expected {MAGIC!r})")
    c.pos = 4
    version = c.scalar("<I", "version")
    if version not in VERSIONS:
        swapped = int.from_bytes(version.to_bytes(4, "little"), "big")
        if swapped in VERSIONS:
            raise c.fail("big-endian GGUF files are not supported")
        raise c.fail(f"GGUF version {version} is not supported (only {', '.join(map(str, VERSIONS))})")
    n_tensors = c.scalar("<Q", "tensor count")
    n_kv = c.scalar("<Q", "metadata count")
    if n_kv > size or n_tensors > size:
        raise c.fail(f"corrupt GGUF header: {n_kv} metadata entries and {n_tensors} tensors cannot fit in the file")
    metadata: dict[str, Any] = {}
    for _ in range(n_kv):
        key = c.string("metadata key")
        vtype = c.scalar("<I", f"metadata {key!r}")
        if key in metadata:
            raise c.fail(f"metadata key {key!r} appears twice")
        metadata[key] = c.value(vtype, key)
    alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or isinstance(alignment, bool) or alignment <= 0 or alignment % 8:
        raise c.fail(f"general.alignment {alignment!r} is not a positive multiple of 8")
    entries = []
    for i in range(n_tensors):
        name = c.string(f"name of tensor {i}")
        n_dims = c.scalar("<I", f"tensor {name!r}")
        if not 1 <= n_dims <= MAX_DIMS:
            raise c.fail(f"tensor {name!r}: {n_dims} dimensions (GGUF allows 1 to {MAX_DIMS})")
        c.need(8 * n_dims, f"tensor {name!r}")
        dims = struct.unpack_from(f"<{n_dims}Q", buf, c.pos)
        c.pos += 8 * n_dims
        ggml_type = c.scalar("<I", f"tensor {name!r}")
        offset = c.scalar("<Q", f"tensor {name!r}")
        entries.append((name, tuple(int(d) for d in dims), ggml_type, offset))
    data_start = -(-c.pos // alignment) * alignment
    digest = hashlib.sha256(buf[:c.pos]).hexdigest()
    tensors: dict[str, StoredTensor] = {}
    for name, dims, ggml_type, offset in entries:
        if name in tensors:
            raise c.fail(f"tensor {name!r} appears twice in the tensor table")
        tensors[name] = _stored(c, name, dims, ggml_type, offset, alignment, data_start)
    _check_overlaps(c, list(tensors.values()))
    return GGUFHeader(path, version, metadata, tensors, data_start, size, digest)


def _stored(c: _Cursor, name: str, dims: tuple[int, ...], ggml_type: int, offset: int, alignment: int,
            data_start: int) -> StoredTensor:
    block = block_of(ggml_type)
    if block is None:
        raise c.fail(f"tensor {name!r}: unknown ggml type {ggml_type}")
    if any(d <= 0 for d in dims):
        raise c.fail(f"tensor {name!r}: dimensions {list(dims)} must all be positive")
    per, nbytes = block
    if dims[0] % per:
        raise c.fail(f"tensor {name!r}: rows of {dims[0]} values are not whole {type_name(ggml_type)} blocks of "
                     f"{per}")
    total = math.prod(dims) // per * nbytes
    if offset % alignment:
        raise c.fail(f"tensor {name!r}: data offset {offset} is not a multiple of the alignment {alignment}")
    start = data_start + offset
    if start + total > c.size:
        raise c.fail(f"tensor {name!r}: data [{start}, {start + total}) lies beyond the end of the {c.size}-byte "
                     "file (truncated?)")
    return StoredTensor(name, dims, ggml_type, start, total, c.path)


def _check_overlaps(c: _Cursor, tensors: list[StoredTensor]) -> None:
    last: StoredTensor | None = None
    for t in sorted(tensors, key=lambda t: (t.start, t.nbytes)):
        if last is not None and t.start < last.start + last.nbytes:
            raise c.fail(f"tensors {last.name!r} and {t.name!r} overlap")
        last = t
