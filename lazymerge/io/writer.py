"""Writing a merged checkpoint crash-safely, in any order, one row block at a time.

The layout (which tensor goes where) is fixed before any data exists, so every shard is created up front with its
final header and its full (sparse) size, and row blocks are `pwrite`n straight to their offsets as the scheduler
produces them, from any thread. Everything lives in a temporary sibling directory that is renamed into place only
when complete: a SIGKILL at any moment leaves either no output directory or a complete one. A journal of
finished, checksummed shards lets `--resume` skip work already on disk.
"""
from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import os
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path

import psutil
import torch

from lazymerge import testhold
from lazymerge.dtypes import BLOCK_CODES, DTYPES
from lazymerge.errors import OutputError
from lazymerge.units import human
from lazymerge.io import pagecache
from lazymerge.io.shards import ShapedTensor

JOURNAL = "journal.json"
INDEX = "model.safetensors.index.json"


@dataclass(frozen=True)
class OutTensor(ShapedTensor):
    """An output tensor as the planner knows it before computing it."""

    name: str
    shape: tuple[int, ...]
    dtype: str

    @property
    def nbytes(self) -> int:
        return self.rows * self.row_nbytes


@dataclass(frozen=True)
class ShardLayout:
    """One output file: `header` is every byte before the data (safetensors: 8-byte length + padded JSON; GGUF:
    metadata and tensor table, padded to its alignment); each tensor comes with the offset of its data within the
    data section, i.e. its absolute file offset is `len(header) + offset`. `fixed` are bytes known from the plan
    (absolute offset, bytes: GGUF tensors computed from the config), written with the header; every other byte
    not covered by a tensor is padding and stays zero (safetensors tensors tile the data section: none)."""

    filename: str
    tensors: tuple[tuple[OutTensor, int], ...]
    header: bytes
    size: int
    fixed: tuple[tuple[int, bytes], ...] = ()

    @property
    def data_nbytes(self) -> int:
        """The bytes the merge writes: its tensors'."""
        return sum(t.nbytes for t, _ in self.tensors)

    def padding(self) -> list[tuple[int, int]]:
        """(offset, length) of every byte range after the header that no tensor and no fixed bytes cover."""
        used = sorted([(len(self.header) + off, t.nbytes) for t, off in self.tensors if t.nbytes]
                      + [(off, len(b)) for off, b in self.fixed if b])
        gaps, end = [], len(self.header)
        for off, n in used:
            if off > end:
                gaps.append((end, off - end))
            end = max(end, off + n)
        if self.size > end:
            gaps.append((end, self.size - end))
        return gaps


