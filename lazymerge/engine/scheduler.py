"""Run a task graph inside a memory budget.

Modelled on dask's local scheduler: a ready set ordered by a static priority, a small thread pool, and
reference counts that drop every intermediate right after its last consumer. The priority is the order in which
the planner emitted tasks, which finishes one row block (and one tensor) before the next, so memory stays at
"one tensor's working set" instead of "all loads first".

The budget rule: the next task in priority order starts only if the bytes held (live outputs plus outputs of
running tasks) stay within the budget; we never skip ahead of a task that doesn't fit, so the depth-first order
is kept and nothing starves. When nothing is running, the next task always starts: a single task larger than the
budget is reported (peak > budget), not a deadlock. Work of other threads (torch kernels, file reads) releases
the GIL, which is what lets loads of the next block overlap computation of the current one.

Two lanes: reads (and writes) wait on the disk, kernels on the cores. With one pool, a worker blocked in a read
is a core that computes nothing, so on 2 cores the wall time was the sum of reading and computing, not the larger
of the two. I/O tasks (`io(task)`) therefore run on their own `io_workers` threads besides the `workers` compute
threads. A task whose lane is full is passed over for the next ready task of the other lane; the budget rule is
unchanged (nothing is started past a task that does not fit).
"""
from __future__ import annotations

import heapq
import queue
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from ..errors import MergeAborted


@dataclass
class ScheduleStats:
    tasks_run: int = 0
    peak_live_bytes: int = 0
    over_budget_tasks: int = 0


def _links(keys: Sequence[str], tasks: Sequence[Any]
           ) -> tuple[dict[str, int], list[int], list[list[int]], list[int]]:
    """(position of each key, unfinished inputs per task, consumers per task, consumers not yet run per task)."""
    index = {k: i for i, k in enumerate(keys)}
    n = len(keys)
    waiting = [0] * n
    consumers: list[list[int]] = [[] for _ in range(n)]
    refs = [0] * n
    for i, t in enumerate(tasks):
        for src in t.inputs:
            s = index[src]
            consumers[s].append(i)
            refs[s] += 1
        waiting[i] = len(t.inputs)
    return index, waiting, consumers, refs


class _ReadyBytes:
    """Bytes needed by the ready tasks of one lane, summed over task positions below any position (a Fenwick
    tree): what a full lane's passed-over tasks reserve, in O(log n) instead of popping them one by one."""

    def __init__(self, n: int) -> None:
        self._tree = [0] * (n + 1)

    def add(self, i: int, nbytes: int) -> None:
        i += 1
        while i < len(self._tree):
            self._tree[i] += nbytes
            i += i & -i

    def below(self, i: int) -> int:
        """The bytes of the ready tasks at positions < i."""
        total = 0
        while i > 0:
            total += self._tree[i]
            i -= i & -i
        return total


