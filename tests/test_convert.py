"""`lazymerge convert-config`: simple hand-written configs -> lazymerge recipes (lazymerge/convert.py).

The conversion is checked as data (the recipe dicts and YAML text), through the click command (JSON and YAML
input, -o, one-line errors), and end to end: a converted recipe merges to the same bytes as the recipe written by
hand, and a sequential config to the chained weighted averages.
"""
from __future__ import annotations

import json

import pytest
import torch
import yaml
from click.testing import CliRunner

from conftest import read_all, read_all_f32
from lazymerge.cli import convert_config_cmd
from lazymerge.convert import convert_config, dump
from lazymerge.errors import RecipeError


def conv(data: dict) -> list[dict]:
    return convert_config(data, "cfg.yaml")


# ----------------------------------------------------------------------------------------------------------------
# conversions as data
# ----------------------------------------------------------------------------------------------------------------
def test_weighted():
    (r,) = conv({"strategy": "weighted", "models": [{"path": "a", "weight": 0.7}, {"path": "b", "weight": 0.3}],
                 "dtype": "bfloat16"})
    assert r == {"merge_method": "linear", "models": [{"model": "a", "parameters": {"weight": 0.7}},
                                                      {"model": "b", "parameters": {"weight": 0.3}}],
                 "dtype": "bfloat16"}


def test_weighted_defaults_and_normalize():
    (r,) = conv({"strategy": "weighted", "models": ["a", {"model": "b"}], "normalize": False})
    assert r["models"] == [{"model": "a", "parameters": {"weight": 1.0}}, {"model": "b", "parameters": {"weight": 1.0}}]
    assert r["parameters"] == {"normalize": False}


def test_task_arithmetic_add_and_subtract():
    (r,) = conv({"strategy": "task_arithmetic", "base": "base", "lambda": 0.8, "out_dtype": "float32",
                 "models": [{"path": "math", "weight": 1.0}, {"path": "toxic", "weight": 0.5, "op": "subtract"},
                            {"path": "other", "weight": -0.25, "op": "add"}, "plain"]})
    assert r["merge_method"] == "task_arithmetic" and r["base_model"] == "base"
    assert [m["parameters"]["weight"] for m in r["models"]] == [1.0, -0.5, -0.25, 1.0]
    assert r["parameters"] == {"lambda": 0.8} and r["out_dtype"] == "float32"


@pytest.mark.parametrize("cfg, t", [
    ({"base": "a", "models": ["b"], "t": 0.3}, 0.3),
    ({"base": "a", "models": ["a", {"path": "b", "weight": 0.25}]}, 0.25),
    ({"models": ["a", "b"]}, 0.5),
    ({"models": [{"path": "a", "weight": 3}, {"path": "b", "weight": 1}]}, 0.25),
    ({"base": "a", "models": [{"path": "a", "weight": 1}, {"path": "b", "weight": 3}]}, 0.75),
])
def test_slerp(cfg, t):
    (r,) = conv({"strategy": "slerp", **cfg})
    assert r == {"merge_method": "slerp", "base_model": "a", "models": [{"model": "a"}, {"model": "b"}],
                 "parameters": {"t": t}}


def test_sequential_linear():
    rs = conv({"strategy": "sequential", "dtype": "bfloat16",
               "models": ["a", {"path": "b", "weight": 0.25}, "c", {"path": "d", "weight": 0.1}]})
    assert [r.get("name") for r in rs] == ["stage-1", "stage-2", None]
    assert rs[0]["models"] == [{"model": "a", "parameters": {"weight": 0.75}},
                               {"model": "b", "parameters": {"weight": 0.25}}]
    assert rs[1]["models"] == [{"model": "stage-1", "parameters": {"weight": 0.5}},
                               {"model": "c", "parameters": {"weight": 0.5}}]
    assert rs[2]["models"][0]["model"] == "stage-2"
    assert rs[2]["models"][1] == {"model": "d", "parameters": {"weight": 0.1}}
    assert all(r["merge_method"] == "linear" and r["dtype"] == "bfloat16" for r in rs)


def test_sequential_first_weight_pairs_with_second():
    rs = conv({"strategy": "sequential", "models": [{"path": "a", "weight": 2}, {"path": "b", "weight": 0.5}]})
    assert len(rs) == 1 and "name" not in rs[0]
    assert [m["parameters"]["weight"] for m in rs[0]["models"]] == [2.0, 0.5]


def test_sequential_slerp():
    rs = conv({"strategy": "sequential", "method": "slerp", "models": ["a", {"path": "b", "weight": 0.2}, "c"]})
    assert rs[0] == {"name": "stage-1", "merge_method": "slerp", "base_model": "a",
                     "models": [{"model": "a"}, {"model": "b"}], "parameters": {"t": 0.2}}
    assert rs[1]["base_model"] == "stage-1" and rs[1]["parameters"] == {"t": 0.5}


