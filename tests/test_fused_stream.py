"""The one-pass kernels over stored bytes (engine/fused_stream.py, engine/lazy.py, engine/fused_rng.py) against
the torch path they replace: torch.equal, bit for bit.

Kernel by kernel where the reference is a torch function (the random stream, the Gram partials), and merge by
merge for the chains (every method that has a fused form, whole and in small row blocks, with the fused path
forced on every block against LAZYMERGE_FUSED=0)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import lazymerge
from lazymerge.engine import fused, fused_rng, lazy
from lazymerge.engine import kernels as K

pytestmark = pytest.mark.skipif(not fused.available(), reason="numba not installed")


@pytest.mark.parametrize("shape,rows", [((3000, 700), (0, 3000)), ((3000, 700), (1, 2999)),
                                        ((3000, 700), (1497, 1498)), ((3000, 700), (1400, 2995)),
                                        ((5000,), (0, 1)), ((2, 2 ** 21 + 5), (1, 2))])
def test_stream_is_torch_rand(shape, rows) -> None:
    """MT19937 in numba, seeded and skipped per row group, draws exactly `kernels.uniform_rows`."""
    parts = (7, "model.layers.0.mlp.up_proj.weight", 1)
    ref = K.uniform_rows(K.derive_seed(*parts), shape, rows).reshape(-1)
    seeds, group_numel, skip = fused_rng.block_stream(parts, shape, rows)
    got = np.empty(ref.numel(), np.float32)
    fused_rng.rows_uniform(fused_rng.new_stream(), seeds, 0, group_numel, skip, got, got.size)
    assert torch.equal(torch.from_numpy(got), ref)


def _stored(seed: int, shape, scale: float = 0.02, base: torch.Tensor | None = None) -> lazy.Stored:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * scale
    if base is not None:
        x = base.float() + x
    x = x.to(torch.bfloat16)
    x.view(-1)[:40] = x.view(-1)[40:80]          # exact ties and zero deltas between models
    return lazy.Stored(x)


@pytest.mark.parametrize("shape", [(37, 129), (4099,)])
def test_gram_products_are_the_reference_partials(shape) -> None:
    b = _stored(0, shape, 1.0)
    xs = [_stored(i, shape, 0.01, b.raw) for i in (1, 2)]
    tvs = [lazy.TaskVector(x, b) for x in xs]
    assert torch.equal(lazy.row_gram([b, xs[0]]), K.row_gram([b.f32(), xs[0].f32()]))
    assert torch.equal(lazy.row_gram(tvs), K.row_gram([x.f32() - b.f32() for x in xs]))


def test_pending_with_a_nan_is_converted_by_torch() -> None:
    xs = [_stored(i, (64, 300)) for i in range(2)]
    xs[1].raw.view(-1)[5] = float("nan")
    p = lazy.weighted_sum(xs, (1.0, 2.0), True)
    ref = K.weighted_sum([x.f32() for x in xs], (1.0, 2.0)).div_(3.0)
    assert torch.equal(p.compute(torch.float32).view(torch.int32), ref.view(torch.int32))
    assert torch.equal(p.compute(torch.bfloat16).view(torch.int16), ref.to(torch.bfloat16).view(torch.int16))


def _recipes(base: Path, tunes: list[Path]) -> dict[str, dict]:
    b, t = str(base), [str(x) for x in tunes]
    fam = lambda method, **p: {"merge_method": method, "base_model": b, "dtype": "bfloat16",  # noqa: E731
                               "models": [{"model": m, "parameters": dict(p, weight=w)}
                                          for m, w in zip(t, (0.6, 0.45))]}
    out = {
        "linear": {"merge_method": "linear", "dtype": "bfloat16",
                   "models": [{"model": m, "parameters": {"weight": w}} for m, w in zip([b, *t], (1.0, 0.7, 0.3))]},
        "task_arithmetic": dict(fam("task_arithmetic"), parameters={"lambda": 0.8}),
        "task_arithmetic_normalize": dict(fam("task_arithmetic"), parameters={"normalize": True}),
        "ties": fam("ties", density=0.5),
        "ties_count_lambda": dict(fam("ties", density=0.3), parameters={"consensus": "count", "lambda": 1.3}),
        "ties_rescale_norm": dict(fam("ties", density=0.4), parameters={"rescale_norm": "l2"}),
        "dare_ties": fam("dare_ties", density=0.5),
        "dare_linear": fam("dare_linear", density=0.7),
        "dare_ties_norescale": dict(fam("dare_ties", density=0.6), parameters={"rescale": False}),
        "della": fam("della", density=0.5, epsilon=0.1),
        "della_linear": fam("della_linear", density=0.6, epsilon=0.2),
        "breadcrumbs_ties": fam("breadcrumbs_ties", density=0.8, gamma=0.05),
        "breadcrumbs": fam("breadcrumbs", density=0.9, gamma=0.01),
        "slerp": {"merge_method": "slerp", "base_model": b, "dtype": "bfloat16",
                  "models": [{"model": b}, {"model": t[0]}], "parameters": {"t": 0.3}},
        "model_stock": {"merge_method": "model_stock", "base_model": b, "dtype": "bfloat16",
                        "models": [{"model": m} for m in t]},
        "model_stock_filter_wise": {"merge_method": "model_stock", "base_model": b, "dtype": "bfloat16",
                                    "models": [{"model": m} for m in t], "parameters": {"filter_wise": True}},
        "nuslerp_base": {"merge_method": "nuslerp", "base_model": b, "dtype": "bfloat16",
                         "models": [{"model": m, "parameters": {"weight": w}} for m, w in zip(t, (0.3, 0.7))]},
        "multislerp": {"merge_method": "multislerp", "dtype": "bfloat16",
                       "models": [{"model": m, "parameters": {"weight": 1.0}} for m in [b, *t]]},
        "karcher": {"merge_method": "karcher", "dtype": "bfloat16", "models": [{"model": m} for m in [b, *t]]},
        "sce": {"merge_method": "sce", "base_model": b, "dtype": "bfloat16", "models": [{"model": m} for m in t],
                "parameters": {"select_topk": 0.5}},
        "ties_float32_out": dict(fam("ties", density=0.5), dtype="float32"),
    }
    return out


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from lazymerge.synth import make_demo
    return make_demo(tmp_path_factory.mktemp("fused-stream"), "tiny")


def _merge(rec: dict, out: Path, rows: int | None) -> dict[str, torch.Tensor]:
    lazymerge.merge(rec, out, seed=3, overwrite=True, max_block_rows=rows)
    tensors: dict[str, torch.Tensor] = {}
    for f in sorted(out.glob("*.safetensors")):
        tensors.update(load_file(str(f)))
    return tensors


@pytest.mark.parametrize("name", list(_recipes(Path("b"), [Path("x"), Path("y")])))
def test_fused_merge_equals_torch_merge(name, models, tmp_path, monkeypatch) -> None:
    """Every block through the fused chain (MIN_NUMEL=1), whole tensors and 48-row blocks, against the torch
    kernels (LAZYMERGE_FUSED=0): the same bytes."""
    base, tunes = models
    rec = _recipes(base, tunes)[name]
    for rows in (None, 48):
        monkeypatch.setattr(fused, "MIN_NUMEL", 1)
        monkeypatch.delenv("LAZYMERGE_FUSED", raising=False)
        got = _merge(rec, tmp_path / "fused", rows)
        monkeypatch.setenv("LAZYMERGE_FUSED", "0")
        ref = _merge(rec, tmp_path / "torch", rows)
        assert got.keys() == ref.keys()
        for k in ref:
            assert torch.equal(got[k].view(torch.uint8), ref[k].view(torch.uint8)), (name, rows, k)
