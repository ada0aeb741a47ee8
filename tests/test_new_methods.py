"""sce, nearswap, arcee_fusion, ram and ramplus_tl: lazymerge's output vs the plain whole-tensor formulas of
tests/reference.py (themselves checked against mergekit in test_parity_extra.py and by hand below), their edge
cases, and their parameter checks. Blocking invariance is in test_blockwise_methods.py.
"""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import reference as ref
from conftest import plain_recipe, read_all, read_all_f32, write_recipe

TOL = 1e-6


def _lm():
    import lazymerge

    return lazymerge


def merge_and_read(recipe: dict, tmp_path, **kw) -> dict[str, torch.Tensor]:
    out = tmp_path / "out"
    _lm().merge(plain_recipe(recipe), out, seed=0, **kw)
    return read_all(out)


def assert_close(out: dict[str, torch.Tensor], expected_fn, names, tol: float = TOL) -> None:
    assert set(out) == set(names)
    bad = []
    for name in sorted(out):
        y = out[name]
        assert y.dtype == torch.float32, name
        e = expected_fn(name)
        assert tuple(y.shape) == tuple(e.shape), name
        err = float((y - e).abs().max())
        if not err <= tol:
            bad.append(f"{name}: {err:.3g}")
    assert not bad, "outside tolerance: " + ", ".join(bad)


def _recipe(models, method: str, names: tuple[str, ...], dtype: str, **glob) -> dict:
    r = {"merge_method": method, "base_model": models["base"], "models": [{"model": models[n]} for n in names],
         "dtype": dtype, "parameters": glob}
    if dtype == "bfloat16":
        r["out_dtype"] = "float32"
    return r


@pytest.fixture(params=["fp32", "bf16"])
def prec_models(request):
    name = {"fp32": "models_fp32", "bf16": "models_bf16"}[request.param]
    return ("float32" if request.param == "fp32" else "bfloat16"), request.getfixturevalue(name)


# ----------------------------------------------------------------------------------------------------------------
# the references by hand
# ----------------------------------------------------------------------------------------------------------------
def test_reference_sce_by_hand():
    b = torch.zeros(4)
    x1 = torch.tensor([1.0, 2.0, 0.0, -1.0])
    x2 = torch.tensor([3.0, 2.0, 0.0, 1.0])
    # variances [1, 0, 0, 1]: 2 non-zero -> k = int(2 * 0.5) = 1: the first of the tied pair (index 0) is kept
    assert ref.sce_mask([x1, x2], 0.5).tolist() == [True, False, False, False]
    assert ref.sce_mask([x1, x2], 0.0).tolist() == [False] * 4
    # select_topk 1: mean squares 6/4 and 14/4 -> weights 0.3, 0.7; signs: sum [4, 4, 0, 0] -> + everywhere;
    # entry 3: x1 = -1 disagrees -> only x2 (weight 0.7) -> 0.7 * 1 / 0.7 = 1
    y = ref.sce(b, [x1, x2])
    assert torch.allclose(y, torch.tensor([0.3 * 1 + 0.7 * 3, 2.0, 0.0, 1.0]))
    # top-k 0.5 keeps entry 0 only: weights from [1,0,0,0] and [3,0,0,0] -> 0.1, 0.9 -> 0.1 + 2.7 = 2.8
    assert torch.allclose(ref.sce(b, [x1, x2], 0.5), torch.tensor([2.8, 0.0, 0.0, 0.0]))


def test_reference_nearswap_and_fusion_by_hand():
    b = torch.tensor([0.0, 0.0, 1.0])
    x = torch.tensor([0.1, 1.0, 1.0])
    # t = 0.2: |b - x| = [0.1, 1, 0] -> w = [1, 0.2, 1] (0 clamped to 1e-6) -> y = [0.1, 0.2, 1]
    assert torch.allclose(ref.nearswap(b, x, 0.2), torch.tensor([0.1, 0.2, 1.0]))
    assert torch.equal(ref.nearswap(b, x, 0.0), b)
    # fusion: identical rows have zero importance; the row that changed most keeps its change
    B = torch.zeros(4, 3)
    X = B.clone()
    X[2] = torch.tensor([3.0, 0.0, 0.0])
    imp = ref.fusion_importance(B, X)
    assert imp[2, 0] > 0 and float(imp[[0, 1, 3]].abs().max()) == 0.0
    y = ref.arcee_fusion(B, X)            # q1 = median = q3 = 0 -> threshold 0: every entry passes
    assert torch.equal(y, X)


