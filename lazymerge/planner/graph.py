"""The task graph: nodes, and the small builder each merge method uses to describe one output tensor.

A method never executes anything: it emits tasks (an op's typed attributes from `engine.ops`, inputs, output
bytes) for one tensor, block by block. The order in which tasks are emitted is a valid topological order that finishes one row block
(and one tensor) before starting the next; the scheduler uses it as its priority, as dask.order would compute.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, Iterable, Sequence

import networkx as nx

from .. import shapes
from ..dtypes import row_nbytes
from ..engine import ops

F32 = 4


@dataclass(frozen=True)
class Task:
    """One node of the graph: an op (its typed attributes, `engine.ops`), the keys of its inputs, the bytes of its
    output, and the temporaries it allocates while it runs."""

    attrs: ops.Attrs
    inputs: tuple[str, ...]
    nbytes: int
    tensor: str
    block: int = 0
    scratch: int = 0          # bytes of temporaries while it runs (freed when it ends)

    @property
    def op(self) -> str:
        return self.attrs.op


@dataclass(frozen=True)
class SourceRef:
    """One input of a tensor job: which model (key into Plan.sources) and which tensor in it.

    `job` is set for a *virtual* source: the tensor is an earlier stage's output (multi-stage recipes), computed
    in the graph by that stage's job instead of read from disk (see `TensorBuilder.load`).

    `stored` is False for a tensor its source computes (an adapted weight W + scale * B @ A, `io.adapters`): it
    has no stored form, so it is only ever read as float32. Reading it "as stored" would round a value that
    exists only in float32, and a tensor whose loads are shared between phases (`share_loads`) would then see
    other values than one that is not: the output would depend on the budget and the block size."""

    model: str
    name: str
    row_nbytes: int        # bytes of one stored row (source dtype), for "bytes to read"
    job: Any = field(default=None, compare=False)
    stored: bool = True


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


def share_loads(tl: TaskList, computed: "set[tuple[str, str]] | frozenset" = frozenset()) -> tuple[TaskList, int]:
    """Read every input block once: where several phases of a tensor load the same block (top-k passes, norms,
    Gram partials before the combination), the first load reads it as stored and every phase casts its own float32
    copy from it (`cast`), instead of reading the input again. The stored block stays live from the first phase to
    the last, so the caller keeps this only when the working set still fits. Returns the list and the bytes kept.
    Keys are unchanged: consumers need no rewiring.

    A `computed` tensor ((model, name): one with no stored form, `SourceRef.stored`) is kept as the float32 value
    every phase would have loaded, never rounded to its source's dtype: what a phase sees must not depend on
    whether its loads were shared."""
    groups: dict[tuple, list[int]] = {}
    for idx, t in enumerate(tl.tasks):
        a = t.attrs
        if isinstance(a, ops.Load) and not a.raw and a.vocab is None:
            groups.setdefault((a.model, a.name, a.rows), []).append(idx)
    raw_of: dict[int, str] = {}
    exact: set[str] = set()
    kept = 0
    for (model, name, _), g in groups.items():
        if len(g) > 1:
            raw_key = tl.keys[g[0]] + ":stored"
            if (model, name) in computed:
                exact.add(raw_key)
                kept += tl.tasks[g[0]].nbytes
            else:
                kept += tl.tasks[g[0]].attrs.read_bytes
            for idx in g:
                raw_of[idx] = raw_key
    if not raw_of:
        return tl, 0
    out = TaskList()
    read: set[str] = set()
    for idx, (k, t) in enumerate(zip(tl.keys, tl.tasks)):
        raw_key = raw_of.get(idx)
        if raw_key is None:
            out.keys.append(k)
            out.tasks.append(t)
            continue
        if raw_key not in read:
            read.add(raw_key)
            a = t.attrs
            out.keys.append(raw_key)
            if raw_key in exact:
                out.tasks.append(Task(a, (), t.nbytes, t.tensor, t.block, 0))
            else:
                out.tasks.append(Task(ops.Load(a.model, a.name, a.rows, a.read_bytes, raw=True), (), a.read_bytes,
                                      t.tensor, t.block, 0))
        out.keys.append(k)
        out.tasks.append(Task(ops.Cast(), (raw_key,), t.nbytes, t.tensor, t.block, 0))
    return out, kept


def mark_rereads(tl: TaskList) -> TaskList:
    """Where phases read the same input block again (the blocks were too big to keep, `_read_once`), every read
    but the last leaves the block's pages in the page cache (`Load.evict=False`): the next phase finds them
    there instead of on disk. The last read drops them, so the cache ends as the merge found it. "Last" is the
    task order, which is the phase order (each phase waits on the statistics of the one before)."""
    def block(t: Task) -> tuple | None:
        a = t.attrs
        return (a.model, a.name, a.rows) if isinstance(a, ops.Load) and a.vocab is None else None

    blocks = [block(t) for t in tl.tasks]
    last = {b: idx for idx, b in enumerate(blocks)}
    keep = [b is not None and last[b] != idx for idx, b in enumerate(blocks)]
    if not any(keep):
        return tl
    return TaskList(list(tl.keys), [replace(t, attrs=replace(t.attrs, evict=False)) if k else t
                                    for k, t in zip(keep, tl.tasks)])


class TensorBuilder:
    """Emits the tasks of one output tensor. Methods call `load`, `delta` and `emit`; `write` ends a block.

    With several row blocks, each `phase` of a multi-pass method reloads its inputs (memoised per phase) so that
    no phase keeps the whole tensor alive; with one block every phase shares the same loads.

    A source with a `job` (an earlier stage's output) is loaded through a *child* builder that emits that job's
    tasks into this tensor's task list: its whole-tensor statistics (select/gram/reduce) once, on first use, and
    its element-wise chain per (block, phase) of this builder, like a reload. So a later stage recomputes an
    earlier stage's block instead of keeping it alive, and the earlier stage's value never goes to disk.
    """

    def __init__(self, name: str, shape: tuple[int, ...], blocks: Sequence[tuple[int, int]],
                 sources: Sequence[SourceRef], base: int | None, out_dtype: str, seed: int,
                 root: "TensorBuilder | None" = None, vocab: Any = None, gguf: Any = None):
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
        self.rows = shapes.rows(shape)
        self.numel = math.prod(shape)
        self.row_numel = shapes.row_numel(shape)
        self.vocab = vocab            # planner.vocab.VocabPlan when this tensor's rows are mapped
        self.gguf = gguf              # io.gguf.rows.RowEncoding: GGUF output, how its rows are encoded
        self.out = TaskList()
        self.computed: set[tuple[str, str]] = set()   # (model, name) of loaded tensors with no stored form
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
    def emit(self, attrs: ops.Attrs, inputs: Iterable[str], nbytes: int, block: int = 0) -> str:
        """Emit a task; its scratch is the op's temporaries (`engine.ops`) in float32 blocks of row block `block`."""
        root = self.root              # a child builder emits into its output tensor's list (see the class doc)
        key = f"{root.name}#{root._n}:{attrs.op}"
        root._n += 1
        root.out.keys.append(key)
        scratch = int(ops.OPS[attrs.op].scratch_blocks(attrs) * self.f32(block))
        root.out.tasks.append(Task(attrs, tuple(inputs), int(nbytes), root.name, block, scratch))
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
        """Block j of source i as float32 (or, `raw`, in its stored dtype: integer buffers are copied as is; a
        tensor with no stored form, `SourceRef.stored`, is float32 either way)."""
        src = self.sources[i]
        if src.job is not None:
            memo = ("virtual", i, j, self._phase(phase))
            if memo not in self._memo:
                self._memo[memo] = self._virtual(i, j, phase)
            return self._memo[memo]
        if not src.stored:
            raw = False
            self.root.computed.add((src.model, src.name))
        memo = ("load", i, j, self._phase(phase), raw)
        if memo not in self._memo:
            rows = self.blocks[j] if len(self.shape) >= 2 else None   # 0-d/1-d tensors are one row
            read = self.block_rows(j) * src.row_nbytes
            vocab = None
            if self.vocab is not None:
                vocab = self.vocab.block_attrs(src.model, self.name, rows or (0, self.shape[0]))
                if vocab is not None:
                    read = vocab.read_rows * src.row_nbytes
            self._memo[memo] = self.emit(ops.Load(src.model, src.name, rows, read, raw, vocab),
                                         (), read if raw else self.f32(j), j)
        return self._memo[memo]

    def delta(self, i: int, j: int, phase: int = 0) -> str:
        """Task vector block of source i against the base."""
        assert self.base is not None
        memo = ("delta", i, j, self._phase(phase))
        if memo not in self._memo:
            self._memo[memo] = self.emit(ops.Delta(), (self.load(i, j, phase), self.load(self.base, j, phase)),
                                         self.f32(j), j)
        return self._memo[memo]

    def write(self, y: str, j: int) -> str:
        return self.emit(ops.Write(self.name, self.blocks[j][0], self.out_dtype, self.gguf), (y,),
                         self.block_rows(j) * row_nbytes(self.out_dtype, self.row_numel), j)
