"""Pure tensor math for the merge methods: no I/O, no graph, no global state.

Every kernel sees a *block* of an output tensor: rows ``[a, b)`` of its first dimension (a 0-d or 1-d tensor is a
single row and always one whole block).  The contract that shapes this module is **bit-identical results whatever
the row blocking**, so:

* element-wise work uses only correctly rounded IEEE operations (no fused ``alpha=`` adds, no BLAS), which give the
  same bits for an element in any block;
* per-row reductions always reduce a 2-d ``[rows, cols]`` float64 view along dim 1, and a one-row block is padded
  with a zero row so that torch never switches to its split (parallel) single-output reduction;
* whole-tensor statistics are exact combinations of per-row (or per-block integer) partials: ``math.fsum`` over rows,
  integer histograms, integer super-accumulators;
* random numbers are drawn per fixed row group whose size depends on the tensor shape only.

Inputs are float32.  Where methods.md is silent the semantics are mergekit 0.1.5's; its quirks are noted inline.

The kernels live in one module per family, named for its job: `rows` (how a block is viewed), `linear`
(element-wise combinations), `seeds` (block-invariant randomness), `topk` (trim: top-k, rank sampling, order
statistics), `statistics` (norms, variances, importance), `interpolation` (Gram statistics and the slerp family's
coefficients), `elect` (sign election and combine). The engine's ops call them through this package (`K.name`).
"""
from __future__ import annotations

from .. import fused  # noqa: F401  (the numba twins, reached as K.fused)
from .elect import combine_elected, elect_nonneg, ram_counts, ram_merge, ramplus_lambdas, sce_combine, sum_into
from .interpolation import (COL_GRAM_LIMBS, col_gram, col_gram_total, gram_total, karcher_coeffs, lincomb_cols,
                            model_stock_coeffs, model_stock_t, multislerp_coeffs, nuslerp_coeffs, nuslerp_t, row_gram,
                            slerp_coeffs, with_base)
from .linear import delta, fisher_merge, lincomb, nearswap, scale, weighted_sum
from .rows import CHUNK_ELEMS, row_chunks, row_layout, row_sum, rows2d
from .seeds import GROUP_NUMEL, derive_seed, uniform_rows
from .statistics import (fusion_apply, fusion_importance, fusion_quantile_ranks, norm_from_partials, norm_partials,
                         sce_weights, variance_key)
from .topk import (count_nonzero, order_pass1, order_pass2, order_reduce1, order_reduce2, rank_magnitude_sampling,
                   topk_keep, topk_mask, topk_pass1, topk_pass2, topk_reduce1, topk_reduce1_fraction, topk_reduce2)

__all__ = [
    "CHUNK_ELEMS", "COL_GRAM_LIMBS", "col_gram", "col_gram_total", "combine_elected", "count_nonzero", "delta",
    "derive_seed", "elect_nonneg", "fisher_merge", "fusion_apply", "fusion_importance", "fusion_quantile_ranks",
    "gram_total", "karcher_coeffs", "lincomb", "lincomb_cols", "model_stock_coeffs", "model_stock_t",
    "multislerp_coeffs", "nearswap", "norm_from_partials", "norm_partials", "nuslerp_coeffs", "nuslerp_t",
    "order_pass1", "order_pass2", "order_reduce1", "order_reduce2", "ram_counts", "ram_merge",
    "ramplus_lambdas", "rank_magnitude_sampling", "row_gram", "scale", "sce_combine", "sce_weights",
    "slerp_coeffs", "sum_into", "topk_keep", "topk_mask", "topk_pass1", "topk_pass2", "topk_reduce1",
    "topk_reduce1_fraction", "topk_reduce2", "uniform_rows", "variance_key", "weighted_sum", "with_base",
]
