"""Merge methods as small graphs of ops.

A method is a parameter schema plus a `build` function that emits, for one output tensor, the tasks of its
whole-tensor statistics (top-k thresholds, Gram reductions, norm factors) and returns a function that emits the
element-wise tasks of one row block and returns the key of that block's float32 value. The caller decides what
happens to the value: `emit_tensor` writes it; a later stage of a multi-stage recipe consumes it instead (see
`graph.TensorBuilder`), which is why a method never writes itself. No method has its own execution path: they
all compose the typed ops of `engine.ops` (load, delta, top-k selection, trims and drops, rescale, elect,
combine, Gram partials, coefficients, lincomb; mergekit's newer methods, at the end of this module, add a few
small ops of their own, with the same two-phase statistics). The math lives in `engine.kernels`; the definitions
in docs/methods.md (mergekit's defaults).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ..engine import ops
from ..errors import RecipeError
from .graph import TensorBuilder

# -- parameter schema ---------------------------------------------------------------------------------------


def _unit_open_closed(v: float) -> str | None:
    return None if 0.0 < v <= 1.0 else "must be in (0, 1]"


def _unit_closed(v: float) -> str | None:
    return None if 0.0 <= v <= 1.0 else "must be in [0, 1]"


def _non_negative(v: float) -> str | None:
    return None if v >= 0.0 else "must be >= 0"


def _positive_int(v: float) -> str | None:
    return None if v >= 1 else "must be >= 1"


@dataclass(frozen=True)
class Param:
    name: str
    kind: type                        # float, bool, int or str
    default: Any = None               # None + required=False means "absent"
    required: bool = False
    per_model: bool = True            # may be given per model (else only in global `parameters`)
    check: Callable[[Any], str | None] | None = None
    choices: tuple[str, ...] = ()

    def coerce(self, value: Any, where: str) -> Any:
        if self.kind is bool:
            if isinstance(value, bool):
                return value
            if value in (0, 1):
                return bool(value)
            raise RecipeError(f"{where}: must be true or false, not {value!r}")
        if self.kind in (float, int):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise RecipeError(f"{where}: must be a number, not {value!r}")
            value = self.kind(value)
            problem = self.check(value) if self.check else None
            if problem:
                raise RecipeError(f"{where}: {value!r} {problem}")
            return value
        if self.kind is Path:
            if not isinstance(value, str):
                raise RecipeError(f"{where}: must be a path to a checkpoint directory, not {value!r}")
            return Path(value)
        if self.kind is str:
            if value is None:
                return None
            if not isinstance(value, str) or (self.choices and value not in self.choices):
                raise RecipeError(f"{where}: must be one of {', '.join(self.choices)}, not {value!r}")
            return value
        raise AssertionError(self.kind)


@dataclass
class Resolved:
    """Parameters resolved for one tensor: `models[i]` for the i-th contributing model, `glob` method-wide."""

    models: list[dict[str, Any]]
    glob: dict[str, Any]


BlockFn = Callable[[int], str]
Build = Callable[[TensorBuilder, list[int], list[int], Resolved], BlockFn]


@dataclass(frozen=True)
class Method:
    name: str
    params: tuple[Param, ...]
    build: Build                      # (tb, models, indices, params) -> (block j -> key of its value)
    base: str = "required"            # "required", "optional" or "none"
    min_models: int = 1
    max_models: int | None = None
    doc: str = ""
    in_models_base_contributes: bool = False   # slerp/nuslerp: the base listed in models is an input

    def param(self, name: str) -> Param | None:
        return next((p for p in self.params if p.name == name), None)


# -- shared pieces of graphs -------------------------------------------------------------------------------

WEIGHT = Param("weight", float, required=True)
WEIGHT1 = Param("weight", float, default=1.0)
DENSITY = Param("density", float, default=1.0, check=_unit_open_closed)
NORMALIZE_T = Param("normalize", bool, default=True, per_model=False)
NORMALIZE_F = Param("normalize", bool, default=False, per_model=False)
LAMBDA = Param("lambda", float, default=1.0, per_model=False)
INT8_MASK = Param("int8_mask", bool, default=False, per_model=False)   # accepted for compatibility: masks are
                                                                       # never materialised at full size here
RESCALE = Param("rescale", bool, default=True, per_model=False)
RESCALE_NORM = Param("rescale_norm", str, default=None, per_model=False, choices=("l1", "l2", "linf"))
CONSENSUS = Param("consensus", str, default="sum", per_model=False, choices=("sum", "count"))
GAMMA = Param("gamma", float, default=0.01, check=_unit_closed)
EPSILON = Param("epsilon", float, default=0.15, check=_non_negative)


def emit_tensor(tb: TensorBuilder, block_value: BlockFn) -> None:
    """Write every block of an output tensor (the end of a tensor's subgraph)."""
    for j in range(len(tb.blocks)):
        tb.write(block_value(j), j)


def _select(tb: TensorBuilder, m: int, k: int, tag: str) -> str:
    """Exact k-th largest |delta| over the whole tensor: two radix passes over the blocks (see kernels)."""
    # phases are per model: a base block loaded for model m's pass must not wait for another model's pass
    h1 = [tb.emit(ops.TopkPass1(), (tb.delta(m, j, (1, m, tag)),), 65536 * 8, j) for j in range(len(tb.blocks))]
    s1 = tb.emit(ops.TopkReduce1(k, tag), h1, 1024)
    h2 = [tb.emit(ops.TopkPass2(), (tb.delta(m, j, (2, m, tag)), s1), 65536 * 8, j)
          for j in range(len(tb.blocks))]
    return tb.emit(ops.TopkReduce2(tag), (s1, *h2), 1024 + 16 * len(tb.blocks))


def _sparsify_states(tb: TensorBuilder, m: int, p: dict[str, Any], how: str) -> list[str]:
    """Whole-tensor statistics a sparsifier needs before it can trim any block."""
    n = tb.numel
    density = p.get("density", 1.0)
    if how == "magnitude" and density < 1.0:
        k = int(density * n)
        if k == 0:
            raise RecipeError(f"density {density} keeps no entry of {tb.name} ({n} entries): raise density")
        return [_select(tb, m, k, "keep")]
    if how == "magnitude_outliers":
        keep = int(density * n)
        top = int(p["gamma"] * n)
        bot = n - keep - top
        if bot < 0:
            top, bot = top + bot, 0
        states = [_select(tb, m, n - bot, "upto") if bot > 0 else None,
                  _select(tb, m, top, "top") if top > 0 else None]
        return states  # type: ignore[return-value]
    return []


def _trim(tb: TensorBuilder, d: str, m: int, p: dict[str, Any], how: str, states: list[str], j: int,
          seed_parts: tuple, glob: dict[str, Any]) -> str:
    density = p.get("density", 1.0)
    if how == "none":
        return d
    if how == "magnitude":
        if not states:
            return d
        return tb.emit(ops.TrimMagnitude(block=j), (d, states[0]), tb.f32(j), j)
    if how == "magnitude_outliers":
        upto, top = states
        if upto is None and top is None:
            return d
        ins = tuple(s for s in (upto, top) if s is not None)
        return tb.emit(ops.TrimOutliers(block=j, has_upto=upto is not None, has_top=top is not None), (d, *ins),
                       tb.f32(j), j)
    if how == "random":
        if density >= 1.0:
            return d
        return tb.emit(ops.DropRandom(density, bool(glob["rescale"] and not glob.get("rescale_norm")), seed_parts,
                                      tb.shape, tb.blocks[j]), (d,), tb.f32(j), j)
    if how == "rank_magnitude_sampling":
        eps = p["epsilon"]
        if not (0.0 < density - eps and density + eps < 1.0):
            raise RecipeError(f"della: density ± epsilon ({density} ± {eps}) must lie in (0, 1)")
        return tb.emit(ops.DropDella(density, eps, bool(glob["rescale"] and not glob.get("rescale_norm")),
                                     seed_parts, tb.shape, tb.blocks[j]), (d,), tb.f32(j), j)
    raise AssertionError(how)


@dataclass(frozen=True)
class Family:
    """One row of the sparsify -> elect -> combine table in methods.md."""

    sparsify: str
    elect: bool


def _build_family(fam: Family) -> Build:
    def build(tb: TensorBuilder, models: list[int], indices: list[int], P: Resolved) -> BlockFn:
        base = tb.base
        assert base is not None
        states = [_sparsify_states(tb, m, p, fam.sparsify) for m, p in zip(models, P.models)]
        norm_kind = P.glob.get("rescale_norm")
        factors: list[str | None] = [None] * len(models)
        if norm_kind:
            for n_, (m, p, idx) in enumerate(zip(models, P.models, indices)):
                before, after = [], []
                for j in range(len(tb.blocks)):
                    d = tb.delta(m, j, (3, m))
                    t = _trim(tb, d, m, p, fam.sparsify, states[n_], j, (tb.seed, tb.name, idx), P.glob)
                    before.append(tb.emit(ops.Norm(norm_kind), (d,), tb.block_rows(j) * 8, j))
                    after.append(tb.emit(ops.Norm(norm_kind), (t,), tb.block_rows(j) * 8, j))
                factors[n_] = tb.emit(ops.NormFactor(norm_kind, split=len(before)), (*before, *after), 64)
        weights = tuple(p["weight"] for p in P.models)

        def block(j: int) -> str:
            ts = []
            for n_, (m, p, idx) in enumerate(zip(models, P.models, indices)):
                t = _trim(tb, tb.delta(m, j), m, p, fam.sparsify, states[n_], j, (tb.seed, tb.name, idx), P.glob)
                if factors[n_] is not None:
                    t = tb.emit(ops.Rescale(), (t, factors[n_]), tb.f32(j), j)
                ts.append(tb.emit(ops.Rescale(p["weight"]), (t,), tb.f32(j), j))   # e_i = w_i d_i'
            inputs = [tb.load(base, j), *ts]
            if fam.elect:
                # a bool per entry, plus the float32 sum it is computed from
                inputs.append(tb.emit(ops.Elect(P.glob["consensus"]), ts, tb.f32(j) // 4, j))
            return tb.emit(ops.Combine(weights, P.glob["normalize"], P.glob["lambda"], fam.elect), inputs,
                           tb.f32(j), j)

        return block

    return build


def _build_linear(tb: TensorBuilder, models: list[int], indices: list[int], P: Resolved) -> BlockFn:
    attrs = ops.WeightedSum(tuple(p["weight"] for p in P.models), P.glob["normalize"])
    return lambda j: tb.emit(attrs, [tb.load(m, j) for m in models], tb.f32(j), j)


def _build_task_arithmetic(tb: TensorBuilder, models: list[int], indices: list[int], P: Resolved) -> BlockFn:
    return _build_family(Family("none", elect=False))(tb, models, indices, P)


def _gram_then_lincomb(tb: TensorBuilder, gram_inputs: Callable[[int, int], list[str]], n_gram: int,
                       lin_inputs: Callable[[int], list[str]], coeffs: ops.Attrs) -> BlockFn:
    """The one mechanism for methods that need inner products over the whole tensor (slerp, model_stock,
    nuslerp, multislerp, karcher): per-block Gram partials -> exact reduction -> coefficients (the op `coeffs`)
    -> lincomb.

    `coeffs.mode` says which vectors the inner products are over: "total" (the flattened tensor), "rows" (each
    row: filter-wise variants) or "cols" (each column)."""
    mode = coeffs.mode  # type: ignore[attr-defined]
    per = tb.row_numel if mode == "cols" else None
    parts = [tb.emit(ops.Gram(mode), gram_inputs(j, 1), (per or tb.block_rows(j)) * n_gram * n_gram * 8, j)
             for j in range(len(tb.blocks))]
    width = n_gram + 1
    coef_bytes = {"total": 1, "rows": tb.rows, "cols": tb.row_numel}[mode] * width * 8
    coef = tb.emit(coeffs, parts, coef_bytes)
    return lambda j: tb.emit(ops.Lincomb(tb.blocks[j], mode), (*lin_inputs(j), coef), tb.f32(j), j)


def _build_slerp(tb: TensorBuilder, models: list[int], indices: list[int], P: Resolved) -> BlockFn:
    base = tb.base
    other = next(m for m in models if m != base)
    pair = [base, other]
    return _gram_then_lincomb(tb, lambda j, ph: [tb.load(m, j, ph) for m in pair], 2,
                              lambda j: [tb.load(m, j) for m in pair], ops.SlerpCoeffs(P.glob["t"]))


def _build_model_stock(tb: TensorBuilder, models: list[int], indices: list[int], P: Resolved) -> BlockFn:
    base = tb.base
    assert base is not None
    return _gram_then_lincomb(tb, lambda j, ph: [tb.delta(m, j, ph) for m in models], len(models),
                              lambda j: [tb.load(base, j)] + [tb.load(m, j) for m in models],
                              ops.ModelStockCoeffs(len(models), "rows" if P.glob["filter_wise"] else "total"))


def _spherical(kind: str) -> Build:
    """nuslerp / multislerp / karcher: on the models themselves, or on task vectors when a base is given."""

    def build(tb: TensorBuilder, models: list[int], indices: list[int], P: Resolved) -> BlockFn:
        base = tb.base
        mode = "total"
        if kind == "nuslerp" and not P.glob["nuslerp_flatten"]:
            mode = "cols" if P.glob["nuslerp_row_wise"] else "rows"
        if len(tb.shape) < 2:
            mode = "total"            # a 1-d tensor is one vector in every mode
        if base is None:
            def gram_in(j: int, ph: int) -> list[str]:
                return [tb.load(m, j, ph) for m in models]

            def lin_in(j: int) -> list[str]:
                return [tb.load(m, j) for m in models]
        else:
            def gram_in(j: int, ph: int) -> list[str]:
                return [tb.delta(m, j, ph) for m in models]

            def lin_in(j: int) -> list[str]:
                return [tb.load(base, j)] + [tb.load(m, j) for m in models]
        weights = tuple(p.get("weight", 1.0) for p in P.models)
        with_base = base is not None
        coeffs: ops.Attrs
        if kind == "nuslerp":
            coeffs = ops.NuslerpCoeffs(weights, with_base, mode)
        elif kind == "multislerp":
            coeffs = ops.MultislerpCoeffs(weights, P.glob["normalize_weights"], P.glob["eps"], with_base, mode)
        else:
            coeffs = ops.KarcherCoeffs(P.glob["max_iter"], P.glob["tol"], mode)
        return _gram_then_lincomb(tb, gram_in, len(models), lin_in, coeffs)

    return build


def _build_passthrough(tb: TensorBuilder, models: list[int], indices: list[int], P: Resolved) -> BlockFn:
    scale = P.models[0].get("scale", 1.0) if P.models else 1.0

    def block(j: int) -> str:
        x = tb.load(models[0], j)
        return tb.emit(ops.Rescale(scale), (x,), tb.f32(j), j) if scale != 1.0 else x

    return block


FAMILY_PARAMS = (WEIGHT, DENSITY, LAMBDA, INT8_MASK, RESCALE_NORM, CONSENSUS)

METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    METHODS[method.name] = method
    return method


register(Method("linear", (WEIGHT, NORMALIZE_T), _build_linear, base="optional", min_models=1,
                doc="weighted average of the models (model soup)"))
register(Method("task_arithmetic", (WEIGHT, NORMALIZE_F, LAMBDA, INT8_MASK), _build_task_arithmetic,
                doc="base + lambda * sum of weighted task vectors"))
register(Method("ties", FAMILY_PARAMS + (NORMALIZE_T,), _build_family(Family("magnitude", True)),
                doc="TIES: trim by magnitude, elect signs, disjoint mean"))
register(Method("dare_ties", FAMILY_PARAMS + (NORMALIZE_F, RESCALE), _build_family(Family("random", True)),
                doc="DARE random drop + rescale, then TIES sign election"))
register(Method("dare_linear", FAMILY_PARAMS + (NORMALIZE_F, RESCALE), _build_family(Family("random", False)),
                doc="DARE random drop + rescale, then a weighted sum"))
register(Method("breadcrumbs", FAMILY_PARAMS + (NORMALIZE_F, GAMMA),
                _build_family(Family("magnitude_outliers", False)),
                doc="drop the smallest and the largest-magnitude outliers of each task vector"))
register(Method("breadcrumbs_ties", FAMILY_PARAMS + (NORMALIZE_F, GAMMA),
                _build_family(Family("magnitude_outliers", True)),
                doc="breadcrumbs sparsification with TIES sign election"))
register(Method("della", FAMILY_PARAMS + (NORMALIZE_T, RESCALE, EPSILON),
                _build_family(Family("rank_magnitude_sampling", True)),
                doc="DELLA: magnitude-ranked drop probabilities, rescale, sign election"))
register(Method("della_linear", FAMILY_PARAMS + (NORMALIZE_F, RESCALE, EPSILON),
                _build_family(Family("rank_magnitude_sampling", False)),
                doc="DELLA sparsification with a weighted sum"))
register(Method("slerp", (Param("t", float, required=True, per_model=False, check=_unit_closed),),
                _build_slerp, min_models=2, max_models=2, in_models_base_contributes=True,
                doc="spherical interpolation between the base (t=0) and one other model (t=1)"))
register(Method("model_stock", (Param("filter_wise", bool, default=False, per_model=False),), _build_model_stock,
                min_models=2, doc="Model Stock: interpolate the fine-tunes' mean toward the base by their angle"))
register(Method("nuslerp", (WEIGHT, Param("nuslerp_flatten", bool, default=True, per_model=False),
                            Param("nuslerp_row_wise", bool, default=False, per_model=False)),
                _spherical("nuslerp"), base="optional", min_models=2, max_models=2,
                doc="slerp with per-model weights, over the flattened tensor, rows or columns"))
register(Method("multislerp", (WEIGHT, Param("normalize_weights", bool, default=True, per_model=False),
                               Param("eps", float, default=1e-8, per_model=False, check=_non_negative)),
                _spherical("multislerp"), base="optional", min_models=2,
                doc="spherical interpolation of more than two models"))
register(Method("karcher", (Param("max_iter", int, default=10, per_model=False, check=_positive_int),
                            Param("tol", float, default=1e-5, per_model=False, check=_non_negative)),
                _spherical("karcher"), base="none", min_models=2,
                doc="Riemannian (Karcher) mean of the models on the hypersphere"))
def _build_fisher(tb: TensorBuilder, models: list[int], indices: list[int], P: Resolved) -> BlockFn:
    attrs = ops.Fisher(tuple(p["weight"] for p in P.models))

    def block(j: int) -> str:
        xs = [tb.load(m, j) for m in models]
        fs = [tb.load(p["fisher"], j) for p in P.models]
        return tb.emit(attrs, (*xs, *fs), tb.f32(j), j)

    return block


register(Method("fisher", (Param("fisher", Path, required=True), WEIGHT1), _build_fisher, base="optional",
                min_models=1, doc="Fisher-weighted average: sum_i w_i F_i x_i / sum_i w_i F_i (element-wise)"))
register(Method("passthrough", (Param("scale", float, default=1.0),), _build_passthrough, base="optional",
                min_models=1, max_models=1, doc="copy one model's tensors (with slices: frankenmerges)"))


# -- newer mergekit methods: sce, nearswap, arcee_fusion, ram, ramplus_tl (docs/methods.md) -------------------
#
# Same mechanisms as above: whole-tensor statistics are per-block partials -> one exact reduction (SCE's variance
# top-k is the radix select of `_select` on another key; arcee_fusion's quantiles the same radix passes on signed
# keys), then the element-wise phase. `_memo_op` keeps an op emitted once per (block, phase), as `tb.delta` does.


def _memo_op(tb: TensorBuilder, memo: dict, tag: str, j: int, phase: Any, make: Callable[[], str]) -> str:
    key = (tag, j, tb._phase(phase))
    if key not in memo:
        memo[key] = make()
    return memo[key]


def _build_sce(tb: TensorBuilder, models: list[int], indices: list[int], P: Resolved) -> BlockFn:
    base = tb.base
    assert base is not None
    frac = P.glob["select_topk"]
    nb = len(tb.blocks)
    memo: dict = {}

    def variance(j: int, ph: Any) -> str:
        return _memo_op(tb, memo, "var", j, ph, lambda: tb.emit(
            ops.Variance(len(models)), [tb.delta(m, j, ph) for m in models], tb.f32(j), j))

    state = None
    if frac < 1:
        vs = [variance(j, ("sce", 1)) for j in range(nb)]
        h1 = [tb.emit(ops.TopkPass1(), (v,), 65536 * 8, j) for j, v in enumerate(vs)]
        cnt = [tb.emit(ops.CountNonzero(), (v,), 8, j) for j, v in enumerate(vs)]
        s1 = tb.emit(ops.TopkReduce1Fraction(frac, split=nb), (*h1, *cnt), 1024)
        h2 = [tb.emit(ops.TopkPass2(), (variance(j, ("sce", 2)), s1), 65536 * 8, j) for j in range(nb)]
        state = tb.emit(ops.TopkReduce2("variance"), (s1, *h2), 1024 + 16 * nb)

    def selected(j: int, ph: Any) -> list[str]:
        ds = [tb.delta(m, j, ph) for m in models]
        if state is None:
            return ds
        keep = _memo_op(tb, memo, "mask", j, ph, lambda: tb.emit(ops.KeyMask(block=j), (variance(j, ph), state),
                                                                tb.f32(j) // 4, j))
        return [_memo_op(tb, memo, f"keep{i}", j, ph, lambda d=d: tb.emit(ops.Keep(), (d, keep), tb.f32(j), j))
                for i, d in enumerate(ds)]

    sq: list[list[str]] = [[] for _ in models]
    for j in range(nb):
        for i, d in enumerate(selected(j, ("sce", 3))):
            sq[i].append(tb.emit(ops.Norm("l2"), (d,), tb.block_rows(j) * 8, j))
    weights = tb.emit(ops.SceWeights(len(models), tb.numel), [p for parts in sq for p in parts], 64)

    def block(j: int) -> str:
        ds = selected(j, 0)
        nonneg = tb.emit(ops.Elect("sum"), ds, tb.f32(j) // 4, j)
        return tb.emit(ops.SceCombine(len(models)), (tb.load(base, j), *ds, nonneg, weights), tb.f32(j), j)

    return block


def _build_nearswap(tb: TensorBuilder, models: list[int], indices: list[int], P: Resolved) -> BlockFn:
    base = tb.base
    assert base is not None
    return lambda j: tb.emit(ops.Nearswap(P.glob["t"]), (tb.load(base, j), tb.load(models[0], j)), tb.f32(j), j)


def _build_arcee_fusion(tb: TensorBuilder, models: list[int], indices: list[int], P: Resolved) -> BlockFn:
    base = tb.base
    assert base is not None
    x = models[0]
    nb = len(tb.blocks)
    if tb.numel == 0:
        return lambda j: tb.load(base, j)
    memo: dict = {}

    def importance(j: int, ph: Any) -> str:
        return _memo_op(tb, memo, "imp", j, ph, lambda: tb.emit(
            ops.FusionImportance(), (tb.load(x, j, ph), tb.load(base, j, ph)), tb.f32(j), j))

    h1 = [tb.emit(ops.QuantilePass1(), (importance(j, ("fusion", 1)),), 65536 * 8, j) for j in range(nb)]
    s1 = tb.emit(ops.FusionQuantiles1(tb.numel), h1, 1024)
    h2 = [tb.emit(ops.QuantilePass2(), (importance(j, ("fusion", 2)), s1), 3 * 65536 * 8, j) for j in range(nb)]
    quantiles = tb.emit(ops.QuantileReduce2(), (s1, *h2), 64)
    return lambda j: tb.emit(ops.Fusion(), (tb.load(x, j), tb.load(base, j), importance(j, 0), quantiles),
                             tb.f32(j), j)


def _build_ram(plus: bool) -> Build:
    def build(tb: TensorBuilder, models: list[int], indices: list[int], P: Resolved) -> BlockFn:
        base = tb.base
        assert base is not None
        eps = P.glob["epsilon"]
        lambdas = None
        if plus:
            parts = [tb.emit(ops.RamCounts(eps), [tb.delta(m, j, ("ram", 1)) for m in models], 16 * len(models), j)
                     for j in range(len(tb.blocks))]
            lambdas = tb.emit(ops.RamplusLambdas(P.glob["r"], P.glob["alpha"], eps), parts, 64)

        def block(j: int) -> str:
            ins = [tb.load(base, j), *(tb.delta(m, j) for m in models), *([lambdas] if lambdas else [])]
            return tb.emit(ops.Ram(eps, len(models), plus), ins, tb.f32(j), j)

        return block

    return build


def _positive(v: float) -> str | None:
    return None if v > 0.0 else "must be > 0"


RAM_EPSILON = Param("epsilon", float, default=1e-5, per_model=False, check=_non_negative)
register(Method("sce", (Param("select_topk", float, default=1.0, per_model=False, check=_unit_closed), INT8_MASK),
                _build_sce, min_models=1,
                doc="SCE: select the entries of largest variance across task vectors, weight models by their "
                    "mean squared delta, elect signs"))
register(Method("nearswap", (Param("t", float, required=True, per_model=False, check=_non_negative),),
                _build_nearswap, min_models=1, max_models=1,
                doc="NearSwap: take the other model's value where it is within t of the base, interpolate elsewhere"))
register(Method("arcee_fusion", (), _build_arcee_fusion, min_models=1, max_models=1,
                doc="Arcee Fusion: keep the other model's changes whose importance reaches median + 1.5 IQR"))
register(Method("ram", (RAM_EPSILON,), _build_ram(False), min_models=1,
                doc="RAM: add deltas contributed by one model whole, average those contributed by several"))
register(Method("ramplus_tl", (Param("r", float, default=0.1, per_model=False, check=_non_negative),
                               Param("alpha", float, default=0.2, per_model=False, check=_non_negative),
                               Param("epsilon", float, default=1e-5, per_model=False, check=_positive)),
                _build_ram(True), min_models=1,
                doc="RAM+ (tensor-local): RAM with each model's unique entries scaled by its share of overlap"))
