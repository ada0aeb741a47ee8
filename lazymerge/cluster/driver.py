"""The client side of a cluster merge: connect, check the workers, hand out partitions, journal, finish.

The client does everything a local run does except computing: it takes the output lock, preallocates the
temporary shards with their final headers, keeps the journal, drives the progress bar, writes the edge pages the
workers hand back (see `partition.py`), and finalises (index, config, tokenizer, report). Workers compute one
partition each with the same engine as a local run, so the output is bit-identical to a local run.

Failures: a worker that dies mid-partition has its partition run again elsewhere by Dask (its writes go to fixed
offsets, so running it twice is harmless). A client that dies leaves the temporary directory and its journal of
finished shards; `--resume` against the same cluster recomputes only the shards not journaled.
"""
from __future__ import annotations

import contextlib
import logging
import os
import re
import threading
import time
import uuid
from concurrent.futures import CancelledError
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from .. import testhold
from ..engine.ops import Load, Write
from ..engine.report import Progress, Report
from ..engine.run import _input_dirs, check_output_dir, finalize_output, input_files, run_fingerprint
from ..errors import MergeAborted, OutputError
from ..io.hub import pinned_name
from ..io.writer import CheckpointWriter
from .partition import partition_layout
from .preflight import check_workers
from .worker import PartitionJob, PartitionResult, layout_digest, run_partition

ENV_ADDRESS = "DASK_SCHEDULER_ADDRESS"
CONNECT_TIMEOUT_S = 30
WORKER_WAIT_S = 120


def _distributed() -> Any:
    try:
        import distributed
    except ImportError:
        raise OutputError("cluster: Dask is not installed; pip install 'lazymerge[dask]'") from None
    return distributed


@contextlib.contextmanager
def open_cluster(spec: str | None = None) -> Iterator[Any]:
    """A `distributed.Client` for `spec`: `local:N` starts a LocalCluster of N worker processes (closed on
    exit), `tcp://HOST:PORT` (or any Dask address) connects to a running scheduler; None or `env` uses the
    address in DASK_SCHEDULER_ADDRESS. One-line OutputError when that is impossible."""
    distributed = _distributed()
    spec = (spec or "").strip()
    if spec in ("", "env"):
        spec = os.environ.get(ENV_ADDRESS, "").strip()
        if not spec:
            raise OutputError(f"cluster: no address given and {ENV_ADDRESS} is not set; use --cluster local:N "
                              "or --cluster tcp://HOST:PORT")
    m = re.fullmatch(r"local(?::(\d+))?", spec)
    if m:
        n = int(m.group(1) or (os.cpu_count() or 1))
        if n < 1:
            raise OutputError(f"cluster: '{spec}': a local cluster needs at least 1 worker")
        # silence_logs: the workers' shutdown warnings ("still alive after 4 s, killing") are not the user's
        # business; errors still show
        with distributed.LocalCluster(n_workers=n, threads_per_worker=1, processes=True, dashboard_address=":0",
                                      silence_logs=logging.ERROR) as cluster, distributed.Client(cluster) as client:
            yield client
        return
    if "://" not in spec:
        raise OutputError(f"cluster: '{spec}' is neither local:N nor a scheduler address like tcp://HOST:8786")
    try:
        client = distributed.Client(spec, timeout=CONNECT_TIMEOUT_S)
    except (OSError, TimeoutError) as exc:
        first = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise OutputError(f"cluster: cannot reach the Dask scheduler at {spec}: {first}") from None
    with client:
        yield client


def _wait_for_workers(client: Any) -> None:
    """A scheduler whose workers are still starting: wait for the first one, not for ever."""
    try:
        client.wait_for_workers(1, timeout=WORKER_WAIT_S)
    except TimeoutError:
        raise OutputError(f"cluster: no worker joined the scheduler {client.scheduler.address} within "
                          f"{WORKER_WAIT_S} s; start some with: dask worker {client.scheduler.address}") from None