def execute(keys: Sequence[str], tasks: Sequence[Any], run: Callable[[Any, list[Any], tuple[bool, ...]], Any], *,
            budget: int | None, workers: int = 2, on_done: Callable[[Any, Any], None] | None = None,
            on_start: Callable[[int], None] | None = None, cancel: threading.Event | None = None,
            io: Callable[[Any], bool] | None = None, io_workers: int = 0) -> ScheduleStats:
    """Execute `tasks` (each with `.inputs`, `.nbytes`, `.scratch`), keyed by `keys`, listed in a topological order
    that is also their priority. `run(task, input_values, own)` computes one task (`own[k]`: input k is donated);
    `on_done(task, result)` is called on the scheduling thread after each task (progress); `on_start(live)` before
    each task starts, with the bytes now held, its own included (the buffer pool trims itself to the rest of the
    budget). `io(task)`: whether a task waits on the disk; such tasks run on `io_workers` threads of their own
    (0: one pool for all). Raises the first task error, or MergeAborted on cancel.

    Long because the start loop, the completion loop and the reference counts share the scheduler's state (live
    bytes, lanes, ready heaps): split apart they would pass it all around."""
    index, waiting, consumers, refs = _links(keys, tasks)
    n = len(keys)
    lanes = [1 if io is not None and io_workers > 0 and io(t) else 0 for t in tasks]

    def need(i: int) -> int:
        return tasks[i].nbytes + tasks[i].scratch

    ready: tuple[list[int], list[int]] = ([], [])          # one heap of ready tasks per lane
    ready_bytes = (_ReadyBytes(n), _ReadyBytes(n))          # and what they need, by position

    def make_ready(i: int) -> None:
        heapq.heappush(ready[lanes[i]], i)
        ready_bytes[lanes[i]].add(i, need(i))

    for i in range(n):
        if waiting[i] == 0:
            make_ready(i)
    results: dict[int, Any] = {}
    running: dict[Future, int] = {}
    done: queue.SimpleQueue[Future] = queue.SimpleQueue()      # futures as they finish (their done callback)
    live = 0
    stats = ScheduleStats()
    cancel = cancel or threading.Event()

    def release(i: int) -> None:
        nonlocal live
        results.pop(i, None)
        live -= tasks[i].nbytes

    slots = [max(1, workers), io_workers]
    busy = [0, 0]
    pool = ThreadPoolExecutor(max_workers=max(1, workers) + io_workers, thread_name_prefix="lazymerge")
    try:
        done_count = 0
        while done_count < n:
            if cancel.is_set():
                raise MergeAborted("interrupted")
            # start what fits, in priority order, from the lanes with a free slot. The ready tasks of a full lane
            # that come before the next task keep their place: their memory stays reserved, so that the other
            # lane cannot fill the budget ahead of them (loads running far ahead of the kernels that free them).
            # One heap per lane and a sum tree of what each lane's ready tasks need: passing over a full lane
            # costs O(log n), where popping its ready tasks one by one made a run of small blocks quadratic.
            while True:
                lane = min((k for k in (0, 1) if ready[k] and busy[k] < slots[k]),
                           key=lambda k: ready[k][0], default=None)
                if lane is None:
                    break
                i = ready[lane][0]
                reserved = ready_bytes[1 - lane].below(i)        # the other lane is full, or has nothing before i
                if budget is not None and running and live + reserved + need(i) > budget:
                    break
                heapq.heappop(ready[lane])
                ready_bytes[lane].add(i, -need(i))
                t = tasks[i]
                busy[lane] += 1
                if budget is not None and live + need(i) > budget:
                    stats.over_budget_tasks += 1
                live += need(i)
                stats.peak_live_bytes = max(stats.peak_live_bytes, live)
                if on_start is not None:
                    on_start(live)
                srcs = [index[s] for s in t.inputs]
                # donate an input's buffer when this task is its last reader (and reads it only once)
                own = tuple(refs[s] == 1 and srcs.count(s) == 1 for s in srcs)
                args = [results[s] for s in srcs]
                fut = pool.submit(run, t, args, own)
                running[fut] = i
                fut.add_done_callback(done.put)
            # completions arrive on a queue: `concurrent.futures.wait` would install and remove a waiter on every
            # running future per completion (a quarter of a small-block merge's scheduling time)
            try:
                finished = [done.get(timeout=0.25)]
            except queue.Empty:
                continue                      # nothing finished yet: look at `cancel` again
            while True:
                try:
                    finished.append(done.get_nowait())
                except queue.Empty:
                    break
            for fut in finished:
                i = running.pop(fut)
                busy[lanes[i]] -= 1
                value = fut.result()          # re-raises the task's error
                live -= tasks[i].scratch
                done_count += 1
                stats.tasks_run += 1
                if on_done is not None:
                    on_done(tasks[i], value)
                if refs[i]:
                    results[i] = value
                else:
                    live -= tasks[i].nbytes   # nobody needs it (write tasks)
                del value
                for s in {index[k] for k in tasks[i].inputs}:
                    refs[s] -= tasks[i].inputs.count(keys[s])
                    if refs[s] == 0:
                        release(s)
                for c in consumers[i]:
                    waiting[c] -= 1
                    if waiting[c] == 0:
                        make_ready(c)
    except BaseException:
        cancel.set()
        for fut in running:
            fut.cancel()
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        results.clear()
    return stats
