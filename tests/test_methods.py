"""Merge math: lazymerge's output vs the plain whole-tensor formulas of tests/reference.py.

Every output tensor is compared (max abs error <= 1e-6). float32 inputs are merged to float32; bfloat16 inputs are
merged with `out_dtype: float32` and compared against the reference computed on the bf16 inputs upcast to float32.
Random methods are compared given the same uniform draws: the test regenerates them with lazymerge's public
`kernels.uniform_rows(kernels.derive_seed(seed, tensor, model_index), shape, (0, rows))` on the whole tensor.
"""
from __future__ import annotations

import math
import re

import networkx as nx
import pytest
import torch
import yaml

import reference as ref
from conftest import plain_recipe, read_all, read_all_f32, write_recipe

TOL = 1e-6
SEED = 0

PRECISIONS = ["fp32", "bf16"]


# ----------------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------------
def _lm():
    import lazymerge

    return lazymerge


@pytest.fixture
def models(request):
    """Parametrised indirectly by precision: ("fp32" | "bf16") -> model paths."""
    return request.getfixturevalue({"fp32": "models_fp32", "bf16": "models_bf16"}[request.param])


def dtype_keys(precision: str) -> dict:
    if precision == "fp32":
        return {"dtype": "float32"}
    return {"dtype": "bfloat16", "out_dtype": "float32"}


def merge_and_read(recipe: dict, tmp_path, *, seed: int = SEED, **kw) -> dict[str, torch.Tensor]:
    out = tmp_path / "out"
    _lm().merge(plain_recipe(recipe), out, seed=seed, **kw)
    return read_all(out)


def load(models: dict, *names: str) -> list[dict[str, torch.Tensor]]:
    return [read_all_f32(models[n]) for n in names]


def draws(name: str, shape, model_index: int, seed: int = SEED) -> torch.Tensor:
    from lazymerge.engine.kernels import derive_seed, uniform_rows

    shape = tuple(shape)
    # kernels.uniform_rows: a 0-d/1-d tensor is one row; otherwise rows = shape[0]
    rows = shape[0] if len(shape) >= 2 else 1
    u = uniform_rows(derive_seed(seed, name, model_index), shape, (0, rows))
    assert tuple(u.shape) == shape, f"uniform_rows returned shape {tuple(u.shape)} for {shape}"
    return u


def assert_matches(out: dict[str, torch.Tensor], expected_fn, names, *, tol: float = TOL,
                   out_dtype: torch.dtype = torch.float32, only=None):
    """Every output tensor present (names exactly `names`), of `out_dtype`, within `tol` of expected_fn(name)."""
    assert set(out) == set(names), (
        f"missing: {sorted(set(names) - set(out))}, unexpected: {sorted(set(out) - set(names))}")
    bad = []
    for name in sorted(out):
        if only is not None and not only(name):
            continue
        y = out[name]
        assert y.dtype == out_dtype, f"{name}: dtype {y.dtype}, expected {out_dtype}"
        e = expected_fn(name)
        assert tuple(y.shape) == tuple(e.shape), f"{name}: shape {tuple(y.shape)} != {tuple(e.shape)}"
        err = float((y.to(torch.float32) - e).abs().max())
        if not err <= tol:
            bad.append(f"{name}: max abs err {err:.3g}")
    assert not bad, "tensors outside tolerance {}:\n  ".format(tol) + "\n  ".join(bad)


def layer_of(name: str) -> int | None:
    m = re.match(r"model\.layers\.(\d+)\.", name)
    return int(m.group(1)) if m else None


# ----------------------------------------------------------------------------------------------------------------
# the reference itself, on hand-computed tiny cases
# ----------------------------------------------------------------------------------------------------------------
def test_reference_linear_and_task_arithmetic_by_hand():
    a, b = torch.tensor([1.0, 2.0]), torch.tensor([3.0, -2.0])
    assert torch.equal(ref.linear([a, b], [1.0, 3.0]), torch.tensor([2.5, -1.0]))
    assert torch.equal(ref.linear([a, b], [1.0, 3.0], normalize=False), torch.tensor([10.0, -4.0]))
    base = torch.tensor([1.0, 1.0])
    # d1 = [0, 1], d2 = [2, -3]; 0.5*d1 - 1*d2 = [-2, 3.5]; lambda 2 -> [-4, 7]
    y = ref.task_arithmetic(base, [a, b], [0.5, -1.0], lambda_=2.0)
    assert torch.equal(y, torch.tensor([-3.0, 8.0]))


