"""Element-wise ops over row blocks: task vectors, rescales, weighted sums, sign election and the TIES-family
combine, Fisher weighting."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ... import memory
from .. import kernels as K
from .. import lazy
from ..context import RunContext
from .registry import Attrs, eager, op

Tensor = torch.Tensor


@dataclass(frozen=True)
class Delta(Attrs):
    """The task vector: input 0 minus input 1 (the base)."""


@op("delta", Delta, scratch=0.0, lazy=True)
def _delta(ctx: RunContext, ins: list[Any], a: Delta, own: tuple[bool, ...]) -> Any:
    tv = lazy.delta(ins[0], ins[1])
    if tv is not None:
        return tv
    ins, own = eager(ins, own)
    return ins[0].sub_(ins[1]) if own[0] else K.delta(ins[0], ins[1])


@dataclass(frozen=True)
class Rescale(Attrs):
    """Input 0 times `factor`, or times the scalar of input 1 (a norm factor) when `factor` is None."""

    factor: float | None = None


@op("rescale", Rescale, scratch=0.0, lazy=True)
def _rescale(ctx: RunContext, ins: list[Any], a: Rescale, own: tuple[bool, ...]) -> Any:
    factor = float(ins[1] if len(ins) > 1 else a.factor)
    tv = lazy.rescale(ins[0], factor)
    if tv is not None:
        return tv
    ins, own = eager(ins, own)
    return ins[0].mul_(factor) if own[0] else K.scale(ins[0], factor)


@dataclass(frozen=True)
class WeightedSum(Attrs):
    """sum_i w_i x_i over the inputs, divided by sum_i w_i when `normalize` (linear)."""

    weights: tuple[float, ...]
    normalize: bool


@op("weighted_sum", WeightedSum, scratch=1.0, lazy=True)
def _weighted_sum(ctx: RunContext, ins: list[Any], a: WeightedSum, own: tuple[bool, ...]) -> Any:
    fused_sum = lazy.weighted_sum(ins, a.weights, a.normalize)
    if fused_sum is not None:
        return fused_sum
    ins, own = eager(ins, own)
    weights = a.weights
    acc = ins[0].mul_(weights[0]) if own[0] else K.scale(ins[0], weights[0])
    for x, w, o in zip(ins[1:], weights[1:], own[1:]):
        acc.add_(x.mul_(w) if o else K.scale(x, w))
    if a.normalize:
        acc.div_(sum(weights))
    return acc


@dataclass(frozen=True)
class Elect(Attrs):
    """TIES sign election over the weighted task vectors: True where the elected sign is + (fused: in `combine`)."""

    consensus: str                       # "sum" or "count"


@op("elect", Elect, scratch=1.0, lazy=True)
def _elect(ctx: RunContext, ins: list[Any], a: Elect, own: tuple[bool, ...]) -> Any:
    if a.consensus in ("sum", "count") and all(isinstance(x, lazy.TaskVector) for x in ins):
        return K.fused.elect_later(a.consensus, ins)     # elected inside the fused combine (engine/lazy.py)
    ins, own = eager(ins, own)
    if a.consensus in ("sum", "count") and K.fused.use(*ins):
        return K.fused.elect_later(a.consensus, ins)     # the fused combine elects in its own pass
    return K.elect_nonneg(ins, a.consensus)


@dataclass(frozen=True)
class Combine(Attrs):
    """base + lam * D, D mixing the weighted task vectors (inputs: base, e_1..e_n[, elected sign])."""

    weights: tuple[float, ...]
    normalize: bool
    lam: float
    elect: bool


@op("combine", Combine, scratch=3.0, lazy=True)
def _combine(ctx: RunContext, ins: list[Any], a: Combine, own: tuple[bool, ...]) -> Any:
    """D is per methods.md step 4: the elected entries' (or all entries') sum, normalised by the weights."""
    weights = a.weights
    n = len(weights)
    deferred = ins[1 + n] if a.elect else None
    if not a.elect or isinstance(deferred, K.fused.Deferred):
        fused_block = lazy.combine(ins[0], ins[1:1 + n], weights, deferred.consensus if a.elect else None,
                                   a.normalize, a.lam)
        if fused_block is not None:
            return fused_block
    ins, own = eager(ins, own)
    base, es = ins[0], ins[1:1 + n]
    if a.elect and (K.fused.use(base, *es) or isinstance(ins[1 + n], K.fused.Deferred)):
        # the whole chain below (and the election, when deferred) in one pass: engine/fused.py
        out = base if own[0] else memory.empty_like(base)
        return K.fused.combine_elected(es, weights, ins[1 + n], a.normalize, a.lam, base, out)
    if a.elect:
        d = K.combine_elected(es, weights, ins[1 + n], a.normalize, own[1:1 + n])
    else:
        d = K.sum_into(es, own[1])
        if a.normalize:
            total = K.weighted_sum([torch.ones(())] * n, weights)   # the float32 sum of the weights
            if abs(float(total)) >= 1e-8:
                d.div_(total)
    if a.lam != 1.0:
        d.mul_(a.lam)
    return base.add_(d) if own[0] else d.add_(base)   # d is ours; float addition commutes bit for bit


@dataclass(frozen=True)
class Fisher(Attrs):
    """Fisher-weighted average sum_i w_i F_i x_i / sum_i w_i F_i (inputs: x_1..x_n, F_1..F_n)."""

    weights: tuple[float, ...]


@op("fisher", Fisher, scratch=4.0)
def _fisher(ctx: RunContext, ins: list[Any], a: Fisher, own: tuple[bool, ...]) -> Tensor:
    n = len(a.weights)
    return K.fisher_merge(ins[:n], ins[n:], a.weights)
