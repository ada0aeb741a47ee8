"""Emit the output stage's task graph: every tensor job block by block, written, in row blocks sized to the budget.
"""
from __future__ import annotations

import math
from typing import Any

from .. import shapes
from ..dtypes import FLOAT_CODES, torch_name
from ..errors import OutputError
from ..io.gguf.layout import GGUFOptions, plan_gguf_layout
from ..io.gguf.names import GGUFPiece, arch_of, plan_pieces
from ..io.gguf.rows import RowEncoding, RowTransform
from ..io.writer import OutTensor, ShardLayout, plan_layout
from .graph import TaskList, TensorBuilder, mark_rereads, share_loads
from .methods import emit_tensor
from .plan import Plan
from .stage_compiler import StagePlan, TensorJob

def _blocks(rows: int, block_rows: int, align: int = 1) -> list[tuple[int, int]]:
    """Row blocks of `block_rows` rows, rounded down to a multiple of `align` (a GGUF head: at least one)."""
    block_rows = max(align, block_rows - block_rows % align)
    return [(a, min(a + block_rows, rows)) for a in range(0, rows, block_rows)]


def _read_once(tb: TensorBuilder, share: int | None, build: Any) -> tuple[TaskList, int]:
    """Each input block read from disk once: kept between phases when that fits, else re-read from the cache."""
    tl, n = _share_or_reread(tb, share, build)
    return mark_rereads(tl), n


def _share_or_reread(tb: TensorBuilder, share: int | None, build: Any) -> tuple[TaskList, int]:
    """The tensor's tasks with each input block read once (`share_loads`) when that still fits the share: the
    stored blocks stay live across phases, so the row blocks are made smaller to leave them room, as long as they
    take at most three quarters of the share. Otherwise the phases read their blocks again, from the page cache
    (`mark_rereads`)."""
    n = len(tb.blocks)
    if n == 1:
        return tb.out, n
    shared, kept = share_loads(tb.out, tb.computed)
    if not kept or share is None or shared.peak_bytes() <= share:
        return shared, n
    if 4 * kept > 3 * share:
        return tb.out, n
    rows = tb.blocks[0][1] - tb.blocks[0][0]
    working = tb.out.peak_bytes()                  # one block's working set, reading again
    for _ in range(3):                             # shrink the blocks until the kept blocks and one block's work fit
        rows = max(1, math.floor(rows * (share - kept) / working))
        smaller = build(rows)
        shared, _ = share_loads(smaller.out, smaller.computed)
        peak = shared.peak_bytes()
        if peak <= share:
            return shared, len(smaller.blocks)
        working = max(1, peak - kept)
    return tb.out, n


def _gguf_pieces(st: StagePlan, opts: GGUFOptions) -> tuple[Any, dict[str, GGUFPiece], set[str]]:
    """What each output tensor becomes in the GGUF (io.gguf.names): before any task, so an architecture or a
    tensor the GGUF writer cannot map stops the merge before any work."""
    arch = arch_of(st.config, st.recipe.source)
    codes = {j.out_dtype for j in st.jobs if j.out_dtype in FLOAT_CODES}
    for j in st.jobs:
        if j.out_dtype not in FLOAT_CODES:
            raise OutputError(f"{j.name}: a {j.out_dtype} tensor cannot be written to GGUF (float tensors only)")
    pieces = plan_pieces(arch, st.config or {}, [(j.name, tuple(j.shape)) for j in st.jobs], opts.type, codes)
    return arch, {p.name: p for p in pieces}, codes


def _gguf_layout(st: StagePlan, arch: Any, pieces: dict[str, GGUFPiece], config: dict | None,
                 opts: GGUFOptions, codes: set[str], warnings: list[str]) -> list[ShardLayout]:
    """The GGUF files: metadata from the output's config and its tokenizer files (the merged tokenizer's, when
    the vocabulary was aligned, over the lead's)."""
    files = {p.name: p.read_bytes() for p in st.aux_files}
    files.update(st.vocab.files if st.vocab else {})
    return plan_gguf_layout(arch, list(pieces.values()), config or {}, files, opts, codes, warnings)


def emit_plan(st: StagePlan, sources: dict[str, Any], budget: int | None, shard_bytes: int, seed: int,
              max_block_rows: int | None, gguf: GGUFOptions | None = None) -> Plan:
    """The output stage's task graph: every job emitted block by block and written, with row blocks sized so
    that one tensor's working set fits its share of the budget. With `gguf`, the output is a GGUF (docs/gguf.md):
    each tensor's write encodes and quantizes its rows as llama.cpp's converter would."""
    share = budget // 2 if budget else None
    tasks = TaskList()
    outputs: list[OutTensor] = []
    blocks_of: dict[str, int] = {}
    arch, pieces, codes = _gguf_pieces(st, gguf) if gguf is not None else (None, {}, set())
    for job in st.jobs:
        shape = job.shape
        rows = shapes.rows(shape)
        piece = pieces.get(job.name)
        out_dtype = piece.code if piece else job.out_dtype
        encoding = RowEncoding(job.out_dtype, piece.transform, shape[0] if shape else 1, len(shape)) \
            if piece and (piece.transform != RowTransform() or piece.code != job.out_dtype) else None

        def build(block_rows: int, job: TensorJob = job, shape: tuple[int, ...] = shape, rows: int = rows,
                  out_dtype: str = out_dtype, encoding: Any = encoding,
                  align: int = piece.head_rows if piece else 1) -> TensorBuilder:
            tb = TensorBuilder(job.name, shape, _blocks(rows, block_rows, align), job.refs, job.base, out_dtype,
                               seed, vocab=job.vocab, gguf=encoding)
            emit_tensor(tb, job.emit(tb))
            return tb

        block_rows = min(rows, max_block_rows) if max_block_rows else rows
        tb = build(block_rows)
        if share is not None and len(tb.blocks) == 1 and rows > 1:
            peak = tb.out.peak_bytes()
            if peak > share:
                tb = build(max(1, math.floor(rows * share / peak)))
        tl, n_blocks = _read_once(tb, share, build)
        tasks.extend(tl)
        blocks_of[job.name] = n_blocks
        outputs.append(OutTensor(job.name, shape, out_dtype))

    config = dict(st.config) if st.config else None
    out_codes = {j.out_dtype for j in st.jobs if j.out_dtype in FLOAT_CODES}
    if config is not None and len(out_codes) == 1:
        config["torch_dtype"] = torch_name(out_codes.pop())
    warnings = list(st.vocab.warnings) if st.vocab else []
    layout = _gguf_layout(st, arch, pieces, config, gguf, codes, warnings) if gguf is not None else \
        plan_layout(outputs, shard_bytes)
    return Plan(recipe=st.recipe, method=st.method, tasks=tasks, sources=sources, outputs=outputs,
                layout=layout, budget=budget, seed=seed, config=config, aux_files=st.aux_files, blocks=blocks_of,
                warnings=warnings, extra_files=dict(st.vocab.files) if st.vocab else {}, gguf=gguf)


