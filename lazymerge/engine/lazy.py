"""Values that the ops pass along without computing them yet, so that a method's chain runs as one fused pass.

Why: a merge's per-element chain (widen the inputs, delta, trim or drop, rescale, elect, combine, round for the
writer) is a handful of flops per element, but the torch path makes a float32 block at every step. Here the ops
of such a chain describe their step instead of doing it, and the op at the end of the chain runs it in one pass
over the stored bytes (`engine.fused_stream`):

* `Stored`: a bfloat16 input block as read (a `load`, or a `cast` of a block read once for several phases).
* `TaskVector`: x - base over two `Stored` blocks, with its sparsification (top-k trim, breadcrumbs, DARE or
  DELLA drop) and rescales recorded (`delta`, `trim_*`, `drop_*`, `rescale`).
* `Pending`: a finished block not computed yet (`combine`, `weighted_sum`, `lincomb`): the `write` that consumes
  it computes it straight into the output dtype.

Every value is immutable: nothing writes into a block that a lazy value refers to (an op that writes in place is
given a fresh float32 copy, see `materialize`). Any op that does not understand these values gets them
materialized as float32 blocks first (`engine.ops.run_task`), so a lazy value is always correct, merely not
always faster. The planner's graph and its memory estimates are unchanged: a lazy value holds at most the stored
blocks its task's inputs were counted for, in bfloat16 where they were counted in float32.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from .. import memory
from . import fused
from . import fused_stream as S
from . import kernels as K
from .fused_rng import block_stream

_E16 = np.zeros(0, np.uint16)
_E32 = np.zeros(0, np.float32)


def _bits(raw: Tensor) -> np.ndarray:
    return raw.reshape(-1).view(torch.int16).numpy().view(np.uint16)


class Stored:
    """A bfloat16 CPU block as stored on disk (maybe an unaligned view of a read buffer)."""

    __slots__ = ("raw",)

    def __init__(self, raw: Tensor) -> None:
        self.raw = raw

    @property
    def shape(self) -> torch.Size:
        return self.raw.shape

    def bits(self) -> np.ndarray:
        return _bits(self.raw)

    def f32(self) -> Tensor:
        return fused.widen_checked(self.raw)[0]


def stored_ok(x: Any) -> bool:
    """Whether a block read as stored may travel as `Stored`: bfloat16 on the CPU, big enough for the kernels."""
    return (isinstance(x, Tensor) and x.dtype == torch.bfloat16 and x.device.type == "cpu" and x.is_contiguous()
            and x.numel() >= fused.MIN_NUMEL and fused.available())


@dataclass(frozen=True)
class Della:
    density: float
    epsilon: float
    rescale: bool
    stream: tuple


@dataclass(frozen=True)
class TaskVector:
    """x - base, then sparsified (`mode`: fused_stream's NONE / MAGNITUDE / OUTLIERS / RANDOM, or `della`), then
    multiplied by each of `scales` in order: the value of the chain `delta -> trim/drop -> rescale*`."""

    x: Stored
    base: Stored
    mode: int = S.NONE
    thr: tuple[int, int] = (0, 0)          # top-k thresholds (bit patterns of |d|): keep / upto, top
    cuts: tuple[int, int] = (0, 0)         # each threshold's tie cut in this block (flat index)
    flags: tuple[int, int] = (0, 0)        # OUTLIERS: has_upto, has_top; RANDOM: rescale by 1/density
    density: float = 1.0
    stream: tuple | None = None            # RANDOM: (group seeds, draws per group, skip into the first)
    della: Della | None = None
    scales: tuple[float, ...] = ()

    @property
    def shape(self) -> torch.Size:
        return self.x.shape

    @property
    def plain(self) -> bool:
        return self.mode == S.NONE and self.della is None and not self.scales


class Pending:
    """A block that its consumer computes: `fill(out16, out32, to16)` writes it as bfloat16 bits or float32 and
    returns how many entries are NaN."""

    __slots__ = ("shape", "fill")

    def __init__(self, shape: Sequence[int], fill: Callable[[np.ndarray, np.ndarray, bool], int]) -> None:
        self.shape = tuple(shape)
        self.fill = fill

    def compute(self, dtype: torch.dtype = torch.float32) -> Tensor:
        if dtype == torch.bfloat16:
            out = memory.empty(self.shape, torch.bfloat16)
            if self.fill(_bits(out), _E32, True) == 0:
                return out
            # a NaN: torch's own conversion decides its bits (they differ between its scalar and vector paths)
            return memory.empty(self.shape, torch.bfloat16).copy_(self.compute(torch.float32))
        out = memory.empty(self.shape, torch.float32)
        self.fill(_E16, out.reshape(-1).numpy(), False)
        return out if dtype == torch.float32 else memory.empty(self.shape, dtype).copy_(out)


LAZY = (Stored, TaskVector, Pending)


def is_lazy(x: Any) -> bool:
    return isinstance(x, LAZY)


def materialize(x: Any) -> Any:
    """A lazy value as a fresh float32 block (anything else as it is)."""
    if isinstance(x, Stored):
        return x.f32()
    if isinstance(x, TaskVector):
        return _task_vector(x)
    if isinstance(x, Pending):
        return x.compute(torch.float32)
    return x


# -- the per-model parameters of the kernels ------------------------------------------------------------------


def _precomputed(tv: TaskVector) -> Tensor:
    """DELLA's drop needs ranks along each row: computed per row into a float32 block before the chain's pass."""
    d = tv.della
    assert d is not None
    shape = tuple(tv.shape)
    rows, row_numel = K.rows2d(torch.empty(shape, device="meta")).shape
    out = memory.empty(shape, torch.float32)
    flat = out.reshape(-1).numpy()
    if d.density >= 1:
        S.task_vector(tv.x.bits(), tv.base.bits(), _E32, np.array([S.NONE]), np.zeros((1, 2), np.int64),
                      np.zeros((1, 2), np.int64), np.zeros((1, 2), np.int64), np.ones(1, np.float32),
                      np.zeros((1, 1), np.float32), np.zeros(1, np.int64), np.zeros((1, 1), np.uint32),
                      np.zeros((1, 2), np.int64), flat)
        return out
    if not (0 < d.density - d.epsilon and d.density + d.epsilon < 1):
        raise ValueError(f"della: density +/- epsilon must lie in (0, 1), got density={d.density} "
                         f"epsilon={d.epsilon}")
    seeds, group_numel, skip = d.stream
    S.della(tv.x.bits(), tv.base.bits(), row_numel, seeds.reshape(1, -1), np.array([[group_numel, skip]]),
            np.float32(d.density - d.epsilon), np.float32(d.epsilon), d.rescale, flat)
    return out


def _params(tvs: Sequence[TaskVector]) -> tuple:
    n = len(tvs)
    modes = np.array([S.PRECOMPUTED if tv.della is not None else tv.mode for tv in tvs], np.int64)
    thr = np.array([tv.thr for tv in tvs], np.int64).reshape(n, 2)
    cuts = np.array([tv.cuts for tv in tvs], np.int64).reshape(n, 2)
    flags = np.array([tv.flags for tv in tvs], np.int64).reshape(n, 2)
    dens = np.array([tv.density for tv in tvs], np.float32)
    width = max([1] + [len(tv.scales) for tv in tvs])
    scales = np.zeros((n, width), np.float32)
    for k, tv in enumerate(tvs):
        scales[k, :len(tv.scales)] = tv.scales
    nscales = np.array([len(tv.scales) for tv in tvs], np.int64)
    groups = max([1] + [len(tv.stream[0]) for tv in tvs if tv.stream is not None])
    seeds = np.zeros((n, groups), np.uint32)
    ginfo = np.zeros((n, 2), np.int64)
    for k, tv in enumerate(tvs):
        if tv.stream is not None and tv.mode == S.RANDOM:
            seeds[k, :len(tv.stream[0])] = tv.stream[0]
            ginfo[k] = tv.stream[1:]
    # DELLA's blocks as tensors (`keep`: they must stay referenced while the kernel reads their numpy views,
    # or the buffer pool would lend them again) and as the kernel's arrays
    keep = [_precomputed(tv) if tv.della is not None else None for tv in tvs]
    pres = tuple(t.reshape(-1).numpy() if t is not None else _E32 for t in keep)
    return keep, (pres, modes, thr, cuts, flags, dens, scales, nscales, seeds, ginfo)


def _task_vector(tv: TaskVector) -> Tensor:
    keep, (pres, *p) = _params([tv])
    if keep[0] is not None and not tv.scales:
        return keep[0]
    out = memory.empty(tuple(tv.shape), torch.float32)
    S.task_vector(tv.x.bits(), tv.base.bits(), pres[0], *p, out.reshape(-1).numpy())
    return out


# -- the ops' fused forms (engine/ops/ calls these when its inputs are lazy) -----------------------------------


def delta(x: Any, b: Any) -> TaskVector | None:
    if isinstance(x, Stored) and isinstance(b, Stored) and x.shape == b.shape:
        return TaskVector(x, b)
    return None


def rescale(tv: Any, factor: float) -> TaskVector | None:
    if isinstance(tv, TaskVector):
        return replace(tv, scales=tv.scales + (float(np.float32(factor)),))
    return None


def _sparse_ready(tv: Any) -> bool:
    return isinstance(tv, TaskVector) and tv.plain


def _threshold(state: dict, block: int, tv: TaskVector) -> tuple[int, int]:
    """(threshold bits, tie cut) of a top-k state for this block: `kernels.topk_mask` as two integers."""
    if state["all"]:
        return -1, 0
    if state.get("none"):
        return int(S.NEVER), 0
    t, quota = state["threshold"], state["quota"][block]
    equal = state.get("equal")
    if equal is not None and quota == equal[block]:
        return t, tv.x.raw.numel()
    return t, int(S.delta_cut(tv.x.bits(), tv.base.bits(), np.int64(t), quota))


def trim_magnitude(tv: Any, state: dict, block: int) -> TaskVector | None:
    if not _sparse_ready(tv):
        return None
    if state["all"]:
        return tv                                   # d * 1: the same bits
    t, cut = _threshold(state, block, tv)
    return replace(tv, mode=S.MAGNITUDE, thr=(t, 0), cuts=(cut, 0))


def trim_outliers(tv: Any, upto: dict | None, top: dict | None, block: int) -> TaskVector | None:
    if not _sparse_ready(tv):
        return None
    t0, c0 = _threshold(upto, block, tv) if upto is not None else (0, 0)
    t1, c1 = _threshold(top, block, tv) if top is not None else (0, 0)
    return replace(tv, mode=S.OUTLIERS, thr=(t0, t1), cuts=(c0, c1), flags=(int(upto is not None),
                                                                           int(top is not None)))


def drop_random(tv: Any, density: float, rescale_: bool, seed_parts: tuple, shape: tuple, rows: tuple
                ) -> TaskVector | None:
    if not _sparse_ready(tv):
        return None
    return replace(tv, mode=S.RANDOM, density=float(np.float32(density)), flags=(int(rescale_), 0),
                   stream=block_stream(seed_parts, shape, rows))


def drop_della(tv: Any, density: float, epsilon: float, rescale_: bool, seed_parts: tuple, shape: tuple,
               rows: tuple) -> TaskVector | None:
    if not _sparse_ready(tv):
        return None
    return replace(tv, della=Della(density, epsilon, rescale_, block_stream(seed_parts, shape, rows)))


def topk_hist(tv: Any, high_bin: int = -1) -> Tensor | None:
    if not _sparse_ready(tv):
        return None
    return torch.from_numpy(S.delta_hist(tv.x.bits(), tv.base.bits(), high_bin))


def _same_base(tvs: Sequence[Any], base: Any) -> bool:
    return isinstance(base, Stored) and all(
        isinstance(tv, TaskVector) and (tv.base is base or tv.base.raw.data_ptr() == base.raw.data_ptr())
        and tv.shape == base.shape for tv in tvs)


def combine(base: Any, es: Sequence[Any], weights: Sequence[float], consensus: str | None, normalize: bool,
            lam: float) -> "Pending | Tensor | None":
    """`ops.combine` over task vectors of `base` in one pass: TIES election (consensus "sum"/"count") or a plain
    sum (consensus None). A `Pending` block, or float32 at once when DELLA's precomputed blocks are involved."""
    if not _same_base(es, base) or consensus not in (None, "sum", "count"):
        return None
    n = len(es)
    elect = {None: 0, "sum": 1, "count": 2}[consensus]
    w = np.array(weights, np.float32)
    total = np.float32(0.0)
    use_total = False
    if elect == 0 and normalize:
        total = K.weighted_sum([torch.ones(())] * n, weights)       # the float32 sum of the weights, as ops.combine
        use_total = abs(float(total)) >= 1e-8
        total = np.float32(float(total))
    keep, params = _params(es)
    xs = tuple(tv.x.bits() if tv.della is None else _E16 for tv in es)
    base_bits = base.bits()

    def fill(out16: np.ndarray, out32: np.ndarray, to16: bool) -> int:
        assert keep is not None                              # DELLA's blocks live as long as this closure
        return S.family(base_bits, xs, *params, w, elect, normalize, np.float32(lam), lam != 1.0, total,
                        use_total, out16, out32, to16)

    p = Pending(base.shape, fill)
    return p.compute(torch.float32) if any(tv.della is not None for tv in es) else p


def weighted_sum(xs: Sequence[Any], weights: Sequence[float], normalize: bool) -> Pending | None:
    if not all(isinstance(x, Stored) and x.shape == xs[0].shape for x in xs):
        return None
    bits = tuple(x.bits() for x in xs)
    w = np.array(weights, np.float32)
    total = np.float32(sum(weights))                     # ops.weighted_sum divides by the Python sum

    def fill(out16: np.ndarray, out32: np.ndarray, to16: bool) -> int:
        return S.weighted_sum(bits, w, normalize, total, out16, out32, to16)

    return Pending(xs[0].shape, fill)


def lincomb(xs: Sequence[Any], coeffs: Tensor) -> Pending | None:
    """`kernels.lincomb` (coefficients [n], or [rows, n] for this block's rows)."""
    if not all(isinstance(x, Stored) and x.shape == xs[0].shape for x in xs) or coeffs.dim() not in (1, 2) \
            or coeffs.shape[-1] != len(xs):
        return None
    c = coeffs.to(torch.float64).reshape(-1, len(xs)).contiguous().numpy()
    shape = tuple(xs[0].shape)
    rows, row_numel = (1, math.prod(shape)) if len(shape) <= 1 else (shape[0], math.prod(shape[1:]))
    if c.shape[0] not in (1, rows):
        return None
    bits = tuple(x.bits() for x in xs)

    def fill(out16: np.ndarray, out32: np.ndarray, to16: bool) -> int:
        return S.lincomb(bits, c, max(1, row_numel), 0, out16, out32, to16)

    return Pending(shape, fill)


def row_gram(xs: Sequence[Any]) -> Tensor | None:
    """`kernels.row_gram` over inputs and plain task vectors: the float64 products made in one pass from the
    stored bytes, each row summed by torch exactly as the reference sums it."""
    if not all(isinstance(x, Stored) or _sparse_ready(x) for x in xs) or len({tuple(x.shape) for x in xs}) != 1:
        return None
    shape = tuple(xs[0].shape)
    rows, row_numel = (1, math.prod(shape)) if len(shape) <= 1 else (shape[0], math.prod(shape[1:]))
    parts = [(x.bits(), _E16) if isinstance(x, Stored) else (x.x.bits(), x.base.bits()) for x in xs]
    n = len(xs)
    out = torch.empty(rows, n, n, dtype=torch.float64)
    for a, b in K.row_chunks(rows, row_numel):
        buf = torch.empty((b - a) * row_numel, dtype=torch.float64)
        for i in range(n):
            for j in range(i, n):
                S.products(*parts[i], *parts[j], a * row_numel, b * row_numel, buf.numpy())
                s = K.row_sum(buf.reshape(b - a, row_numel))
                out[a:b, i, j] = s
                out[a:b, j, i] = s
    return out


def variance_key(ds: Sequence[Any]) -> Tensor | None:
    """`kernels.variance_key` of plain task vectors of one base, from the stored bytes."""
    if not ds or not all(_sparse_ready(d) for d in ds) or not _same_base(ds, ds[0].base):
        return None
    out = memory.empty(tuple(ds[0].shape), torch.float32)
    S.variance(tuple(d.x.bits() for d in ds), ds[0].base.bits(), out.reshape(-1).numpy())
    return out


def write_value(x: Any, dtype: torch.dtype) -> Tensor | None:
    """A lazy block in the output dtype, for `write`."""
    if isinstance(x, Pending):
        return x.compute(dtype)
    if isinstance(x, Stored):
        if dtype == torch.bfloat16 and fused.all_finite(x.raw):
            return memory.empty(tuple(x.shape), torch.bfloat16).copy_(x.raw)     # the stored bits, unchanged
        return memory.empty(tuple(x.shape), dtype).copy_(x.f32())
    if isinstance(x, TaskVector):
        return memory.empty(tuple(x.shape), dtype).copy_(_task_vector(x))
    return None