def test_dump_round_trips():
    single = conv({"strategy": "weighted", "models": ["a", "b"]})
    assert "---" not in dump(single)
    assert yaml.safe_load(dump(single)) == single[0]
    multi = conv({"strategy": "sequential", "models": ["a", "b", "c"]})
    text = dump(multi)
    assert text.count("\n---") == 1
    assert list(yaml.safe_load_all(text)) == multi
    assert text.index("name: stage-1") < text.index("merge_method")          # name first, as written by hand


# ----------------------------------------------------------------------------------------------------------------
# errors: one line, naming the key, closest match
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cfg, pattern", [
    ([1, 2], r"cfg.yaml: a config must be a mapping"),
    ({"models": ["a"]}, r"cfg.yaml: strategy: missing; one of weighted, task_arithmetic, slerp, sequential"),
    ({"strategy": "wieghted", "models": ["a"]}, r"strategy: unknown strategy 'wieghted' \(did you mean 'weighted'\?\)"),
    ({"strategy": "ties", "models": ["a"]}, r"strategy: unknown strategy 'ties'; one of"),
    ({"strategy": "weighted", "models": ["a"], "nromalize": True}, r"unknown key 'nromalize' \(did you mean 'normalize'\?\)"),
    ({"strategy": "weighted", "models": ["a"], "base": "b"}, r"cfg.yaml: base: not used by strategy 'weighted'"),
    ({"strategy": "weighted", "models": ["a"], "t": 0.5}, r"t: not used by strategy 'weighted' \(only by slerp\)"),
    ({"strategy": "weighted", "models": []}, r"models: must be a non-empty list"),
    ({"strategy": "weighted"}, r"models: must be a non-empty list"),
    ({"strategy": "weighted", "models": [{"path": "a", "wieght": 1}]}, r"models\[0\]: unknown key 'wieght' \(did you mean 'weight'\?\)"),
    ({"strategy": "weighted", "models": [{"weight": 1}]}, r"models\[0\].path: missing"),
    ({"strategy": "weighted", "models": [{"path": "a", "weight": "high"}]}, r"models\[0\].weight: must be a number"),
    ({"strategy": "weighted", "models": [{"path": "a", "weight": 1}, {"path": "b", "weight": -1}]}, r"weights sum to 0"),
    ({"strategy": "weighted", "models": [{"path": "a", "op": "subtract"}]}, r"models\[0\].op: only strategy task_arithmetic"),
    ({"strategy": "weighted", "models": ["a"], "dtype": "bf61"}, r"dtype: unknown dtype 'bf61'"),
    ({"strategy": "task_arithmetic", "models": ["a"]}, r"cfg.yaml: base: missing; task_arithmetic"),
    ({"strategy": "task_arithmetic", "base": "b", "models": [{"path": "a", "op": "subtact"}]},
     r"models\[0\].op: must be add or subtract, not 'subtact' \(did you mean 'subtract'\?\)"),
    ({"strategy": "slerp", "models": ["a", "b", "c"]}, r"models: slerp interpolates between exactly two models"),
    ({"strategy": "slerp", "base": "a", "models": ["b", "c"]}, r"exactly one other model, got 2"),
    ({"strategy": "slerp", "models": ["a", "b"], "t": 1.5}, r"cfg.yaml: t: 1.5 must be in \[0, 1\]"),
    ({"strategy": "slerp", "models": ["a", {"path": "b", "weight": 0.2}], "t": 0.5}, r"models\[1\].weight: give slerp's 't'"),
    ({"strategy": "sequential", "models": ["a"]}, r"sequential merge needs at least two models"),
    ({"strategy": "sequential", "models": ["a", "b"], "method": "ties"}, r"method: must be linear or slerp"),
    ({"strategy": "sequential", "models": ["a", {"path": "b", "weight": 2}]}, r"models\[1\].weight: 2.0 must be in \[0, 1\]"),
])
def test_errors(cfg, pattern):
    with pytest.raises(RecipeError, match=pattern) as exc:
        conv(cfg)
    assert "\n" not in str(exc.value)


# ----------------------------------------------------------------------------------------------------------------
# the command
# ----------------------------------------------------------------------------------------------------------------
def test_command_json_to_file(tmp_path):
    cfg = tmp_path / "merge.json"
    cfg.write_text(json.dumps({"strategy": "weighted", "models": [{"path": "a", "weight": 0.5},
                                                                  {"path": "b", "weight": 0.5}]}))
    out = tmp_path / "recipe.yaml"
    res = CliRunner().invoke(convert_config_cmd, [str(cfg), "-o", str(out)])
    assert res.exit_code == 0, res.output
    text = out.read_text()
    assert text.startswith("# converted from merge.json")
    assert yaml.safe_load(text)["merge_method"] == "linear"


