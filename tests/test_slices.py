"""`slices:` recipes as mergekit plans them, checked against plain torch on whole tensors.

- output layers are renumbered consecutively; layer k of a slice reads layer a + k of each source;
- a slice with several sources is merged with the recipe's method over those layers;
- gradients span each slice's own layers (t = k / (n - 1), 1 for a one-layer slice);
- parameters resolve source-in-slice > slice > model > global, filters per tensor;
- embeddings merge over the first slice's sources, final norm / lm_head over the last slice's, both at t = 0.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import reference as ref
from conftest import read_all, read_all_f32
from test_architectures import make_family

PREFIX = "model.layers."


def _lm():
    import lazymerge

    return lazymerge


def merge(recipe: dict, out: Path, **kw) -> dict[str, torch.Tensor]:
    _lm().merge(recipe, out, **kw)
    return read_all(out)


def files_bytes(out: Path) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in sorted(out.glob("*.safetensors"))}


@pytest.fixture(scope="module")
def fam(tmp_path_factory) -> dict[str, str]:
    """A 6-layer tiny Llama family: base, ft1, ft2."""
    return {k: str(v) for k, v in make_family(tmp_path_factory.mktemp("fam6"), "llama", layers=6).items()}


def _layer(name: str) -> tuple[int, str] | None:
    if not name.startswith(PREFIX):
        return None
    k, rest = name[len(PREFIX):].split(".", 1)
    return int(k), rest


def interp(values: list[float], pos: float) -> float:
    """A gradient's value at relative position pos in [0, 1] (numpy, independent of lazymerge's code)."""
    return float(np.interp(pos, np.linspace(0.0, 1.0, len(values)), values))


# ----------------------------------------------------------------------------------------------------------------
def test_full_range_slice_equals_models_form(fam, tmp_path: Path) -> None:
    models = [{"model": fam["ft1"], "parameters": {"weight": 0.6, "density": 0.5}},
              {"model": fam["ft2"], "parameters": {"weight": 0.5, "density": 0.4}}]
    for method in ("ties", "dare_ties"):
        plain = {"merge_method": method, "base_model": fam["base"], "models": models, "dtype": "float32"}
        sliced = {"merge_method": method, "base_model": fam["base"], "dtype": "float32", "slices": [{"sources": [
            {"model": fam["base"], "layer_range": [0, 6]},
            *({"model": m["model"], "layer_range": [0, 6], "parameters": m["parameters"]} for m in models)]}]}
        _lm().merge(plain, tmp_path / f"{method}-a", seed=3)
        _lm().merge(sliced, tmp_path / f"{method}-b", seed=3)
        assert files_bytes(tmp_path / f"{method}-a") == files_bytes(tmp_path / f"{method}-b"), method


def test_partial_slice_is_those_layers_of_the_full_merge(fam, tmp_path: Path) -> None:
    full = merge({"merge_method": "ties", "base_model": fam["base"], "dtype": "float32",
                  "models": [{"model": fam["ft1"], "parameters": {"weight": 0.7, "density": 0.5}},
                             {"model": fam["ft2"], "parameters": {"weight": 0.3, "density": 0.5}}]}, tmp_path / "a")
    part = merge({"merge_method": "ties", "base_model": fam["base"], "dtype": "float32", "slices": [{
        "sources": [{"model": fam["base"], "layer_range": [2, 5]},
                    {"model": fam["ft1"], "layer_range": [2, 5], "parameters": {"weight": 0.7, "density": 0.5}},
                    {"model": fam["ft2"], "layer_range": [2, 5], "parameters": {"weight": 0.3, "density": 0.5}}]}]},
                 tmp_path / "b")
    for name, y in part.items():
        lk = _layer(name)
        src = f"{PREFIX}{lk[0] + 2}.{lk[1]}" if lk else name
        assert torch.equal(y, full[src]), name
    assert sum(1 for n in part if _layer(n)) == 3 * 9
    assert json.loads((tmp_path / "b" / "config.json").read_text())["num_hidden_layers"] == 3


def test_slerp_filter_gradients_per_slice(fam, tmp_path: Path) -> None:
    """The common mergekit recipe (slerp with self_attn / mlp gradients), split into two slices; the second
    slice overrides `t` for mlp only, so its other tensors fall back to the global filter list."""
    attn, mlp, other = [0, 0.5, 0.3, 0.7, 1], [1, 0.5, 0.7, 0.3, 0], 0.5
    slice2_mlp = [0.2, 0.8]
    recipe = {"merge_method": "slerp", "base_model": fam["base"], "dtype": "float32",
              "parameters": {"t": [{"filter": "self_attn", "value": attn}, {"filter": "mlp", "value": mlp},
                                   {"value": other}]},
              "slices": [
                  {"sources": [{"model": fam["base"], "layer_range": [0, 4]},
                               {"model": fam["ft1"], "layer_range": [0, 4]}]},
                  {"sources": [{"model": fam["base"], "layer_range": [4, 6]},
                               {"model": fam["ft1"], "layer_range": [4, 6]}],
                   "parameters": {"t": [{"filter": "mlp", "value": slice2_mlp}]}}]}
    out = merge(recipe, tmp_path / "out", max_block_rows=5)
    base, ft1 = read_all_f32(fam["base"]), read_all_f32(fam["ft1"])

    def t_of(name: str) -> float:
        lk = _layer(name)
        if lk is None:              # non-layer tensors at 0: embeddings from the first slice, norm / head the last
            pos, second = (0.0, name in ("model.norm.weight", "lm_head.weight"))
        elif lk[0] < 4:
            pos, second = lk[0] / 3, False
        else:
            pos, second = (lk[0] - 4) / 1, True
        if second and "mlp" in name:
            return interp(slice2_mlp, pos)
        if "self_attn" in name:
            return interp(attn, pos)
        if "mlp" in name:
            return interp(mlp, pos)
        return other

    assert set(out) == set(base)
    for name in base:
        want = ref.slerp(base[name], ft1[name], t_of(name))
        torch.testing.assert_close(out[name], want, rtol=0, atol=1e-6, msg=name)


def test_parameter_precedence_source_slice_model_global(fam, tmp_path: Path) -> None:
    recipe = {
        "merge_method": "linear", "dtype": "float32",
        "parameters": {"weight": 0.1, "normalize": False},
        "models": [{"model": fam["ft2"], "parameters": {"weight": 0.4}}],     # per-model defaults (extension)
        "slices": [
            {"sources": [{"model": fam["ft1"], "layer_range": [0, 2], "parameters": {"weight": 0.7}},
                         {"model": fam["ft2"], "layer_range": [0, 2]}],
             "parameters": {"weight": 0.2}},
            {"sources": [{"model": fam["ft1"], "layer_range": [2, 5]},
                         {"model": fam["ft2"], "layer_range": [2, 5]}],
             "parameters": {"weight": [{"filter": "mlp", "value": [0.0, 1.0]}]}},
            {"sources": [{"model": fam["ft1"], "layer_range": [5, 6], "parameters": {"weight": [0.3, 0.9]}},
                         {"model": fam["ft2"], "layer_range": [5, 6]}]}]}
    out = merge(recipe, tmp_path / "out")
    x1, x2 = read_all_f32(fam["ft1"]), read_all_f32(fam["ft2"])

    def weights(name: str) -> tuple[float, float]:
        lk = _layer(name)
        if lk is None:      # embeddings: the first slice; norm / head: the last slice; both at t = 0
            return (interp([0.3, 0.9], 0.0), 0.4) if name in ("model.norm.weight", "lm_head.weight") else (0.7, 0.2)
        k = lk[0]
        if k < 2:                                       # slice 0: source > slice
            return 0.7, 0.2
        if k < 5:                                       # slice 1: a slice filter list (mlp only), at (k-2)/2
            if "mlp" in name:
                w = interp([0.0, 1.0], (k - 2) / 2)
                return w, w
            return 0.1, 0.4                             # no match: ft1 -> global, ft2 -> its models entry
        return interp([0.3, 0.9], 1.0), 0.4             # slice 2, one layer (t = 1): source gradient / model

    assert set(out) == set(x1)
    for name, y in out.items():
        w1, w2 = weights(name)
        want = ref.linear([x1[name], x2[name]], [w1, w2], normalize=False)
        torch.testing.assert_close(y, want, rtol=0, atol=1e-7, msg=name)


def test_frankenmerge_loads_in_transformers(models_fp32, tmp_path: Path) -> None:
    """Stacked layers from two models (a 2-layer model becomes 3 layers) load as a Llama with our tensors."""
    transformers = pytest.importorskip("transformers")
    m = {k: str(v) for k, v in models_fp32.items()}
    recipe = {"merge_method": "passthrough", "dtype": "float32", "slices": [
        {"sources": [{"model": m["ft1"], "layer_range": [0, 2]}]},
        {"sources": [{"model": m["ft2"], "layer_range": [1, 2], "parameters": {"scale": 0.5}}]}]}
    out = merge(recipe, tmp_path / "out")
    a, b = read_all(m["ft1"]), read_all(m["ft2"])
    for rest in ("mlp.up_proj.weight", "self_attn.q_proj.weight", "input_layernorm.weight"):
        assert torch.equal(out[f"{PREFIX}0.{rest}"], a[f"{PREFIX}0.{rest}"])
        assert torch.equal(out[f"{PREFIX}1.{rest}"], a[f"{PREFIX}1.{rest}"])
        assert torch.equal(out[f"{PREFIX}2.{rest}"], b[f"{PREFIX}1.{rest}"] * 0.5)
    assert torch.equal(out["model.embed_tokens.weight"], a["model.embed_tokens.weight"])
    # the embeddings from the first slice's source, the head (scale at t = 0) from the last slice's, as mergekit
    assert torch.equal(out["lm_head.weight"], b["lm_head.weight"] * 0.5)
    assert torch.equal(out["model.norm.weight"], b["model.norm.weight"] * 0.5)
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert model.config.num_hidden_layers == 3
    sd = model.state_dict()
    for name, t in out.items():
        assert torch.equal(sd[name], t), name


def test_slice_base_model_at_slice_level(fam, tmp_path: Path) -> None:
    """`base_model` inside a slice (newer mergekit) is that slice's base."""
    recipe = {"merge_method": "task_arithmetic", "dtype": "float32", "slices": [
        {"base_model": fam["base"],
         "sources": [{"model": fam["base"], "layer_range": [0, 6]},
                     {"model": fam["ft1"], "layer_range": [0, 6], "parameters": {"weight": 0.5}}]}]}
    out = merge(recipe, tmp_path / "out")
    b, x = read_all_f32(fam["base"]), read_all_f32(fam["ft1"])
    for name, y in out.items():
        torch.testing.assert_close(y, ref.task_arithmetic(b[name], [x[name]], [0.5]), rtol=0, atol=1e-7)


