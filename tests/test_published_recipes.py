"""Published mergekit recipes, end to end: tests/published/<case>/recipe.yaml, each citing its source (mergekit's
examples and README, model cards) and adapted to the tiny float32 checkpoints in tests/published/models.

- deterministic recipes: lazymerge's output must be mergekit 0.1.5's (tests/published/<case>/expected, made by
  benches/make_corpus_expected.py in mergekit's own venv) within 1e-6, every tensor name included;
- random recipes (`# random: METHOD`: dare_*, della*), whose masks no other tool can reproduce: bit-identical for
  the same seed whatever the block size, different for another seed, and with the recipe's own density and
  weight, a one-model variant keeps the density's fraction of each delta, rescaled as the method says.
"""
from __future__ import annotations

import copy
import json
import math
import re
from pathlib import Path

import pytest
import torch
import yaml

from conftest import read_all
from hubfix import hub_env, published  # noqa: F401

ROOT = Path(__file__).resolve().parent / "published"
TOL = 1e-6
CASES = sorted(p.parent.name for p in ROOT.glob("*/recipe.yaml"))


def text_of(case: str) -> str:
    text = (ROOT / case / "recipe.yaml").read_text()
    for key in ("base", "ft1", "ft2", "ft3"):
        text = text.replace("{" + key + "}", str(ROOT / "models" / key))
    return text


def is_random(case: str) -> bool:
    return re.search(r"^# random: \w+", (ROOT / case / "recipe.yaml").read_text(), flags=re.M) is not None


DETERMINISTIC = [c for c in CASES if not is_random(c)]
RANDOM = [c for c in CASES if is_random(c)]


def test_corpus_is_published_and_big_enough():
    assert len(CASES) >= 15, CASES
    for case in CASES:
        assert re.search(r"^# Source: \S", (ROOT / case / "recipe.yaml").read_text(), flags=re.M), case
    for case in DETERMINISTIC:
        assert (ROOT / case / "expected").is_dir(), f"{case}: run benches/make_corpus_expected.py"
    assert len(RANDOM) >= 2


def merge(case: str, tmp_path: Path, name: str = "out", **kw) -> dict[str, torch.Tensor]:
    import lazymerge

    recipe = tmp_path / f"{name}.yaml"
    recipe.write_text(text_of(case))
    lazymerge.merge(recipe, tmp_path / name, **kw)
    return read_all(tmp_path / name)


@pytest.mark.parametrize("case", DETERMINISTIC)
def test_matches_mergekit(case: str, tmp_path: Path):
    assert_matches_mergekit(case, merge(case, tmp_path, seed=0), tmp_path / "out")


def assert_matches_mergekit(case: str, got: dict[str, torch.Tensor], out: Path) -> None:
    expected = read_all(ROOT / case / "expected")
    assert sorted(got) == sorted(expected), (
        f"missing: {sorted(set(expected) - set(got))}, unexpected: {sorted(set(got) - set(expected))}")
    bad = []
    for name, e in sorted(expected.items()):
        y = got[name]
        assert tuple(y.shape) == tuple(e.shape) and y.dtype == e.dtype, name
        err = float((y - e).abs().max())
        if not err <= TOL:
            bad.append(f"{name}: max abs err {err:.3g}")
    assert not bad, f"{case}: tensors outside {TOL}:\n  " + "\n  ".join(bad)
    want = json.loads((ROOT / case / "expected" / "config.json").read_text())["num_hidden_layers"]
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == want


# the recipes as published, naming real hub repositories (`# Hub:` says which placeholder is which), served by
# the loopback hub with the tiny checkpoints in their place
HUB_IDS = {case: dict(re.findall(r"\{(\w+)\}=(\S+)", m.group(1))) for case in DETERMINISTIC
           if (m := re.search(r"^# Hub: (.*)$", (ROOT / case / "recipe.yaml").read_text(), flags=re.M))}


def test_most_published_recipes_name_their_hub_repositories():
    assert len(HUB_IDS) >= 10, sorted(HUB_IDS)