def test_command_yaml_to_stdout(tmp_path):
    cfg = tmp_path / "merge.yaml"
    cfg.write_text("strategy: sequential\nmodels: [a, b, c]\n")
    res = CliRunner().invoke(convert_config_cmd, [str(cfg)])
    assert res.exit_code == 0, res.output
    docs = list(yaml.safe_load_all(res.output))
    assert [d.get("name") for d in docs] == ["stage-1", None]


@pytest.mark.parametrize("name, text, pattern", [
    ("bad.json", "{strategy: weighted", r"bad.json: JSON error"),
    ("bad.yaml", "strategy: [", r"bad.yaml: YAML error"),
    ("s.yaml", "strategy: wieghted\nmodels: [a]\n", r"did you mean 'weighted'"),
])
def test_command_errors(tmp_path, name, text, pattern):
    import re

    cfg = tmp_path / name
    cfg.write_text(text)
    res = CliRunner().invoke(convert_config_cmd, [str(cfg), "-o", str(tmp_path / "out.yaml")])
    assert res.exit_code == 2
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and re.search(pattern, lines[0]), res.output
    assert not (tmp_path / "out.yaml").exists()


def test_command_missing_input_and_self_overwrite(tmp_path):
    res = CliRunner().invoke(convert_config_cmd, [str(tmp_path / "nope.yaml")])
    assert res.exit_code == 2 and "nope.yaml: config file does not exist" in res.output
    cfg = tmp_path / "c.yaml"
    cfg.write_text("strategy: weighted\nmodels: [a]\n")
    res = CliRunner().invoke(convert_config_cmd, [str(cfg), "-o", str(cfg)])
    assert res.exit_code == 2 and "is the input config" in res.output
    assert cfg.read_text() == "strategy: weighted\nmodels: [a]\n"


# ----------------------------------------------------------------------------------------------------------------
# end to end: converted recipes merge like the hand-written ones
# ----------------------------------------------------------------------------------------------------------------
def _merge(recipe, out):
    import lazymerge

    lazymerge.merge(recipe, out, memory="unlimited")
    return read_all(out)


@pytest.mark.parametrize("cfg, by_hand", [
    ({"strategy": "weighted", "models": [{"path": "{ft1}", "weight": 0.7}, {"path": "{ft2}", "weight": 0.3}]},
     {"merge_method": "linear", "models": [{"model": "{ft1}", "parameters": {"weight": 0.7}},
                                           {"model": "{ft2}", "parameters": {"weight": 0.3}}]}),
    ({"strategy": "task_arithmetic", "base": "{base}", "lambda": 0.9,
      "models": [{"path": "{ft1}", "weight": 1.0}, {"path": "{ft2}", "weight": 0.5, "op": "subtract"}]},
     {"merge_method": "task_arithmetic", "base_model": "{base}", "parameters": {"lambda": 0.9},
      "models": [{"model": "{ft1}", "parameters": {"weight": 1.0}},
                 {"model": "{ft2}", "parameters": {"weight": -0.5}}]}),
    ({"strategy": "slerp", "base": "{base}", "models": ["{ft1}"], "t": 0.3},
     {"merge_method": "slerp", "base_model": "{base}", "models": [{"model": "{base}"}, {"model": "{ft1}"}],
      "parameters": {"t": 0.3}}),
], ids=["weighted", "task_arithmetic", "slerp"])
def test_converted_merges_like_by_hand(models_fp32, tmp_path, cfg, by_hand):
    paths = {k: str(v) for k, v in models_fp32.items()}

    def sub(obj):
        if isinstance(obj, str):
            return obj.format(**paths)
        if isinstance(obj, dict):
            return {k: sub(v) for k, v in obj.items()}
        if isinstance(obj, list):
            return [sub(v) for v in obj]
        return obj

    (recipe,) = convert_config(sub(cfg), "cfg.yaml")
    a = _merge(yaml.safe_load(dump([recipe])), tmp_path / "converted")
    b = _merge(sub(by_hand), tmp_path / "by_hand")
    assert set(a) == set(b)
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_sequential_end_to_end(models_fp32, tmp_path):
    """Needs multi-stage recipes in the planner: ((0.75 ft1 + 0.25 ft2) * 0.6 + 0.4 ft3)."""
    cfg = {"strategy": "sequential", "models": [str(models_fp32["ft1"]), {"path": str(models_fp32["ft2"]),
                                                                         "weight": 0.25},
                                               {"path": str(models_fp32["ft3"]), "weight": 0.4}]}
    text = dump(convert_config(cfg, "cfg.yaml"))
    out = _merge(text, tmp_path / "out")
    xs = [read_all_f32(models_fp32[n]) for n in ("ft1", "ft2", "ft3")]
    assert set(out) == set(xs[0])
    for name, y in out.items():
        want = (0.75 * xs[0][name] + 0.25 * xs[1][name]) * 0.6 + 0.4 * xs[2][name]
        torch.testing.assert_close(y.float(), want, rtol=0, atol=1e-6)
