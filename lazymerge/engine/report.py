"""What a run cost: the report printed after a merge and saved as OUT/lazymerge_report.json.

Peak RSS is the process's own accounting (psutil, sampled while the merge runs), because that is the number a
user's machine sees; `peak_live_bytes` is lazymerge's own tensor accounting, the number the budget bounds.
"""
from __future__ import annotations

import json
import resource
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import psutil

from ..errors import printable
from ..units import human


@dataclass
class Progress:
    """Handed to a `progress` callback after every task."""

    tensors_done: int
    tensors_total: int
    bytes_done: int
    bytes_total: int
    elapsed_s: float


@dataclass
class Report:
    method: str
    out: str
    seed: int
    device: str
    wall_s: float
    cpu_s: float
    peak_rss: int
    peak_live_bytes: int
    budget: int | None
    bytes_read: int
    bytes_written: int
    tensors: int
    tasks: int
    shards: int
    blocked_tensors: int = 0          # tensors computed in several row blocks
    resumed_tensors: int = 0
    over_budget_tasks: int = 0
    warnings: list[str] = field(default_factory=list)
    version: str = ""
    timeline: dict | None = None      # `Timeline.to_dict()`: what the workers were doing over time
    inputs: dict[str, str] = field(default_factory=dict)   # hub inputs: "org/name@revision" -> commit sha read
    bytes_transferred: int = 0        # from the hub during the run: downloaded files and streamed ranges

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2) + "\n"

    def summary(self) -> str:
        rate = self.bytes_written / self.wall_s if self.wall_s > 0 else 0.0
        lines = [
            f"merged        {self.tensors} tensors ({self.method}) into {self.out}",
            f"wall time     {self.wall_s:.2f} s (cpu {self.cpu_s:.2f} s), {human(rate)}/s written",
            f"peak RSS      {human(self.peak_rss)} (tensors held: {human(self.peak_live_bytes)}, "
            f"budget {human(self.budget) if self.budget else 'unlimited'})",
            f"read          {human(self.bytes_read)}",
            f"written       {human(self.bytes_written)} in {self.shards} shard(s)",
            f"tasks         {self.tasks}" + (f", {self.blocked_tensors} tensors in row blocks"
                                              if self.blocked_tensors else ""),
        ]
        if self.bytes_transferred:
            lines.append(f"transferred   {human(self.bytes_transferred)} from the hub")
        lines += [f"input         {ref} at {sha}" for ref, sha in sorted(self.inputs.items())]
        if self.resumed_tensors:
            lines.append(f"resumed       {self.resumed_tensors} tensors kept from the interrupted run")
        lines += [f"warning       {printable(w)}" for w in self.warnings]
        return "\n".join(lines)


class RssSampler:
    """Samples this process's RSS in a daemon thread; `peak` is the largest value seen."""

    def __init__(self, interval: float = 0.1):
        self.interval = interval
        self.proc = psutil.Process()
        self.peak = self.proc.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True, name="lazymerge-rss")
        self.t0 = time.perf_counter()
        self.cpu0 = self._cpu()

    def _cpu(self) -> float:
        r = resource.getrusage(resource.RUSAGE_SELF)
        return r.ru_utime + r.ru_stime

    def sample(self) -> int:
        """The RSS now, counted into `peak` (so a figure read from here, say a start, is never above the peak)."""
        now = self.proc.memory_info().rss
        self.peak = max(self.peak, now)
        return now

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.sample()
            except psutil.Error:  # pragma: no cover - process going away
                return

    def __enter__(self) -> "RssSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()

    @property
    def wall(self) -> float:
        return time.perf_counter() - self.t0

    @property
    def cpu(self) -> float:
        return self._cpu() - self.cpu0


class Timeline:
    """Busy thread-seconds per kind of task (read, compute, write) in fixed time bins since the run started: shows
    whether reads, kernels and writes overlap (benches/run.py plots it next to RSS). Cheap: two clock reads and a
    few additions per task."""

    KINDS = ("read", "compute", "write")

    def __init__(self, bin_s: float = 0.25) -> None:
        self.bin_s = bin_s
        self.t0 = time.perf_counter()
        self.bins: dict[str, list[float]] = {k: [] for k in self.KINDS}
        self._lock = threading.Lock()

    @staticmethod
    def kind(op: str) -> str:
        return "read" if op == "load" else "write" if op == "write" else "compute"

    def add(self, kind: str, start: float, end: float) -> None:
        a, b = start - self.t0, end - self.t0
        with self._lock:
            row = self.bins[kind]
            while a < b:
                i = int(a / self.bin_s)
                edge = min(b, (i + 1) * self.bin_s)
                if len(row) <= i:
                    row.extend([0.0] * (i + 1 - len(row)))
                row[i] += edge - a
                a = edge

    def to_dict(self) -> dict:
        with self._lock:
            n = max(len(v) for v in self.bins.values())
            return {"bin_s": self.bin_s, **{k: [round(x, 4) for x in v + [0.0] * (n - len(v))]
                                            for k, v in self.bins.items()}}
