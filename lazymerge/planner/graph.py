"""The task graph: nodes, and the small builder each merge method uses to describe one output tensor.

A method never executes anything: it emits tasks (`op` + inputs + attributes + output bytes) for one tensor,
block by block. The order in which tasks are emitted is a valid topological order that finishes one row block
(and one tensor) before starting the next; the scheduler uses it as its priority, as dask.order would compute.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import networkx as nx

F32 = 4

# Temporaries an op allocates while it runs, in float32 blocks of its row block (the kernels in engine/ops.py:
# e.g. a top-k pass holds |d| and its bit pattern; `combine` holds agreement masks and a weight sum; Gram and
# lincomb work in float64). Counted against the budget so that RSS, not just our bookkeeping, stays within it.
SCRATCH = {"load": 0.0, "write": 0.0, "reduce": 0.0, "delta": 0.0, "rescale": 0.0, "weighted_sum": 1.0,
           "select": 2.0, "trim": 2.0, "elect": 1.0, "combine": 3.0, "norm": 2.0, "gram": 6.0, "lincomb": 4.0,
           "fisher": 4.0}
# the newer mergekit methods' ops (sce, nearswap, arcee_fusion, ram; see planner/methods.py)
SCRATCH.update({"variance": 8.0, "count_nonzero": 0.25, "keymask": 2.0, "keep": 0.25, "sce_combine": 4.0,
                "nearswap": 3.0, "fusion_importance": 6.0, "quantile": 5.0, "fusion": 3.0, "ram_counts": 3.0,
                "ram": 5.0})


@dataclass(frozen=True)
class Task:
    op: str
    inputs: tuple[str, ...]
    attrs: dict[str, Any]
    nbytes: int
    tensor: str
    block: int = 0
    scratch: int = 0          # bytes of temporaries while it runs (freed when it ends)


@dataclass(frozen=True)
class SourceRef:
    """One input of a tensor job: which model (key into Plan.sources) and which tensor in it.

    `job` is set for a *virtual* source: the tensor is an earlier stage's output (multi-stage recipes), computed
    in the graph by that stage's job instead of read from disk (see `TensorBuilder.load`)."""

    model: str
    name: str
    row_nbytes: int        # bytes of one stored row (source dtype), for "bytes to read"
    job: Any = field(default=None, compare=False)


@dataclass
class TaskList:
    """Tasks in emission order; turned into a networkx graph once, at the end (fast for 100k nodes)."""

    keys: list[str] = field(default_factory=list)
    tasks: list[Task] = field(default_factory=list)

    def extend(self, other: "TaskList") -> None:
        self.keys.extend(other.keys)
        self.tasks.extend(other.tasks)

    def to_graph(self) -> nx.DiGraph:
        g = nx.DiGraph()
        g.add_nodes_from((k, {"task": t, "order": i}) for i, (k, t) in enumerate(zip(self.keys, self.tasks)))
        g.add_edges_from((src, k) for k, t in zip(self.keys, self.tasks) for src in t.inputs)
        return g

    def peak_bytes(self) -> int:
        """Peak live bytes when the tasks run one at a time in emission order, each output freed after its last
        consumer: the planner's estimate of a job's working set, and a lower bound for the whole run."""
        remaining: dict[str, int] = {}
        for t in self.tasks:
            for src in t.inputs:
                remaining[src] = remaining.get(src, 0) + 1
        size = {k: t.nbytes for k, t in zip(self.keys, self.tasks)}
        live = peak = 0
        for k, t in zip(self.keys, self.tasks):
            live += t.nbytes
            peak = max(peak, live + t.scratch)
            for src in set(t.inputs):
                remaining[src] -= t.inputs.count(src)
                if remaining[src] == 0:
                    live -= size[src]
            if remaining.get(k, 0) == 0:
                live -= t.nbytes
        return peak


