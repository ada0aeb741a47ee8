"""Trim: exact magnitude top-k over blocks (TIES, DARE-TIES, breadcrumbs, SCE), DELLA's rank-magnitude sampling,
and exact order statistics of signed values (arcee_fusion's quantiles), all by two-pass radix histograms."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from ... import memory
from .. import fused


# ----------------------------------------------------------------------------------------------------------------
# Magnitude top-k: exact two-pass radix select over blocks
#
# |d| as float32 is non-negative, so its bit pattern read as int32 orders exactly like the value.  Pass 1
# histograms the high 16 bits of every block, reduce 1 finds the high bin holding the k-th largest; pass 2
# histograms the low 16 bits inside that bin, reduce 2 fixes the exact threshold and hands each block a quota of
# threshold-equal entries so that exactly k are kept, ties going to the lowest flat index (earlier blocks first).
# mergekit breaks ties by an unstable argsort, i.e. arbitrarily.
# ----------------------------------------------------------------------------------------------------------------

_BINS = 65536


def _abs_bits(d: Tensor) -> Tensor:
    return d.abs().contiguous().view(torch.int32).reshape(-1)


def topk_pass1(d_block: Tensor) -> Tensor:
    """int64 ``[65536]`` histogram of the high 16 bits of ``|d|`` in this block."""
    if fused.use(d_block):
        return fused.topk_hist(d_block)
    return torch.bincount(_abs_bits(d_block) >> 16, minlength=_BINS)


def topk_reduce1(hists: Sequence[Tensor], k: int) -> dict:
    """Locate the high bin of the k-th largest ``|d|``: ``{"all", "k", "bin", "above"}`` (plain ints).

    ``above`` counts entries in strictly higher bins.  ``k >= numel`` gives ``{"all": True, ...}`` (keep all);
    k <= 0 is an error.
    """
    if k <= 0:
        raise ValueError(f"top-k with k={k}: at least one entry must be kept")
    total = torch.stack(list(hists)).sum(dim=0)
    numel = int(total.sum())
    if k >= numel:
        return {"all": True, "k": k}
    at_or_above = torch.flip(torch.cumsum(torch.flip(total, [0]), 0), [0])  # entries in bins >= i
    b = int(torch.nonzero(at_or_above >= k).max())
    return {"all": False, "k": k, "bin": b, "above": int(at_or_above[b] - total[b])}


def topk_pass2(d_block: Tensor, state1: dict) -> Tensor:
    """int64 ``[65536]`` histogram of the low 16 bits of the block's entries that fall in the selected high bin."""
    if state1["all"] or state1.get("none"):
        return torch.zeros(_BINS, dtype=torch.int64)
    if fused.use(d_block):
        return fused.topk_hist(d_block, state1["bin"])
    bits = _abs_bits(d_block)
    low = bits[(bits >> 16) == state1["bin"]] & 0xFFFF
    return torch.bincount(low, minlength=_BINS)


def topk_reduce2(hists: Sequence[Tensor], state1: dict) -> dict:
    """Exact threshold and tie quotas: ``{"all", "threshold", "quota"}``.

    ``threshold`` is the int32 bit pattern of the k-th largest ``|d|``; every entry above it is kept, and block j
    keeps its first ``quota[j]`` entries equal to it (``hists`` must be in block order).  A first state with
    ``none`` (k = 0, see `topk_reduce1_fraction`) gives ``{"all": False, "none": True}``: keep nothing.
    """
    if state1["all"]:
        return {"all": True}
    if state1.get("none"):
        return {"all": False, "none": True}
    stacked = torch.stack(list(hists))
    total = stacked.sum(dim=0)
    need = state1["k"] - state1["above"]
    at_or_above = torch.flip(torch.cumsum(torch.flip(total, [0]), 0), [0])
    low = int(torch.nonzero(at_or_above >= need).max())
    ties = need - int(at_or_above[low] - total[low])
    quota = []
    equal = stacked[:, low].tolist()
    for eq in equal:
        q = min(eq, ties)
        quota.append(q)
        ties -= q
    # `equal`: how many entries of each block equal the threshold (a block keeping all of them needs no scan)
    return {"all": False, "threshold": (state1["bin"] << 16) | low, "quota": quota, "equal": equal}


def topk_keep(d_block: Tensor, state2: dict, block_index: int, owned: bool = False) -> Tensor:
    """``d * topk_mask(d, ...)`` (a dropped negative entry becomes -0.0), overwriting ``d`` when ``owned``."""
    if not state2["all"] and fused.use(d_block):
        out = d_block if owned else memory.empty_like(d_block)
        quota = state2["quota"][block_index]
        return fused.keep_mul(d_block, state2["threshold"], quota, out,
                              all_equal=quota == state2.get("equal", [None] * (block_index + 1))[block_index])
    keep = topk_mask(d_block, state2, block_index)
    return d_block.mul_(keep) if owned else d_block * keep


def topk_mask(d_block: Tensor, state2: dict, block_index: int) -> Tensor:
    """Bool mask (shaped like the block) of the entries of this block among the tensor's top k by ``|d|``."""
    if state2["all"]:
        return torch.ones(d_block.shape, dtype=torch.bool, device=d_block.device)
    if state2.get("none"):
        return torch.zeros(d_block.shape, dtype=torch.bool, device=d_block.device)
    bits = _abs_bits(d_block)
    t = state2["threshold"]
    quota = state2["quota"][block_index]
    keep = bits > t
    if quota > 0:
        # the first `quota` entries equal to the threshold, by flat index (few: a scan of their positions only)
        keep[torch.nonzero(bits == t).squeeze(1)[:quota]] = True
    return keep.reshape(d_block.shape)


