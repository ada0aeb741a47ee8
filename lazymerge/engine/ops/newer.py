"""mergekit's newer methods (planner/methods.py): sce, nearswap, arcee_fusion, ram / ramplus_tl."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .. import kernels as K
from .. import lazy
from ..context import RunContext
from .registry import Attrs, eager, op
from .sparsify import keep_where

Tensor = torch.Tensor


def _variance_scratch(a: Any) -> float:
    """2(n+4): float64 copies of the n deltas, their mean and sum"""
    return (a.n + 4) * 2


@dataclass(frozen=True)
class Variance(Attrs):
    """SCE's selection key: the per-entry variance of the n task vectors (inputs: d_1..d_n)."""

    n: int


@op("variance", Variance, scratch=_variance_scratch, lazy=True)
def _variance(ctx: RunContext, ins: list[Any], a: Variance, own: tuple[bool, ...]) -> Tensor:
    key = lazy.variance_key(ins)
    if key is not None:
        return key
    ins, own = eager(ins, own)
    return K.variance_key(ins)


@dataclass(frozen=True)
class CountNonzero(Attrs):
    """How many entries of a block are non-zero (an int)."""


@op("count_nonzero", CountNonzero, scratch=0.25)
def _count_nonzero(ctx: RunContext, ins: list[Any], a: CountNonzero, own: tuple[bool, ...]) -> int:
    return K.count_nonzero(ins[0])


@dataclass(frozen=True)
class TopkReduce1Fraction(Attrs):
    """Top-k, pass 1 reduced with k a fraction of the non-zero keys (inputs: histograms, then counts): SCE."""

    fraction: float
    split: int                           # the first `split` inputs are the histograms


@op("topk_reduce1_fraction", TopkReduce1Fraction, scratch=0.0)
def _topk_reduce1_fraction(ctx: RunContext, ins: list[Any], a: TopkReduce1Fraction, own: tuple[bool, ...]) -> Any:
    return K.topk_reduce1_fraction(ins[:a.split], ins[a.split:], a.fraction)


@dataclass(frozen=True)
class KeyMask(Attrs):
    """The top-k mask of a block chosen by a key other than the tensor itself (inputs: key, top-k state): SCE."""

    block: int


@op("keymask", KeyMask, scratch=2.0)
def _keymask(ctx: RunContext, ins: list[Any], a: KeyMask, own: tuple[bool, ...]) -> Tensor:
    return K.topk_mask(ins[0], ins[1], a.block)


@dataclass(frozen=True)
class Keep(Attrs):
    """Zero the entries of input 0 where the mask (input 1) is False."""


@op("keep", Keep, scratch=0.25)
def _keep_op(ctx: RunContext, ins: list[Any], a: Keep, own: tuple[bool, ...]) -> Tensor:
    return keep_where(ins[0], ins[1], own[0])


@dataclass(frozen=True)
class SceWeights(Attrs):
    """SCE's per-model weights from the l2 partials of the selected task vectors (n groups, model-major)."""

    n: int
    numel: int


@op("sce_weights", SceWeights, scratch=0.0)
def _sce_weights(ctx: RunContext, ins: list[Any], a: SceWeights, own: tuple[bool, ...]) -> Any:
    per = len(ins) // a.n
    return K.sce_weights([list(ins[i * per:(i + 1) * per]) for i in range(a.n)], a.numel)


@dataclass(frozen=True)
class SceCombine(Attrs):
    """base + the SCE mix of the n selected task vectors (inputs: base, d_1..d_n, weights, elected sign)."""

    n: int


@op("sce_combine", SceCombine, scratch=4.0)
def _sce_combine(ctx: RunContext, ins: list[Any], a: SceCombine, own: tuple[bool, ...]) -> Tensor:
    nonneg = ins[1 + a.n]
    if isinstance(nonneg, K.fused.Deferred):       # a deferred election, computed before anything is modified
        nonneg = K.fused.elect_nonneg([lazy.materialize(e) for e in nonneg.es], nonneg.consensus) \
            if any(lazy.is_lazy(e) for e in nonneg.es) else K.fused.resolve(nonneg)
    return K.sce_combine(ins[0], ins[1:1 + a.n], ins[2 + a.n], nonneg)


@dataclass(frozen=True)
class Nearswap(Attrs):
    """NearSwap: the other model's value where it is within t of the base, interpolated elsewhere."""

    t: float