def test_reference_ties_by_hand():
    base = torch.zeros(4)
    x1 = torch.tensor([3.0, -1.0, 0.5, 2.0])   # density 0.5 keeps |3|, |2|
    x2 = torch.tensor([-1.0, -2.0, 4.0, 0.1])  # density 0.5 keeps |4|, |-2|
    # e1 = [3, 0, 0, 2], e2 = [0, -2, 4, 0] (weights 1); sums [3, -2, 4, 2] -> signs + - + +
    y = ref.ties(base, [x1, x2], [1.0, 1.0], [0.5, 0.5], normalize=True)
    assert torch.equal(y, torch.tensor([3.0, -2.0, 4.0, 2.0]))
    # sign disagreement: e1 = 1.0 * 2 = 2, e2 = 0.8 * -3 = -2.4 -> sum -0.4 -> s = -1: keep only e2, divisor 0.8
    y = ref.ties(torch.zeros(1), [torch.tensor([2.0]), torch.tensor([-3.0])], [1.0, 0.8], [1, 1], normalize=True)
    assert torch.allclose(y, torch.tensor([-3.0]))    # -2.4 / 0.8
    y = ref.ties(torch.zeros(1), [torch.tensor([2.0]), torch.tensor([-3.0])], [1.0, 0.8], [1, 1], normalize=False)
    assert torch.allclose(y, torch.tensor([-2.4]))
    # weights decide the sign: e1 = 2, e2 = 0.5 * -3 = -1.5 -> s = +1: keep e1
    y = ref.ties(torch.zeros(1), [torch.tensor([2.0]), torch.tensor([-3.0])], [1.0, 0.5], [1, 1], normalize=True)
    assert torch.equal(y, torch.tensor([2.0]))
    # sum exactly 0 -> s = +1; zero entries never agree -> divisor 0 -> 1
    y = ref.ties(torch.zeros(2), [torch.tensor([1.0, 0.0]), torch.tensor([-1.0, 0.0])], [1, 1], [1, 1])
    assert torch.equal(y, torch.tensor([1.0, 0.0]))
    # count consensus: two small positives outvote one large negative
    y = ref.ties(torch.zeros(1), [torch.tensor([1.0]), torch.tensor([1.0]), torch.tensor([-5.0])], [1, 1, 1],
                 [1, 1, 1], normalize=False, consensus="count")
    assert torch.equal(y, torch.tensor([2.0]))
    # top-k tie-break: equal magnitudes, lower flat index kept
    m = ref.magnitude_mask(torch.tensor([1.0, -1.0, 1.0, 0.5]), 0.5)
    assert m.tolist() == [True, True, False, False]
    with pytest.raises(ValueError):
        ref.magnitude_mask(torch.ones(3), 0.2)       # k = 0


def test_reference_dare_by_hand():
    d = torch.tensor([1.0, 2.0, 3.0, 4.0])
    u = torch.tensor([0.1, 0.6, 0.4, 0.9])
    assert torch.allclose(ref.sparsify_random(d, 0.5, u), torch.tensor([2.0, 0.0, 6.0, 0.0]))
    assert torch.equal(ref.sparsify_random(d, 0.5, u, rescale=False), torch.tensor([1.0, 0.0, 3.0, 0.0]))
    assert torch.equal(ref.sparsify_random(d, 1.0, u), d)
    # l1 rescale: kept 1 + 3 = 4, before 10 -> x2.5
    assert torch.allclose(ref.sparsify_random(d, 0.5, u, rescale_norm="l1"), torch.tensor([2.5, 0.0, 7.5, 0.0]))


