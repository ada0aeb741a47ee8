"""Safetensors files read straight from the hub with HTTP range requests: headers for plans, row blocks for runs.

A plan needs only each file's header (its first 8 + N bytes: two range requests), and a streamed run needs only
the byte ranges the engine reads, in the blocks it reads them. `RemoteShardReader` has `ShardReader.read`'s
interface, so the planner and the engine never know whether a tensor comes from a disk or from the network.
All HTTP goes through huggingface_hub (`http_backoff` on its shared session: authentication, `HF_ENDPOINT`,
retries with backoff on timeouts, dropped connections, 429 and 5xx); nothing here is an HTTP client of its own.

`ReadAhead` keeps the network busy while the CPU merges: a run announces the ranges it will read, in the order
its tasks are prioritised, and a few threads fetch them a bounded number of bytes ahead. A range that a later
phase reads again (`evict=False`, the page cache's job for a local file) is kept in memory until its last read,
within the same bounded window (beyond it, it is fetched again), so each input byte crosses the network about
once and the memory outside the budget stays bounded.
"""
from __future__ import annotations

import collections
import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from .. import memory
from ..errors import CheckpointError, LazyMergeError
from ..units import parse_size
from .shards import TensorInfo, header_length, parse_header, row_span

THREADS = 4                          # range requests in flight at once
RESUMES = 5                          # a response broken off midway is resumed this many times at most
WINDOW_MAX = 256 << 20               # bytes fetched ahead of the engine, at most (outside the --memory budget)


class _Counter:
    """Bytes received by range requests in this process (tests and reports; a download's bytes are its files)."""

    def __init__(self) -> None:
        self.value = 0
        self._lock = threading.Lock()

    def add(self, n: int) -> None:
        with self._lock:
            self.value += n


TRANSFERRED = _Counter()


@dataclass(frozen=True)
class RemoteFile:
    """One file of a repository pinned at a commit, as huggingface_hub addresses it."""

    url: str                         # hf_hub_url(repo, name, revision=sha, endpoint=...)
    size: int
    label: str                       # "org/name@sha12: file", for messages

    def read(self, offset: int, nbytes: int) -> torch.Tensor:
        """Bytes [offset, offset + nbytes) as a new uint8 tensor, streamed into it from one range request (no
        copy of the whole body on the way). huggingface_hub retries a request that fails to start (timeouts,
        refused connections, 429, 5xx, with backoff); a response that breaks off midway is resumed where it
        stopped, a few times. Any other failure is one line naming the file."""
        from huggingface_hub import constants
        from huggingface_hub.errors import HfHubHTTPError
        from huggingface_hub.utils import build_hf_headers, hf_raise_for_status, http_stream_backoff

        if offset < 0 or nbytes < 0 or offset + nbytes > self.size:
            raise CheckpointError(f"{self.label}: bytes {offset}..{offset + nbytes} lie beyond its {self.size} bytes")
        out = memory.empty(nbytes, torch.uint8)
        view = memoryview(out.numpy()) if nbytes else memoryview(bytearray())
        got, breaks = 0, 0
        while got < nbytes:
            headers = build_hf_headers()       # HF_TOKEN or the saved login, as huggingface_hub finds it
            headers.update({"Range": f"bytes={offset + got}-{offset + nbytes - 1}", "Accept-Encoding": "identity"})
            started = False
            try:
                with http_stream_backoff("GET", self.url, headers=headers,
                                         timeout=constants.HF_HUB_DOWNLOAD_TIMEOUT) as r:
                    hf_raise_for_status(r)
                    started = True
                    skip = offset + got if r.status_code == 200 else 0     # a server that ignores Range
                    for chunk in r.iter_bytes():     # as the client reads them: re-chunking copies
                        TRANSFERRED.add(len(chunk))
                        part = memoryview(chunk)[min(skip, len(chunk)):][:nbytes - got]
                        skip = max(0, skip - len(chunk))
                        view[got:got + len(part)] = part
                        got += len(part)
                        if got == nbytes:
                            break
                    if got < nbytes:
                        raise ConnectionError(f"the response ended {nbytes - got} bytes early")
            except (LazyMergeError, HfHubHTTPError) as exc:
                raise hub_error(exc, self.label) from None
            except Exception as exc:           # the connection broke: resume where it stopped, or give up
                breaks += 1
                if not started or breaks > RESUMES:
                    raise hub_error(exc, self.label) from None
                time.sleep(min(8.0, 0.5 * 2 ** breaks))
        return out