def test_reference_ram_by_hand():
    b = torch.zeros(3)
    x1 = torch.tensor([1.0, 2.0, 0.0])
    x2 = torch.tensor([0.0, 4.0, 1e-6])
    # entry 0: only x1 contributes -> 1; entry 1: both -> (2 + 4) / 2; entry 2: below epsilon -> 0
    assert torch.allclose(ref.ram(b, [x1, x2]), torch.tensor([1.0, 3.0, 0.0]))
    # RAM+: x1 has 1 shared, 1 unique -> rho 1 -> clamp 0.2 -> lambda 1 + 0.1 * 0.2; x2: 1 shared, 0 unique
    lam = ref.ramplus_lambdas(b, [x1, x2])
    assert lam == pytest.approx([1.02, 1.02])       # x2: rho = 1 / 1e-5, clamped to alpha
    assert torch.allclose(ref.ramplus_tl(b, [x1, x2]), torch.tensor([1.02, 3.0, 0.0]))
    assert ref.ramplus_lambdas(b, [x1, x2], r=0.5, alpha=2.0)[0] == pytest.approx(1.5)


# ----------------------------------------------------------------------------------------------------------------
# the new block-wise statistics, on their own
# ----------------------------------------------------------------------------------------------------------------
def _blocks(x: torch.Tensor, cuts: list[int]) -> list[torch.Tensor]:
    edges = [0, *cuts, x.shape[0]]
    return [x[a:b] for a, b in zip(edges, edges[1:])]


