"""Inner products: per-block Gram partials, the coefficients each interpolating method derives from them (slerp,
model_stock, nuslerp, multislerp, karcher), and the linear combination that applies them."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .. import kernels as K
from .. import lazy
from ..context import RunContext
from .registry import Attrs, eager, op

Tensor = torch.Tensor


# "cols" (each column).


@dataclass(frozen=True)
class Gram(Attrs):
    """Partial Gram matrix of the inputs over one block: per row in float64, or exact per column (limbs)."""

    mode: str


@op("gram", Gram, scratch=6.0, lazy=True)
def _gram(ctx: RunContext, ins: list[Any], a: Gram, own: tuple[bool, ...]) -> Tensor:
    if a.mode != "cols":
        g = lazy.row_gram(ins)
        if g is not None:
            return g
    ins, own = eager(ins, own)
    return (K.col_gram(ins) if a.mode == "cols" else K.row_gram(ins)).cpu()


def _gram_total(parts: list[Any], mode: str) -> Tensor:
    """The Gram matrix (matrices, per row or column) from all blocks' partials, order-independently."""
    if mode == "total":
        return K.gram_total(parts)
    if mode == "rows":
        return torch.cat(list(parts))
    return K.col_gram_total(parts)


def _maybe_base(c: Tensor, with_base: bool) -> Tensor:
    return K.with_base(c) if with_base else c


@dataclass(frozen=True)
class SlerpCoeffs(Attrs):
    """slerp's two coefficients (base, other) at `t` from the Gram partials of the pair."""

    t: float
    mode: str = "total"


@op("slerp_coeffs", SlerpCoeffs, scratch=0.0)
def _slerp_coeffs(ctx: RunContext, ins: list[Any], a: SlerpCoeffs, own: tuple[bool, ...]) -> Tensor:
    return K.slerp_coeffs(_gram_total(ins, a.mode), a.t)


@dataclass(frozen=True)
class ModelStockCoeffs(Attrs):
    """Model Stock's coefficients (base, fine-tunes) from the task vectors' Gram partials."""

    n: int
    mode: str = "total"


@op("model_stock_coeffs", ModelStockCoeffs, scratch=0.0)
def _model_stock_coeffs(ctx: RunContext, ins: list[Any], a: ModelStockCoeffs, own: tuple[bool, ...]) -> Tensor:
    return K.model_stock_coeffs(K.model_stock_t(_gram_total(ins, a.mode)), a.n)


@dataclass(frozen=True)
class NuslerpCoeffs(Attrs):
    """nuslerp's coefficients from the Gram partials (a leading base coefficient when `with_base`)."""

    weights: tuple[float, ...]
    with_base: bool
    mode: str = "total"


@op("nuslerp_coeffs", NuslerpCoeffs, scratch=0.0)
def _nuslerp_coeffs(ctx: RunContext, ins: list[Any], a: NuslerpCoeffs, own: tuple[bool, ...]) -> Tensor:
    return _maybe_base(K.nuslerp_coeffs(_gram_total(ins, a.mode), a.weights), a.with_base)


@dataclass(frozen=True)
class MultislerpCoeffs(Attrs):
    """multislerp's coefficients from the Gram partials (a leading base coefficient when `with_base`)."""

    weights: tuple[float, ...]
    normalize_weights: bool
    eps: float
    with_base: bool
    mode: str = "total"


@op("multislerp_coeffs", MultislerpCoeffs, scratch=0.0)
def _multislerp_coeffs(ctx: RunContext, ins: list[Any], a: MultislerpCoeffs, own: tuple[bool, ...]) -> Tensor:
    G = _gram_total(ins, a.mode)
    return _maybe_base(K.multislerp_coeffs(G, a.weights, a.normalize_weights, a.eps), a.with_base)


@dataclass(frozen=True)
class KarcherCoeffs(Attrs):
    """The Karcher mean's coefficients from the models' Gram partials (fixed-point iteration)."""

    max_iter: int
    tol: float
    mode: str = "total"


@op("karcher_coeffs", KarcherCoeffs, scratch=0.0)
def _karcher_coeffs(ctx: RunContext, ins: list[Any], a: KarcherCoeffs, own: tuple[bool, ...]) -> Tensor:
    return K.karcher_coeffs(_gram_total(ins, a.mode), None, a.max_iter, a.tol)


@dataclass(frozen=True)
class Lincomb(Attrs):
    """sum_i c_i x_i in float64, rounded once (inputs: x_1..x_n, coefficients)."""

    rows: tuple[int, int]                # the block's rows (for per-row coefficients)
    mode: str = "total"


@op("lincomb", Lincomb, scratch=4.0, lazy=True)
def _lincomb(ctx: RunContext, ins: list[Any], a: Lincomb, own: tuple[bool, ...]) -> Any:
    coeffs = ins[-1]
    if a.mode == "rows":
        r0, r1 = a.rows or (0, 1)
        coeffs = coeffs[r0:r1]
    if a.mode != "cols":
        fused_block = lazy.lincomb(ins[:-1], coeffs.cpu())
        if fused_block is not None:
            return fused_block
    ins, own = eager(ins, own)
    xs = ins[:-1]
    coeffs = coeffs.to(xs[0].device)
    if a.mode == "cols":
        return K.lincomb_cols(xs, coeffs)
    return K.lincomb(xs, coeffs)
