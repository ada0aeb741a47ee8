"""The `fisher` method against the element-wise formula y = sum_i w_i F_i x_i / sum_i w_i F_i."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

import lazymerge
from conftest import read_all, write_checkpoint


def fisher_set(models: dict[str, Path], tmp_path: Path, equal: bool) -> dict[str, Path]:
    shapes = {k: v.shape for k, v in read_all(models["ft1"]).items()}
    out = {}
    for i, name in enumerate(("ft1", "ft2")):
        g = torch.Generator().manual_seed(7 if equal else 7 + i)
        fs = {k: torch.rand(s, generator=g) for k, s in shapes.items()}
        # a region where no model has any importance: the formula falls back to the plain mean there
        first = "model.layers.0.self_attn.q_proj.weight"
        fs[first][:3] = 0.0
        out[name] = write_checkpoint(tmp_path / f"fisher-{name}", fs, dtype=torch.float32, tag=f"fisher-{name}")
    return out


@pytest.mark.parametrize("equal", [False, True])
def test_fisher_matches_formula(models_fp32: dict[str, Path], tmp_path: Path, equal: bool) -> None:
    fisher = fisher_set(models_fp32, tmp_path, equal)
    w = [0.7, 0.3]
    recipe = {
        "merge_method": "fisher",
        "models": [{"model": str(models_fp32[n]), "parameters": {"fisher": str(fisher[n]), "weight": wi}}
                   for n, wi in zip(("ft1", "ft2"), w)],
        "dtype": "float32",
    }
    lazymerge.merge(recipe, tmp_path / "out", memory="unlimited")
    got = read_all(tmp_path / "out")
    xs = [read_all(models_fp32[n]) for n in ("ft1", "ft2")]
    fs = [read_all(fisher[n]) for n in ("ft1", "ft2")]
    for name, y in got.items():
        num = w[0] * fs[0][name] * xs[0][name] + w[1] * fs[1][name] * xs[1][name]
        den = w[0] * fs[0][name] + w[1] * fs[1][name]
        mean = (w[0] * xs[0][name] + w[1] * xs[1][name]) / (w[0] + w[1])
        ref = torch.where(den == 0, mean, num / torch.where(den == 0, torch.ones_like(den), den))
        assert (y - ref).abs().max() <= 1e-6, name
        if equal:
            # equal importance everywhere: the plain weighted average
            assert (y - mean).abs().max() <= 1e-6, name


def test_fisher_needs_a_matrix_per_model(models_fp32: dict[str, Path], tmp_path: Path) -> None:
    recipe = {"merge_method": "fisher", "models": [{"model": str(models_fp32["ft1"])}]}
    with pytest.raises(lazymerge.RecipeError, match="fisher"):
        lazymerge.plan(recipe)