@pytest.mark.parametrize("case", sorted(HUB_IDS))
def test_matches_mergekit_with_real_hub_ids(case: str, published, hub_env: Path, tmp_path: Path):
    import lazymerge

    text = (ROOT / case / "recipe.yaml").read_text()
    shas = {}
    for key, repo in HUB_IDS[case].items():
        shas[f"{repo}@main"] = published.hub.add(repo, ROOT / "models" / key)
        text = text.replace("{" + key + "}", repo)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(text)
    report = lazymerge.merge(recipe, tmp_path / "out", seed=0)
    assert report.inputs == shas
    assert_matches_mergekit(case, read_all(tmp_path / "out"), tmp_path / "out")


def test_model_stock_weights_warn_once(tmp_path: Path):
    """The model_stock card's per-model `weight` filter lists: ignored (the output matches mergekit's, above),
    with one warning line."""
    import lazymerge

    recipe = tmp_path / "r.yaml"
    recipe.write_text(text_of("model_stock_with_weights"))
    p = lazymerge.plan(recipe)
    try:
        hits = [w for w in p.warnings if "has no effect" in w]
    finally:
        p.close()
    assert len(hits) == 1 and "'weight' has no effect for model_stock" in hits[0], p.warnings


@pytest.mark.parametrize("case", RANDOM)
def test_random_recipe_is_deterministic(case: str, tmp_path: Path):
    a = merge(case, tmp_path, "a", seed=7)
    b = merge(case, tmp_path, "b", seed=7, max_block_rows=3, memory="64KiB")
    c = merge(case, tmp_path, "c", seed=8)
    assert a.keys() == b.keys() == c.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), f"{name}: not bit-identical across block sizes"
    assert any(not torch.equal(a[n], c[n]) for n in a if a[n].dim() == 2), "another seed, the same masks"


def _one_model_variant(case: str) -> tuple[dict, dict]:
    """The recipe's output document with only its first fine-tune (its own parameters kept)."""
    docs = [d for d in yaml.safe_load_all(text_of(case)) if d]
    doc = copy.deepcopy(docs[-1])
    entry = next(e for e in doc["models"] if e["model"] != doc["base_model"] and e.get("parameters"))
    doc["models"] = [entry]
    return doc, entry


def _at(value, layer: int | None) -> float:
    """A gradient (or scalar) at a layer of the 6-layer models; non-layer tensors at t = 0."""
    if not isinstance(value, list):
        return float(value)
    t = 0.0 if layer is None else layer / 5
    pos = t * (len(value) - 1)
    i = min(int(pos), len(value) - 2)
    return value[i] + (value[i + 1] - value[i]) * (pos - i)


@pytest.mark.parametrize("case", [c for c in RANDOM if c != "multimerge_docs"])
def test_random_recipe_statistics(case: str, tmp_path: Path):
    """One fine-tune at the recipe's density: the kept fraction of its delta is the density (within 5 sigma
    over the model) and each kept entry is rescaled: DARE by weight / density, DELLA by lambda / p with p its
    rank-based keep probability in [density - epsilon, density + epsilon] (normalized: the weight cancels)."""
    import lazymerge

    doc, entry = _one_model_variant(case)
    method, prm, glob = doc["merge_method"], entry["parameters"], doc.get("parameters") or {}
    recipe = tmp_path / "one.yaml"
    recipe.write_text(yaml.safe_dump(doc))
    lazymerge.merge(recipe, tmp_path / "one", seed=3)
    out, base, ft = (read_all(p) for p in (tmp_path / "one", Path(doc["base_model"]), Path(entry["model"])))
    density, eps = float(prm["density"]), float(prm.get("epsilon", 0.0))
    kept_total = n_total = 0
    for name, y in out.items():
        m = re.search(r"layers\.(\d+)\.", name)
        layer = int(m.group(1)) if m else None
        delta, diff = ft[name] - base[name], y - base[name]
        kept = diff != 0
        kept_total += int(kept.sum())
        n_total += delta.numel()
        ratio = diff[kept] / delta[kept]
        if method.startswith("dare"):
            assert not glob.get("normalize", False)
            want = _at(prm["weight"], layer) / density
            torch.testing.assert_close(ratio, torch.full_like(ratio, want), rtol=1e-3, atol=0, msg=name)
        else:
            assert method.startswith("della") and glob.get("normalize")
            lam = float(glob.get("lambda", 1.0))
            lo, hi = lam / (density + eps), lam / (density - eps)
            assert float(ratio.min()) >= lo * (1 - 1e-3) and float(ratio.max()) <= hi * (1 + 1e-3), name
    sigma = math.sqrt(n_total * density * (1 - density))
    assert abs(kept_total - density * n_total) <= 5 * sigma, (kept_total / n_total, density)


