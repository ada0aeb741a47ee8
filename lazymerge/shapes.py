"""Rows: the unit in which lazymerge reads, computes and writes a tensor, with one meaning everywhere.

A tensor of shape (R, ...) has R rows of prod(...) elements each, and row blocks split its first dimension. A 0-d
or 1-d tensor is ONE row (a bias, a norm weight): it is always read, merged and written whole. io (reads and
writes), the planner (row blocks, sizes) and the kernels (per-row statistics) all count rows with these two
functions, so a block [a, b) means the same rows to all of them.
"""
from __future__ import annotations

import math
from typing import Sequence


def rows(shape: Sequence[int]) -> int:
    """Rows of a tensor: dim 0 of a tensor of 2 or more dims; 1 for a 0-d or 1-d tensor."""
    return int(shape[0]) if len(shape) >= 2 else 1


def row_numel(shape: Sequence[int]) -> int:
    """Elements of one row: prod(shape[1:]) for 2 or more dims; every element for a 0-d or 1-d tensor."""
    return math.prod(shape[1:]) if len(shape) >= 2 else math.prod(shape)


def block_shape(shape: Sequence[int], a: int, b: int) -> tuple[int, ...]:
    """The shape of rows [a, b) of a tensor of `shape` (a 0-d/1-d tensor: itself, or empty for no row)."""
    if len(shape) >= 2:
        return (b - a, *shape[1:])
    if b - a == 1:
        return tuple(shape)
    return (0,)
