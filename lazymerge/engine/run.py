"""Execute a Plan into an output directory: writer set-up, the scheduler, progress, the report.

The output appears atomically: the writer fills a temporary sibling directory and renames it at the end, so a
crash or Ctrl-C leaves either nothing or (with --resume) a temporary directory that a re-run can continue.
"""
from __future__ import annotations

import hashlib
import json
import ctypes
import gc
import os
import threading
import time
from pathlib import Path
from typing import Any, Callable

import torch

from .. import memory, testhold
from ..errors import MergeAborted, OutputError
from ..io.hub import bytes_transferred, pinned_name
from ..io.writer import CheckpointWriter
from ..options import RunOptions
from .context import RunContext
from .inputs import reading
from .ops import run_task
from .report import Progress, Report, RssSampler, Timeline
from .scheduler import ScheduleStats, execute


POOL_IDLE_UNBUDGETED = 512 << 20    # idle recycled buffers kept when the run has no --memory budget


def release_freed_memory() -> None:
    """Make glibc return freed tensor buffers to the OS at once.

    glibc serves allocations above a *dynamic* threshold with mmap and raises that threshold (up to 32 MiB) each
    time such a buffer is freed; from then on block-sized tensors come from the heap, whose freed space stays
    in the process's RSS. Pinning the threshold at 1 MiB keeps RSS equal to what is live, which is what the
    budget promises. (With transparent huge pages the extra page faults are cheap.)
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 1 << 20)          # M_MMAP_THRESHOLD
    except (OSError, AttributeError):      # not glibc: nothing to tune
        pass


def resolve_device(device: "str | torch.device") -> torch.device:
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise OutputError(f"device: '{device}' is not a device; use cpu or cuda[:N]") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise OutputError(f"device: '{device}' requested but no CUDA device is available; use --device cpu")
    if dev.type not in ("cpu", "cuda"):
        raise OutputError(f"device: '{device}' is not supported; use cpu or cuda[:N]")
    return dev


def usable_cores() -> int:
    """CPUs this process may run on (`taskset`/cgroup affinity), not the machine's count."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


MIN_WORKER_BYTES = 64 << 20     # a worker is only useful if the budget can hold a task of this size for it
IO_WORKERS = 1                  # threads that only read inputs, besides the compute workers (scheduler lanes):
                                # one sequential reader is what the I/O floor uses to reach the disk's speed


def _reads(task: Any) -> bool:
    """Tasks that wait on the disk and run on the I/O lane: input reads. (Writes stay on the compute lane: the
    write of a fused chain computes the block it writes, engine/lazy.py.)"""
    return task.op == "load"


