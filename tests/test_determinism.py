"""Determinism: the output bytes depend on the recipe and the seed only, never on the memory budget (blocking),
and the random streams are reproducible, seed-dependent and statistically uniform."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from conftest import plain_recipe, read_all, safetensors_header, shard_files

TINY_BUDGET = 64 * 1024          # far below one tensor's working set for the 88x32 / 97x32 tensors


def _lm():
    import lazymerge

    return lazymerge


def recipes(m) -> dict[str, dict]:
    return {
        "ties": {
            "merge_method": "ties", "base_model": m["base"],
            "models": [{"model": m["ft1"], "parameters": {"weight": 0.6, "density": 0.4}},
                       {"model": m["ft2"], "parameters": {"weight": 0.5, "density": 0.7}},
                       {"model": m["ft3"], "parameters": {"weight": 0.4, "density": 0.5}}],
            "dtype": "float32",
        },
        "dare_ties": {
            "merge_method": "dare_ties", "base_model": m["base"],
            "models": [{"model": m["ft1"], "parameters": {"weight": 0.6, "density": 0.4}},
                       {"model": m["ft2"], "parameters": {"weight": 0.5, "density": 0.7}},
                       {"model": m["ft3"], "parameters": {"weight": 0.4, "density": 0.5}}],
            "dtype": "float32",
        },
        "slerp": {
            "merge_method": "slerp", "base_model": m["base"],
            "models": [{"model": m["base"]}, {"model": m["ft1"]}],
            "parameters": {"t": 0.4}, "dtype": "float32",
        },
    }


def merged_files(out: Path) -> dict[str, bytes]:
    """Bytes of the index (when there is one) and of every shard it lists."""
    out = Path(out)
    files = {}
    if (out / "model.safetensors.index.json").exists():
        files["model.safetensors.index.json"] = (out / "model.safetensors.index.json").read_bytes()
    for f in shard_files(out):
        files[f] = (out / f).read_bytes()
    return files


def assert_identical(a: Path, b: Path):
    fa, fb = merged_files(a), merged_files(b)
    assert sorted(fa) == sorted(fb)
    if "model.safetensors.index.json" in fa:
        assert json.loads(fa["model.safetensors.index.json"]) == json.loads(fb["model.safetensors.index.json"])
    for f in fa:
        if f.endswith(".safetensors"):
            assert safetensors_header(Path(a) / f) == safetensors_header(Path(b) / f), f"{f}: headers differ"
        if fa[f] != fb[f]:
            ta, tb = read_all(a), read_all(b)
            diff = [n for n in ta if not torch.equal(ta[n], tb[n])]
            pytest.fail(f"{f} differs; tensors that differ: {diff}")


@pytest.mark.parametrize("method", ["ties", "dare_ties", "slerp"])
def test_budget_does_not_change_bytes(models_fp32, tmp_path, method):
    lm = _lm()
    recipe = plain_recipe(recipes(models_fp32)[method])
    # the tiny budget really splits tensors into row blocks (otherwise this test would prove nothing)
    g = lm.plan(recipe, memory=TINY_BUDGET).graph
    per_tensor: dict[str, int] = {}
    for _, data in g.nodes(data=True):
        t = data["task"]
        if t.op == "write":
            per_tensor[t.tensor] = per_tensor.get(t.tensor, 0) + 1
    assert max(per_tensor.values()) > 1, "memory=64 KiB did not split any tensor into blocks"

    lm.merge(recipe, tmp_path / "free", memory=None, seed=0)
    lm.merge(recipe, tmp_path / "tiny", memory=TINY_BUDGET, seed=0)
    assert_identical(tmp_path / "free", tmp_path / "tiny")


@pytest.mark.parametrize("method", ["ties", "dare_ties", "slerp"])
def test_same_seed_same_bytes(models_fp32, tmp_path, method):
    lm = _lm()
    recipe = plain_recipe(recipes(models_fp32)[method])
    lm.merge(recipe, tmp_path / "one", seed=7)
    lm.merge(recipe, tmp_path / "two", seed=7)
    assert_identical(tmp_path / "one", tmp_path / "two")


def test_different_seed_changes_dare(models_fp32, tmp_path):
    lm = _lm()
    recipe = plain_recipe(recipes(models_fp32)["dare_ties"])
    lm.merge(recipe, tmp_path / "s0", seed=0)
    lm.merge(recipe, tmp_path / "s1", seed=1)
    a, b = read_all(tmp_path / "s0"), read_all(tmp_path / "s1")
    assert set(a) == set(b)
    differing = [n for n in a if not torch.equal(a[n], b[n])]
    # every tensor gets its own random masks: all of them (even the 32-element norms) must change
    assert sorted(differing) == sorted(a), f"unchanged with another seed: {sorted(set(a) - set(differing))}"


def test_deterministic_methods_ignore_seed(models_fp32, tmp_path):
    lm = _lm()
    recipe = plain_recipe(recipes(models_fp32)["ties"])
    lm.merge(recipe, tmp_path / "s0", seed=0)
    lm.merge(recipe, tmp_path / "s1", seed=12345)
    assert_identical(tmp_path / "s0", tmp_path / "s1")


# ----------------------------------------------------------------------------------------------------------------
# the random stream itself (kernels.uniform_rows / derive_seed, the public contract the method tests rely on)
# ----------------------------------------------------------------------------------------------------------------
def test_uniform_rows_reproducible_and_block_independent():
    from lazymerge.engine.kernels import derive_seed, uniform_rows

    shape = (88, 32)
    s = derive_seed(0, "model.layers.0.mlp.up_proj.weight", 1)
    whole = uniform_rows(s, shape, (0, 88))
    assert tuple(whole.shape) == shape and whole.dtype == torch.float32
    assert torch.equal(whole, uniform_rows(s, shape, (0, 88)))
    # any row range is the same slice of the whole, whatever the block boundaries
    for a, b in [(0, 1), (3, 17), (17, 64), (63, 88), (40, 41)]:
        assert torch.equal(uniform_rows(s, shape, (a, b)), whole[a:b]), (a, b)
    # a tensor spanning several row groups (3 Mi elements: more than one group of any size <= 1 Mi elements)
    big = (12, 1 << 18)
    sb = derive_seed(5, "big", 0)
    whole = uniform_rows(sb, big, (0, 12))
    for a, b in [(0, 12), (0, 5), (3, 9), (4, 8), (7, 12), (11, 12), (2, 3)]:
        assert torch.equal(uniform_rows(sb, big, (a, b)), whole[a:b]), (a, b)
    # 1-D tensors are one row (kernels contract)
    s1 = derive_seed(0, "model.norm.weight", 0)
    v = uniform_rows(s1, (32,), (0, 1))
    assert tuple(v.shape) == (32,)
    assert torch.equal(v, uniform_rows(s1, (32,), (0, 1)))


def test_derive_seed_separates_streams():
    from lazymerge.engine.kernels import derive_seed, uniform_rows

    name = "model.layers.1.self_attn.q_proj.weight"
    seeds = {
        derive_seed(0, name, 0), derive_seed(0, name, 1), derive_seed(1, name, 0),
        derive_seed(0, "model.layers.0.self_attn.q_proj.weight", 0),
    }
    assert len(seeds) == 4
    assert derive_seed(0, name, 0) == derive_seed(0, name, 0)
    a = uniform_rows(derive_seed(0, name, 0), (32, 32), (0, 32))
    b = uniform_rows(derive_seed(0, name, 1), (32, 32), (0, 32))
    assert not torch.equal(a, b)
    # independent streams: P(a < .5 and b < .5) ~ 1/4
    both = float(((a < 0.5) & (b < 0.5)).float().mean())
    assert abs(both - 0.25) <= 6 * math.sqrt(0.25 * 0.75 / a.numel())


def test_uniform_rows_is_uniform():
    from lazymerge.engine.kernels import derive_seed, uniform_rows

    n_rows, cols = 400, 250
    u = uniform_rows(derive_seed(3, "stat", 0), (n_rows, cols), (0, n_rows)).double().reshape(-1)
    n = u.numel()
    assert float(u.min()) >= 0.0 and float(u.max()) < 1.0
    assert abs(float(u.mean()) - 0.5) <= 6 * math.sqrt(1 / 12 / n)
    # 20-bin chi-square, far tail (df 19: P(chi2 > 60) ~ 3e-6)
    counts = torch.histc(u, bins=20, min=0.0, max=1.0)
    expected = n / 20
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 60, f"chi2 {chi2:.1f}"
    # P(u < p) = p for a few densities (what DARE relies on)
    for p in (0.1, 0.3, 0.5, 0.9):
        frac = float((u < p).double().mean())
        assert abs(frac - p) <= 6 * math.sqrt(p * (1 - p) / n), (p, frac)
