"""Test holds: stop a run at a named point so that a test can kill, interrupt or release it exactly there.

A fault test must SIGKILL or Ctrl-C a real run at a known point, and a merge of a tiny model is over in
milliseconds: watching it from outside races it. So a run can be told to stop by itself, with

    LAZYMERGE_TEST_HOLD=<event>:<n>:<path>

in its environment (read once, when lazymerge is imported, and taken out of the environment so that the processes
it starts do not inherit it; unset, every hook below is one attribute test). The n-th time <event> happens in the
process, the run writes <path> (JSON: event, n, pid), creates the FIFO <path>.release and blocks opening it: the
test reads <path>, looks at the run's files, then kills it, interrupts it (Ctrl-C raises KeyboardInterrupt from the
hold, as from any blocking call of the main thread) or releases it by opening the FIFO for writing and closing it
(`tests/holdkit.py` is the test's side). One hold per process.

Events, each counted where it happens:
- an op's name (`write`, `load`, ...): a task of that op has finished (the scheduler's `on_done`, wrapped by
  engine.run.execute_tasks: local runs and cluster workers);
- `shard`: a shard is complete and journaled, so a --resume keeps it (io.writer, local and cluster runs);
- `finalize`: the output is complete in its temporary directory (a directory output: its journal removed), not yet
  renamed (a file output: not yet moved into place);
- `trial`: a search trial's result is stored in the study (evaluate.search, local and cluster).

A hold blocks only where blocking is safe: on the thread that drives the run (the scheduling loop, the cluster
client's loop, finalize, the search loop), which is the thread Ctrl-C interrupts and which holds no lock. An
event that happens on another thread (a shard completed inside a write task, on a scheduler worker thread) holds
the run at the driving thread's next `pause()`: `on_done` reaches one after every task, so with one worker the run
stops right after the task that completed the shard, nothing else in flight.

In-process (a Dask worker plugin, a test driving the API), `arm(event, n, action)` sets the same hold with a
function to call at the point instead of announcing and blocking; `arm(None)` removes it.
"""
from __future__ import annotations

import json
import os
import threading
from dataclasses import dataclass
from typing import Any, Callable

ENV = "LAZYMERGE_TEST_HOLD"


@dataclass(frozen=True)
class Hold:
    event: str
    n: int
    path: str | None = None                               # announce at path, block on path + ".release"
    action: Callable[[dict], None] | None = None          # or call this at the point


ARMED = False              # read by the hooks before calling in: False costs them one attribute test
_hold: Hold | None = None
_count = 0
_due = False
_lock = threading.Lock()


def parse(spec: str) -> Hold:
    """`<event>:<n>:<path>` as a Hold; ValueError naming the variable when malformed."""
    parts = spec.split(":", 2)
    if len(parts) != 3 or not parts[0] or not parts[1].isdigit() or int(parts[1]) < 1 or not parts[2]:
        raise ValueError(f"{ENV}={spec!r}: expected <event>:<n>:<path>, n >= 1")
    return Hold(parts[0], int(parts[1]), path=parts[2])


def arm(hold: "Hold | str | None", n: int = 1, action: Callable[[dict], None] | None = None) -> None:
    """Set the process's hold (an event name with `n` and `action`, or a Hold), counting from zero; None removes
    it."""
    global ARMED, _hold, _count, _due
    if isinstance(hold, str):
        hold = Hold(hold, n, action=action)
    with _lock:
        _hold, _count, _due = hold, 0, False
        ARMED = hold is not None


def reached(event: str, *, here: bool = True) -> None:
    """`event` happened once more. At the awaited n-th time, hold the run here, or at the driving thread's next
    `pause()` when the caller is not the driving thread (`here=False`)."""
    global _count, _due
    hold = _hold
    if hold is None:
        return
    if event == hold.event:
        with _lock:
            _count += 1
            if _count == hold.n:
                _due = True
    if here:
        pause()


def after_task(on_done: Callable[[Any, Any], None] | None) -> Callable[[Any, Any], None]:
    """The scheduler's `on_done` (or None) followed by the finished task's event: the engine wraps its callback
    in this only while a hold is armed, so an unarmed run pays nothing per task."""
    def done(task: Any, value: Any) -> None:
        if on_done is not None:
            on_done(task, value)
        reached(task.op)
    return done


def pause() -> None:
    """A point where the driving thread may stop: hold here if the awaited event has happened."""
    global _due
    hold = _hold
    if hold is None or not _due:
        return
    with _lock:
        if not _due:
            return
        _due = False
    info = {"event": hold.event, "n": hold.n, "pid": os.getpid()}
    if hold.action is not None:
        hold.action(info)
        return
    release = hold.path + ".release"
    try:
        os.mkfifo(release)
    except FileExistsError:
        pass
    tmp = hold.path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(info, f)
    os.replace(tmp, hold.path)
    with open(release, "rb") as f:          # blocks until the test opens it to write; returns at its close
        f.read()


if os.environ.get(ENV):
    # this process's hold: taken out of the environment so that processes it starts (a local Dask cluster's
    # workers) do not stop at the same point and announce at the same path
    arm(parse(os.environ.pop(ENV)))