def _value(spec, name: str) -> float:
    """A recipe parameter for tensor `name`: a scalar, a gradient over the 6 layers, or a list of {filter, value}
    (the first whose filter is in the name, or the one without a filter)."""
    m = re.search(r"layers\.(\d+)\.", name)
    layer = int(m.group(1)) if m else None
    if isinstance(spec, list) and spec and isinstance(spec[0], dict):
        spec = next(e["value"] for e in spec if "filter" not in e or e["filter"] in name)
    return _at(spec, layer)


TRIMS = [c for c in DETERMINISTIC if any(d.get("merge_method") in ("ties", "breadcrumbs_ties")
                                         for d in yaml.safe_load_all(text_of(c)) if d)]


@pytest.mark.parametrize("case", TRIMS)
def test_trim_decisions_have_no_near_ties(case: str):
    """As tests/test_parity.py checks for ../shared/parity: the trims' keys |x - b| are exact on every IEEE machine,
    so the comparison with mergekit above holds on any CPU when no tie straddles a cut and no elected sign sum is
    within rounding of 0. A key computed by an earlier slerp stage (mega_slerp_then_ties) is not exact: no cut may
    fall within its rounding distance (tests/thresholds.py: twice the largest difference between float32 and
    float64 evaluations of the slerp with three orders of summation)."""
    import reference as ref
    import thresholds as th

    docs = [d for d in yaml.safe_load_all(text_of(case)) if d]
    stages = {d["name"]: d for d in docs[:-1]}
    doc = docs[-1]
    models = {}

    def tensors(path: str) -> dict[str, torch.Tensor]:
        if path not in models:
            models[path] = read_all(Path(path))
        return models[path]

    def delta(path: str, name: str, base: str) -> tuple[torch.Tensor, "torch.Tensor | float"]:
        """The task vector a model name gives against the base, and the rounding distance of its magnitude: a
        checkpoint's is one float32 subtraction (distance 0), a slerp stage's comes out of float64."""
        b = tensors(base)[name]
        if path not in stages:
            return (tensors(path)[name] - b).double(), 0.0
        st = stages[path]
        assert st["merge_method"] == "slerp", st["merge_method"]
        other = next(s["model"] for s in st["slices"][0]["sources"] if s["model"] != st["base_model"])
        y, dist = th.slerp_values(tensors(st["base_model"])[name], tensors(other)[name],
                                  _value(st["parameters"]["t"], name))
        return y - b.double(), dist

    method, glob = doc["merge_method"], doc.get("parameters") or {}
    entries = [e for e in doc["models"] if e["model"] != doc["base_model"]]
    cuts = 0
    for name in read_all(ROOT / case / "expected"):
        kept = []
        for e in entries:
            prm = {**glob, **(e.get("parameters") or {})}
            d, dist = delta(e["model"], name, doc["base_model"])
            density, gamma, n = _value(prm.get("density", 1.0), name), _value(prm.get("gamma", 0.01), name), d.numel()
            if density >= 1:
                mask = torch.ones(d.shape, dtype=torch.bool)
            else:
                if method == "ties":
                    ks, mask = [int(density * n)], ref.magnitude_mask(d, density)
                else:
                    top = min(int(gamma * n), n - int(density * n))
                    ks, mask = [int(density * n) + top, top], ref.magnitude_outliers_mask(d, density, gamma)
                for k in ks:
                    assert not th.topk_ambiguous(d.abs(), k, dist).any(), f"{name}: |d| near the cut at {k}"
                    cuts += 1
            kept.append((_value(prm.get("weight", 1.0), name) * d * mask).float())
        assert not th.sign_ambiguous(kept).any(), f"{name}: an elected sign within rounding of 0"
    assert cuts > 0
