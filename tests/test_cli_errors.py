"""Bad recipes and inputs end in one clear line, a non-zero exit, no traceback and no output directory.

Runs the real console entry point in a subprocess: what a user sees is what is tested.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import read_all, write_recipe


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lazymerge.cli", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=600)


def assert_clean_failure(proc: subprocess.CompletedProcess, *words: str) -> None:
    assert proc.returncode != 0, proc.stdout
    err = proc.stderr.strip()
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    for w in words:
        assert w in lines[0], (w, lines[0])


def ties(models: dict[str, Path], **ft1_params) -> dict:
    return {
        "merge_method": "ties",
        "base_model": str(models["base"]),
        "models": [
            {"model": str(models["ft1"]), "parameters": {"weight": 0.5, "density": 0.5, **ft1_params}},
            {"model": str(models["ft2"]), "parameters": {"weight": 0.5, "density": 0.5}},
        ],
    }


def clone_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def edit_tensor(model: Path, name: str, fn) -> None:
    """Rewrite the shard holding `name` with fn applied to its tensors dict."""
    for shard in sorted(model.glob("*.safetensors")):
        tensors = load_file(shard)
        if name in tensors:
            fn(tensors)
            save_file(tensors, shard, metadata={"format": "pt"})
            return
    raise AssertionError(name)


CASES = {
    "unknown_method": (lambda m, tmp: {**ties(m), "merge_method": "tiez"}, ["merge_method", "tiez", "ties"]),
    "missing_model_dir": (lambda m, tmp: {**ties(m), "base_model": str(tmp / "nope")}, ["nope", "does not exist"]),
    "density_above_one": (lambda m, tmp: ties(m, density=1.5), ["density", "1.5"]),
    "density_zero": (lambda m, tmp: ties(m, density=0.0), ["density"]),
    "density_not_number": (lambda m, tmp: ties(m, density="half"), ["density", "half"]),
    "unknown_parameter": (lambda m, tmp: ties(m, desnity=0.5), ["desnity", "density"]),
    "unknown_top_key": (lambda m, tmp: {**ties(m), "paramters": {}}, ["paramters", "parameters"]),
    "missing_weight": (lambda m, tmp: {**ties(m), "models": [{"model": str(m["ft1"])}]}, ["weight"]),
    # a key no method knows stays a typo, even next to a method that ignores other methods' keys
    "unknown_parameter_model_stock": (lambda m, tmp: stock(m, desnity=0.5), ["models[0].parameters", "'desnity'",
                                                                           "did you mean 'density'"]),
    # mergekit's gradient-slerp example writes `pattern:`, which mergekit reads as "no filter"
    "filter_spelled_pattern": (lambda m, tmp: {**ties(m), "parameters": {"normalize": [
        {"pattern": "self_attn", "value": True}, {"value": False}]}},
        ["parameters.normalize", "write 'filter:' instead of 'pattern:'"]),
    # every point of a gradient is in range, even one that falls between the model's two layers
    "gradient_point_out_of_range": (lambda m, tmp: ties(m, density=[0.5, -0.5, 1.0]),
                                    ["models[0].parameters.density[1]", "-0.5", "must be in (0, 1]"]),
    "gradient_in_filter_out_of_range": (lambda m, tmp: ties(m, density=[{"filter": "mlp", "value": [0.5, 1.5]}]),
                                        ["models[0].parameters.density[0].value[1]", "1.5"]),
}


def stock(models: dict[str, Path], **ft1_params) -> dict:
    return {"merge_method": "model_stock", "base_model": str(models["base"]), "dtype": "float32", "models": [
        {"model": str(models["ft1"]), "parameters": ft1_params},
        {"model": str(models["ft2"]), "parameters": {"weight": 0.5}}]}


def test_parameter_of_another_method_warns_once_and_has_no_effect(models_fp32: dict[str, Path],
                                                                  tmp_path: Path) -> None:
    """Published model_stock recipes carry a per-model `weight`: mergekit ignores it, so do we, with one warning
    line (on `plan` and in the run's report), and the output is the one without it."""
    with_weight = write_recipe(tmp_path, stock(models_fp32, weight=0.5), "with.yaml")
    proc = run_cli("plan", str(with_weight))
    assert proc.returncode == 0, proc.stderr
    lines = [ln for ln in proc.stdout.splitlines() if "has no effect" in ln]
    assert len(lines) == 1, proc.stdout
    assert "'weight' has no effect for model_stock" in lines[0] and "models[0].parameters" in lines[0], lines[0]
    proc = run_cli("run", str(with_weight), str(tmp_path / "a"), "-q")
    assert proc.returncode == 0, proc.stderr
    assert sum("'weight' has no effect for model_stock" in ln for ln in proc.stdout.splitlines()) == 1, proc.stdout
    without = stock(models_fp32)
    del without["models"][1]["parameters"]
    proc = run_cli("run", str(write_recipe(tmp_path, without, "without.yaml")), str(tmp_path / "b"), "-q")
    assert proc.returncode == 0, proc.stderr
    assert "has no effect" not in proc.stdout
    a, b = read_all(tmp_path / "a"), read_all(tmp_path / "b")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_recipe(case: str, models_fp32: dict[str, Path], tmp_path: Path) -> None:
    make, words = CASES[case]
    recipe = write_recipe(tmp_path, make(models_fp32, tmp_path))
    out = tmp_path / "out"
    proc = run_cli("run", str(recipe), str(out), "-q")
    assert_clean_failure(proc, *words)
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_yaml_syntax_error(tmp_path: Path) -> None:
    recipe = tmp_path / "broken.yaml"
    recipe.write_text("merge_method: ties\nmodels:\n  - model: [unclosed\n")
    proc = run_cli("run", str(recipe), str(tmp_path / "out"), "-q")
    assert_clean_failure(proc, "broken.yaml", "line")
    assert not (tmp_path / "out").exists()


def test_missing_tensor(models_fp32: dict[str, Path], tmp_path: Path) -> None:
    ft = clone_model(models_fp32["ft2"], tmp_path / "ft2-missing")
    name = "model.layers.1.mlp.up_proj.weight"
    edit_tensor(ft, name, lambda t: t.pop(name))
    index = ft / "model.safetensors.index.json"
    import json

    data = json.loads(index.read_text())
    data["weight_map"].pop(name)
    index.write_text(json.dumps(data))
    recipe = ties(models_fp32)
    recipe["models"][1]["model"] = str(ft)
    proc = run_cli("run", str(write_recipe(tmp_path, recipe)), str(tmp_path / "out"), "-q")
    assert_clean_failure(proc, name, "ft2-missing", "missing")
    assert not (tmp_path / "out").exists()


def test_shape_mismatch(models_fp32: dict[str, Path], tmp_path: Path) -> None:
    ft = clone_model(models_fp32["ft1"], tmp_path / "ft1-shape")
    name = "model.layers.0.self_attn.q_proj.weight"

    def widen(t: dict) -> None:
        t[name] = torch.zeros(t[name].shape[0], t[name].shape[1] + 1, dtype=t[name].dtype)

    edit_tensor(ft, name, widen)
    recipe = ties(models_fp32)
    recipe["models"][0]["model"] = str(ft)
    proc = run_cli("run", str(write_recipe(tmp_path, recipe)), str(tmp_path / "out"), "-q")
    assert_clean_failure(proc, name, "shape")
    assert not (tmp_path / "out").exists()


def test_plan_reports_without_running(models_fp32: dict[str, Path], tmp_path: Path) -> None:
    proc = run_cli("plan", str(write_recipe(tmp_path, ties(models_fp32))), "--memory", "1MiB")
    assert proc.returncode == 0, proc.stderr
    for word in ("tasks", "read", "write", "est. peak", "budget"):
        assert word in proc.stdout


def test_existing_output_refused(models_fp32: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    proc = run_cli("run", str(write_recipe(tmp_path, ties(models_fp32))), str(out), "-q")
    assert_clean_failure(proc, "out", "--overwrite")
    assert (out / "keep.txt").read_text() == "mine"