def test_reference_breadcrumbs_by_hand():
    d = torch.tensor([5.0, -1.0, 3.0, 0.5, -4.0, 2.0, 0.1, 6.0, -0.2, 1.5])
    # n = 10, density 0.5 -> keep 5, gamma 0.1 -> top 1, bot 4: ascending |d|:
    # 0.1(6) 0.2(8) 0.5(3) 1(1) | 1.5(9) 2(5) 3(2) 4(4) 5(0) | 6(7)
    m = ref.magnitude_outliers_mask(d, 0.5, 0.1)
    assert sorted(torch.nonzero(m).flatten().tolist()) == [0, 2, 4, 5, 9]
    # gamma 0 keeps up to the largest (no "-0" slice bug)
    m = ref.magnitude_outliers_mask(d, 0.3, 0.0)
    assert sorted(torch.nonzero(m).flatten().tolist()) == [0, 4, 7]
    # keep + top > n: top shrinks, bot = 0
    m = ref.magnitude_outliers_mask(d, 0.95, 0.2)    # keep 9, top 2, bot -1 -> top 1, bot 0
    assert int(m.sum()) == 9 and not bool(m[7])


def test_reference_della_by_hand():
    d = torch.tensor([[0.1, -0.4, 0.3], [1.0, 0.5, -2.0]])
    p = ref.rank_magnitude_probs(d, 0.5, 0.2)
    # row 0 ranks (0, 2, 1); row 1 ranks (1, 0, 2); p = 0.3 + 0.4 * rank / 2
    assert torch.allclose(p, torch.tensor([[0.3, 0.7, 0.5], [0.5, 0.3, 0.7]]))
    u = torch.tensor([[0.2, 0.8, 0.4], [0.6, 0.1, 0.69]])
    y = ref.sparsify_rank_magnitude(d, 0.5, u, epsilon=0.2)
    assert torch.allclose(y, torch.tensor([[0.1 / 0.3, 0.0, 0.3 / 0.5], [0.0, 0.5 / 0.3, -2.0 / 0.7]]))
    with pytest.raises(ValueError):
        ref.rank_magnitude_probs(d, 0.9, 0.15)


def test_reference_slerp_and_model_stock_by_hand():
    v0 = torch.tensor([1.0, 0.0])
    v1 = torch.tensor([0.0, 2.0])
    y = ref.slerp(v0, v1, 0.5)
    s = math.sin(math.pi / 4) / math.sin(math.pi / 2)
    assert torch.allclose(y, torch.tensor([s, 2 * s]))
    assert torch.equal(ref.slerp(v0, v1, 0.0), v0)
    # (near-)parallel -> lerp
    assert torch.allclose(ref.slerp(v0, 3 * v0, 0.25), torch.tensor([1.5, 0.0]))
    # model stock: orthogonal deltas -> cos 0 -> t 0 -> base
    b = torch.tensor([1.0, 1.0])
    assert torch.allclose(ref.model_stock(b, [b + torch.tensor([1.0, 0]), b + torch.tensor([0, 1.0])]), b)
    # identical deltas -> cos 1 -> t 1 -> mean
    x = b + torch.tensor([0.5, -0.5])
    assert torch.allclose(ref.model_stock(b, [x, x, x]), x)
    # filter-wise: row 0 deltas identical (t = 1 -> mean), row 1 orthogonal (t = 0 -> base)
    B = torch.zeros(2, 2)
    X1 = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    X2 = torch.tensor([[1.0, 1.0], [0.0, 1.0]])
    y = ref.model_stock(B, [X1, X2], filter_wise=True)
    assert torch.allclose(y, torch.tensor([[1.0, 1.0], [0.0, 0.0]]))


def test_reference_gradient_by_hand():
    assert ref.gradient_value([0.1, 0.9, 0.3], 0, 2) == pytest.approx(0.1)
    assert ref.gradient_value([0.1, 0.9, 0.3], 1, 2) == pytest.approx(0.3)
    assert ref.gradient_value([0.0, 1.0], 1, 3) == pytest.approx(0.5)
    assert ref.gradient_value([0.0, 1.0, 0.0], 1, 5) == pytest.approx(0.5)


# ----------------------------------------------------------------------------------------------------------------
# linear / task arithmetic
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("models", PRECISIONS, indirect=True)
def test_linear(models, request, tmp_path):
    prec = request.node.callspec.params["models"]
    recipe = {
        "merge_method": "linear",
        "models": [
            {"model": models["ft1"], "parameters": {"weight": 1.0}},
            {"model": models["ft2"], "parameters": {"weight": 2.0}},
            {"model": models["ft3"], "parameters": {"weight": 0.5}},
        ],
        **dtype_keys(prec),
    }
    out = merge_and_read(recipe, tmp_path)
    x1, x2, x3 = load(models, "ft1", "ft2", "ft3")
    assert_matches(out, lambda n: ref.linear([x1[n], x2[n], x3[n]], [1.0, 2.0, 0.5]), x1)