def test_order_statistics_are_exact_over_blocks():
    from lazymerge.engine import kernels as K

    g = torch.Generator().manual_seed(3)
    x = torch.randn(37, 11, generator=g)
    x[::3] = torch.round(x[::3] * 4) / 4              # many exact ties
    x[5, :4] = torch.tensor([0.0, -0.0, float("inf"), -float("inf")])
    x[6] = -1e-40                                       # negative subnormals
    want = torch.sort(x.reshape(-1)).values
    ranks = [0, 1, 57, 200, 203, x.numel() // 2, x.numel() - 2, x.numel() - 1]
    for cuts in ([], [1], [5, 6, 30]):
        parts = _blocks(x, cuts)
        s1 = K.order_reduce1([K.order_pass1(p) for p in parts], ranks)
        got = K.order_reduce2([K.order_pass2(p, s1) for p in parts], s1)
        assert got == [float(want[r]) for r in ranks], cuts
    with pytest.raises(ValueError):
        K.order_reduce1([K.order_pass1(x)], [x.numel()])


def test_variance_topk_selection_over_blocks():
    """SCE's selection: the radix top-k on the variance key, k from the non-zero count, in any blocking, is the
    reference's top-k (ties to the lower flat index); k = 0 keeps nothing."""
    from lazymerge.engine import kernels as K

    g = torch.Generator().manual_seed(5)
    ds = [torch.randn(23, 6, generator=g) for _ in range(3)]
    for d in ds:
        d[4] = 1.0                                      # a row of zero variance
        d[7, :3] = torch.tensor([1.0, 2.0, 3.0]) * (1 if d is ds[0] else -1)   # tied variances
    for frac in (0.0, 0.01, 0.3, 0.9):
        want = ref.sce_mask(ds, frac)
        for cuts in ([], [4, 5, 17]):
            blocks = list(zip(*[_blocks(d, cuts) for d in ds]))
            keys = [K.variance_key(b) for b in blocks]
            s1 = K.topk_reduce1_fraction([K.topk_pass1(k) for k in keys], [K.count_nonzero(k) for k in keys],
                                         frac)
            s2 = K.topk_reduce2([K.topk_pass2(k, s1) for k in keys], s1)
            got = torch.cat([K.topk_mask(k, s2, j) for j, k in enumerate(keys)])
            assert torch.equal(got, want), (frac, cuts)


# ----------------------------------------------------------------------------------------------------------------
# lazymerge vs the references
# ----------------------------------------------------------------------------------------------------------------
def check(m, method: str, names: tuple[str, ...], dtype: str, fn, tmp_path, **glob):
    """Merge with lazymerge and compare every tensor with fn(base, [models]) from reference.py."""
    out = merge_and_read(_recipe(m, method, names, dtype, **glob), tmp_path)
    b = read_all_f32(m["base"])
    xs = [read_all_f32(m[k]) for k in names]
    assert_close(out, lambda n: fn(b[n], [x[n] for x in xs]), b)
    return out, b, xs


def test_sce(prec_models, tmp_path):
    dtype, m = prec_models
    check(m, "sce", ("ft1", "ft2", "ft3"), dtype, lambda b, xs: ref.sce(b, xs, 0.3), tmp_path, select_topk=0.3)


def test_sce_defaults_and_int8_mask(models_fp32, tmp_path):
    check(models_fp32, "sce", ("ft1", "ft2"), "float32", ref.sce, tmp_path, int8_mask=True)


@pytest.mark.parametrize("case", ["topk_zero", "one_model"])
def test_sce_selecting_nothing_gives_the_base(models_fp32, tmp_path, case):
    """select_topk 0, or one model (all variances 0, so k = int(0 * topk) = 0): mergekit's mask is empty and the
    merge is the base model."""
    m = models_fp32
    names, glob = (("ft1", "ft2"), {"select_topk": 0.0}) if case == "topk_zero" else (("ft1",), {"select_topk": 0.5})
    out, b, _ = check(m, "sce", names, "float32", lambda b, xs: ref.sce(b, xs, glob["select_topk"]), tmp_path,
                      **glob)
    assert all(torch.equal(out[n], b[n]) for n in b)


def test_nearswap(prec_models, tmp_path):
    dtype, m = prec_models
    out, b, (x,) = check(m, "nearswap", ("ft2",), dtype, lambda b, xs: ref.nearswap(b, xs[0], 0.006), tmp_path,
                         t=0.006)
    # some entries swapped whole, some interpolated
    d = out["model.layers.0.mlp.up_proj.weight"]
    assert bool((d == x["model.layers.0.mlp.up_proj.weight"]).any())
    assert bool((d != x["model.layers.0.mlp.up_proj.weight"]).any())


def test_nearswap_gradient_t(models_fp32, tmp_path):
    m = models_fp32
    out = merge_and_read(_recipe(m, "nearswap", ("ft1",), "float32", t=[0.0, 0.02]), tmp_path)
    b, x = read_all_f32(m["base"]), read_all_f32(m["ft1"])
    t_of = {0: 0.0, 1: 0.02}

    def expected(n):       # non-layer tensors (embeddings, final norm, lm_head) read a gradient at its start
        layer = int(n.split(".")[2]) if n.startswith("model.layers.") else 0
        return ref.nearswap(b[n], x[n], t_of[layer])

    assert_close(out, expected, b)


def test_base_listed_among_the_models(models_fp32, tmp_path):
    """mergekit's examples list the base under `models` too: it is still the base, not a second model."""
    m = models_fp32
    for method, glob in (("nearswap", {"t": 0.004}), ("arcee_fusion", {})):
        recipe = _recipe(m, method, ("base", "ft1"), "float32", **glob)
        out = merge_and_read(recipe, tmp_path / method)
        again = merge_and_read(_recipe(m, method, ("ft1",), "float32", **glob), tmp_path / f"{method}-2")
        assert all(torch.equal(out[n], again[n]) for n in out)


def test_arcee_fusion(prec_models, tmp_path):
    dtype, m = prec_models
    out, b, _ = check(m, "arcee_fusion", ("ft3",), dtype, lambda b, xs: ref.arcee_fusion(b, xs[0]), tmp_path)
    w = "model.layers.1.self_attn.q_proj.weight"
    kept = out[w] != b[w]
    assert 0 < float(kept.float().mean()) < 0.5       # only the important changes are kept


def test_arcee_fusion_of_identical_models_is_the_base(models_fp32, tmp_path):
    m = models_fp32
    recipe = _recipe(m, "arcee_fusion", ("base",), "float32")
    recipe["models"] = [{"model": m["ft1"]}]
    recipe["base_model"] = m["ft1"]
    from lazymerge.errors import RecipeError

    with pytest.raises(RecipeError, match="exactly 1"):     # the base alone is not "one other model"
        merge_and_read(recipe, tmp_path)
    # a copy of the base under another path is a model: importance 0 everywhere -> the base
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(m["base"], copy)
    recipe = _recipe({**m, "copy": copy}, "arcee_fusion", ("copy",), "float32")
    out = merge_and_read(recipe, tmp_path)
    b = read_all_f32(m["base"])
    assert all(torch.equal(out[n], b[n]) for n in b)


def test_ram(prec_models, tmp_path):
    dtype, m = prec_models
    check(m, "ram", ("ft1", "ft2", "ft3"), dtype, lambda b, xs: ref.ram(b, xs, 0.01), tmp_path, epsilon=0.01)


def test_ramplus_tl(prec_models, tmp_path):
    dtype, m = prec_models
    _, b, xs = check(m, "ramplus_tl", ("ft1", "ft2", "ft3"), dtype,
                     lambda b, xs: ref.ramplus_tl(b, xs, 0.4, 0.6, 0.012), tmp_path, epsilon=0.012, r=0.4, alpha=0.6)
    # the factors differ from 1 (else this would only test ram)
    n = "model.layers.0.mlp.gate_proj.weight"
    assert max(ref.ramplus_lambdas(b[n], [x[n] for x in xs], 0.4, 0.6, 0.012)) > 1.0


def test_ramplus_tl_defaults_two_models(models_fp32, tmp_path):
    check(models_fp32, "ramplus_tl", ("ft1", "ft3"), "float32", ref.ramplus_tl, tmp_path)


# ----------------------------------------------------------------------------------------------------------------
# parameters and model counts are checked before any tensor is read
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method,names,glob,words", [
    ("sce", ("ft1", "ft2"), {"select_topk": 1.5}, ("parameters.select_topk", "[0, 1]")),
    ("sce", ("ft1", "ft2"), {"select_top_k": 0.3}, ("unknown key 'select_top_k'", "select_topk")),
    ("nearswap", ("ft1",), {}, ("parameters.t", "missing")),
    ("nearswap", ("ft1",), {"t": -0.1}, ("parameters.t", ">= 0")),
    ("nearswap", ("ft1", "ft2"), {"t": 0.1}, ("nearswap", "exactly 1")),
    ("arcee_fusion", ("ft1", "ft2"), {}, ("arcee_fusion", "exactly 1")),
    ("arcee_fusion", ("ft1",), {"threshold": 0.5}, ("unknown key 'threshold'", "it takes none here")),
    ("ram", ("ft1",), {"epsilon": -1.0}, ("parameters.epsilon", ">= 0")),
    ("ramplus_tl", ("ft1",), {"epsilon": 0.0}, ("parameters.epsilon", "> 0")),
    ("ramplus_tl", ("ft1",), {"alpha": -0.5}, ("parameters.alpha", ">= 0")),
    ("ramplus_tl", ("ft1",), {"r": "big"}, ("parameters.r", "number")),
])
def test_bad_parameters_are_refused(models_fp32, method, names, glob, words):
    from lazymerge.errors import RecipeError

    with pytest.raises(RecipeError) as exc:
        _lm().plan(plain_recipe(_recipe(models_fp32, method, names, "float32", **glob)))
    for w in words:
        assert w in str(exc.value), (w, str(exc.value))