class TensorBuilder:
    """Emits the tasks of one output tensor. Methods call `load`, `delta` and `op`; `write` ends a block.

    With several row blocks, each `phase` of a multi-pass method reloads its inputs (memoised per phase) so that
    no phase keeps the whole tensor alive; with one block every phase shares the same loads.

    A source with a `job` (an earlier stage's output) is loaded through a *child* builder that emits that job's
    tasks into this tensor's task list: its whole-tensor statistics (select/gram/reduce) once, on first use, and
    its element-wise chain per (block, phase) of this builder, like a reload. So a later stage recomputes an
    earlier stage's block instead of keeping it alive, and the earlier stage's value never goes to disk.
    """

    def __init__(self, name: str, shape: tuple[int, ...], blocks: Sequence[tuple[int, int]],
                 sources: Sequence[SourceRef], base: int | None, out_dtype: str, seed: int,
                 root: "TensorBuilder | None" = None, vocab: Any = None):
        self.root = root or self          # the builder of the output tensor: owns the task list and the keys
        self.context: Any = None          # a child's memo namespace: which stats pass / parent phase it serves
        self._children: dict[int, tuple[TensorBuilder, Any]] = {}
        self.name = name
        self.shape = tuple(shape)
        self.blocks = list(blocks)
        self.sources = list(sources)
        self.base = base
        self.out_dtype = out_dtype
        self.seed = seed
        self.rows = shape[0] if len(shape) >= 2 else 1
        self.numel = 1
        for d in shape:
            self.numel *= d
        self.row_numel = self.numel // self.rows if self.rows else 0
        self.vocab = vocab            # planner.vocab.VocabPlan when this tensor's rows are mapped
        self.out = TaskList()
        self._memo: dict[tuple, str] = {}
        self._n = 0

    # -- sizes -------------------------------------------------------------------------------------------
    def block_rows(self, j: int) -> int:
        a, b = self.blocks[j]
        return b - a

    def f32(self, j: int) -> int:
        """Bytes of one float32 block."""
        return self.block_rows(j) * self.row_numel * F32

    # -- emission ----------------------------------------------------------------------------------------
    def op(self, op: str, inputs: Iterable[str], nbytes: int, block: int = 0, scratch: int | None = None, /,
           **attrs: Any) -> str:
        """Emit a task; `scratch` defaults to the op's temporaries measured in float32 blocks (SCRATCH)."""
        root = self.root              # a child builder emits into its output tensor's list (see the class doc)
        key = f"{root.name}#{root._n}:{op}"
        root._n += 1
        root.out.keys.append(key)
        if scratch is None:
            scratch = int(SCRATCH.get(op, 1.0) * self.f32(block))
        root.out.tasks.append(Task(op, tuple(inputs), attrs, int(nbytes), root.name, block, int(scratch)))
        return key

    def _phase(self, phase: int) -> Any:
        if len(self.blocks) == 1:
            return 0                      # one block: every phase (and every child pass) shares its loads
        return phase if self.context is None else (self.context, phase)

    def _virtual(self, i: int, j: int, phase: int) -> str:
        """Block j of an earlier stage's output (source i), computed here: see the class docstring."""
        if i not in self._children:
            job = self.sources[i].job
            child = TensorBuilder(job.name, self.shape, self.blocks, job.refs, job.base, "F32", self.seed,
                                  root=self.root, vocab=job.vocab)
            child.context = ("stats", self.context)
            self._children[i] = (child, job.emit(child))
        child, block_value = self._children[i]
        child.context = ("block", self._phase(phase))
        return block_value(j)

    def load(self, i: int, j: int, phase: int = 0, raw: bool = False) -> str:
        """Block j of source i as float32 (or, `raw`, in its stored dtype: integer buffers are copied as is)."""
        if self.sources[i].job is not None:
            memo = ("virtual", i, j, self._phase(phase))
            if memo not in self._memo:
                self._memo[memo] = self._virtual(i, j, phase)
            return self._memo[memo]
        memo = ("load", i, j, self._phase(phase), raw)
        if memo not in self._memo:
            src = self.sources[i]
            rows = self.blocks[j] if len(self.shape) >= 2 else None   # 0-d/1-d tensors are one row
            read = self.block_rows(j) * src.row_nbytes
            extra = {}
            if self.vocab is not None:
                extra = self.vocab.block_attrs(src.model, self.name, rows or (0, self.shape[0]))
                if extra:
                    read = extra["read_rows"] * src.row_nbytes
            self._memo[memo] = self.op("load", (), read if raw else self.f32(j), j, model=src.model,
                                       name=src.name, rows=rows, read_bytes=read, raw=raw, **extra)
        return self._memo[memo]

    def delta(self, i: int, j: int, phase: int = 0) -> str:
        """Task vector block of source i against the base."""
        assert self.base is not None
        memo = ("delta", i, j, self._phase(phase))
        if memo not in self._memo:
            self._memo[memo] = self.op("delta", (self.load(i, j, phase), self.load(self.base, j, phase)),
                                       self.f32(j), j)
        return self._memo[memo]

    def write(self, y: str, j: int, out_itemsize: int) -> str:
        return self.op("write", (y,), self.block_rows(j) * self.row_numel * out_itemsize, j,
                       name=self.name, row_start=self.blocks[j][0], dtype=self.out_dtype)