def test_linear_global_weight_override_unnormalized(models_fp32, tmp_path):
    m = models_fp32
    recipe = {
        "merge_method": "linear",
        "models": [
            {"model": m["ft1"]},
            {"model": m["ft2"]},
            {"model": m["ft3"], "parameters": {"weight": 0.5}},   # overrides the global weight
        ],
        "parameters": {"weight": 0.25, "normalize": False},
        "dtype": "float32",
    }
    out = merge_and_read(recipe, tmp_path)
    x1, x2, x3 = load(m, "ft1", "ft2", "ft3")
    assert_matches(out, lambda n: ref.linear([x1[n], x2[n], x3[n]], [0.25, 0.25, 0.5], normalize=False), x1)


@pytest.mark.parametrize("models", PRECISIONS, indirect=True)
def test_task_arithmetic_negative_weight(models, request, tmp_path):
    prec = request.node.callspec.params["models"]
    recipe = {
        "merge_method": "task_arithmetic",
        "base_model": models["base"],
        "models": [
            {"model": models["ft1"], "parameters": {"weight": 0.8}},
            {"model": models["ft2"], "parameters": {"weight": -0.4}},   # subtract a capability
            {"model": models["ft3"], "parameters": {"weight": 0.3}},
        ],
        "parameters": {"lambda": 0.9},
        **dtype_keys(prec),
    }
    out = merge_and_read(recipe, tmp_path)
    b, x1, x2, x3 = load(models, "base", "ft1", "ft2", "ft3")
    assert_matches(out, lambda n: ref.task_arithmetic(b[n], [x1[n], x2[n], x3[n]], [0.8, -0.4, 0.3],
                                                      lambda_=0.9), b)


def test_task_arithmetic_normalize_global_weight(models_fp32, tmp_path):
    m = models_fp32
    recipe = {
        "merge_method": "task_arithmetic",
        "base_model": m["base"],
        "models": [
            {"model": m["ft1"]},
            {"model": m["ft2"], "parameters": {"weight": -0.25}},
        ],
        "parameters": {"weight": 0.5, "normalize": True},
        "dtype": "float32",
    }
    out = merge_and_read(recipe, tmp_path)
    b, x1, x2 = load(m, "base", "ft1", "ft2")
    assert_matches(out, lambda n: ref.task_arithmetic(b[n], [x1[n], x2[n]], [0.5, -0.25], normalize=True), b)


# ----------------------------------------------------------------------------------------------------------------
# ties
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("models", PRECISIONS, indirect=True)
def test_ties(models, request, tmp_path):
    prec = request.node.callspec.params["models"]
    recipe = {
        "merge_method": "ties",
        "base_model": models["base"],
        "models": [
            {"model": models["ft1"]},                                           # global density / weight
            {"model": models["ft2"], "parameters": {"density": 0.3}},           # own density
            {"model": models["ft3"], "parameters": {"weight": 0.2, "density": 0.7}},
        ],
        "parameters": {"density": 0.5, "weight": 0.6},                         # normalize: default true
        **dtype_keys(prec),
    }
    out = merge_and_read(recipe, tmp_path)
    b, x1, x2, x3 = load(models, "base", "ft1", "ft2", "ft3")
    assert_matches(out, lambda n: ref.ties(b[n], [x1[n], x2[n], x3[n]], [0.6, 0.6, 0.2], [0.5, 0.3, 0.7],
                                           normalize=True), b)


def test_ties_unnormalized_lambda_count_int8(models_fp32, tmp_path):
    m = models_fp32
    recipe = {
        "merge_method": "ties",
        "base_model": m["base"],
        "models": [
            {"model": m["ft1"], "parameters": {"weight": 0.9, "density": 0.4}},
            {"model": m["ft2"], "parameters": {"weight": 0.5, "density": 0.6}},
            {"model": m["ft3"], "parameters": {"weight": 0.7, "density": 0.5}},
        ],
        "parameters": {"normalize": False, "lambda": 1.3, "int8_mask": True, "consensus": "count"},
        "dtype": "float32",
    }
    out = merge_and_read(recipe, tmp_path)
    b, x1, x2, x3 = load(m, "base", "ft1", "ft2", "ft3")
    assert_matches(out, lambda n: ref.ties(b[n], [x1[n], x2[n], x3[n]], [0.9, 0.5, 0.7], [0.4, 0.6, 0.5],
                                           normalize=False, lambda_=1.3, consensus="count"), b)


