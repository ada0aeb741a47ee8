"""Row layout: how every kernel sees a block (``[rows, row_numel]``), and the row-wise helpers whose reduction
order depends on the row length only, never on which rows are computed together (the blocking contract of
`lazymerge.engine.kernels`)."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from ... import shapes


# ----------------------------------------------------------------------------------------------------------------
# Row layout helpers
# ----------------------------------------------------------------------------------------------------------------


def rows2d(x: Tensor) -> Tensor:
    """View a block as ``[rows, row_numel]``; 0-d and 1-d tensors are one row."""
    if x.dim() <= 1:
        return x.reshape(1, -1)
    return x.reshape(x.shape[0], -1)


def row_layout(shape: Sequence[int]) -> tuple[int, int]:
    """(rows, row_numel) of a full tensor (lazymerge.shapes: a 0-d/1-d tensor is one row, as in `rows2d`)."""
    return shapes.rows(shape), shapes.row_numel(shape)


CHUNK_ELEMS = 1 << 16


def row_chunks(rows: int, row_numel: int) -> list[tuple[int, int]]:
    """Row ranges of about CHUNK_ELEMS elements (at least one row) for float64 work on a float32 block.

    Why: a whole block's float64 temporaries are fresh allocations several times the block's size, each faulted
    in and zeroed by the kernel (a third of a slerp merge's CPU time); 512 KiB ones stay below glibc's mmap
    threshold and are reused. Only for work whose per-row (or per-element) results do not depend on which rows
    are computed together."""
    step = max(1, CHUNK_ELEMS // max(1, row_numel))
    return [(a, min(rows, a + step)) for a in range(0, rows, step)]


def row_sum(m: Tensor) -> Tensor:
    """Sum a 2-d tensor along dim 1 with a reduction order that depends on the row length only.

    With a single output element torch splits the reduced dimension across threads, which changes the order of
    the additions; a padding row keeps it on the per-row path used for every other block size.
    """
    if m.shape[0] == 1:
        return torch.cat([m, torch.zeros_like(m)]).sum(dim=1)[:1]
    return m.sum(dim=1)
