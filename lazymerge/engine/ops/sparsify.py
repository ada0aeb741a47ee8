"""Sparsification: the exact top-k over the whole tensor in two histogram passes, magnitude and outlier trims,
DARE and DELLA random drops."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .. import kernels as K
from .. import lazy
from ..context import RunContext
from .registry import Attrs, eager, op

Tensor = torch.Tensor


@dataclass(frozen=True)
class TopkPass1(Attrs):
    """Top-k, pass 1 over one block: a histogram of the high 16 bits of abs(d) (CPU)."""


@op("topk_pass1", TopkPass1, scratch=2.0, lazy=True)
def _topk_pass1(ctx: RunContext, ins: list[Any], a: TopkPass1, own: tuple[bool, ...]) -> Tensor:
    h = lazy.topk_hist(ins[0])
    if h is not None:
        return h
    ins, own = eager(ins, own)
    # partials (histograms, Gram rows, norms) are small: they live on the CPU whatever the device
    return K.topk_pass1(ins[0]).cpu()


@dataclass(frozen=True)
class TopkReduce1(Attrs):
    """Top-k, pass 1 reduced over all blocks: the high-bits bucket that holds the k-th largest abs(d)."""

    k: int
    tag: str                             # which threshold of the tensor ("keep", "upto", "top")


@op("topk_reduce1", TopkReduce1, scratch=0.0)
def _topk_reduce1(ctx: RunContext, ins: list[Any], a: TopkReduce1, own: tuple[bool, ...]) -> Any:
    return K.topk_reduce1(ins, a.k)


@dataclass(frozen=True)
class TopkPass2(Attrs):
    """Top-k, pass 2 over one block: a histogram of the low bits inside the bucket (inputs: d, pass-1 state)."""


@op("topk_pass2", TopkPass2, scratch=2.0, lazy=True)
def _topk_pass2(ctx: RunContext, ins: list[Any], a: TopkPass2, own: tuple[bool, ...]) -> Tensor:
    s1 = ins[1]
    if not (s1["all"] or s1.get("none")):
        h = lazy.topk_hist(ins[0], s1["bin"])
        if h is not None:
            return h
    ins, own = eager(ins, own)
    return K.topk_pass2(ins[0], ins[1]).cpu()


@dataclass(frozen=True)
class TopkReduce2(Attrs):
    """Top-k, pass 2 reduced: the exact k-th largest abs(d) and how many ties to keep (inputs: state 1, hists)."""

    tag: str


@op("topk_reduce2", TopkReduce2, scratch=0.0)
def _topk_reduce2(ctx: RunContext, ins: list[Any], a: TopkReduce2, own: tuple[bool, ...]) -> Any:
    return K.topk_reduce2(ins[1:], ins[0])


def keep_where(d: Tensor, keep: Tensor, owned: bool) -> Tensor:
    """Zero the entries not kept: one multiply by the mask (a dropped negative entry becomes -0.0, which adds
    like +0.0 and never agrees in a sign election)."""
    return d.mul_(keep) if owned else d * keep


@dataclass(frozen=True)
class TrimMagnitude(Attrs):
    """Keep the entries of d at or above the top-k threshold (inputs: d, top-k state), zero the rest (TIES)."""

    block: int                           # the block's index: ties at the threshold are broken by flat index


@op("trim_magnitude", TrimMagnitude, scratch=2.0, lazy=True)
def _trim_magnitude(ctx: RunContext, ins: list[Any], a: TrimMagnitude, own: tuple[bool, ...]) -> Any:
    tv = lazy.trim_magnitude(ins[0], ins[1], a.block)
    if tv is not None:
        return tv
    ins, own = eager(ins, own)
    return K.topk_keep(ins[0], ins[1], a.block, own[0])


@dataclass(frozen=True)
class TrimOutliers(Attrs):
    """Breadcrumbs: zero the smallest entries of d and the largest-magnitude outliers (inputs: d, states)."""

    block: int
    has_upto: bool                       # a threshold below which entries are dropped is an input
    has_top: bool                        # a threshold above which entries are dropped is an input


@op("trim_outliers", TrimOutliers, scratch=2.0, lazy=True)
def _trim_outliers(ctx: RunContext, ins: list[Any], a: TrimOutliers, own: tuple[bool, ...]) -> Any:
    states = iter(ins[1:])
    tv = lazy.trim_outliers(ins[0], next(states) if a.has_upto else None, next(states) if a.has_top else None,
                            a.block)
    if tv is not None:
        return tv
    ins, own = eager(ins, own)
    d = ins[0]
    keep = None
    i = 1
    if a.has_upto:
        keep = K.topk_mask(d, ins[i], a.block)
        i += 1
    if a.has_top:
        top = K.topk_mask(d, ins[i], a.block).logical_not_()
        keep = top if keep is None else keep.logical_and_(top)
    return keep_where(d, keep, own[0])


@dataclass(frozen=True)
class DropRandom(Attrs):
    """DARE: keep each entry of d with probability `density` (block-invariant random stream), rescale by 1/p."""

    density: float
    rescale: bool
    seed_parts: tuple                    # (run seed, tensor name, model rank): the random stream's key
    shape: tuple[int, ...]               # the whole tensor's shape (fixes the row groups)
    rows: tuple[int, int]


def _uniform(a: DropRandom | DropDella, d: Tensor) -> Tensor:
    u = K.uniform_rows(K.derive_seed(*a.seed_parts), tuple(a.shape), tuple(a.rows)).to(d.device)
    return u.reshape(d.shape)


@op("drop_random", DropRandom, scratch=2.0, lazy=True)
def _drop_random(ctx: RunContext, ins: list[Any], a: DropRandom, own: tuple[bool, ...]) -> Any:
    tv = lazy.drop_random(ins[0], a.density, a.rescale, a.seed_parts, a.shape, a.rows)
    if tv is not None:
        return tv
    ins, own = eager(ins, own)
    d = ins[0]
    kept = keep_where(d, _uniform(a, d) < a.density, own[0])
    return kept.div_(a.density) if a.rescale else kept


@dataclass(frozen=True)
class DropDella(Attrs):
    """DELLA: drop entries of d with probabilities ranked by magnitude in density ± epsilon, rescale."""

    density: float
    epsilon: float
    rescale: bool
    seed_parts: tuple
    shape: tuple[int, ...]
    rows: tuple[int, int]


@op("drop_della", DropDella, scratch=2.0, lazy=True)
def _drop_della(ctx: RunContext, ins: list[Any], a: DropDella, own: tuple[bool, ...]) -> Any:
    tv = lazy.drop_della(ins[0], a.density, a.epsilon, a.rescale, a.seed_parts, a.shape, a.rows)
    if tv is not None:
        return tv
    ins, own = eager(ins, own)
    d = ins[0]
    return K.rank_magnitude_sampling(d, _uniform(a, d), a.density, a.epsilon, a.rescale)


@dataclass(frozen=True)
class Norm(Attrs):
    """Per-row partials of the l1 / l2 / linf norm of one block (CPU, float64)."""

    kind: str


@op("norm", Norm, scratch=2.0)
def _norm(ctx: RunContext, ins: list[Any], a: Norm, own: tuple[bool, ...]) -> Tensor:
    return K.norm_partials(ins[0], a.kind).cpu()


@dataclass(frozen=True)
class NormFactor(Attrs):
    """norm(d) / norm(trimmed d) from both tensors' norm partials (1 when either is ~0): `rescale_norm`."""

    norm: str
    split: int                           # the first `split` inputs are the partials before trimming


@op("norm_factor", NormFactor, scratch=0.0)
def _norm_factor(ctx: RunContext, ins: list[Any], a: NormFactor, own: tuple[bool, ...]) -> float:
    before = K.norm_from_partials(ins[:a.split], a.norm)
    after = K.norm_from_partials(ins[a.split:], a.norm)
    return 1.0 if before < 1e-7 or after < 1e-7 else before / after