def choose_threads(budget: int | None, workers: int | None = None, cores: int | None = None) -> tuple[int, int]:
    """(tasks run at once, threads each task's kernels use), from the cores and the budget; no fixed cap.

    One worker per core keeps every core busy with independent tasks (reads overlap kernels; kernels release the
    GIL), as long as the budget can give each a task of some size; at least 2, so that a read overlaps a kernel.
    Kernel threads share the cores among the workers (torch intra-op threads and the fused kernels' threads), so
    that workers x threads ~ cores instead of cores^2 runnable threads fighting for the same caches."""
    n = cores or usable_cores()
    if workers is None:
        workers = n if budget is None else min(n, budget // MIN_WORKER_BYTES)
        workers = max(2, workers)
    return workers, max(1, n // workers)


def check_output_dir(out: Path, inputs: list[Path]) -> None:
    """The output must not land inside (or be) an input model directory: we would be writing into our inputs;
    nor contain one: --overwrite would delete it."""
    o = out.expanduser().resolve()
    for p in inputs:
        q = p.resolve()
        if o == q or q in o.parents:
            raise OutputError(f"{out}: output directory is inside input model directory {p}")
        if o in q.parents:
            raise OutputError(f"{out}: output directory contains input model directory {p}")


def _input_dirs(plan: Any) -> list[Path]:
    dirs = []
    for src in plan.sources.values():
        dirs.append(Path(src.path))
        adapter = getattr(src, "adapter", None)
        if adapter is not None and getattr(adapter, "path", None) is not None:
            dirs.append(Path(adapter.path))
    dirs += [Path(f).parent for f in plan.aux_files]
    return dirs


def input_files(plan: Any) -> list[Path]:
    """Every file the plan reads tensor data from (checkpoint shards, adapter weights), sorted."""
    files: set[Path] = set()
    for src in plan.sources.values():
        files |= src.data_files()
    return sorted(files)


def meta_files(plan: Any) -> list[Path]:
    """Every small file whose bytes decide what the merge computes, besides the tensor data: each input's
    config.json, index, tokenizer and adapter config (`meta_files()` of each source), and what the planner read
    besides them (a tokenizer_source directory), sorted."""
    files: set[Path] = {Path(f) for f in getattr(plan, "read_files", ())}
    for src in plan.sources.values():
        files |= src.meta_files()
    return sorted(files)


def run_fingerprint(plan: Any, device: torch.device, version: str) -> str:
    """What the output bytes depend on besides the layout: a resumed run keeps finished shards only when this is
    unchanged. The recipe, seed, device kind, lazymerge and torch versions; each tensor data file's path, size
    and mtime (hashing gigabytes would cost a read of every input); and the bytes of every small file that
    decides what is merged (`meta_files`: an edited adapter_config.json, config.json or tokenizer changes the
    result without touching a weight file)."""
    h = hashlib.sha256()
    h.update(json.dumps([plan.method.name, plan.recipe.raw, getattr(plan.recipe, "documents", None), plan.seed,
                         device.type, version, torch.__version__], sort_keys=True, default=str).encode())
    for f in input_files(plan):
        pinned = pinned_name(f)          # a hub file: its commit says what it holds, downloaded or not
        if pinned is not None:
            h.update(f"{pinned}\0".encode())
            continue
        try:
            st = f.stat()
            h.update(f"{f.resolve()}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
        except OSError:
            h.update(f"{f}\0missing\0".encode())
    for f in meta_files(plan):
        try:           # a hub file by its commit and name: the same wherever the cache is
            h.update(f"{pinned_name(f) or f.resolve()}\0{hashlib.sha256(f.read_bytes()).hexdigest()}\0".encode())
        except OSError:
            h.update(f"{f}\0missing\0".encode())
    return h.hexdigest()


def select_tasks(plan: Any, keep: Callable[[str], bool]) -> tuple[list[str], list[Any]]:
    """The keys and tasks, in priority order, of the output tensors for which `keep(name)` holds."""
    keys, tasks = [], []
    for k, t in zip(plan.tasks.keys, plan.tasks.tasks):
        if keep(t.tensor):
            keys.append(k)
            tasks.append(t)
    return keys, tasks


def execute_tasks(plan: Any, writer: Any, dev: torch.device, keys: list[str], tasks: list[Any], *,
                  strict: bool = False, workers: int | None = None,
                  on_done: Callable[[Any, Any], None] | None = None,
                  cancel: threading.Event | None = None,
                  timeline: Timeline | None = None) -> tuple[ScheduleStats, RunContext]:
    """Run `tasks` of `plan` inside its budget, writing through `writer` (anything with `write_rows`: the
    output's CheckpointWriter here, a cluster worker's range writer in `lazymerge.cluster`)."""
    ctx = RunContext(sources=plan.sources, writer=writer, device=dev, strict=strict)
    n_workers, threads = choose_threads(plan.budget, workers)

    def run(task: Any, args: list[Any], own: tuple[bool, ...]) -> Any:
        if timeline is None:
            return run_task(ctx, task.attrs, args, own)
        t0 = time.perf_counter()
        try:
            return run_task(ctx, task.attrs, args, own)
        finally:
            timeline.add(Timeline.kind(task.op), t0, time.perf_counter())

    if testhold.ARMED:
        on_done = testhold.after_task(on_done)
    torch_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    # the plan's objects (tasks, graph, headers) live for the whole run: keep the cycle collector from tracing
    # them again on every collection (2-3% of a 1b TIES merge's CPU time went to that)
    gc.freeze()
    try:
        with memory.pooled() as pool:
            def on_start(live: int) -> None:
                # idle recycled buffers fit in what the budget has left, and take at most a quarter of it: the
                # scheduler's `live` is an upper bound (scratch estimates), so a pool filling all the headroom
                # would turn the budget's slack into resident memory (measured: peak RSS within budget + 300 MB
                # for ties, dare_ties, linear and slerp on the 1b preset, `benches/results/1b-io-*`)
                if pool is not None:
                    if plan.budget is None:
                        pool.trim(POOL_IDLE_UNBUDGETED)
                    else:
                        pool.trim(min(plan.budget - live, plan.budget // 4))

            with reading(plan.sources, tasks, plan.budget):   # hub inputs: downloaded or streamed ahead
                stats = execute(keys, tasks, run, budget=plan.budget, workers=n_workers, on_done=on_done,
                                on_start=on_start, cancel=cancel, io=_reads,
                                # an explicit worker count is every thread: tasks then run in task order
                                io_workers=IO_WORKERS if workers is None else 0)
    finally:
        gc.unfreeze()
        torch.set_num_threads(torch_threads)
    return stats, ctx


def finalize_output(writer: CheckpointWriter, plan: Any, report: Report,
                    extra_files: dict[str, bytes] | None) -> None:
    """Add the report, config, tokenizer and extra files and move the finished output into place. A GGUF holds
    its config and tokenizer in its metadata: a GGUF directory gets the report, the recipe and the model card
    (README.md, when written) only; a GGUF file output is its files alone."""
    files = dict(extra_files or {})
    files["lazymerge_report.json"] = report.to_json().encode()
    if plan.gguf is not None:
        files = {k: v for k, v in files.items() if k.startswith("lazymerge_") or k == "README.md"}
        writer.finalize(config=None, aux_files=[], extra_files=files)
        return
    writer.finalize(config=plan.config, aux_files=plan.aux_files, extra_files=files)


def run_plan(plan: Any, out: "str | Path", options: RunOptions = RunOptions(), *,
             progress: Callable[[Progress], None] | None = None, overwrite: bool = False, resume: bool = False,
             extra_files: dict[str, bytes] | None = None, version: str = "",
             cancel: threading.Event | None = None) -> Report:
    """Run `plan` (compiled with `options`) here into `out`, on `options.device` with `options.workers`
    scheduler threads."""
    out = Path(out)
    dev = resolve_device(options.device)
    release_freed_memory()
    check_output_dir(out, _input_dirs(plan))
    writer = CheckpointWriter(out, plan.layout, overwrite=overwrite, resume=resume,
                              fingerprint=run_fingerprint(plan, dev, version),
                              files=plan.gguf is not None and plan.gguf.file)
    writer.open()
    transferred = bytes_transferred()
    try:
        done_tensors = writer.tensors_done() if resume else set()
        keys, tasks = select_tasks(plan, lambda tensor: tensor not in done_tensors)
        writes_left = {}
        for t in tasks:
            if t.op == "write":
                writes_left[t.tensor] = writes_left.get(t.tensor, 0) + 1
        total_tensors = len(plan.outputs)
        state = {"tensors": total_tensors - len(writes_left), "bytes": 0}
        bytes_total = sum(t.nbytes for t in tasks if t.op == "write")

        with RssSampler() as rss:
            def on_done(task: Any, _value: Any) -> None:
                if task.op != "write":
                    return
                state["bytes"] += task.nbytes
                writes_left[task.tensor] -= 1
                if writes_left[task.tensor] == 0:
                    state["tensors"] += 1
                if progress is not None:
                    progress(Progress(state["tensors"], total_tensors, state["bytes"], bytes_total, rss.wall))

            timeline = Timeline()
            try:
                stats, ctx = execute_tasks(plan, writer, dev, keys, tasks, strict=options.strict,
                                           workers=options.workers, on_done=on_done, cancel=cancel,
                                           timeline=timeline)
            except KeyboardInterrupt:
                raise MergeAborted(f"{out}: interrupted; no output written"
                                   + (" (re-run with --resume to continue)" if resume else "")) from None
        report = Report(
            method=plan.method.name, out=str(out), seed=plan.seed, device=str(dev), wall_s=rss.wall,
            cpu_s=rss.cpu, peak_rss=rss.peak, peak_live_bytes=stats.peak_live_bytes, budget=plan.budget,
            bytes_read=ctx.bytes_read, bytes_written=ctx.bytes_written, tensors=total_tensors,
            tasks=stats.tasks_run, shards=len(plan.layout),
            blocked_tensors=sum(1 for n in plan.blocks.values() if n > 1), resumed_tensors=len(done_tensors),
            over_budget_tasks=stats.over_budget_tasks, warnings=list(plan.warnings) + ctx.warnings,
            version=version, timeline=timeline.to_dict(), inputs=dict(getattr(plan, "pins", {})),
            bytes_transferred=bytes_transferred() - transferred,
        )
        finalize_output(writer, plan, report, extra_files)
        return report
    except BaseException:
        # with --resume, finished shards survive a failure so the next run can keep them
        writer.abort(keep_partial=resume)
        raise
