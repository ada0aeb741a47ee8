"""The worker side: run one partition of a merge on a Dask worker.

A worker is shipped the recipe and the run's options, never a Plan (a Plan holds open memory maps): it compiles
the same plan from the checkpoints' headers (cached per process, so a worker compiles once per run), checks that
its layout is byte for byte the client's, and runs only its partition's tensors through the engine's own
budgeted scheduler. Its writer opens the client's preallocated temporary shard file and `pwrite`s the pages
that lie entirely inside the partition's range; the bytes of the edge pages go back to the client (see
`partition.py`). Writing the same bytes at the same offsets again is harmless, which is what makes a retried
partition (its worker died) safe.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch

from ..engine.report import RssSampler
from ..engine.run import execute_tasks, release_freed_memory, resolve_device, select_tasks
from ..errors import LazyMergeError, OutputError
from ..io.hub import bytes_transferred
from ..io.writer import ShardLayout, check_rows, row_bytes
from ..moe.routers import bind_routers
from ..planner.compile import compile_plan
from ..planner.plan import DEFAULT_MEMORY_FRACTION, resolve_budget
from .partition import Partition, page_split


@dataclass(frozen=True)
class PartitionJob:
    """What every partition task of one run needs besides its Partition: how to rebuild the plan, where to
    write, and how to run. `recipe` is the recipe's parsed documents (or a Recipe), so no worker re-reads a
    file the user may have edited since; relative model paths are resolved against the client's `cwd`."""

    recipe: Any
    stage: str | None
    memory: int | str | None          # per worker; None: 60% of the worker's Dask memory limit
    shard_size: int | str
    seed: int
    allow_pickle: bool
    max_block_rows: int | None
    device: str
    strict: bool
    threads: int | None               # scheduler threads per partition (the engine's --workers)
    tmp_dir: str
    layout_digest: str
    cwd: str
    stream_inputs: bool = False       # hub inputs: each worker streams its own partition's byte ranges


@dataclass(frozen=True)
class PartitionResult:
    """What a finished partition sends back: the edge bytes for the client to write, and its costs."""

    index: int
    worker: str
    edges: tuple[tuple[int, bytes], ...]
    nbytes: int
    bytes_read: int
    bytes_written: int
    tasks: int
    peak_live_bytes: int
    over_budget_tasks: int
    budget: int | None
    peak_rss: int
    wall_s: float
    cpu_s: float
    warnings: tuple[str, ...] = field(default_factory=tuple)
    bytes_transferred: int = 0        # from the hub, by this partition's reads


def layout_digest(layout: list[ShardLayout]) -> str:
    """A hash of the output layout (file names, headers, sizes): equal digests mean equal offsets."""
    h = hashlib.sha256()
    for s in layout:
        h.update(s.filename.encode() + b"\0" + s.header + s.size.to_bytes(8, "little"))
    return h.hexdigest()


class RangeWriter:
    """Writes one partition's rows into the existing temporary shard file: whole pages inside the partition's
    range directly, edge-page bytes into buffers returned to the client. Thread-safe like CheckpointWriter."""

    def __init__(self, path: Path, shard: ShardLayout, part: Partition):
        self.path = path
        self.part = part
        self._where = {t.name: (t, len(shard.header) + off) for t, off in shard.tensors if t.name in part.tensors}
        self.direct, edge_ranges = page_split(part.start, part.stop)
        self._edges = [(lo, bytearray(hi - lo)) for lo, hi in edge_ranges]
        self._lock = threading.Lock()
        self.written = 0
        self._fd: int | None = None

    def __enter__(self) -> "RangeWriter":
        try:
            self._fd = os.open(self.path, os.O_WRONLY)    # never O_CREAT/O_TRUNC: the client owns the file
        except OSError as exc:
            raise OutputError(f"{self.path}: cannot open the temporary output for writing: "
                              f"{exc.strerror or exc}") from None
        return self

    def __exit__(self, *exc: Any) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            try:
                if exc[0] is None:
                    os.fsync(fd)           # durable before the client journals the shard
            finally:
                os.close(fd)

    def write_rows(self, name: str, row_start: int, tensor: torch.Tensor) -> None:
        out, offset = self._where[name]
        nbytes = check_rows(out, row_start, tensor)
        data = row_bytes(tensor)
        lo = offset + row_start * out.row_nbytes
        hi = lo + nbytes
        a, b = max(lo, self.direct[0]), min(hi, self.direct[1])
        if a < b:
            self._pwrite(data[a - lo:b - lo], a)
        for elo, buf in self._edges:
            x, y = max(lo, elo), min(hi, elo + len(buf))
            if x < y:
                buf[x - elo:y - elo] = data[x - lo:y - lo]
        with self._lock:
            self.written += nbytes

    def _pwrite(self, data: memoryview, offset: int) -> None:
        assert self._fd is not None
        try:
            while data:
                n = os.pwrite(self._fd, data, offset)
                data, offset = data[n:], offset + n
        except OSError as exc:
            raise OutputError(f"{self.path}: write failed: {exc.strerror or exc}") from None

    def edges(self) -> tuple[tuple[int, bytes], ...]:
        return tuple((lo, bytes(buf)) for lo, buf in self._edges)


