"""Randomness that does not depend on the blocking: seeds derived from names, uniform draws per fixed row group
(DARE, DELLA, a MoE's random routers and expert noise)."""
from __future__ import annotations

import hashlib

import torch
from torch import Tensor

from .rows import row_layout


# ----------------------------------------------------------------------------------------------------------------
# Randomness (block-invariant)
# ----------------------------------------------------------------------------------------------------------------

GROUP_NUMEL = 2**20
_SEED_MASK = (1 << 63) - 1


def derive_seed(run_seed: int, *parts: str | int) -> int:
    """A 63-bit seed from the run seed and names (tensor, model index, row group, ...).

    Hashing instead of drawing from one stream is what makes a tensor's random numbers independent of which
    tensors were processed before it, of the schedule and of the device.
    """
    h = hashlib.blake2b(digest_size=8, person=b"lazymerge-seed")
    for part in (run_seed, *parts):
        if isinstance(part, bool) or not isinstance(part, (int, str)):
            raise TypeError(f"derive_seed: parts must be int or str, got {type(part).__name__}")
        tag, data = (b"i", str(part).encode()) if isinstance(part, int) else (b"s", part.encode("utf-8"))
        h.update(tag + len(data).to_bytes(8, "little") + data)
    return int.from_bytes(h.digest(), "little") & _SEED_MASK


def uniform_rows(seed: int, shape: tuple[int, ...], rows: tuple[int, int]) -> Tensor:
    """Float32 uniforms in [0, 1) for rows ``[a, b)`` of a tensor of ``shape``, shaped like that block.

    The tensor's rows are cut into fixed groups of ``max(1, 2**20 // row_numel)`` rows; group g is drawn whole
    from its own generator seeded with ``derive_seed(seed, "row-group", g)``.  A block draws the groups it
    overlaps and slices, so an element's number never depends on the blocking.  0-d/1-d tensors are one row:
    ``rows`` must be ``(0, 1)``.
    """
    total_rows, row_numel = row_layout(shape)
    a, b = rows
    if not 0 <= a <= b <= total_rows:
        raise ValueError(f"uniform_rows: rows {rows} out of range for shape {tuple(shape)}")
    block_shape = tuple(shape) if len(shape) <= 1 else (b - a, *shape[1:])
    if a == b or row_numel == 0:
        return torch.empty(block_shape, dtype=torch.float32)
    group_rows = max(1, GROUP_NUMEL // row_numel)
    chunks = []
    for g in range(a // group_rows, (b - 1) // group_rows + 1):
        g0, g1 = g * group_rows, min((g + 1) * group_rows, total_rows)
        gen = torch.Generator().manual_seed(derive_seed(seed, "row-group", g))
        draw = torch.rand((g1 - g0) * row_numel, generator=gen, dtype=torch.float32)
        lo, hi = max(a, g0) - g0, min(b, g1) - g0
        chunks.append(draw[lo * row_numel : hi * row_numel])
    return torch.cat(chunks).reshape(block_shape)