@op("nearswap", Nearswap, scratch=3.0)
def _nearswap(ctx: RunContext, ins: list[Any], a: Nearswap, own: tuple[bool, ...]) -> Tensor:
    return K.nearswap(ins[0], ins[1], a.t)


@dataclass(frozen=True)
class FusionImportance(Attrs):
    """Arcee Fusion's importance of each entry of the other model against the base (inputs: x, base)."""


@op("fusion_importance", FusionImportance, scratch=6.0)
def _fusion_importance(ctx: RunContext, ins: list[Any], a: FusionImportance, own: tuple[bool, ...]) -> Tensor:
    return K.fusion_importance(ins[0], ins[1])


@dataclass(frozen=True)
class QuantilePass1(Attrs):
    """Order statistics, pass 1 over one block: a histogram of the high bits of the signed keys (CPU)."""


@op("quantile_pass1", QuantilePass1, scratch=5.0)
def _quantile_pass1(ctx: RunContext, ins: list[Any], a: QuantilePass1, own: tuple[bool, ...]) -> Tensor:
    return K.order_pass1(ins[0]).cpu()


@dataclass(frozen=True)
class FusionQuantiles1(Attrs):
    """Order statistics, pass 1 reduced: the buckets of Arcee Fusion's quantile ranks of `numel` keys."""

    numel: int


@op("fusion_quantiles1", FusionQuantiles1, scratch=0.0)
def _fusion_quantiles1(ctx: RunContext, ins: list[Any], a: FusionQuantiles1, own: tuple[bool, ...]) -> Any:
    return K.order_reduce1(ins, K.fusion_quantile_ranks(a.numel))


@dataclass(frozen=True)
class QuantilePass2(Attrs):
    """Order statistics, pass 2 over one block: the low bits inside the buckets (inputs: keys, pass-1 state)."""


@op("quantile_pass2", QuantilePass2, scratch=5.0)
def _quantile_pass2(ctx: RunContext, ins: list[Any], a: QuantilePass2, own: tuple[bool, ...]) -> Tensor:
    return K.order_pass2(ins[0], ins[1]).cpu()


@dataclass(frozen=True)
class QuantileReduce2(Attrs):
    """Order statistics, pass 2 reduced: the exact quantile values (inputs: state 1, histograms)."""


@op("quantile_reduce2", QuantileReduce2, scratch=0.0)
def _quantile_reduce2(ctx: RunContext, ins: list[Any], a: QuantileReduce2, own: tuple[bool, ...]) -> Any:
    return K.order_reduce2(ins[1:], ins[0])


@dataclass(frozen=True)
class Fusion(Attrs):
    """Arcee Fusion: the other model's changes whose importance reaches the threshold (x, base, importance, q)."""


@op("fusion", Fusion, scratch=3.0)
def _fusion(ctx: RunContext, ins: list[Any], a: Fusion, own: tuple[bool, ...]) -> Tensor:
    return K.fusion_apply(ins[0], ins[1], ins[2], ins[3])


@dataclass(frozen=True)
class RamCounts(Attrs):
    """RAM+: per-model counts of unique and overlapping entries of one block (inputs: d_1..d_n; CPU)."""

    epsilon: float


@op("ram_counts", RamCounts, scratch=3.0)
def _ram_counts(ctx: RunContext, ins: list[Any], a: RamCounts, own: tuple[bool, ...]) -> Tensor:
    return K.ram_counts(ins, a.epsilon).cpu()


@dataclass(frozen=True)
class RamplusLambdas(Attrs):
    """RAM+: each model's scale for its unique entries, from all blocks' counts."""

    r: float
    alpha: float
    epsilon: float


@op("ramplus_lambdas", RamplusLambdas, scratch=0.0)
def _ramplus_lambdas(ctx: RunContext, ins: list[Any], a: RamplusLambdas, own: tuple[bool, ...]) -> Any:
    return K.ramplus_lambdas(torch.stack(list(ins)).sum(dim=0), a.r, a.alpha, a.epsilon)


@dataclass(frozen=True)
class Ram(Attrs):
    """RAM: base + deltas contributed by one model whole, averaged where several contribute (RAM+ with lambdas)."""

    epsilon: float
    n: int
    plus: bool


@op("ram", Ram, scratch=5.0)
def _ram(ctx: RunContext, ins: list[Any], a: Ram, own: tuple[bool, ...]) -> Tensor:
    return K.ram_merge(ins[0], ins[1:1 + a.n], a.epsilon, ins[1 + a.n] if a.plus else None)
