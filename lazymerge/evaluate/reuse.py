"""Weights read more than once: decoding steps, several passes, several lm-eval calls on one model.

`ReusedWeights` wraps a weight source (the `WeightSource` protocol of `weights.py`) and keeps what it hands out:

- in memory, converted to the compute dtype, while the kept bytes fit `keep` (a share of the budget): a model
  that fits its budget is read (or merged) once, and later passes cost no I/O and no conversion;
- otherwise, for a recipe when `spill` is on, in a temporary file (`spill.SpillFile`) in the dtype the merge
  wrote: the next pass reads the merged tensor back instead of merging it again. The file is deleted on close;
  nothing is written where the user would see a merge;
- otherwise (a checkpoint) it is read from the checkpoint again, which is what the checkpoint already is.

The numbers are the same either way: a kept tensor is the same values converted once instead of each time.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable

import torch

from .spill import SpillFile

ROW_RUNS = 64                      # at most this many separate row reads for `rows`; beyond, one pass


class ReusedWeights:
    """A `WeightSource` that keeps tensors within `keep` bytes and spills a recipe's others (when `spill`)."""

    def __init__(self, source: Any, *, keep: int, dtype: torch.dtype = torch.float32, spill: bool = False,
                 spill_dir: "str | None" = None):
        self.source, self.keep, self.dtype, self.spill = source, max(0, keep), dtype, spill
        self.spill_dir = spill_dir
        self.kept: dict[str, torch.Tensor] = {}
        self.kept_bytes = 0
        self._spilled: dict[str, tuple[int, torch.dtype]] = {}       # name -> (offset, stored dtype)
        self._file: SpillFile | None = None

    # the protocol's attributes are the wrapped source's
    @property
    def label(self) -> str:
        return self.source.label

    @property
    def config_dir(self) -> Path:
        return self.source.config_dir

    @property
    def names(self) -> set[str]:
        return self.source.names

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return self.source.shapes

    @property
    def over_budget(self) -> int:
        return self.source.over_budget

    @property
    def weight_share(self) -> float:
        return self.source.weight_share

    @property
    def spilled_bytes(self) -> int:
        return 0 if self._file is None else self._file.bytes_written

    def _nbytes(self, name: str) -> int:
        return math.prod(self.shapes[name]) * torch.tensor([], dtype=self.dtype).element_size()

    def _room(self, name: str) -> bool:
        return self.kept_bytes + self._nbytes(name) <= self.keep

    def _remember(self, name: str, value: torch.Tensor) -> torch.Tensor:
        """Keep `value` if it fits, else spill it (in the dtype it came in) when spilling; returns what to hand
        out."""
        if name in self.kept or name in self._spilled:
            return value
        if self._room(name):
            value = value.to(self.dtype)
            self.kept[name] = value
            self.kept_bytes += value.numel() * value.element_size()
        elif self.spill and self.is_recipe:
            if self._file is None:
                self._file = SpillFile(self.spill_dir)
            self._spilled[name] = (self._file.append(value), value.dtype)
        return value

    @property
    def is_recipe(self) -> bool:
        return hasattr(self.source, "plan")

    def _read_spilled(self, name: str, rows: "tuple[int, int] | None" = None) -> torch.Tensor:
        offset, dtype = self._spilled[name]
        shape = self.shapes[name]
        if rows is None:
            return self._file.read(offset, shape, dtype)
        row_bytes = math.prod(shape[1:]) * torch.tensor([], dtype=dtype).element_size()
        return self._file.read(offset + rows[0] * row_bytes, (rows[1] - rows[0], *shape[1:]), dtype)

    def load(self, names: list[str], dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """Whole tensors in `dtype` (the source converts them as read; a kept one was converted once)."""
        out: dict[str, torch.Tensor] = {}
        missing = []
        for n in names:
            if n in self.kept:
                out[n] = self.kept[n]
            elif n in self._spilled:
                out[n] = self._read_spilled(n)
            else:
                missing.append(n)
        if missing:
            for n, v in self.source.load(missing, dtype).items():
                out[n] = self._remember(n, v)
        return {n: v.to(dtype) for n, v in out.items()}

    def for_row_blocks(self, name: str, block_rows: int, fn: Callable[[int, torch.Tensor], None]) -> None:
        rows = self.shapes[name][0]
        step = max(1, block_rows)
        if name in self.kept or name in self._spilled:
            for a in range(0, rows, step):
                b = min(a + step, rows)
                fn(a, self.kept[name][a:b] if name in self.kept else self._read_spilled(name, (a, b)))
            return
        keep = self._room(name)
        spill = not keep and self.spill and self.is_recipe
        if not (keep or spill):
            self.source.for_row_blocks(name, block_rows, fn)
            return
        if spill and self._file is None:
            self._file = SpillFile(self.spill_dir)
        whole = torch.empty(self.shapes[name], dtype=self.dtype) if keep else None
        first: list[Any] = []

        def tee(a: int, block: torch.Tensor) -> None:
            if keep:
                whole[a:a + block.shape[0]] = block
            else:
                offset = self._file.append(block)
                if not first:
                    first.append((offset, block.dtype))
            fn(a, block)

        self.source.for_row_blocks(name, block_rows, tee)
        if keep:
            self.kept[name] = whole
            self.kept_bytes += whole.numel() * whole.element_size()
        else:
            self._spilled[name] = first[0]

    def rows(self, name: str, ids: torch.Tensor, block_rows: int) -> torch.Tensor:
        """The rows `ids` (sorted, unique) of tensor `name`: a decoding step needs a few embedding rows, not the
        whole embedding. Few scattered rows are read one run at a time (from memory, the spill file or the
        checkpoint); many, or a recipe not kept, come from one pass over the tensor's row blocks."""
        if name in self.kept:
            return self.kept[name][ids]
        idx = ids.tolist()
        runs: list[tuple[int, int]] = []
        for i in idx:
            if runs and runs[-1][1] == i:
                runs[-1] = (runs[-1][0], i + 1)
            else:
                runs.append((i, i + 1))
        ckpt = getattr(self.source, "ckpt", None)
        if len(runs) <= ROW_RUNS and (name in self._spilled or (ckpt is not None and not self._room(name))):
            read = ((lambda r: self._read_spilled(name, r)) if name in self._spilled
                    else (lambda r: ckpt.read(name, rows=r, dtype=None)))
            return torch.cat([read(r) for r in runs])
        out = torch.empty((len(idx), *self.shapes[name][1:]), dtype=self.dtype)

        def take(start: int, block: torch.Tensor) -> None:
            sel = (ids >= start) & (ids < start + block.shape[0])
            if sel.any():
                out[sel] = block[ids[sel] - start].to(self.dtype)

        self.for_row_blocks(name, block_rows, take)
        return out

    def close(self) -> None:
        self.kept.clear()
        if self._file is not None:
            self._file.close()
            self._file = None
        self.source.close()