def test_ties_density_keeping_nothing_is_an_error(models_fp32, tmp_path):
    from lazymerge.errors import LazyMergeError

    m = models_fp32
    recipe = {
        "merge_method": "ties",
        "base_model": m["base"],
        "models": [{"model": m["ft1"]}, {"model": m["ft2"]}],
        # int(0.02 * 32) = 0 for the 32-element layer norms: k = 0 must be an error, not a zero tensor
        "parameters": {"density": 0.02, "weight": 1.0},
        "dtype": "float32",
    }
    with pytest.raises(LazyMergeError):
        _lm().merge(plain_recipe(recipe), tmp_path / "out", seed=SEED)


# ----------------------------------------------------------------------------------------------------------------
# DARE
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("models", PRECISIONS, indirect=True)
def test_dare_linear(models, request, tmp_path):
    prec = request.node.callspec.params["models"]
    recipe = {
        "merge_method": "dare_linear",
        "base_model": models["base"],
        "models": [
            {"model": models["ft1"], "parameters": {"weight": 0.5}},
            {"model": models["ft2"], "parameters": {"weight": 0.7, "density": 0.3}},
        ],
        "parameters": {"density": 0.6},             # normalize default false, rescale default true
        **dtype_keys(prec),
    }
    out = merge_and_read(recipe, tmp_path)
    b, x1, x2 = load(models, "base", "ft1", "ft2")
    assert_matches(out, lambda n: ref.dare_linear(
        b[n], [x1[n], x2[n]], [0.5, 0.7], [0.6, 0.3],
        [draws(n, b[n].shape, 0), draws(n, b[n].shape, 1)]), b)


def test_dare_linear_no_rescale_normalized(models_fp32, tmp_path):
    m = models_fp32
    recipe = {
        "merge_method": "dare_linear",
        "base_model": m["base"],
        "models": [
            {"model": m["ft1"], "parameters": {"weight": 0.4, "density": 0.5}},
            {"model": m["ft2"], "parameters": {"weight": 0.6, "density": 0.8}},
            {"model": m["ft3"], "parameters": {"weight": 0.3, "density": 0.5}},
        ],
        "parameters": {"rescale": False, "normalize": True},
        "dtype": "float32",
    }
    out = merge_and_read(recipe, tmp_path)
    b, x1, x2, x3 = load(m, "base", "ft1", "ft2", "ft3")
    assert_matches(out, lambda n: ref.dare_linear(
        b[n], [x1[n], x2[n], x3[n]], [0.4, 0.6, 0.3], [0.5, 0.8, 0.5],
        [draws(n, b[n].shape, i) for i in range(3)], rescale=False, normalize=True), b)


@pytest.mark.parametrize("models", PRECISIONS, indirect=True)
def test_dare_ties(models, request, tmp_path):
    prec = request.node.callspec.params["models"]
    recipe = {
        "merge_method": "dare_ties",
        "base_model": models["base"],
        "models": [
            {"model": models["ft1"], "parameters": {"weight": 0.6, "density": 0.5}},
            {"model": models["ft2"], "parameters": {"weight": 0.5}},
            {"model": models["ft3"], "parameters": {"weight": 0.4, "density": 0.7}},
        ],
        "parameters": {"density": 0.4, "lambda": 1.1},     # normalize default false
        **dtype_keys(prec),
    }
    out = merge_and_read(recipe, tmp_path)
    b, x1, x2, x3 = load(models, "base", "ft1", "ft2", "ft3")
    assert_matches(out, lambda n: ref.dare_ties(
        b[n], [x1[n], x2[n], x3[n]], [0.6, 0.5, 0.4], [0.5, 0.4, 0.7],
        [draws(n, b[n].shape, i) for i in range(3)], lambda_=1.1), b)


def _binomial_ok(kept: int, n: int, p: float, z: float) -> bool:
    return abs(kept / n - p) <= z * math.sqrt(p * (1 - p) / n)


