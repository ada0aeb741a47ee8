"""The engine's side of vocabulary alignment: a block of a vocab-indexed tensor assembled token by token.

The planner (planner/vocab.py) maps every output row of an embedding / lm_head to a source row, or to a fill (a
mean of rows, or zeros) where the source model lacks the token, and puts one block's slice of that map into the
`load` task (`ops.VocabRows`). At run time `load_block` reads only the source rows the block needs, in runs of
consecutive rows, and assembles the block with the pure `map_rows`. The merge method then sees aligned rows, as for
any other tensor.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

import torch

# Runs of needed source rows closer than this are read as one range (fewer reads, a few extra rows).
GAP_ROWS = 16
# Fixed chunk for whole-tensor means (padding rows): the result must not depend on block sizes.
MEAN_CHUNK_ROWS = 256

Fill = tuple[tuple[str, int, int], ...]   # mean over entries of (mean of rows [a, b) of source key); () = zeros


@dataclass(frozen=True)
class VocabRows:
    """One block's slice of a source's row map (the `vocab` attribute of a `load` task).

    `map[i]` is the source row of the block's output row i, or -1; `fill` has one Fill per -1, in order;
    `row_shape` is the shape of one row (for a block with no source row); `read_rows` counts the source rows
    `load_block` reads (the task's read bytes); `names` gives, for each source a fill reads, its own tensor for
    this output tensor, which need not be the loaded source's (a model with tied embeddings has no lm_head: its
    head rows are its embed_tokens rows)."""

    map: tuple[int, ...]
    fill: tuple[Fill, ...]
    row_shape: tuple[int, ...]
    read_rows: int
    names: tuple[tuple[str, str], ...] = ()


def row_runs(row_map: Iterable[int], gap: int = GAP_ROWS) -> list[tuple[int, int]]:
    """Sorted ranges [s, e) of source rows covering the non-negative entries of `row_map`; ranges separated by
    at most `gap` unused rows are merged (one read instead of several)."""
    rows = sorted({r for r in row_map if r >= 0})
    runs: list[list[int]] = []
    for r in rows:
        if runs and r - runs[-1][1] <= gap:
            runs[-1][1] = r + 1
        else:
            runs.append([r, r + 1])
    return [(s, e) for s, e in runs]


def map_rows(src: torch.Tensor | None, row_map: Sequence[int], fallback_rows: torch.Tensor | None,
             offset: int = 0, row_shape: tuple[int, ...] | None = None) -> torch.Tensor:
    """One block of output rows: `out[i] = src[row_map[i] - offset]` where `row_map[i] >= 0`, and the next row of
    `fallback_rows` (one row per -1 entry, in order) where it is -1.

    `src` holds consecutive source rows starting at `offset` (None when no entry is >= 0; `row_shape` then gives
    the shape of a row). Pure: no I/O.
    """
    idx = torch.as_tensor(list(row_map), dtype=torch.long)
    have = idx >= 0
    n_missing = int((~have).sum())
    if src is not None:
        shape, dtype, device = tuple(src.shape[1:]), src.dtype, src.device
    elif fallback_rows is not None:
        shape, dtype, device = tuple(fallback_rows.shape[1:]), fallback_rows.dtype, fallback_rows.device
    else:
        shape, dtype, device = tuple(row_shape or ()), torch.float32, torch.device("cpu")
    if n_missing and (fallback_rows is None or fallback_rows.shape[0] != n_missing):
        got = 0 if fallback_rows is None else fallback_rows.shape[0]
        raise ValueError(f"map_rows: {n_missing} rows are -1 but {got} fallback rows were given")
    if bool(have.any()) and src is None:
        raise ValueError("map_rows: source rows are needed but src is None")
    out = torch.empty((len(idx), *shape), dtype=dtype, device=device)
    if bool(have.any()):
        local = idx[have] - offset
        if int(local.min()) < 0 or int(local.max()) >= src.shape[0]:
            raise ValueError(f"map_rows: source rows {int(idx[have].min())}..{int(idx[have].max())} are not all in "
                             f"src (rows {offset}..{offset + src.shape[0] - 1})")
        out[have.to(device)] = src[local.to(src.device)]
    if n_missing:
        out[(~have).to(device)] = fallback_rows.to(device=device, dtype=dtype)
    return out


Reader = Callable[[str, tuple[int, int]], torch.Tensor]


def read_token_rows(ckpt: Any, name: str, rows: tuple[int, int], device: Any = "cpu") -> torch.Tensor:
    """Token rows [a, b) of vocab-indexed tensor `name` of a checkpoint, as float32: a matrix's rows, or a 1-d
    tensor's elements (a bias: each element is one token's row, while io reads a 1-d tensor whole as one row,
    lazymerge.shapes; such a tensor has one value per token, so reading it whole costs no more than its rows)."""
    if len(ckpt.tensors[name].shape) >= 2:
        return ckpt.read(name, rows=rows, dtype=torch.float32, device=device)
    return ckpt.read(name, dtype=torch.float32, device=device)[rows[0]:rows[1]]


def _mean_rows(read: Reader, key: str, a: int, b: int) -> torch.Tensor:
    """Mean of rows [a, b) of source `key`, accumulated row by row in float64 over fixed chunks, so the value is
    the same whichever block asks for it."""
    if b - a == 1:
        return read(key, (a, b))[0].to(torch.float64)
    acc = None
    for s in range(a, b, MEAN_CHUNK_ROWS):
        chunk = read(key, (s, min(s + MEAN_CHUNK_ROWS, b))).to(torch.float64)
        for row in chunk:
            acc = row.clone() if acc is None else acc.add_(row)
    return acc / (b - a)


def fill_rows(read: Reader, fills: Sequence[Fill], row_shape: tuple[int, ...]) -> torch.Tensor:
    """The rows for -1 entries: each the mean over its entries of (mean of rows [a, b) of that source), float32."""
    out = torch.zeros((len(fills), *row_shape), dtype=torch.float32)
    cache: dict[tuple[str, int, int], torch.Tensor] = {}
    for i, f in enumerate(fills):
        if not f:
            continue
        acc = None
        for entry in f:
            if entry not in cache:
                cache[entry] = _mean_rows(read, *entry)
            acc = cache[entry].clone() if acc is None else acc.add_(cache[entry])
        out[i] = (acc / len(f)).to(torch.float32)
    return out


def load_block(read: Reader, key: str, rows: VocabRows) -> torch.Tensor:
    """A block of output rows for source `key` (float32): the rows it has, read in runs, and the filled rest.

    `read(key, (a, b))` returns rows [a, b) of the tensor being loaded from source `key` as float32.
    """
    vocab_map, vocab_fill, row_shape = rows.map, rows.fill, tuple(rows.row_shape)
    runs = row_runs(vocab_map)
    fallback = fill_rows(read, vocab_fill, row_shape) if vocab_fill else None
    if not runs:
        return map_rows(None, vocab_map, fallback, row_shape=row_shape)
    if len(runs) == 1:
        return map_rows(read(key, runs[0]), vocab_map, fallback, offset=runs[0][0], row_shape=row_shape)
    parts, lookup, pos = [], {}, 0
    for s, e in runs:
        parts.append(read(key, (s, e)))
        lookup.update({r: pos + r - s for r in range(s, e)})
        pos += e - s
    local = [lookup[r] if r >= 0 else -1 for r in vocab_map]
    return map_rows(torch.cat(parts), local, fallback, row_shape=row_shape)
