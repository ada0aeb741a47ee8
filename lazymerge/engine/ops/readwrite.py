"""Ops that read input rows (`load`, `cast`) and write output rows (`write`): the only ops that touch files,
through the run context."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from ... import memory
from ...dtypes import BLOCK_CODES, torch_dtype
from ...io.checkpoint import Checkpoint
from ...io.gguf.rows import RowEncoding, encode
from .. import kernels as K
from .. import lazy
from ..context import RunContext
from ..quantize import quantize
from ..vocab_rows import VocabRows, load_block, read_token_rows
from .registry import Attrs, eager, op

Tensor = torch.Tensor


@dataclass(frozen=True)
class Load(Attrs):
    """Rows of an input tensor as float32 (or as stored when `raw`), vocab rows mapped when `vocab` is set."""

    model: str
    name: str
    rows: tuple[int, int] | None         # None: the whole tensor (a 0-d/1-d tensor is one row)
    read_bytes: int
    raw: bool = False
    vocab: VocabRows | None = None
    evict: bool = True                   # False: a later phase reads these rows again; leave them in the page cache


def _finite(x: Tensor) -> bool:
    if K.fused.finite_checkable(x):
        return K.fused.all_finite(x)
    # a sum is NaN/Inf whenever any entry is (and a reduction is cheaper than an element-wise isfinite)
    return math.isfinite(float(x.sum())) or bool(torch.isfinite(x).all())


@op("load", Load, scratch=0.0)
def _load(ctx: RunContext, ins: list[Any], a: Load, own: tuple[bool, ...]) -> Tensor:
    ckpt = ctx.sources[a.model]
    if a.vocab is not None:      # a vocab-indexed tensor whose rows are mapped token by token (engine/vocab_rows.py)
        names = dict(a.vocab.names)      # a fill's source reads its own tensor (tied: its embedding)

        def read(key: str, rows: tuple[int, int]) -> Tensor:
            name = a.name if key == a.model else names[key]
            return read_token_rows(ctx.sources[key], name, rows, ctx.device)

        x = load_block(read, a.model, a.vocab)
    elif _stays_stored(ctx, ckpt, a):
        # read as stored and checked; widened, if at all, inside the kernel that consumes it (engine/lazy.py)
        raw = ckpt.read_stored(a.name, rows=a.rows, evict=a.evict)
        ctx.count(read=a.read_bytes)
        if not K.fused.all_finite(raw):
            ctx.non_finite(a.model, a.name)
        return lazy.Stored(raw)
    else:
        x = ckpt.read(a.name, rows=a.rows, dtype=None if a.raw else torch.float32, device=ctx.device,
                      evict=a.evict)
    ctx.count(read=a.read_bytes)
    if x.is_floating_point() and not _finite(x):
        ctx.non_finite(a.model, a.name)
    return x


def _stays_stored(ctx: RunContext, ckpt: Any, a: Load) -> bool:
    """Whether to read the block as stored and hand it on as `lazy.Stored`: bfloat16 on a checkpoint (whose stored
    bits are the file's: an adapted or computed source rounds when asked for its stored dtype), on the CPU."""
    if a.raw or ctx.device.type != "cpu" or type(ckpt) is not Checkpoint or a.read_bytes < 2 * K.fused.MIN_NUMEL:
        return False
    info = ckpt.tensors.get(a.name)
    return info is not None and info.dtype == "BF16" and K.fused.finite_checkable_dtype(torch.bfloat16)


@dataclass(frozen=True)
class Cast(Attrs):
    """A block read as stored (a raw `load`) as a new float32 block: each phase's copy of an input block read once."""


@op("cast", Cast, scratch=0.0, lazy=True)
def _cast(ctx: RunContext, ins: list[Any], a: Cast, own: tuple[bool, ...]) -> Any:
    if lazy.stored_ok(ins[0]):
        return lazy.Stored(ins[0])         # no copy: the phase's consumers read the stored block
    ins, own = eager(ins, own)
    if ins[0].device.type != "cpu":
        return ins[0].to(torch.float32, copy=True)
    return memory.empty(tuple(ins[0].shape), torch.float32).copy_(ins[0])


@dataclass(frozen=True)
class Write(Attrs):
    """Cast a block to the output dtype (or quantize it: GGUF) and write it at its rows of the output tensor."""

    name: str
    row_start: int
    dtype: str                           # safetensors code, or a GGUF block type (dtypes.BLOCK_CODES)
    gguf: RowEncoding | None = None      # GGUF output: what llama.cpp's converter does to these rows first


def _write_scratch(a: Write) -> float:
    """0; GGUF: 1.5 (rounded through bf16/f16, then widened), 1 (a transformed copy)"""
    if a.gguf is None:
        return 0.0
    if a.gguf.via in ("BF16", "F16"):
        return 1.5
    return 1.0 if a.gguf.transform.permute or a.gguf.transform.offset else 0.0


@op("write", Write, scratch=_write_scratch, lazy=True)
def _write(ctx: RunContext, ins: list[Any], a: Write, own: tuple[bool, ...]) -> None:
    x = ins[0]
    gguf = a.gguf is not None or a.dtype in BLOCK_CODES
    # a fused chain's block is computed straight in the output dtype; GGUF rows are encoded from float32
    y = None if gguf else lazy.write_value(x, torch_dtype(a.dtype))
    if y is None:
        x = lazy.materialize(x)
        if a.gguf is not None:
            x = encode(x.cpu(), a.gguf)
        if a.dtype in BLOCK_CODES:
            y = quantize(x.reshape(x.shape[0] if x.dim() >= 2 else 1, -1), a.dtype)
        elif x.device.type == "cpu":
            y = memory.empty(tuple(x.shape), torch_dtype(a.dtype)).copy_(x)
        else:
            y = x.to(device="cpu", dtype=torch_dtype(a.dtype)).contiguous()
    ctx.writer.write_rows(a.name, a.row_start, y)
    ctx.count(written=y.numel() * y.element_size())
    return None