def _client_of(cluster: Any) -> contextlib.AbstractContextManager:
    """A Client passed in is used as is (the caller owns it); a string is opened (and closed) here."""
    if cluster is None or isinstance(cluster, str):
        return open_cluster(cluster)
    return contextlib.nullcontext(cluster)


def _device(device: "str | torch.device") -> torch.device:
    """The device kind, checked for syntax only: it is the workers' device, not this machine's."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise OutputError(f"device: '{device}' is not a device; use cpu or cuda[:N]") from None
    if dev.type not in ("cpu", "cuda"):
        raise OutputError(f"device: '{device}' is not supported; use cpu or cuda[:N]")
    return dev


def _small_files(plan: Any) -> list[Path]:
    """The other files a worker reads when it compiles the plan: each input's config.json and index, and the
    tokenizer files (vocabulary alignment reads them)."""
    files = {Path(f) for f in plan.aux_files}
    for src in plan.sources.values():
        root = getattr(src, "path", None)
        if root is not None and Path(root).is_dir():
            files |= {Path(root) / n for n in ("config.json", "model.safetensors.index.json")}
            files |= {Path(f) for f in src.aux_files()} if hasattr(src, "aux_files") else set()
    return sorted(f for f in files if f.is_file())


def _costs(plan: Any) -> dict[str, int]:
    """Bytes each output tensor reads and writes: what a partition costs, for balancing."""
    cost: dict[str, int] = {}
    for t in plan.tasks.tasks:
        if isinstance(t.attrs, (Load, Write)):
            cost[t.tensor] = cost.get(t.tensor, 0) + (t.attrs.read_bytes if isinstance(t.attrs, Load) else t.nbytes)
    return cost


def run_on_cluster(plan: Any, out: "str | Path", cluster: Any, *, recipe: Any, stage: str | None,
                   memory: int | str | None, shard_size: int | str, allow_pickle: bool,
                   max_block_rows: int | None, device: "str | torch.device" = "cpu",
                   progress: Callable[[Progress], None] | None = None, overwrite: bool = False,
                   resume: bool = False, strict: bool = False, workers: int | None = None,
                   extra_files: dict[str, bytes] | None = None, version: str = "",
                   cancel: threading.Event | None = None, stream_inputs: bool = False) -> Report:
    """Run `plan` (compiled here from `recipe` with the other arguments, which every worker repeats) into `out`
    on a Dask cluster (`distributed.Client`, `local:N`, a scheduler address, or None for DASK_SCHEDULER_ADDRESS).
    """
    out = Path(os.path.abspath(out))
    dev = _device(device)
    check_output_dir(out, _input_dirs(plan))
    with _client_of(cluster) as client:
        writer = CheckpointWriter(out, plan.layout, overwrite=overwrite, resume=resume,
                                  fingerprint=run_fingerprint(plan, dev, version))
        writer.open()
        try:
            report = _drive(plan, out, client, writer, dev, recipe=recipe, stage=stage, memory=memory,
                            shard_size=shard_size, allow_pickle=allow_pickle, max_block_rows=max_block_rows,
                            progress=progress, resume=resume, strict=strict, workers=workers, version=version,
                            cancel=cancel, stream_inputs=stream_inputs)
            finalize_output(writer, plan, report, extra_files)
            return report
        except BaseException:
            writer.abort(keep_partial=resume)
            raise


def _drive(plan: Any, out: Path, client: Any, writer: CheckpointWriter, dev: torch.device, *, recipe: Any,
           stage: str | None, memory: int | str | None, shard_size: int | str, allow_pickle: bool,
           max_block_rows: int | None, progress: Callable[[Progress], None] | None, resume: bool, strict: bool,
           workers: int | None, version: str, cancel: threading.Event | None, stream_inputs: bool) -> Report:
    distributed = _distributed()
    t0, cpu0 = time.perf_counter(), time.process_time()
    _wait_for_workers(client)
    # hub files are not probed: each worker resolves the pinned commits itself (its own cache, or streamed)
    local = [f for f in input_files(plan) + _small_files(plan) if pinned_name(f) is None]
    addresses = check_workers(client, local, writer.tmp_dir, [s.filename for s in plan.layout])
    skip = writer.completed_shards()
    resumed = len(writer.tensors_done())
    parts = partition_layout(plan.layout, len(addresses), skip=skip, cost=_costs(plan))
    from ..planner.recipe import Recipe, read_documents

    shipped = recipe if isinstance(recipe, Recipe) else read_documents(recipe)[0]
    job = PartitionJob(recipe=shipped, stage=stage, memory=memory, shard_size=shard_size, seed=plan.seed,
                       allow_pickle=allow_pickle, max_block_rows=max_block_rows, device=str(dev), strict=strict,
                       threads=workers, tmp_dir=str(writer.tmp_dir), layout_digest=layout_digest(plan.layout),
                       cwd=os.getcwd(), stream_inputs=stream_inputs)
    token = uuid.uuid4().hex[:8]
    futures = {client.submit(run_partition, job, p, key=f"lazymerge-{token}-{p.index:05d}", pure=False): p
               for p in parts}
    tensors_total = len(plan.outputs)
    tensors_done = tensors_total - sum(len(p.tensors) for p in parts)
    bytes_total = sum(p.nbytes for p in parts)
    bytes_done = 0
    results: list[PartitionResult] = []
    try:
        for fut in distributed.as_completed(list(futures)):
            if cancel is not None and cancel.is_set():
                raise MergeAborted(f"{out}: interrupted")
            part = futures[fut]
            try:
                res: PartitionResult = fut.result()
            except distributed.KilledWorker:
                raise OutputError(f"{part.filename}: partition {part.index} killed every worker that ran it; "
                                  "see the workers' logs (out of memory? lower --memory)") from None
            except CancelledError:
                raise OutputError(f"cluster: partition {part.index} was cancelled (scheduler gone or restarted?)"
                                  + ("; finished shards are kept for --resume" if resume else "")) from None
            writer.write_external(part.filename, part.nbytes, list(res.edges))
            if testhold.ARMED:
                testhold.pause()               # a shard this partition completed may be the awaited one
            results.append(res)
            tensors_done += len(part.tensors)
            bytes_done += part.nbytes
            if progress is not None:
                progress(Progress(tensors_done, tensors_total, bytes_done, bytes_total, time.perf_counter() - t0))
    except KeyboardInterrupt:
        raise MergeAborted(f"{out}: interrupted; no output written"
                           + (" (re-run with --resume to continue)" if resume else "")) from None
    finally:
        client.cancel(list(futures))
    warnings = list(dict.fromkeys([*plan.warnings, *(w for r in results for w in r.warnings)]))
    return Report(
        method=plan.method.name, out=str(out), seed=plan.seed, device=str(dev),
        wall_s=time.perf_counter() - t0, cpu_s=time.process_time() - cpu0 + sum(r.cpu_s for r in results),
        peak_rss=max((r.peak_rss for r in results), default=0),
        peak_live_bytes=max((r.peak_live_bytes for r in results), default=0),
        budget=max((r.budget for r in results if r.budget is not None), default=plan.budget),
        bytes_read=sum(r.bytes_read for r in results), bytes_written=sum(r.bytes_written for r in results),
        tensors=tensors_total, tasks=sum(r.tasks for r in results), shards=len(plan.layout),
        blocked_tensors=sum(1 for n in plan.blocks.values() if n > 1), resumed_tensors=resumed,
        over_budget_tasks=sum(r.over_budget_tasks for r in results), warnings=warnings, version=version,
        inputs=dict(getattr(plan, "pins", {})), bytes_transferred=sum(r.bytes_transferred for r in results))
