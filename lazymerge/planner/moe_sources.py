"""Inputs of a MoE plan that are not files: the router weights and the experts' noise.

The engine reads every input through the same interface as a checkpoint (`tensors`, `read(name, rows, dtype)`),
so a MoE needs no op of its own: a router tensor is `load` (from a `RouterSource`) then `write`, and a noisy expert
weight is `load` + `load` (from a `NoiseSource`) -> `weighted_sum` -> `write`. This is the narrow hook through
which values computed outside the graph (the routers, from prompts) enter it.
"""
from __future__ import annotations

import math
import threading
from pathlib import Path
from typing import Callable

import torch

from .. import shapes
from ..engine.kernels import derive_seed, uniform_rows
from ..errors import LazyMergeError
from ..io.shards import DTYPES, TensorInfo
from .moe_routers import RouterPass


def _info(name: str, shape: tuple[int, ...], code: str, path: Path) -> TensorInfo:
    return TensorInfo(name, code, tuple(shape), path, 0, math.prod(shape) * DTYPES[code][1])


class _ComputedSource:
    """What the engine asks of any input besides its tensors: such a source has no tokenizer or config files to
    copy, no data file for the run's fingerprint, no warnings, and nothing to close."""

    warnings: tuple[str, ...] = ()

    def aux_files(self) -> list[Path]:
        return []

    def data_files(self) -> set[Path]:
        """None: its values are computed, not read from a file."""
        return set()

    def meta_files(self) -> set[Path]:
        """None: what it computes from (the base model, the recipe's prompts) is fingerprinted with those."""
        return set()

    def has_stored_form(self, name: str) -> bool:
        """Yes: the values are held (routers, in their dtype) or made (noise, float32) in the dtype they are
        described with, so a read in that dtype is exact."""
        return True

    def close(self) -> None:
        pass


class RouterSource(_ComputedSource):
    """Router weights, described by the plan (`spec`, a `RouterPass`) and filled by the router pass
    (`lazymerge.moe.routers`): it binds the pass with `bind(fn)` and computes it once, before the graph runs
    (`compute()`) or on first read, then holds the values in memory.

    The planner builds this source without the means to fill it, so that it never imports code that runs a
    model; reading it unbound is a bug of the caller, hence an error. The values are small: layers x experts x
    hidden floats (a 4-expert 1B-model MoE: 0.7 MiB)."""

    def __init__(self, spec: RouterPass, code: str, path: Path):
        self.path = path
        self.config = None
        self.spec = spec
        self.tensors = {t.name: _info(t.name, t.shape, code, path) for t in spec.tensors}
        self._compute: Callable[[], dict[str, torch.Tensor]] | None = None
        self._values: dict[str, torch.Tensor] | None = None
        self._lock = threading.Lock()

    def bind(self, compute: Callable[[], dict[str, torch.Tensor]]) -> None:
        """Set the function that computes the values (name -> tensor); it runs at most once."""
        with self._lock:
            if self._compute is None:
                self._compute = compute

    def compute(self) -> None:
        with self._lock:
            if self._values is None:
                if self._compute is None:
                    raise LazyMergeError(f"{self.path}: the routers were not computed; a MoE plan is run through "
                                     "lazymerge.merge (or lazymerge.moe.routers.prepare_routers(plan) first)")
                values = self._compute()
                dtype = DTYPES[next(iter(self.tensors.values())).dtype][0] if self.tensors else torch.float32
                self._values = {n: values[n].to(dtype).contiguous() for n in self.tensors}

    def read(self, name: str, rows: tuple[int, int] | None = None, dtype: torch.dtype | None = torch.float32,
             device: str | torch.device = "cpu", evict: bool = True) -> torch.Tensor:
        self.compute()
        assert self._values is not None
        x = self._values[name]
        if rows is not None:
            x = x[rows[0]:rows[1]]
        return x.to(device=device, dtype=dtype or x.dtype, copy=True)


class NoiseSource(_ComputedSource):
    """Gaussian noise N(0, 1) for an expert's weights (mergekit-moe's `noise_scale`), drawn per (seed, expert,
    tensor, row group) like DARE's masks, so a block's noise never depends on blocking or schedule."""

    def __init__(self, seed: int, expert: int, path: Path):
        self.path = path
        self.config = None
        self.seed = seed
        self.expert = expert
        self.tensors: dict[str, TensorInfo] = {}

    def add(self, name: str, shape: tuple[int, ...]) -> None:
        self.tensors[name] = _info(name, shape, "F32", self.path)

    def read(self, name: str, rows: tuple[int, int] | None = None, dtype: torch.dtype | None = torch.float32,
             device: str | torch.device = "cpu", evict: bool = True) -> torch.Tensor:
        shape = self.tensors[name].shape
        rows = rows or (0, shapes.rows(shape))
        # Box-Muller on two block-invariant uniform streams
        u1 = uniform_rows(derive_seed(self.seed, "moe-noise", self.expert, name, 1), shape, rows)
        u2 = uniform_rows(derive_seed(self.seed, "moe-noise", self.expert, name, 2), shape, rows)
        z = torch.sqrt(-2.0 * torch.log1p(-u1)) * torch.cos((2.0 * math.pi) * u2)
        return z.to(device=device, dtype=dtype or torch.float32)