@pytest.mark.parametrize("density", [0.3, 0.8])
def test_dare_keep_fraction_is_density(models_fp32, tmp_path, density):
    """The random mask keeps ~density of the entries (binomial bound), and kept entries are d / density."""
    m = models_fp32
    recipe = {
        "merge_method": "dare_linear",
        "base_model": m["base"],
        "models": [{"model": m["ft1"], "parameters": {"weight": 1.0, "density": density}}],
        "dtype": "float32",
    }
    out = merge_and_read(recipe, tmp_path)
    b, x1 = load(m, "base", "ft1")
    total_kept = total = 0
    for n, y in out.items():
        d = x1[n] - b[n]
        assert bool((d != 0).all())
        delta = y.float() - b[n]
        kept = delta != 0
        # a kept entry is the rescaled delta; a dropped one is exactly the base
        assert float((delta[kept] - d[kept] / density).abs().max()) <= TOL, n
        k, cnt = int(kept.sum()), kept.numel()
        if cnt >= 1000:
            assert _binomial_ok(k, cnt, density, 6.0), f"{n}: kept {k}/{cnt}, density {density}"
        total_kept += k
        total += cnt
    assert _binomial_ok(total_kept, total, density, 5.0), f"kept {total_kept}/{total}, density {density}"


# ----------------------------------------------------------------------------------------------------------------
# slerp
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("models", PRECISIONS, indirect=True)
def test_slerp(models, request, tmp_path):
    prec = request.node.callspec.params["models"]
    recipe = {
        "merge_method": "slerp",
        "base_model": models["base"],
        "models": [{"model": models["base"]}, {"model": models["ft1"]}],
        "parameters": {"t": 0.35},
        **dtype_keys(prec),
    }
    out = merge_and_read(recipe, tmp_path)
    b, x1 = load(models, "base", "ft1")
    # both branches must be exercised: matrices (dot ~ 0.9) and layer norms (dot > 0.9995 -> lerp)
    assert any(t.dim() == 1 for t in b.values()) and any(t.dim() == 2 for t in b.values())
    assert_matches(out, lambda n: ref.slerp(b[n], x1[n], 0.35), b)


def test_slerp_filtered_parameter(models_fp32, tmp_path):
    m = models_fp32
    recipe = {
        "merge_method": "slerp",
        "base_model": m["base"],
        "models": [{"model": m["base"]}, {"model": m["ft2"]}],
        "parameters": {"t": [{"filter": "self_attn", "value": 0.2},
                             {"filter": "mlp", "value": 0.8},
                             {"value": 0.5}]},
        "dtype": "float32",
    }

    def t_of(n):
        return 0.2 if "self_attn" in n else 0.8 if "mlp" in n else 0.5

    out = merge_and_read(recipe, tmp_path)
    b, x2 = load(m, "base", "ft2")
    assert_matches(out, lambda n: ref.slerp(b[n], x2[n], t_of(n)), b)


def test_slerp_gradient_parameter(models_fp32, tmp_path):
    m = models_fp32
    grad = [0.1, 0.9, 0.3]        # over 2 layers: layer 0 -> 0.1, layer 1 -> 0.3 (not 0.9: the list is spread)
    recipe = {
        "merge_method": "slerp",
        "base_model": m["base"],
        "models": [{"model": m["base"]}, {"model": m["ft1"]}],
        "parameters": {"t": grad},
        "dtype": "float32",
    }
    out = merge_and_read(recipe, tmp_path)
    b, x1 = load(m, "base", "ft1")
    num_layers = 2
    # only layer tensors have a defined position on the gradient
    assert_matches(out, lambda n: ref.slerp(b[n], x1[n], ref.gradient_value(grad, layer_of(n), num_layers)), b,
                   only=lambda n: layer_of(n) is not None)


# ----------------------------------------------------------------------------------------------------------------
# the rest of the family (also covered by parity for fp32 where deterministic)
# ----------------------------------------------------------------------------------------------------------------
def test_della(models_fp32, tmp_path):
    m = models_fp32
    recipe = {
        "merge_method": "della",
        "base_model": m["base"],
        "models": [
            {"model": m["ft1"], "parameters": {"weight": 0.7, "density": 0.5}},
            {"model": m["ft2"], "parameters": {"weight": 0.5, "density": 0.6, "epsilon": 0.2}},
        ],
        "parameters": {"epsilon": 0.1},                    # normalize default true
        "dtype": "float32",
    }
    out = merge_and_read(recipe, tmp_path)
    b, x1, x2 = load(m, "base", "ft1", "ft2")
    assert_matches(out, lambda n: ref.della(
        b[n], [x1[n], x2[n]], [0.7, 0.5], [0.5, 0.6], [0.1, 0.2],
        [draws(n, b[n].shape, 0), draws(n, b[n].shape, 1)]), b)