@pytest.mark.parametrize("method", ["sce", "nearswap", "arcee_fusion", "ram", "ramplus_tl"])
def test_base_is_required(models_fp32, method):
    from lazymerge.errors import RecipeError

    recipe = _recipe(models_fp32, method, ("ft1",), "float32", **({"t": 0.1} if method == "nearswap" else {}))
    del recipe["base_model"]
    with pytest.raises(RecipeError, match="base_model"):
        _lm().plan(plain_recipe(recipe))


def test_method_wide_parameters_are_not_per_model(models_fp32):
    from lazymerge.errors import RecipeError

    recipe = _recipe(models_fp32, "ram", ("ft1", "ft2"), "float32")
    recipe["models"][0]["parameters"] = {"epsilon": 0.1}
    with pytest.raises(RecipeError, match=r"models\[0\]\.parameters.*epsilon.*it takes none here"):
        _lm().plan(plain_recipe(recipe))


def test_another_methods_parameter_is_ignored_with_a_warning(models_fp32):
    """As mergekit does (and as lazymerge does for every method): `t` means nothing to arcee_fusion."""
    plan = _lm().plan(plain_recipe(_recipe(models_fp32, "arcee_fusion", ("ft1",), "float32", t=0.5)))
    plan.close()
    assert any("'t' has no effect for arcee_fusion" in w for w in plan.warnings), plan.warnings


