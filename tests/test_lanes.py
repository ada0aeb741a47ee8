"""The scheduler's I/O lane (engine/scheduler.py): reads run beside the compute workers, and a task passed over
because its lane is full keeps its memory reserved."""
from __future__ import annotations

import threading
from dataclasses import dataclass

from lazymerge.engine.scheduler import execute


@dataclass(frozen=True)
class T:
    name: str
    inputs: tuple = ()
    nbytes: int = 0
    scratch: int = 0
    io: bool = False


def test_a_read_runs_while_the_only_compute_worker_is_busy() -> None:
    """One compute worker, one I/O thread: the kernel waits for the read to start, which one pool of one worker
    could never do (the test would time out)."""
    read_started = threading.Event()
    tasks = [T("kernel"), T("read", io=True)]

    def run(t, args, own):
        if t.name == "kernel":
            assert read_started.wait(10), "the read did not start beside the kernel"
        else:
            read_started.set()
        return t.name

    stats = execute([t.name for t in tasks], tasks, run, budget=None, workers=1, io=lambda t: t.io, io_workers=1)
    assert stats.tasks_run == 2


def test_a_passed_over_task_keeps_its_memory() -> None:
    """The compute lane is busy; the next compute task (higher priority) waits for it, and the read behind it may
    not take the memory that task needs: it starts only once the compute task has."""
    order: list[str] = []
    gate = threading.Event()
    tasks = [T("busy", nbytes=30), T("next", nbytes=60), T("read", nbytes=60, io=True)]

    def run(t, args, own):
        order.append(t.name)
        if t.name == "busy":
            gate.wait(0.5)           # holds the only compute slot a while
        return None

    execute([t.name for t in tasks], tasks, run, budget=100, workers=1, io=lambda t: t.io, io_workers=1)
    assert order.index("next") < order.index("read")


def test_without_an_io_lane_one_pool_runs_everything() -> None:
    tasks = [T(f"t{i}", io=i % 2 == 0) for i in range(6)]
    seen: list[str] = []
    execute([t.name for t in tasks], tasks, lambda t, a, o: seen.append(t.name), budget=None, workers=2)
    assert sorted(seen) == sorted(t.name for t in tasks)


def test_every_passed_over_task_keeps_its_memory() -> None:
    """Two compute tasks wait for the only compute slot: both reserve their memory, so the read behind them may
    start only once one of them has (with just the first reserved, the read would fit beside the busy task)."""
    order: list[str] = []
    tasks = [T("busy", nbytes=30), T("next1", nbytes=30), T("next2", nbytes=30), T("read", nbytes=30, io=True)]

    def run(t, args, own):
        order.append(t.name)
        return None

    execute([t.name for t in tasks], tasks, run, budget=100, workers=1, io=lambda t: t.io, io_workers=1)
    assert order.index("next1") < order.index("read")


def test_many_small_tasks_each_start_within_the_budget() -> None:
    """A merge of many small blocks: loads (all ready at once) and kernels; the live bytes never pass the budget
    while something runs (the scheduler's stats), whatever the lanes."""
    tasks, budget = [], 1000
    for b in range(300):
        tasks += [T(f"a{b}", nbytes=40, io=True), T(f"c{b}", nbytes=40, io=True),
                  T(f"k{b}", inputs=(f"a{b}", f"c{b}"), nbytes=40, scratch=40), T(f"w{b}", inputs=(f"k{b}",), io=True)]
    stats = execute([t.name for t in tasks], tasks, lambda t, a, o: None, budget=budget, workers=2,
                    io=lambda t: t.io, io_workers=1)
    assert stats.tasks_run == len(tasks) and stats.over_budget_tasks == 0 and stats.peak_live_bytes <= budget