def test_della_linear(models_bf16, tmp_path):
    m = models_bf16
    recipe = {
        "merge_method": "della_linear",
        "base_model": m["base"],
        "models": [
            {"model": m["ft1"], "parameters": {"weight": 0.6}},
            {"model": m["ft3"], "parameters": {"weight": 0.4, "density": 0.3}},
        ],
        "parameters": {"density": 0.5, "lambda": 0.8},   # epsilon default 0.15, normalize default false
        "dtype": "bfloat16",
        "out_dtype": "float32",
    }
    out = merge_and_read(recipe, tmp_path)
    b, x1, x3 = load(m, "base", "ft1", "ft3")
    assert_matches(out, lambda n: ref.della_linear(
        b[n], [x1[n], x3[n]], [0.6, 0.4], [0.5, 0.3], [0.15, 0.15],
        [draws(n, b[n].shape, 0), draws(n, b[n].shape, 1)], lambda_=0.8), b)


def test_della_epsilon_out_of_range_is_an_error(models_fp32, tmp_path):
    from lazymerge.errors import LazyMergeError

    m = models_fp32
    recipe = {
        "merge_method": "della",
        "base_model": m["base"],
        "models": [{"model": m["ft1"]}, {"model": m["ft2"]}],
        "parameters": {"density": 0.9, "epsilon": 0.15, "weight": 1.0},   # 0.9 + 0.15 >= 1
        "dtype": "float32",
    }
    with pytest.raises(LazyMergeError):
        _lm().merge(plain_recipe(recipe), tmp_path / "out", seed=SEED)


def test_breadcrumbs_ties_rescale_norm(models_fp32, tmp_path):
    m = models_fp32
    recipe = {
        "merge_method": "breadcrumbs_ties",
        "base_model": m["base"],
        "models": [
            {"model": m["ft1"], "parameters": {"weight": 0.5, "density": 0.6, "gamma": 0.05}},
            {"model": m["ft2"], "parameters": {"weight": 0.8, "density": 0.7}},     # gamma default 0.01
        ],
        "parameters": {"rescale_norm": "l2", "normalize": True},
        "dtype": "float32",
    }
    out = merge_and_read(recipe, tmp_path)
    b, x1, x2 = load(m, "base", "ft1", "ft2")
    assert_matches(out, lambda n: ref.breadcrumbs_ties(
        b[n], [x1[n], x2[n]], [0.5, 0.8], [0.6, 0.7], [0.05, 0.01], normalize=True, rescale_norm="l2"), b)


def test_model_stock_bf16(models_bf16, tmp_path):
    m = models_bf16
    recipe = {
        "merge_method": "model_stock",
        "base_model": m["base"],
        "models": [{"model": m["ft1"]}, {"model": m["ft2"]}, {"model": m["ft3"]}],
        "dtype": "bfloat16",
        "out_dtype": "float32",
    }
    out = merge_and_read(recipe, tmp_path)
    b, x1, x2, x3 = load(m, "base", "ft1", "ft2", "ft3")
    assert_matches(out, lambda n: ref.model_stock(b[n], [x1[n], x2[n], x3[n]]), b)


def test_passthrough_scale(models_fp32, tmp_path):
    m = models_fp32
    recipe = {
        "merge_method": "passthrough",
        "models": [{"model": m["ft2"], "parameters": {"scale": 0.5}}],
        "dtype": "float32",
    }
    out = merge_and_read(recipe, tmp_path)
    (x2,) = load(m, "ft2")
    assert_matches(out, lambda n: ref.passthrough(x2[n], 0.5), x2)


# ----------------------------------------------------------------------------------------------------------------
# recipe forms and the plan
# ----------------------------------------------------------------------------------------------------------------
def _ties_recipe(m) -> dict:
    return {
        "merge_method": "ties",
        "base_model": m["base"],
        "models": [
            {"model": m["ft1"], "parameters": {"weight": 0.5, "density": 0.5}},
            {"model": m["ft2"], "parameters": {"weight": 0.5, "density": 0.4}},
        ],
        "dtype": "float32",
    }