def hub_error(exc: BaseException, what: str, settings: Any = None) -> LazyMergeError:
    """One line for a failed hub call about `what` (a repository, or a repository's file); `settings` (an
    io.hub.HubSettings) names the endpoint and says whether HF_HUB_OFFLINE is set."""
    from huggingface_hub import errors as he

    if isinstance(exc, LazyMergeError):
        return exc
    endpoint = settings.endpoint if settings is not None else "the hub"
    if isinstance(exc, he.GatedRepoError):
        return CheckpointError(f"{what}: gated repository; accept its conditions on the hub and set HF_TOKEN to a "
                               "token that has access")
    if isinstance(exc, he.RepositoryNotFoundError):
        return CheckpointError(f"{what}: no such model repository on {endpoint} (a private one needs HF_TOKEN), "
                               "and no such local directory")
    if isinstance(exc, he.RevisionNotFoundError):
        return CheckpointError(f"{what}: no such revision (branch, tag or commit) on {endpoint}")
    if isinstance(exc, he.RemoteEntryNotFoundError):
        return CheckpointError(f"{what}: no such file in the repository")
    if isinstance(exc, (he.LocalEntryNotFoundError, he.OfflineModeIsEnabled)):
        if settings is not None and settings.offline:
            return CheckpointError(f"{what}: not in the Hugging Face cache ({settings.cache_dir}), and "
                                   "HF_HUB_OFFLINE=1 forbids downloading it")
        return CheckpointError(f"{what}: cannot reach {endpoint}, and it is not in the Hugging Face cache")
    if isinstance(exc, he.HfHubHTTPError):
        status = exc.response.status_code if exc.response is not None else "?"
        detail = (exc.server_message or "").strip().splitlines()
        return CheckpointError(f"{what}: the hub answered HTTP {status}" + (f" ({detail[0]})" if detail else ""))
    if isinstance(exc, OSError) and not type(exc).__module__.startswith("httpx"):
        return CheckpointError(f"{what}: {exc.strerror or exc}")
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return CheckpointError(f"{what}: cannot reach {endpoint} ({type(exc).__name__}: {first})")


def read_remote_header(rf: RemoteFile, path: Path) -> tuple[dict[str, TensorInfo], dict[str, str], bytes]:
    """A remote file's header through two range requests (its length, then its JSON), validated as strictly as
    a local one. Returns the tensors (their `file` is `path`), the metadata, and the raw first 8 + N bytes."""
    first = rf.read(0, 8).numpy().tobytes() if rf.size >= 8 else b""
    n = header_length(first, rf.size, rf.label)
    raw = rf.read(8, n).numpy().tobytes()
    tensors, metadata = parse_header(raw, rf.size, path, label=rf.label)
    return tensors, metadata, first + raw


class ReadAhead:
    """Fetches announced ranges ahead of the reads that will ask for them, and keeps the ranges a later read
    will ask for again.

    `schedule` lists (file, offset, nbytes) in the order the run is expected to read them; `threads` threads fetch
    them ahead while the bytes fetched and not yet taken, plus the bytes kept, fit in `window`. `take` hands out
    a range (waiting if it is still in flight); a range taken with `keep` (the engine's `evict=False`: a later
    phase reads it again, which is the page cache's job for a local file) stays in the window until its last
    read, or, when the window is full, is fetched again then. The schedule is a forecast, not a contract: the
    scheduler may read in another order, and that only costs waiting, never a wrong byte.
    """

    def __init__(self, schedule: list[tuple[RemoteFile, int, int]], window: int, threads: int = THREADS) -> None:
        self.window = max(1, window)
        self._queue = collections.deque(schedule)
        self._pending: dict[tuple[str, int, int], Future] = {}
        self._kept: dict[tuple[str, int, int], torch.Tensor] = {}
        self._held = 0                       # bytes pending, fetched and not taken, or kept
        self._lock = threading.Lock()
        self._closed = False
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="lazymerge-readahead")
        self._fill()

    def _fill(self) -> None:
        with self._lock:
            while self._queue and not self._closed:
                rf, offset, nbytes = self._queue[0]
                key = (rf.url, offset, nbytes)
                if key in self._pending or key in self._kept:      # a reread of a range held already
                    self._queue.popleft()
                    continue
                if self._held and self._held + nbytes > self.window:
                    return
                self._queue.popleft()
                self._held += nbytes
                self._pending[key] = self._pool.submit(rf.read, offset, nbytes)

    def take(self, rf: RemoteFile, offset: int, nbytes: int, keep: bool) -> torch.Tensor | None:
        """The bytes of this range if it was fetched ahead or kept (waiting if in flight), else None; with
        `keep` they stay held for the next read of the same range."""
        key = (rf.url, offset, nbytes)
        with self._lock:
            data = self._kept.get(key) if keep else self._kept.pop(key, None)
            fut = self._pending.pop(key, None) if data is None else None
            if data is not None and not keep:
                self._held -= nbytes
        if data is None and fut is None:
            return None
        try:
            if fut is not None:
                data = fut.result()
                with self._lock:
                    if keep and not self._closed:
                        self._kept[key] = data
                    else:
                        self._held -= nbytes
            return data
        except BaseException:
            with self._lock:
                self._held -= nbytes
            raise
        finally:
            self._fill()

    def keep(self, rf: RemoteFile, offset: int, nbytes: int, data: torch.Tensor) -> None:
        """Hold a range read on demand for its next read, if the window has room for it."""
        with self._lock:
            key = (rf.url, offset, nbytes)
            if not self._closed and key not in self._kept and self._held + nbytes <= self.window:
                self._kept[key] = data
                self._held += nbytes

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._queue.clear()
            pending, self._pending = list(self._pending.values()), {}
            self._kept.clear()
            self._held = 0
        for fut in pending:
            fut.cancel()
        self._pool.shutdown(wait=True, cancel_futures=True)