def _header(tensors: list[tuple[OutTensor, int]]) -> bytes:
    entries: dict[str, object] = {"__metadata__": {"format": "pt"}}
    for t, offset in tensors:
        entries[t.name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
    text = json.dumps(entries, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)  # keeps the data section 8-byte aligned, as safetensors' own writer does
    return len(text).to_bytes(8, "little") + text


def check_rows(out: OutTensor, row_start: int, tensor: torch.Tensor) -> int:
    """Bytes of `tensor` as rows [row_start, ...) of output tensor `out`; ValueError if it does not fit. Rows of
    a GGUF block type come as bytes, [rows, row bytes] uint8."""
    name = out.name
    if tensor.dtype != out.torch_dtype or tensor.device.type != "cpu":
        raise ValueError(f"{name}: got a {tensor.dtype} tensor on {tensor.device}, "
                         f"the output needs {out.torch_dtype} on cpu")
    whole = len(out.shape) < 2                   # a 0-d/1-d tensor is one row, written whole (lazymerge.shapes)
    n_rows = 1 if whole else tensor.shape[0]
    row = (out.row_nbytes,) if out.dtype in BLOCK_CODES else out.shape[1:]
    if (tensor.numel() != out.numel if whole else tuple(tensor.shape[1:]) != row) \
            or not 0 <= row_start <= row_start + n_rows <= out.rows:
        raise ValueError(f"{name}: rows starting at {row_start} of shape {tuple(tensor.shape)} do not fit "
                         f"the output shape {out.shape}")
    return n_rows * out.row_nbytes


def row_bytes(tensor: torch.Tensor) -> memoryview:
    """The raw bytes of a CPU tensor, as stored in a safetensors file."""
    return memoryview(tensor.contiguous().reshape(-1).view(torch.uint8).numpy())


def plan_layout(tensors: list[OutTensor], shard_size: int) -> list[ShardLayout]:
    """Split tensors, in the given order, into shards of at most `shard_size` data bytes (a bigger tensor gets a
    shard of its own), named the way Hugging Face names them."""
    if shard_size <= 0:
        raise ValueError(f"shard size must be positive, got {shard_size}")
    names = set()
    groups: list[list[OutTensor]] = []
    used = 0
    for t in tensors:
        if t.dtype not in DTYPES:
            raise ValueError(f"{t.name}: unknown safetensors dtype {t.dtype!r}")
        if t.name in names:
            raise ValueError(f"{t.name}: tensor listed twice")
        names.add(t.name)
        if not groups or (groups[-1] and used + t.nbytes > shard_size):
            groups.append([])
            used = 0
        groups[-1].append(t)
        used += t.nbytes
    shards = []
    for i, group in enumerate(groups):
        filename = "model.safetensors" if len(groups) == 1 else \
            f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        placed, offset = [], 0
        for t in group:
            placed.append((t, offset))
            offset += t.nbytes
        header = _header(placed)
        shards.append(ShardLayout(filename, tuple(placed), header, len(header) + offset))
    return shards


def index_json(layout: list[ShardLayout]) -> bytes:
    """The `model.safetensors.index.json` Hugging Face loaders use to find each tensor's shard."""
    total = sum(t.nbytes for s in layout for t, _ in s.tensors)
    weight_map = {t.name: s.filename for s in layout for t, _ in s.tensors}
    return (json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n").encode()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def tiled_digest(pieces: list[tuple[int, int, bytes]]) -> str:
    """A shard's checksum from the sha256 of each piece written to it, whatever order they were written in:
    sha256 over (offset, length, sha256 of the bytes) of every piece, by offset.

    Computed from the bytes in memory as they are written, so that checksumming an output never reads it back from
    disk (which cost a second read of the whole output: the writer drops its pages from the cache once durable).
    A resume recomputes it from the file with the same piece boundaries (kept in the journal)."""
    h = hashlib.sha256()
    for off, n, d in sorted(pieces):
        h.update(off.to_bytes(8, "little") + n.to_bytes(8, "little") + d)
    return h.hexdigest()


def _tiles(pieces: object, size: int) -> bool:
    """Whether journaled `[offset, length]` pieces cover [0, size) exactly, without overlap."""
    if not isinstance(pieces, list):
        return False
    end = 0
    for piece in pieces:
        if not (isinstance(piece, list) and len(piece) == 2 and all(isinstance(v, int) for v in piece)):
            return False
        off, n = piece
        if off != end or n <= 0:
            return False
        end = off + n
    return end == size


def _file_digest(path: Path, pieces: list[list[int]]) -> str:
    """`tiled_digest` of a file on disk, read piece by piece (the resume check)."""
    out = []
    with open(path, "rb") as f:
        for off, n in pieces:
            h = hashlib.sha256()
            f.seek(off)
            left = n
            while left:
                chunk = f.read(min(left, 1 << 24))
                if not chunk:
                    break
                h.update(chunk)
                left -= len(chunk)
            out.append((off, n, h.digest()))
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    return tiled_digest(out)


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two directories (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


class CheckpointWriter:
    """Writes `layout` into `out_dir` via `<parent>/.<name>.lazymerge-tmp`, guarded by a PID lock file.

    With `files`, `out_dir` names a file instead (`merged.gguf`): the layout's files (it, or its split files) are
    moved next to it when complete, one by one, the first split last (the one a loader opens)."""

    def __init__(self, out_dir: Path | str, layout: list[ShardLayout], *, overwrite: bool = False,
                 resume: bool = False, fingerprint: str = "", files: bool = False) -> None:
        """`fingerprint` identifies what produces the data (recipe, inputs, seed...): a resume keeps shards only
        when it and the layout are unchanged, since equal headers alone do not mean equal contents."""
        self.out_dir = Path(os.path.abspath(out_dir))
        self.files = files
        self.layout = list(layout)
        self.fingerprint = fingerprint
        self.overwrite = overwrite
        self.resume = resume
        parent, name = self.out_dir.parent, self.out_dir.name
        self.tmp_dir = parent / f".{name}.lazymerge-tmp"
        self.lock_path = parent / f".{name}.lazymerge.lock"
        self._where: dict[str, tuple[int, OutTensor, int]] = {
            t.name: (i, t, len(s.header) + off) for i, s in enumerate(self.layout) for t, off in s.tensors}
        self._lock = threading.Lock()
        self._journal_lock = threading.Lock()
        self._fds: dict[int, int] = {}
        self._fd_names: dict[int, str] = {}
        self._behind = pagecache.WriteBehind()     # the output leaves the cache as it is written, not at the end
        self._shard_written = [0] * len(self.layout)
        self._tensor_reserved: dict[str, int] = {}
        self._done: set[int] = set()
        self._verified: set[int] = set()
        self._journal: dict[str, dict] = {}
        self._pieces: dict[int, list[tuple[int, int, bytes]]] = {i: [] for i in range(len(self.layout))}
        self._external: set[int] = set()          # shards (partly) written by other processes (write_external)
        self._state = "new"
        self._has_lock = False

    @property
    def total_size(self) -> int:
        return sum(s.size for s in self.layout)

    def _layout_hash(self) -> str:
        h = hashlib.sha256(self.fingerprint.encode() + b"\0")
        for s in self.layout:
            h.update(s.filename.encode() + b"\0" + s.header + s.size.to_bytes(8, "little"))
        return h.hexdigest()

    # -- open -----------------------------------------------------------------------------------------------

    def open(self) -> None:
        """Take the lock and prepare the temporary directory with every shard preallocated."""
        if self._state != "new":
            raise RuntimeError("CheckpointWriter.open() called twice")
        self._refuse_existing()
        try:
            self.out_dir.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutputError(f"{self.out_dir.parent}: cannot create the output's parent directory: "
                              f"{exc.strerror or exc}") from None
        self._acquire_lock()
        try:
            self._prepare_tmp()
            needed = sum(s.size for i, s in enumerate(self.layout) if i not in self._verified)
            free = shutil.disk_usage(self.out_dir.parent).free
            if free < needed:
                raise OutputError(f"{self.out_dir.parent}: not enough free disk space: the output needs {needed} "
                                  f"more bytes, {free} are free ({human(needed)} > {human(free)})")
            for i, shard in enumerate(self.layout):
                if i not in self._verified:
                    self._preallocate(i, shard)
            self._state = "open"
        except OSError as exc:
            self._close_fds()
            if not self.resume:
                _remove(self.tmp_dir)
            self._release_lock()
            raise self._disk_error(exc, self.tmp_dir.name, self.tmp_dir) from None
        except BaseException:
            self._close_fds()
            if not self.resume:
                _remove(self.tmp_dir)
            self._release_lock()
            raise
        for i, shard in enumerate(self.layout):
            if i not in self._done and shard.data_nbytes == 0:
                self._complete(i)

    def _targets(self) -> list[Path]:
        """What appears when the output is complete: the directory, or (`files`) each file of the layout."""
        if not self.files:
            return [self.out_dir]
        return [self.out_dir.parent / s.filename for s in self.layout]

    def _refuse_existing(self) -> None:
        for target in self._targets():
            if target.is_dir() and self.files and not target.is_symlink():
                raise OutputError(f"{target}: is a directory; the output is a file")
            if (target.exists() or target.is_symlink()) and not self.overwrite:
                raise OutputError(f"{target}: already exists; pass --overwrite to replace it")

    def _acquire_lock(self) -> None:
        for _ in range(2):
            try:
                fd = os.open(self.lock_path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except OSError as exc:
                if not isinstance(exc, FileExistsError):
                    raise OutputError(f"{self.out_dir.parent}: cannot create the lock file {self.lock_path.name}: "
                                      f"{exc.strerror or exc}") from None
                pid = self._lock_owner()
                if pid is not None and psutil.pid_exists(pid):
                    raise OutputError(f"{self.out_dir}: is being written by another lazymerge run (pid {pid}); "
                                      f"if it is not, delete {self.lock_path}") from None
                self.lock_path.unlink(missing_ok=True)  # stale: its owner died
                continue
            self._has_lock = True
            try:
                with os.fdopen(fd, "w") as f:
                    f.write(f"{os.getpid()}\n")
            except OSError as exc:
                self._release_lock(force=True)
                raise self._disk_error(exc, self.lock_path.name, self.lock_path) from None
            return
        raise OutputError(f"{self.out_dir}: cannot take the lock {self.lock_path} (another run raced us)")

    def _lock_owner(self) -> int | None:
        try:
            return int(self.lock_path.read_text().strip())
        except (OSError, ValueError):
            return None

    def _release_lock(self, force: bool = False) -> None:
        if self._has_lock:
            if force or self._lock_owner() == os.getpid():
                self.lock_path.unlink(missing_ok=True)
            self._has_lock = False

    def _prepare_tmp(self) -> None:
        if self.resume and self._load_journal():
            keep = {s.filename for i, s in enumerate(self.layout) if i in self._verified} | {JOURNAL}
            for p in self.tmp_dir.iterdir():
                if p.name not in keep:
                    _remove(p)
        else:
            _remove(self.tmp_dir)
            self.tmp_dir.mkdir()
        self._write_journal()

    def _load_journal(self) -> bool:
        """Keep the shards a previous run finished, if the layout is the same and their checksums still match."""
        try:
            journal = json.loads((self.tmp_dir / JOURNAL).read_text())
            if journal.get("layout") != self._layout_hash():
                return False
            shards = dict(journal["shards"])
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return False
        for i, s in enumerate(self.layout):
            rec = shards.get(s.filename)
            path = self.tmp_dir / s.filename
            if (isinstance(rec, dict) and path.is_file() and path.stat().st_size == s.size == rec.get("size")
                    and _tiles(rec.get("pieces"), s.size) and _file_digest(path, rec["pieces"]) == rec.get("sha256")):
                self._verified.add(i)
                self._done.add(i)
                self._journal[s.filename] = {"size": s.size, "sha256": rec["sha256"], "pieces": rec["pieces"]}
        return True

    def _write_journal(self) -> None:
        with self._journal_lock:
            data = json.dumps({"version": 1, "layout": self._layout_hash(), "shards": self._journal}, indent=1)
            tmp = self.tmp_dir / (JOURNAL + ".tmp")
            try:
                with open(tmp, "w") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, self.tmp_dir / JOURNAL)
                _fsync_dir(self.tmp_dir)
            except OSError as exc:
                raise self._disk_error(exc, JOURNAL) from None

    def _preallocate(self, i: int, shard: ShardLayout) -> None:
        fd = os.open(self.tmp_dir / shard.filename, os.O_CREAT | os.O_TRUNC | os.O_RDWR, 0o644)
        self._fds[i] = fd
        self._fd_names[fd] = shard.filename
        self._pwrite(fd, memoryview(shard.header), 0, shard.filename)
        self._pieces[i] = [(0, len(shard.header), hashlib.sha256(shard.header).digest())]
        for off, data in shard.fixed:
            self._pwrite(fd, memoryview(data), off, shard.filename)
            self._pieces[i].append((off, len(data), hashlib.sha256(data).digest()))
        for off, n in shard.padding():            # zeros the sparse file reads back: pieces of the checksum too
            self._pieces[i].append((off, n, hashlib.sha256(bytes(n)).digest()))
        try:
            os.ftruncate(fd, shard.size)
        except OSError as exc:
            raise self._disk_error(exc, shard.filename) from None

    # -- writing --------------------------------------------------------------------------------------------

    def completed_shards(self) -> set[str]:
        """Shard files fully written (and, on resume, verified against their journal checksum)."""
        with self._lock:
            return {self.layout[i].filename for i in self._done}

    def tensors_done(self) -> set[str]:
        """Tensors already on disk from a previous run: the engine may skip them; writes to them are dropped."""
        return {t.name for i in self._verified for t, _ in self.layout[i].tensors}

    def write_rows(self, name: str, row_start: int, tensor: torch.Tensor) -> None:
        """Store rows [row_start, row_start + len(tensor)) of output tensor `name`; safe to call from any thread."""
        if self._state != "open":
            raise RuntimeError(f"write_rows({name!r}) on a writer that is {self._state}")
        i, out, offset = self._where[name]
        if i in self._verified:
            return
        nbytes = check_rows(out, row_start, tensor)
        with self._lock:
            reserved = self._tensor_reserved.get(name, 0) + nbytes
            if reserved > out.nbytes:
                raise RuntimeError(f"{name}: more rows written than the tensor has (a block written twice?)")
            self._tensor_reserved[name] = reserved
            fd = self._fds[i]
        data = row_bytes(tensor)
        at = offset + row_start * out.row_nbytes
        digest = hashlib.sha256(data).digest() if nbytes else b""    # hashlib drops the GIL for big buffers
        self._pwrite(fd, data, at, self.layout[i].filename)
        try:
            self._behind.wrote(fd, at, nbytes)
        except pagecache.WritebackError as exc:
            raise self._disk_error(exc, self._fd_name(exc.fd)) from None
        self._count_written(i, nbytes, (at, nbytes, digest))

    def _fd_name(self, fd: int) -> str:
        """The shard file last opened as `fd` (for an error message)."""
        return self._fd_names.get(fd, f"fd {fd}")

    def _count_written(self, i: int, nbytes: int, piece: tuple[int, int, bytes] | None = None) -> None:
        with self._lock:
            if piece is not None and nbytes:
                self._pieces[i].append(piece)
            self._shard_written[i] += nbytes
            if self._shard_written[i] > self.layout[i].data_nbytes:
                raise RuntimeError(f"{self.layout[i].filename}: more bytes written than the shard holds")
            complete = self._shard_written[i] == self.layout[i].data_nbytes
        if complete:
            self._complete(i)

    # -- bytes written by other processes (lazymerge.cluster) ---------------------------------------------------

    def shard_index(self, filename: str) -> int:
        return next(i for i, s in enumerate(self.layout) if s.filename == filename)

    def write_external(self, filename: str, nbytes: int, pieces: list[tuple[int, bytes]]) -> None:
        """Another process (a cluster worker) wrote `nbytes` data bytes of shard `filename` into its temporary
        file, except `pieces` (absolute offset, bytes) it handed back for us to store: store them, count the
        bytes, and complete the shard (fsync, checksum, journal) when all of its bytes are in."""
        if self._state != "open":
            raise RuntimeError(f"write_external({filename!r}) on a writer that is {self._state}")
        i = self.shard_index(filename)
        if i in self._verified:
            return
        with self._lock:
            fd = self._fds[i]
            self._external.add(i)        # bytes we never saw: the checksum is read back from the file
        for offset, data in pieces:
            self._pwrite(fd, memoryview(data), offset, filename)
        self._count_written(i, nbytes)

    def _pwrite(self, fd: int, data: memoryview, offset: int, filename: str) -> None:
        try:
            while data:
                n = os.pwrite(fd, data, offset)
                data, offset = data[n:], offset + n
        except OSError as exc:
            raise self._disk_error(exc, filename) from None

    def _disk_error(self, exc: OSError, filename: str, path: Path | None = None) -> Exception:
        if isinstance(exc, pagecache.WritebackError):      # accepted by write(), then lost on its way to the disk
            return OutputError(f"{path or self.tmp_dir / filename}: the disk failed to store written data: "
                               f"{exc.strerror or exc}")
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            try:
                free = f", {human(shutil.disk_usage(self.out_dir.parent).free)} free"
            except OSError:
                free = ""
            return OutputError(f"{self.out_dir.parent}: disk full while writing {filename}: the output needs "
                               f"{self.total_size} bytes ({human(self.total_size)}){free}")
        return OutputError(f"{path or self.tmp_dir / filename}: write failed: {exc.strerror or exc}")

    def _complete(self, i: int) -> None:
        """A shard's last byte has landed: make it durable and journal its checksum so a resume can trust it."""
        with self._lock:
            fd = self._fds.pop(i, None)
            self._done.add(i)
        shard = self.layout[i]
        if fd is not None:
            try:
                self._behind.forget_fd(fd)      # raises a writeback error met (and consumed) before the fsync
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            except OSError as exc:
                raise self._disk_error(exc, shard.filename) from None
            finally:
                os.close(fd)
        with self._lock:
            pieces = sorted(self._pieces.pop(i, []))
            external = i in self._external
        if external:
            whole = [[0, shard.size]]
            digest = _file_digest(self.tmp_dir / shard.filename, whole)
        else:
            whole = [[off, n] for off, n, _ in pieces]
            digest = tiled_digest(pieces)
        with self._journal_lock:
            self._journal[shard.filename] = {"size": shard.size, "sha256": digest, "pieces": whole}
        self._write_journal()
        if testhold.ARMED:
            testhold.reached("shard", here=False)     # maybe a scheduler worker thread: held at its next task

    # -- finishing ------------------------------------------------------------------------------------------

    def finalize(self, *, config: dict | None, aux_files: list[Path], extra_files: dict[str, bytes]) -> None:
        """Add the index (only for more than one shard, as `save_pretrained` does), config, tokenizer and extra
        files, then move the finished directory into place atomically and release the lock. A `files` output is
        its files alone: they are moved into place (config, tokenizer and extra files need a directory)."""
        if self._state != "open":
            raise RuntimeError(f"finalize() on a writer that is {self._state}")
        for i, s in enumerate(self.layout):
            if i not in self._done:
                raise RuntimeError(f"{s.filename}: incomplete, {self._shard_written[i]} of {s.data_nbytes} "
                                   "data bytes written")
        if self.files:
            self._finalize_files()
        else:
            self._finalize_dir(config, aux_files, extra_files)
        _fsync_dir(self.out_dir.parent)
        self._state = "finalized"
        self._release_lock()

    def _finalize_dir(self, config: dict | None, aux_files: list[Path], extra_files: dict[str, bytes]) -> None:
        files: dict[str, bytes] = {}
        if len(self.layout) > 1:
            files[INDEX] = index_json(self.layout)
        if config is not None:
            files["config.json"] = (json.dumps(config, indent=2) + "\n").encode()
        for src in aux_files:
            files[Path(src).name] = Path(src).read_bytes()
        for name, data in extra_files.items():
            if not name or "/" in name or "\\" in name or name in (".", "..") or name == JOURNAL:
                raise ValueError(f"extra file name {name!r} must be a plain file name")
            files[name] = data
        for name, data in files.items():
            try:
                with open(self.tmp_dir / name, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
            except OSError as exc:
                raise self._disk_error(exc, name) from None
        (self.tmp_dir / JOURNAL).unlink(missing_ok=True)
        _fsync_dir(self.tmp_dir)
        if testhold.ARMED:
            testhold.reached("finalize")
        self._refuse_existing()
        if self.out_dir.exists() or self.out_dir.is_symlink():
            # --overwrite: swap atomically, so a kill at any moment leaves the old or the new output in place
            if _exchange(self.tmp_dir, self.out_dir):
                _remove(self.tmp_dir)          # now holds the old output
            else:
                old = self.out_dir.parent / f".{self.out_dir.name}.lazymerge-old"
                _remove(old)
                os.rename(self.out_dir, old)
                os.rename(self.tmp_dir, self.out_dir)
                _remove(old)
        else:
            os.rename(self.tmp_dir, self.out_dir)

    def _finalize_files(self) -> None:
        """Each file replaces its target atomically; the first split moves last, so a kill between two moves
        leaves no loadable set of new split files mixed with old ones (a loader opens the first one)."""
        if testhold.ARMED:
            testhold.reached("finalize")
        self._refuse_existing()
        for shard in reversed(self.layout):
            os.replace(self.tmp_dir / shard.filename, self.out_dir.parent / shard.filename)
        _remove(self.tmp_dir)

    def _close_fds(self) -> None:
        with self._lock:
            fds, self._fds = list(self._fds.values()), {}
        for fd in fds:
            os.close(fd)

    def abort(self, keep_partial: bool = False) -> None:
        """Give up: remove the temporary directory (unless `keep_partial`, so a later --resume can reuse the
        finished shards) and release the lock. Safe to call more than once."""
        if self._state in ("finalized", "aborted"):
            return
        self._close_fds()
        if not keep_partial and self._has_lock:
            _remove(self.tmp_dir)
        self._state = "aborted"
        self._release_lock()

    def __enter__(self) -> "CheckpointWriter":
        self.open()
        return self

    def __exit__(self, exc_type: type | None, *exc: object) -> None:
        self.abort(keep_partial=self.resume and exc_type is not None)