def test_recipe_dict_yaml_text_and_path_agree(models_fp32, tmp_path):
    m = models_fp32
    recipe = _ties_recipe(m)
    path = write_recipe(tmp_path, recipe)
    lm = _lm()
    lm.merge(plain_recipe(recipe), tmp_path / "a", seed=SEED)
    lm.merge(path.read_text(), tmp_path / "b", seed=SEED)
    lm.merge(path, tmp_path / "c", seed=SEED)
    a, bb, c = read_all(tmp_path / "a"), read_all(tmp_path / "b"), read_all(tmp_path / "c")
    assert set(a) == set(bb) == set(c)
    for n in a:
        assert torch.equal(a[n], bb[n]) and torch.equal(a[n], c[n]), n
    assert yaml.safe_load(path.read_text())["merge_method"] == "ties"


CORE_OPS = {"load", "delta", "trim_magnitude", "drop_random", "rescale", "elect", "combine", "write", "gram",
            "topk_pass1", "topk_reduce1", "slerp_coeffs", "lincomb", "weighted_sum"}


def _plan_recipes(m) -> dict[str, dict]:
    return {
        "ties": _ties_recipe(m),
        "dare_ties": {
            "merge_method": "dare_ties", "base_model": m["base"],
            "models": [{"model": m["ft1"], "parameters": {"weight": 0.5, "density": 0.5}},
                       {"model": m["ft2"], "parameters": {"weight": 0.5, "density": 0.5}}],
            "dtype": "float32",
        },
        "slerp": {
            "merge_method": "slerp", "base_model": m["base"],
            "models": [{"model": m["base"]}, {"model": m["ft1"]}], "parameters": {"t": 0.5}, "dtype": "float32",
        },
        "linear": {
            "merge_method": "linear",
            "models": [{"model": m["ft1"], "parameters": {"weight": 1.0}},
                       {"model": m["ft2"], "parameters": {"weight": 1.0}}],
            "dtype": "float32",
        },
    }


@pytest.mark.parametrize("method", ["ties", "dare_ties", "slerp", "linear"])
@pytest.mark.parametrize("memory", [None, 64 * 1024])
def test_plan_graph_shape(models_fp32, method, memory):
    from conftest import llama_shapes

    from lazymerge.engine.ops import OPS

    recipe = plain_recipe(_plan_recipes(models_fp32)[method])
    plan = _lm().plan(recipe, memory=memory)
    g = plan.graph
    assert isinstance(g, nx.DiGraph)
    assert nx.is_directed_acyclic_graph(g)
    assert g.number_of_nodes() > 0
    writes: dict[str, list] = {}
    for key, data in g.nodes(data=True):
        assert "task" in data, f"node {key!r} has no task"
        task = data["task"]
        assert isinstance(task.op, str) and task.op, key
        assert task.op in OPS, f"{key!r}: op {task.op!r} is not in engine.ops.OPS"
        assert isinstance(task.attrs, OPS[task.op].attrs), f"{key!r}: attributes {task.attrs!r} of the wrong type"
        assert isinstance(task.nbytes, int) and task.nbytes >= 0, f"{key!r}: nbytes {task.nbytes!r}"
        # the task's inputs are exactly its graph predecessors
        assert set(task.inputs) == set(g.predecessors(key)), f"{key!r}: inputs {task.inputs} vs edges"
        if task.op == "write":
            writes.setdefault(task.tensor, []).append(key)
            assert g.out_degree(key) == 0, f"write node {key!r} has consumers"
    assert set(writes) == set(llama_shapes()), "one write subgraph per output tensor"
    for tensor, keys in writes.items():
        blocks = sorted(g.nodes[k]["task"].block for k in keys)
        assert blocks == list(range(len(blocks))), f"{tensor}: write blocks {blocks}"
        # the subgraph ending in this tensor's writes belongs to this tensor only
        for k in keys:
            for a in nx.ancestors(g, k):
                assert g.nodes[a]["task"].tensor == tensor, f"{tensor}: ancestor {a!r} of another tensor"
    ops = {g.nodes[k]["task"].op for k in g.nodes}
    assert ops >= {"load", "write"}
    assert CORE_OPS <= set(OPS), f"engine.ops.OPS lacks {sorted(CORE_OPS - set(OPS))}"
