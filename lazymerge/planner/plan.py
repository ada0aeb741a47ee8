"""The Plan: a compiled merge (task graph, inputs, output layout, budget) and the memory budget it runs in.

`planner.compile.compile_plan` makes one: recipe -> tensor jobs per stage (`planner.stage_compiler`) -> task
graph (`planner.emit`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import networkx as nx
import psutil

from ..engine.ops import Load
from ..errors import RecipeError, printable
from ..io.checkpoint import Checkpoint
from ..io.writer import OutTensor, ShardLayout
from ..units import human, parse_size
from .graph import TaskList
from .methods import Method
from .recipe import Recipe

DEFAULT_MEMORY_FRACTION = 0.6


def resolve_budget(memory: "int | str | None") -> int | None:
    """Bytes lazymerge may allocate for tensors; None = unlimited. Default: a fraction of available RAM."""
    if memory is None:
        return int(psutil.virtual_memory().available * DEFAULT_MEMORY_FRACTION)
    if isinstance(memory, str) and memory.strip().lower() in ("unlimited", "inf", "none", "0"):
        return None
    if memory == 0:
        return None
    try:
        value = parse_size(memory)
    except ValueError as exc:
        raise RecipeError(f"memory: {exc}") from None
    if value <= 0:
        raise RecipeError(f"memory: must be positive, got {memory!r}")
    return value


@dataclass
class Plan:
    """A compiled merge: the graph, its inputs, its output layout and what it will cost."""

    recipe: Recipe
    method: Method
    tasks: TaskList
    sources: dict[str, Checkpoint]
    outputs: list[OutTensor]
    layout: list[ShardLayout]
    budget: int | None
    seed: int
    config: dict[str, Any] | None
    aux_files: list[Path]
    blocks: dict[str, int] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    extra_files: dict[str, bytes] = field(default_factory=dict)   # e.g. a merged tokenizer
    pins: dict[str, str] = field(default_factory=dict)   # hub inputs: "org/name@revision" -> the commit read
    read_files: list[Path] = field(default_factory=list)   # small files read besides the sources' own meta_files()
    gguf: Any = None               # io.gguf.layout.GGUFOptions when the output is a GGUF
    _graph: nx.DiGraph | None = None

    @property
    def graph(self) -> nx.DiGraph:
        """The task DAG (networkx), built on first use: the scheduler only needs the ordered task list."""
        if self._graph is None:
            self._graph = self.tasks.to_graph()
        return self._graph

    @property
    def bytes_read(self) -> int:
        return sum(t.attrs.read_bytes for t in self.tasks.tasks if isinstance(t.attrs, Load))

    @property
    def bytes_written(self) -> int:
        return sum(s.size for s in self.layout)

    @property
    def est_peak(self) -> int:
        return self.tasks.peak_bytes()

    def summary(self) -> str:
        blocked = {k: v for k, v in self.blocks.items() if v > 1}
        lines = [
            f"method        {self.method.name}",
            f"models        {len(self.sources)} checkpoints",
            f"tensors       {len(self.outputs)} ({len(blocked)} split into row blocks)",
            f"tasks         {len(self.tasks.tasks)}",
            f"read          {human(self.bytes_read)}",
            f"write         {human(self.bytes_written)} in {len(self.layout)} "
            + (f"GGUF file(s), {self.gguf.type}" if self.gguf is not None else "shard(s)"),
            f"budget        {human(self.budget) if self.budget else 'unlimited'}",
            f"est. peak     {human(self.est_peak)} of tensors (one task at a time)",
        ]
        lines += [f"warning       {printable(w)}" for w in self.warnings]
        return "\n".join(lines)

    def close(self) -> None:
        for ckpt in self.sources.values():
            ckpt.close()