@pytest.mark.parametrize("case,match", [
    ("past_end", r"slices\[1\]\.sources\[0\]\.layer_range: \[4, 7\] goes past"),
    ("unequal", r"slices\[0\]\.sources: every source of a slice must span the same number of layers"),
    ("no_base_in_slice", r"slices\[0\]\.sources: ties merges against the base model"),
    ("typo", r"slices\[0\]: unknown key 'source' \(did you mean 'sources'\?\)"),
    ("global_at_source", r"slices\[0\]\.sources\[1\]\.parameters: unknown key 't' for slerp \(a method-wide"),
    ("bad_range", r"slices\[0\]\.sources\[0\]\.layer_range: must be \[start, end\]"),
    ("unused_model", r"models\[0\]: this model is in no slice"),
])
def test_slice_errors(fam, case: str, match: str) -> None:
    s = lambda m, a, b, **kw: {"model": fam[m], "layer_range": [a, b], **kw}   # noqa: E731
    recipes = {
        "past_end": {"merge_method": "passthrough", "slices": [{"sources": [s("ft1", 0, 4)]},
                                                                {"sources": [s("ft2", 4, 7)]}]},
        "unequal": {"merge_method": "linear", "slices": [{"sources": [s("ft1", 0, 4), s("ft2", 0, 3)]}]},
        "no_base_in_slice": {"merge_method": "ties", "base_model": fam["base"],
                             "slices": [{"sources": [s("ft1", 0, 6, parameters={"weight": 1.0}),
                                                     s("ft2", 0, 6, parameters={"weight": 1.0})]}]},
        "typo": {"merge_method": "passthrough", "slices": [{"source": [s("ft1", 0, 4)]}]},
        "global_at_source": {"merge_method": "slerp", "base_model": fam["base"],
                             "slices": [{"sources": [s("base", 0, 6), s("ft1", 0, 6, parameters={"t": 0.5})]}]},
        "bad_range": {"merge_method": "passthrough", "slices": [{"sources": [s("ft1", 3, 3)]}]},
        "unused_model": {"merge_method": "linear", "models": [{"model": fam["base"]}],
                         "slices": [{"sources": [s("ft1", 0, 6, parameters={"weight": 1.0})]}]},
    }
    with pytest.raises(_lm().RecipeError, match=match):
        _lm().plan(recipes[case]).close()


def test_per_layer_config_lists_follow_the_slices(tmp_path: Path) -> None:
    """`layer_types` (Gemma 3 / Qwen 3: sliding or full attention per layer) is rebuilt for the output layers."""
    a = make_family(tmp_path / "a", "llama", layers=4, n_ft=0, seed=1)["base"]
    b = make_family(tmp_path / "b", "llama", layers=4, n_ft=0, seed=2)["base"]
    for path, kinds in ((a, ["s0", "f1", "s2", "f3"]), (b, ["B0", "B1", "B2", "B3"])):
        cfg = json.loads((path / "config.json").read_text())
        (path / "config.json").write_text(json.dumps({**cfg, "layer_types": kinds}))
    recipe = {"merge_method": "passthrough", "slices": [
        {"sources": [{"model": str(a), "layer_range": [0, 3]}]},
        {"sources": [{"model": str(b), "layer_range": [2, 4]}]}]}
    merge(recipe, tmp_path / "out")
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 5
    assert cfg["layer_types"] == ["s0", "f1", "s2", "B2", "B3"]
