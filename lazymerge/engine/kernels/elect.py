"""Sign election and combine: TIES's elected sign and disjoint mean, SCE's combine, RAM / RAM+'s counts and
merge."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from .. import fused


# ----------------------------------------------------------------------------------------------------------------
# TIES election and mixing, lean: the same bits as the plain formulas (tests/reference.py `elect_sign`,
# `combine_block`, which tests/test_kernels.py checks them against) with fewer and smaller temporaries.
#
# `own=True` means the caller donates the first tensor argument (nobody else will read it), so it may be
# overwritten; in-place float ops round exactly like their out-of-place twins, so results stay bit-identical.
# ----------------------------------------------------------------------------------------------------------------


def elect_nonneg(es: Sequence[Tensor], consensus: str = "sum") -> Tensor:
    """TIES sign election as a bool tensor (True where the elected sign is +1; a statistic of exactly 0 elects +1):
    ``sum`` sums the weighted deltas, ``count`` their signs (mergekit ``get_mask``). 1 byte per entry."""
    if consensus in ("sum", "count") and fused.use(*es):
        return fused.elect_nonneg(es, consensus)
    if consensus == "sum":
        stat = es[0] + es[1] if len(es) > 1 else es[0].clone()
        for e in es[2:]:
            stat.add_(e)
    elif consensus == "count":
        stat = torch.sign(es[0])
        for e in es[1:]:
            stat.add_(torch.sign(e))
    else:
        raise ValueError(f"elect_sign: unknown consensus {consensus!r} (expected 'sum' or 'count')")
    return stat >= 0


def combine_elected(es: Sequence[Tensor], weights: Sequence[float], nonneg: Tensor, normalize: bool,
                    own: Sequence[bool] = ()) -> Tensor:
    """methods.md step 4 with a sign from `elect_nonneg`: sum the entries whose sign agrees with the elected one, divided
    (with `normalize`) by the sum of the agreeing models' weights, an exact 0 read as 1."""
    mixed: Tensor | None = None
    divisor: Tensor | None = None
    elected = nonneg.to(torch.float32).mul_(2.0).sub_(1.0)         # +1 / -1
    for i, (e, w) in enumerate(zip(es, weights)):
        agree = torch.sign(e) == elected                         # a zero entry (sign 0) never agrees
        owned = i < len(own) and own[i]
        term = e.mul_(agree) if owned else e * agree             # both: ours to modify
        if mixed is None:
            mixed = term
        else:
            mixed.add_(term)
        if normalize:
            wterm = agree.to(torch.float32).mul_(w)
            divisor = wterm if divisor is None else divisor.add_(wterm)
    assert mixed is not None
    if not normalize:
        return mixed
    assert divisor is not None
    return mixed.div_(divisor.masked_fill_(divisor == 0, 1.0))


def sum_into(es: Sequence[Tensor], own0: bool = False) -> Tensor:
    """``e_0 + e_1 + ...`` in list order, accumulating into e_0 when it is donated."""
    acc = es[0] if own0 else es[0].clone()
    for e in es[1:]:
        acc.add_(e)
    return acc


def sce_combine(base: Tensor, ds: Sequence[Tensor], weights: Sequence[float], nonneg: Tensor) -> Tensor:
    """SCE "erase" and merge: with ``a_i = w_i`` where ``sign(d_i)`` agrees with the elected sign (`elect_nonneg`
    on the selected deltas, consensus "sum") and 0 elsewhere, ``b + sum_i a_i d_i / max(sum_i a_i, 1e-6)``."""
    elected = nonneg.to(torch.float32).mul_(2.0).sub_(1.0)
    num: Tensor | None = None
    den: Tensor | None = None
    for d, w in zip(ds, weights):
        a = (torch.sign(d) == elected).to(torch.float32).mul_(torch.tensor(w, dtype=torch.float32))
        term = d * a
        num = term if num is None else num.add_(term)
        den = a if den is None else den.add_(a)
    assert num is not None and den is not None
    return base + num.div_(den.clamp_(min=1e-6))


def ram_counts(ds: Sequence[Tensor], epsilon: float) -> Tensor:
    """int64 ``[n, 2]``: per model, its entries of this block with ``|d_i| > epsilon`` that another model also
    has (shared) and that no other model has (unique).  Integers: they add exactly over blocks."""
    nz = [d.abs() > epsilon for d in ds]
    count = torch.stack(nz).sum(dim=0)
    shared, unique = count > 1, count == 1
    return torch.tensor([[int((m & shared).sum()), int((m & unique).sum())] for m in nz], dtype=torch.int64)


def ramplus_lambdas(counts: Tensor, r: float, alpha: float, epsilon: float) -> list[float]:
    """RAM+ (tensor-local) per-model factor ``1 + r * clamp(shared / max(unique, epsilon), 0, alpha)`` from the
    whole tensor's `ram_counts`, in float32 as mergekit computes it."""
    shared, unique = counts[:, 0], counts[:, 1]
    rho = shared / unique.clamp(min=epsilon)
    return [float(v) for v in 1 + r * rho.clamp(min=0, max=alpha)]


def ram_merge(base: Tensor, ds: Sequence[Tensor], epsilon: float, lambdas: Sequence[float] | None = None) -> Tensor:
    """RAM: an entry of d_i contributes when ``|d_i| > epsilon``; where exactly one model contributes its delta is
    added whole (times its RAM+ lambda), where several do each adds ``d_i / count``."""
    nz = [d.abs() > epsilon for d in ds]
    count = torch.stack(nz).sum(dim=0)
    unique, overlap, divisor = count == 1, count > 1, count.clamp(min=1)
    acc: Tensor | None = None
    for i, (d, m) in enumerate(zip(ds, nz)):
        z = d * m
        own = z * unique
        if lambdas is not None:
            own = own * torch.tensor(lambdas[i], dtype=torch.float32)
        term = own + z * overlap / divisor
        acc = term if acc is None else acc.add_(term)
    assert acc is not None
    return base + acc
