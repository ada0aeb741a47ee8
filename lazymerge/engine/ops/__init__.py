"""The op registry: the whole vocabulary of the task graph, each op declared once.

An op is a frozen dataclass of its attributes (what the planner puts in a `Task`), registered with `@op` on the
function that runs it, its scratch estimate and, from the dataclass's docstring, one line saying what it does.
"What does op X take, return and cost" is answered here and nowhere else: the planner emits tasks with these
attribute types (`planner.graph.TensorBuilder.emit`), the scheduler runs them (`run_task`), docs/DESIGN.md lists
them (`describe()`).

An op function takes the run context, its input values (in the task's input order), its attributes and `own`:
for each input, whether this task is its last reader, so that it may overwrite it instead of allocating (the
scheduler donates buffers). Kernels stay pure; reading and writing go through the context.

Scratch: the temporaries an op allocates while it runs, in float32 blocks of its row block (e.g. a top-k pass
holds |d| and its bit pattern; `combine` holds agreement masks and a weight sum; Gram and lincomb work in float64).
Counted against the budget so that RSS, not just our bookkeeping, stays within it.

The ops live in one module per family (registry, readwrite, elementwise, sparsify, products, newer); importing
this package imports them all, in this order, which is the registry's order (and docs/DESIGN.md's table).
"""
from __future__ import annotations

from .registry import (Attrs, OpFn, OpSpec, OPS, op, eager, run_task, describe)  # noqa: F401
from .readwrite import (Load, Cast, Write)  # noqa: F401
from .elementwise import (Delta, Rescale, WeightedSum, Elect, Combine, Fisher)  # noqa: F401
from .sparsify import (TopkPass1, TopkReduce1, TopkPass2, TopkReduce2, keep_where, TrimMagnitude, TrimOutliers,
                       DropRandom, DropDella, Norm, NormFactor)  # noqa: F401
from .products import (Gram, SlerpCoeffs, ModelStockCoeffs, NuslerpCoeffs, MultislerpCoeffs, KarcherCoeffs,
                       Lincomb)  # noqa: F401
from .newer import (Variance, CountNonzero, TopkReduce1Fraction, KeyMask, Keep, SceWeights, SceCombine, Nearswap,
                    FusionImportance, QuantilePass1, FusionQuantiles1, QuantilePass2, QuantileReduce2, Fusion,
                    RamCounts, RamplusLambdas, Ram)  # noqa: F401
