"""Run part of a plan into memory instead of onto disk: the hook that lets evaluation consume merged tensors.

Layer-streaming evaluation needs one decoder layer's merged weights at a time. Rather than a second execution
path, it runs the subset of the plan's task graph that ends in those tensors' `write` tasks, through the same
scheduler and ops, with a *sink* in place of the checkpoint writer. The `write` op casts each row block to the
output dtype before handing it over (exactly as it does for the writer), so what a sink receives is bit for bit
what a written merge would hold on disk.
"""
from __future__ import annotations

import threading
from typing import Any, Callable, Iterable

import torch

from .context import RunContext
from .inputs import reading
from .ops import run_task
from .scheduler import ScheduleStats, execute


class TensorCollector:
    """A writer that assembles whole tensors in memory (`write_rows` is the writer's interface), converted to
    `dtype` as their rows arrive (None: as written), so that a block's written copy lives only until it is
    converted."""

    def __init__(self, shapes: dict[str, tuple[int, ...]], dtype: torch.dtype | None = None):
        self.shapes, self.dtype = shapes, dtype
        self.tensors: dict[str, torch.Tensor] = {}
        self._lock = threading.Lock()

    def write_rows(self, name: str, row_start: int, tensor: torch.Tensor) -> None:
        shape = self.shapes[name]
        dtype = self.dtype or tensor.dtype
        with self._lock:
            if row_start == 0 and tuple(tensor.shape) == tuple(shape):
                self.tensors[name] = tensor.to(dtype)
                return
            out = self.tensors.get(name)
            if out is None:
                out = self.tensors[name] = torch.empty(shape, dtype=dtype)
        out[row_start:row_start + tensor.shape[0]].copy_(tensor)


class OrderedRowSink:
    """A writer for one tensor that calls `fn(start, rows)` on consecutive fixed blocks of `block_rows` rows, in
    row order, whatever order and blocking the scheduler writes in. Consumers that fold blocks in sequence (a
    streaming log-sum-exp) then compute the same floats from a merge as from a checkpoint read block by block."""

    def __init__(self, name: str, rows: int, block_rows: int, fn: Callable[[int, torch.Tensor], None]):
        self.name, self.rows, self.block_rows, self.fn = name, rows, max(1, block_rows), fn
        self.cursor = 0
        self.pending: dict[int, torch.Tensor] = {}        # row start -> rows received and not yet consumed
        self._lock = threading.Lock()

    def write_rows(self, name: str, row_start: int, tensor: torch.Tensor) -> None:
        with self._lock:
            self.pending[row_start] = tensor
            self._drain()

    def _drain(self) -> None:
        while self.cursor < self.rows:
            end = min(self.cursor + self.block_rows, self.rows)
            pieces, at = [], self.cursor
            while at < end and at in self.pending:
                piece = self.pending[at]
                pieces.append((at, piece))
                at += piece.shape[0]
            if at < end:
                return                                   # a gap: wait for more rows
            parts = []
            for start, piece in pieces:
                del self.pending[start]
                take = min(piece.shape[0], end - start)
                parts.append(piece[:take])
                if take < piece.shape[0]:
                    self.pending[start + take] = piece[take:]
            block = parts[0] if len(parts) == 1 else torch.cat(parts)
            self.fn(self.cursor, block)
            self.cursor = end


def run_tensors(plan: Any, names: Iterable[str], sink: Any, *, device: torch.device, budget: int | None,
                workers: int = 2) -> ScheduleStats:
    """Execute the tasks of output tensors `names` (and everything they depend on: a tensor's tasks, its earlier
    stages' included, all carry its name) with `sink.write_rows` receiving what `write` tasks would write."""
    wanted = set(names)
    keys, tasks = [], []
    for k, t in zip(plan.tasks.keys, plan.tasks.tasks):
        if t.tensor in wanted:
            keys.append(k)
            tasks.append(t)
    ctx = RunContext(sources=plan.sources, writer=sink, device=device)

    def run(task: Any, args: list[Any], own: tuple[bool, ...]) -> Any:
        return run_task(ctx, task.attrs, args, own)

    with reading(plan.sources, tasks, budget):
        return execute(keys, tasks, run, budget=budget, workers=workers)