def test_cli_plan_shows_the_new_methods(models_fp32, tmp_path):
    recipe = _recipe(models_fp32, "sce", ("ft1", "ft2", "ft3"), "float32", select_topk=0.5)
    proc = subprocess.run([sys.executable, "-m", "lazymerge.cli", "plan", str(write_recipe(tmp_path, recipe)),
                           "--memory", "64KiB"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "sce" in proc.stdout and "split into row blocks" in proc.stdout
    plan = _lm().plan(plain_recipe(recipe), memory="64KiB")
    ops = {t.op for t in plan.tasks.tasks}
    plan.close()
    assert {"variance", "topk_pass1", "topk_reduce1_fraction", "topk_pass2", "topk_reduce2", "keymask", "elect",
            "sce_weights", "sce_combine"} <= ops


# ----------------------------------------------------------------------------------------------------------------
# multi-stage and CUDA
# ----------------------------------------------------------------------------------------------------------------
def test_multi_stage_blocked_equals_unblocked(models_fp32, tmp_path):
    """An arcee_fusion stage feeding sce and ramplus_tl: each recomputes its statistics (quantiles, variance
    top-k, counts) inside the later stage's blocks, and the bytes do not change with the blocking."""
    import yaml

    m = {k: str(v) for k, v in models_fp32.items()}
    docs = [
        {"name": "a", "merge_method": "arcee_fusion", "base_model": m["base"], "models": [{"model": m["ft1"]}],
         "dtype": "float32"},
        {"name": "b", "merge_method": "sce", "base_model": m["base"], "dtype": "float32",
         "models": [{"model": "a"}, {"model": m["ft2"]}, {"model": m["ft3"]}], "parameters": {"select_topk": 0.4}},
        {"name": "c", "merge_method": "ramplus_tl", "base_model": m["base"], "dtype": "float32",
         "models": [{"model": "b"}, {"model": "a"}], "parameters": {"epsilon": 0.005}},
    ]
    text = yaml.safe_dump_all(docs, sort_keys=False)
    outs = []
    for i, kw in enumerate([{"memory": "unlimited"}, {"max_block_rows": 7}]):
        _lm().merge(text, tmp_path / f"o{i}", **kw)
        outs.append({f.name: f.read_bytes() for f in sorted((tmp_path / f"o{i}").glob("*.safetensors"))})
    assert outs[0] == outs[1]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
@pytest.mark.parametrize("method,names,glob", [
    ("sce", ("ft1", "ft2", "ft3"), {"select_topk": 0.3}), ("nearswap", ("ft1",), {"t": 0.006}),
    ("arcee_fusion", ("ft2",), {}), ("ram", ("ft1", "ft2", "ft3"), {"epsilon": 0.01}),
    ("ramplus_tl", ("ft1", "ft2", "ft3"), {"epsilon": 0.012, "r": 0.4, "alpha": 0.6}),
])
def test_cuda_matches_cpu(models_fp32, tmp_path, method, names, glob):
    recipe = plain_recipe(_recipe(models_fp32, method, names, "float32", **glob))
    _lm().merge(recipe, tmp_path / "cpu", device="cpu", max_block_rows=7)
    _lm().merge(recipe, tmp_path / "gpu", device="cuda", max_block_rows=7)
    cpu, gpu = read_all(tmp_path / "cpu"), read_all(tmp_path / "gpu")
    assert cpu.keys() == gpu.keys()
    for name in cpu:
        assert (cpu[name] - gpu[name]).abs().max() <= 1e-6, name
