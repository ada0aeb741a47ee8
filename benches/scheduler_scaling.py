"""The scheduler's cost per task as the graph grows: it must stay flat (linear total), whatever the lanes.

Why: a merge under a small budget is many small row blocks, so tens of thousands of tasks. Until this bench the
start loop popped every ready task of a full lane off the heap and pushed it back, once per completion: with
thousands of loads ready at once (they have no inputs) a run was quadratic in its task count (the test suite's
breadcrumbs merge at --memory 64KiB spent 60 of its 97 s there). This bench runs `engine.scheduler.execute` on
graphs of no-op tasks shaped like a merge (per block: two loads on the I/O lane, a kernel, a write) at growing
sizes, for this tree's scheduler and, in the same run, for the scheduler of a git revision (`--baseline REV`),
and prints microseconds per task. No data is touched: this is the scheduler's own overhead.

    python3 benches/scheduler_scaling.py --sizes 1000 4000 16000 --baseline 0fd24fe \\
        --out benches/results/scheduler-scaling-YYYYMMDD
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


@dataclass(frozen=True)
class Task:
    inputs: tuple[str, ...]
    nbytes: int
    scratch: int
    io: bool


def graph(blocks: int) -> tuple[list[str], list[Task]]:
    """Per block: two loads (I/O lane, no inputs: all ready at the start), a kernel reading both, a write."""
    keys: list[str] = []
    tasks: list[Task] = []
    for b in range(blocks):
        a, c, k, w = f"a{b}", f"c{b}", f"k{b}", f"w{b}"
        keys += [a, c, k, w]
        tasks += [Task((), 64, 0, True), Task((), 64, 0, True), Task((a, c), 64, 64, False), Task((k,), 0, 0, True)]
    return keys, tasks


def scheduler_at(rev: str | None) -> ModuleType:
    """This tree's scheduler, or the one of git revision `rev` loaded from its source (same package context)."""
    if rev is None:
        from lazymerge.engine import scheduler
        return scheduler
    src = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:lazymerge/engine/scheduler.py"],
                         check=True, capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp()) / "scheduler.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location("lazymerge.engine._scheduler_baseline", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod                 # dataclasses look their module up while it executes
    spec.loader.exec_module(mod)
    return mod


def time_once(mod: ModuleType, blocks: int, budget: int | None) -> float:
    keys, tasks = graph(blocks)
    t0 = time.perf_counter()
    stats = mod.execute(keys, tasks, lambda t, args, own: None, budget=budget, workers=2,
                        io=lambda t: t.io, io_workers=1)
    assert stats.tasks_run == len(tasks)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 4000, 16000], help="tasks per graph")
    ap.add_argument("--baseline", default=None, help="git revision whose scheduler runs beside this tree's")
    ap.add_argument("--budget", type=int, default=None, help="bytes (default: unlimited)")
    ap.add_argument("--out", type=Path, default=None, help="folder for results.json and results.md")
    a = ap.parse_args()
    runs = [("this tree", scheduler_at(None))] + ([(a.baseline, scheduler_at(a.baseline))] if a.baseline else [])
    rows = []
    for n in a.sizes:
        for name, mod in runs:
            s = time_once(mod, n // 4, a.budget)
            rows.append({"scheduler": name, "tasks": n, "seconds": s, "us_per_task": 1e6 * s / n})
            print(f"{name:>12}  {n:>7} tasks  {s:8.2f} s  {1e6 * s / n:9.1f} us/task", flush=True)
    if a.out:
        a.out.mkdir(parents=True, exist_ok=True)
        (a.out / "results.json").write_text(json.dumps({"budget": a.budget, "rows": rows}, indent=1))
        lines = ["| scheduler | tasks | s | µs/task |", "|---|---:|---:|---:|"]
        lines += [f"| {r['scheduler']} | {r['tasks']} | {r['seconds']:.2f} | {r['us_per_task']:.1f} |" for r in rows]
        (a.out / "results.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