# -- the plan, once per worker process --------------------------------------------------------------------------

_plan_lock = threading.Lock()
_cached: dict[str, list] = {}          # key -> [plan, partitions using it]; the newest stays for the next one
_newest: list[str] = [""]


def _budget_for(job: PartitionJob) -> int | str | None:
    """--memory is per worker; a worker with several threads runs that many partitions at once, each gets its
    share. Without --memory: 60% of the worker's Dask memory limit (what its nanny enforces)."""
    try:
        from distributed import get_worker

        w = get_worker()
        threads, limit = max(1, w.state.nthreads), w.memory_manager.memory_limit
    except (ImportError, ValueError, AttributeError):
        threads, limit = 1, None
    if job.memory is None and limit:
        return max(1, int(limit * DEFAULT_MEMORY_FRACTION) // threads)
    budget = resolve_budget(job.memory)
    return "unlimited" if budget is None else max(1, budget // threads)


def _plan_key(job: PartitionJob) -> str:
    return repr((job.layout_digest, job.memory, job.tmp_dir, job.max_block_rows, job.stage, job.seed,
                 job.stream_inputs))


def _compile(job: PartitionJob) -> Any:
    here = os.getcwd()
    moved = here != job.cwd and os.path.isdir(job.cwd)
    if moved:
        os.chdir(job.cwd)                 # relative model paths mean what they meant on the client
    try:
        plan = compile_plan(job.recipe, memory=_budget_for(job), shard_size=job.shard_size, seed=job.seed,
                            allow_pickle=job.allow_pickle, max_block_rows=job.max_block_rows, stage=job.stage,
                            stream_inputs=job.stream_inputs)
    finally:
        if moved:
            os.chdir(here)
    if layout_digest(plan.layout) != job.layout_digest:
        plan.close()
        raise OutputError("the plan compiled on this worker lays the output out differently from the "
                          "client's: are the inputs the same files at the same paths on every machine?")
    bind_routers(plan)   # a MoE's routers: computed here on first read, the same bytes as the client's
    return plan


@contextlib.contextmanager
def _plan(job: PartitionJob) -> Iterator[Any]:
    """The run's plan, compiled here from headers once per worker process and run. Plans of other runs are
    closed (their memory maps released) once no partition uses them."""
    key = _plan_key(job)
    with _plan_lock:
        if key not in _cached:
            _cached[key] = [_compile(job), 0]
        _cached[key][1] += 1
        _newest[0] = key
        plan = _cached[key][0]
    try:
        yield plan
    finally:
        with _plan_lock:
            _cached[key][1] -= 1
            for k in [k for k, (_, users) in _cached.items() if users == 0 and k != _newest[0]]:
                _cached.pop(k)[0].close()


def worker_name() -> str:
    try:
        from distributed import get_worker

        return get_worker().address
    except (ImportError, ValueError):
        return "local"


def run_partition(job: PartitionJob, part: Partition) -> PartitionResult:
    """The Dask task: compute `part`'s tensors into the temporary output. A LazyMergeError comes back to the
    client with the worker's address in front of its one-line message."""
    name = worker_name()
    try:
        release_freed_memory()
        dev = resolve_device(job.device)
        transferred = bytes_transferred()
        with _plan(job) as plan:
            keys, tasks = select_tasks(plan, set(part.tensors).__contains__)
            writer = RangeWriter(Path(job.tmp_dir) / part.filename, plan.layout[part.shard], part)
            with RssSampler() as rss, writer:
                stats, ctx = execute_tasks(plan, writer, dev, keys, tasks, strict=job.strict, workers=job.threads)
            budget, warnings = plan.budget, tuple(list(plan.warnings) + ctx.warnings)
        if writer.written != part.nbytes:
            raise OutputError(f"{part.filename}: partition {part.index} wrote {writer.written} of its "
                              f"{part.nbytes} bytes")
    except LazyMergeError as exc:
        raise type(exc)(f"worker {name}: {exc}") from None
    return PartitionResult(
        index=part.index, worker=name, edges=writer.edges(), nbytes=part.nbytes, bytes_read=ctx.bytes_read,
        bytes_written=ctx.bytes_written, tasks=stats.tasks_run, peak_live_bytes=stats.peak_live_bytes,
        over_budget_tasks=stats.over_budget_tasks, budget=budget, peak_rss=rss.peak, wall_s=rss.wall,
        cpu_s=rss.cpu, warnings=warnings, bytes_transferred=bytes_transferred() - transferred)
