"""The CUDA path: the same merges on a GPU agree with the CPU. Skipped where no GPU is present."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

import lazymerge
from conftest import read_all

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")


@pytest.mark.parametrize("method,params", [
    ("ties", {"density": 0.5}), ("dare_ties", {"density": 0.5}), ("task_arithmetic", {}),
])
def test_cuda_matches_cpu(models_fp32: dict[str, Path], tmp_path: Path, method: str, params: dict) -> None:
    recipe = {
        "merge_method": method, "base_model": str(models_fp32["base"]),
        "models": [{"model": str(models_fp32[n]), "parameters": {"weight": 0.5, **params}} for n in ("ft1", "ft2")],
        "dtype": "float32",
    }
    lazymerge.merge(recipe, tmp_path / "cpu", device="cpu", max_block_rows=7)
    lazymerge.merge(recipe, tmp_path / "gpu", device="cuda", max_block_rows=7)
    cpu, gpu = read_all(tmp_path / "cpu"), read_all(tmp_path / "gpu")
    assert cpu.keys() == gpu.keys()
    for name in cpu:
        assert (cpu[name] - gpu[name]).abs().max() <= 1e-6, name


def test_cuda_slerp_and_model_stock(models_fp32: dict[str, Path], tmp_path: Path) -> None:
    for i, recipe in enumerate([
        {"merge_method": "slerp", "base_model": str(models_fp32["base"]),
         "models": [{"model": str(models_fp32["base"])}, {"model": str(models_fp32["ft1"])}],
         "parameters": {"t": 0.3}},
        {"merge_method": "model_stock", "base_model": str(models_fp32["base"]),
         "models": [{"model": str(models_fp32[n])} for n in ("ft1", "ft2", "ft3")]},
    ]):
        lazymerge.merge(recipe, tmp_path / f"cpu{i}", device="cpu")
        lazymerge.merge(recipe, tmp_path / f"gpu{i}", device="cuda")
        cpu, gpu = read_all(tmp_path / f"cpu{i}"), read_all(tmp_path / f"gpu{i}")
        for name in cpu:
            assert (cpu[name] - gpu[name]).abs().max() <= 1e-6, name