# ----------------------------------------------------------------------------------------------------------------
# DELLA rank-magnitude sampling
# ----------------------------------------------------------------------------------------------------------------


def rank_magnitude_sampling(
    d_block: Tensor, u_block: Tensor, density: float, epsilon: float, rescale: bool = True
) -> Tensor:
    """DELLA magprune: keep entry with probability ``p = density - eps + 2 eps r``, r its normalised |d| rank.

    Follows mergekit ``della_magprune`` / ``rank_magnitude``: ranks run along dim 1 (for a 2-d tensor: within each
    row; a 0-d/1-d tensor is one row; for >2-d tensors mergekit ranks along dim 1 too), rank = position in an
    ascending sort of |d| (ties by index here, arbitrary in mergekit), ``r = (rank - 1)/(m - 1)`` computed in
    float32 exactly as mergekit's ``(ranks - min)/(max - min)``.  A row of one entry has r = 0/0 in mergekit (its
    ``bernoulli`` then raises); here it gets r = 1/2, i.e. p = density.  Kept where ``u < p``; with ``rescale``
    kept entries are divided by their own p.  density >= 1 returns ``d`` (mergekit).
    """
    if density >= 1:
        return d_block
    if not (0 < density - epsilon and density + epsilon < 1):
        raise ValueError(f"della: density +/- epsilon must lie in (0, 1), got density={density} epsilon={epsilon}")
    shape = d_block.shape
    d = d_block.reshape(1, -1) if d_block.dim() < 2 else d_block
    u = u_block.reshape(d.shape)
    m = d.shape[1]
    if m == 1:
        rank_norm = torch.full(d.shape, 0.5, dtype=torch.float32)
    else:
        order = torch.argsort(d.abs(), dim=1, stable=True)
        ranks = torch.empty_like(order)
        positions = torch.arange(m).reshape(1, m, *([1] * (d.dim() - 2))).expand_as(order)
        ranks.scatter_(1, order, positions)
        rank_norm = ranks.to(torch.float32) / (m - 1)
    probs = (density - epsilon) + rank_norm * 2 * epsilon
    keep = u < probs
    kept = d / probs if rescale else d
    return torch.where(keep, kept, 0.0).reshape(shape)


# SCE selects a fraction of the non-zero entries: the same radix select, k from a count.


def count_nonzero(x: Tensor) -> int:
    """Entries of a block that are not exactly zero (for SCE's k, which counts non-zero variances)."""
    return int(torch.count_nonzero(x))


def topk_reduce1_fraction(hists: Sequence[Tensor], nonzero: Sequence[int], fraction: float) -> dict:
    """`topk_reduce1` for ``k = int(nonzero * fraction)``, the count summed over blocks (mergekit's SCE multiplies
    the int64 count tensor by the fraction, i.e. in float32; so is it here).  k = 0 keeps nothing: ``{"all":
    False, "none": True}``, which the other top-k kernels understand."""
    k = int(torch.tensor(sum(int(c) for c in nonzero), dtype=torch.int64) * fraction)
    if k <= 0:
        return {"all": False, "none": True}
    return topk_reduce1(hists, k)


# Exact order statistics of a signed float32 tensor over blocks: the same two radix passes as the top-k above, on
# keys that order like the values (positive floats: bits + 2^31; negative: 2^31 - 1 - |bits|, so -0.0 sorts just
# below +0.0 and NaNs at the ends).


def _order_keys(x: Tensor) -> Tensor:
    bits = x.contiguous().view(torch.int32).reshape(-1).to(torch.int64)
    return torch.where(bits >= 0, bits + 2**31, -1 - bits)


def _key_value(key: int) -> float:
    bits = key - 2**31 if key >= 2**31 else -1 - key
    return float(torch.tensor([bits], dtype=torch.int32).view(torch.float32)[0])


def order_pass1(x_block: Tensor) -> Tensor:
    """int64 ``[65536]`` histogram of the high 16 bits of the block's order keys."""
    return torch.bincount(_order_keys(x_block) >> 16, minlength=_BINS)


def order_reduce1(hists: Sequence[Tensor], ranks: Sequence[int]) -> dict:
    """For each 0-based ascending rank, the high bin holding it and the entries below that bin."""
    total = torch.stack(list(hists)).sum(dim=0)
    numel = int(total.sum())
    if any(not 0 <= r < numel for r in ranks):
        raise ValueError(f"order statistics: ranks {list(ranks)} out of range for {numel} entries")
    cum = torch.cumsum(total, 0)
    bins = [int(torch.searchsorted(cum, r, right=True)) for r in ranks]
    return {"ranks": list(ranks), "bins": bins, "below": [int(cum[b] - total[b]) for b in bins]}


def order_pass2(x_block: Tensor, state1: dict) -> Tensor:
    """int64 ``[len(distinct bins), 65536]`` histograms of the low 16 bits inside each selected high bin."""
    keys = _order_keys(x_block)
    high = keys >> 16
    distinct = sorted(set(state1["bins"]))
    return torch.stack([torch.bincount(keys[high == b] & 0xFFFF, minlength=_BINS) for b in distinct])


def order_reduce2(hists: Sequence[Tensor], state1: dict) -> list[float]:
    """The exact values (float32, as Python floats) at the requested ranks."""
    total = torch.stack(list(hists)).sum(dim=0)
    distinct = sorted(set(state1["bins"]))
    out = []
    for r, b, below in zip(state1["ranks"], state1["bins"], state1["below"]):
        cum = torch.cumsum(total[distinct.index(b)], 0)
        low = int(torch.searchsorted(cum, r - below, right=True))
        out.append(_key_value((b << 16) | low))
    return out