class RemoteShardReader:
    """`ShardReader`'s interface over a file on the hub: each read is one range request, unless a run's
    read-ahead fetched it already or kept it for this reread."""

    def __init__(self, rf: RemoteFile) -> None:
        self.rf = rf
        self.path = rf.label
        self._aheads: list[ReadAhead] = []
        self._lock = threading.Lock()

    def attach(self, ahead: ReadAhead) -> None:
        with self._lock:
            self._aheads.append(ahead)

    def detach(self, ahead: ReadAhead) -> None:
        with self._lock:
            if ahead in self._aheads:
                self._aheads.remove(ahead)

    def fetch(self, offset: int, nbytes: int, keep: bool) -> torch.Tensor:
        """The range's bytes as a uint8 tensor the caller owns (a range kept for a later read hands out a copy)."""
        with self._lock:
            aheads = list(self._aheads)
        for ahead in aheads:
            data = ahead.take(self.rf, offset, nbytes, keep)
            if data is not None:
                return memory.empty(nbytes, torch.uint8).copy_(data) if keep else data
        data = self.rf.read(offset, nbytes)
        if keep and aheads:
            aheads[0].keep(self.rf, offset, nbytes, data)
            data = memory.empty(nbytes, torch.uint8).copy_(data)
        return data

    def read(self, info: TensorInfo, rows: tuple[int, int] | None = None,
             dtype: torch.dtype | None = torch.float32, device: str | torch.device = "cpu",
             evict: bool = True, aligned: bool = True) -> torch.Tensor:
        """Rows [a, b) of `info`, as `ShardReader.read` returns them (a new tensor the caller owns)."""
        offset, nbytes, shape = row_span(info, rows)
        stored = info.torch_dtype
        out_dtype = stored if dtype is None else dtype
        if nbytes == 0:
            return torch.empty(shape, dtype=out_dtype, device=device)
        raw = self.fetch(offset, nbytes, keep=not evict).view(stored).view(shape)
        if out_dtype != stored:
            raw = memory.empty(shape, out_dtype).copy_(raw)
        return raw if torch.device(device).type == "cpu" else raw.to(device)

    def close(self) -> None:
        pass


def schedule_window(budget: int | None) -> int:
    """Bytes to fetch ahead and to keep for rereads: enough to cover a few row blocks, a quarter of the budget at
    most; the environment variable LAZYMERGE_READAHEAD sets it (e.g. 1GiB on a fast, distant network; 0 turns
    read-ahead and keeping off: every read is then its own request, rereads included)."""
    env = os.environ.get("LAZYMERGE_READAHEAD", "").strip()
    if env:
        try:
            return 0 if env in ("0", "off") else parse_size(env)
        except ValueError as exc:
            raise CheckpointError(f"LAZYMERGE_READAHEAD: {exc}") from None
    if budget is None:
        return WINDOW_MAX
    return max(16 << 20, min(WINDOW_MAX, budget // 4))


def start_read_ahead(ranges: list[tuple[RemoteShardReader, int, int]], window: int) -> Any:
    """A ReadAhead over `ranges` attached to their readers; returns a function that stops it."""
    if not ranges or window <= 0:
        return lambda: None
    ahead = ReadAhead([(r.rf, o, n) for r, o, n in ranges], window)
    readers = {id(r): r for r, _, _ in ranges}
    for r in readers.values():
        r.attach(ahead)

    def stop() -> None:
        for r in readers.values():
            r.detach(ahead)
        ahead.close()

    return stop
