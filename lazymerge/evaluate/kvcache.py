"""KV caches of a decoding batch within a byte budget: what does not fit lives on disk between steps.

Generation keeps, per decoder layer, the keys and values of every token so far. The caches are transformers' own
(`DynamicCache`, one per group of requests), filled by the model's own attention code; this store only decides
where each (group, layer) cache lives between two uses. After layer i has run for a group, if the caches held
in memory exceed the budget, that layer's cache goes to a spill file (`spill.SpillFile`) and its tensors are
replaced by shape-only stand-ins (a zero-stride view: the cache still answers `get_seq_length` and mask sizes
for the code around the layers). Before layer i runs at the next step, it is read back.

The file holds each spilled cache position by position (`[positions, 2, rows, heads, head_dim]`), so a step only
appends its new positions; rows of finished requests stay in the file and are skipped when reading back. Only
plain `DynamicLayer`s spill (sliding-window layers crop themselves and stay in memory, counted).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from .spill import SpillFile


@dataclass
class _Spilled:
    rows: torch.Tensor                     # file row index of each live request
    width: int                             # rows per position in the file
    records: list[tuple[int, int]] = field(default_factory=list)   # (offset, positions)
    length: int = 0                        # positions in the file
    live: bool = False                     # read back for the running step


def _stand_in(shape: torch.Size, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.zeros((), dtype=dtype, device=device).expand(shape)


def _plain(layer: Any) -> bool:
    from transformers.cache_utils import DynamicLayer

    return type(layer) is DynamicLayer


class KVStore:
    """The caches of a decoding batch's groups; `before_layer` / `after_layer` bracket each layer's run."""

    def __init__(self, caches: list[Any], budget: int | None, spill_dir: "str | None" = None):
        self.caches, self.budget, self.spill_dir = caches, budget, spill_dir
        self._spilled: dict[tuple[int, int], _Spilled] = {}
        self._file: SpillFile | None = None
        self.peak_bytes = 0
        self.spilled_bytes = 0

    @staticmethod
    def _layer_bytes(layer: Any) -> int:
        total = 0
        for t in (layer.keys, layer.values):
            if t is not None and t.numel() and t.stride(-1) != 0:
                total += t.numel() * t.element_size()
        return total

    def memory_bytes(self) -> int:
        return sum(self._layer_bytes(layer) for c in self.caches if c is not None for layer in c.layers)

    def before_layer(self, i: int) -> None:
        for g, cache in enumerate(self.caches):
            s = self._spilled.get((g, i))
            if cache is None or s is None or s.live or not s.records:
                continue
            layer = cache.layers[i]
            _, heads, _, dim = layer.keys.shape
            parts = [self._file.read(off, (n, 2, s.width, heads, dim), layer.keys.dtype) for off, n in s.records]
            whole = parts[0] if len(parts) == 1 else torch.cat(parts)
            whole = whole.index_select(2, s.rows).to(layer.keys.device)           # [L, 2, B, h, d]
            layer.keys = whole[:, 0].permute(1, 2, 0, 3).contiguous()
            layer.values = whole[:, 1].permute(1, 2, 0, 3).contiguous()
            s.live = True

    def after_layer(self, i: int) -> None:
        self.peak_bytes = max(self.peak_bytes, self.memory_bytes())      # the restored layer included
        for g, cache in enumerate(self.caches):
            if cache is None:
                continue
            layer = cache.layers[i]
            if not getattr(layer, "is_initialized", False) or not _plain(layer):
                continue
            s = self._spilled.get((g, i))
            if s is None:
                if self.budget is None or self.memory_bytes() <= self.budget:
                    continue
                rows = layer.keys.shape[0]
                s = self._spilled[(g, i)] = _Spilled(torch.arange(rows), rows)
            self._append(s, layer)

    def _append(self, s: _Spilled, layer: Any) -> None:
        keys, values = layer.keys, layer.values
        new = keys.shape[2] - s.length
        if new > 0:
            b, heads, _, dim = keys.shape
            block = torch.zeros((new, 2, s.width, heads, dim), dtype=keys.dtype)
            block[:, 0, s.rows] = keys[:, :, s.length:].permute(2, 0, 1, 3).cpu()
            block[:, 1, s.rows] = values[:, :, s.length:].permute(2, 0, 1, 3).cpu()
            if self._file is None:
                self._file = SpillFile(self.spill_dir)
            s.records.append((self._file.append(block), new))
            self.spilled_bytes += block.numel() * block.element_size()
            s.length += new
        layer.keys = _stand_in(keys.shape, keys.dtype, keys.device)
        layer.values = _stand_in(values.shape, values.dtype, values.device)
        s.live = False

    def select(self, g: int, keep: torch.Tensor) -> None:
        """Keep only rows `keep` (indices) of group g's caches: its other requests have finished."""
        for i, layer in enumerate(self.caches[g].layers):
            if not getattr(layer, "is_initialized", False):
                continue
            s = self._spilled.get((g, i))
            if s is not None and not s.live:
                s.rows = s.rows[keep]
                shape = (len(keep), *layer.keys.shape[1:])
                layer.keys = _stand_in(torch.Size(shape), layer.keys.dtype, layer.keys.device)
                layer.values = _stand_in(torch.Size(shape), layer.values.dtype, layer.values.device)
            else:
                if s is not None:
                    s.rows = s.rows[keep]
                layer.batch_select_indices(keep.to(layer.keys.device))

    def drop_group(self, g: int) -> None:
        """Group g has finished: free its caches (its spilled records stay in the file until close)."""
        for i in range(len(self.caches[g].layers)):
            self._spilled.pop((g, i), None)
        self.caches[g] = None

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
