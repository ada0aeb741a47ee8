"""Every merge method gives byte-identical output whatever the row blocking: small `max_block_rows` (several
blocks per tensor, blocks that do not divide the rows), a tiny memory budget, and unblocked. Also for slices and
multi-stage recipes, whose intermediates are recomputed block by block inside the later stage."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from conftest import read_all, write_checkpoint

BLOCKINGS = [{"max_block_rows": 7}, {"memory": "64KiB"}]


def _lm():
    import lazymerge

    return lazymerge


def files_bytes(out: Path) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in sorted(Path(out).glob("*.safetensors"))}


@pytest.fixture(scope="module")
def fisher(models_fp32, tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("fisher")
    out = {}
    for i, name in enumerate(("ft1", "ft2")):
        g = torch.Generator().manual_seed(11 + i)
        fs = {k: torch.rand(v.shape, generator=g) for k, v in read_all(models_fp32[name]).items()}
        out[name] = str(write_checkpoint(root / name, fs, dtype=torch.float32, tag=f"fisher-{name}"))
    return out


def recipes(m: dict[str, str], fisher: dict[str, str]) -> dict[str, dict]:
    fam = lambda method, extra=None, glob=None: {   # noqa: E731
        "merge_method": method, "base_model": m["base"], "dtype": "float32",
        "models": [{"model": m["ft1"], "parameters": {"weight": 0.6, "density": 0.5, **(extra or {})}},
                   {"model": m["ft2"], "parameters": {"weight": 0.5, "density": 0.7, **(extra or {})}},
                   {"model": m["ft3"], "parameters": {"weight": 0.4, "density": 0.4, **(extra or {})}}],
        "parameters": dict(glob or {})}
    three = [{"model": m[k], "parameters": {"weight": w}} for k, w in (("ft1", 0.5), ("ft2", 0.3), ("ft3", 0.2))]
    two = three[:2]
    return {
        "linear": {"merge_method": "linear", "models": three, "dtype": "float32"},
        "task_arithmetic": {**fam("ties"), "merge_method": "task_arithmetic", "parameters": {"lambda": 0.9},
                            "models": three},
        "ties": fam("ties"),
        "ties_rescale_norm_l2": fam("ties", glob={"rescale_norm": "l2"}),
        "ties_count": fam("ties", glob={"consensus": "count"}),
        "dare_ties": fam("dare_ties"),
        "dare_linear": fam("dare_linear", glob={"rescale_norm": "linf"}),
        "breadcrumbs": fam("breadcrumbs", {"gamma": 0.05}),
        "breadcrumbs_ties": fam("breadcrumbs_ties", {"gamma": 0.02}),
        "della": fam("della", {"epsilon": 0.1}),
        "della_linear": fam("della_linear", {"epsilon": 0.2}, {"rescale_norm": "l1"}),
        "slerp": {"merge_method": "slerp", "base_model": m["base"], "dtype": "float32",
                  "models": [{"model": m["base"]}, {"model": m["ft1"]}],
                  "parameters": {"t": [{"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]},
                                       {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]}, {"value": 0.5}]}},
        "model_stock": {"merge_method": "model_stock", "base_model": m["base"], "dtype": "float32",
                        "models": [{"model": m[k]} for k in ("ft1", "ft2", "ft3")]},
        "model_stock_filter_wise": {"merge_method": "model_stock", "base_model": m["base"], "dtype": "float32",
                                    "models": [{"model": m[k]} for k in ("ft1", "ft2", "ft3")],
                                    "parameters": {"filter_wise": True}},
        "nuslerp": {"merge_method": "nuslerp", "models": two, "dtype": "float32"},
        "nuslerp_rows": {"merge_method": "nuslerp", "models": two, "dtype": "float32",
                         "parameters": {"nuslerp_flatten": False}},
        "nuslerp_cols_base": {"merge_method": "nuslerp", "base_model": m["base"], "models": two, "dtype": "float32",
                              "parameters": {"nuslerp_flatten": False, "nuslerp_row_wise": True}},
        "multislerp": {"merge_method": "multislerp", "models": three, "dtype": "float32"},
        "multislerp_base": {"merge_method": "multislerp", "base_model": m["base"], "models": three,
                            "dtype": "float32"},
        "karcher": {"merge_method": "karcher", "models": [{"model": m[k]} for k in ("ft1", "ft2", "ft3")],
                    "dtype": "float32"},
        "fisher": {"merge_method": "fisher", "dtype": "float32",
                   "models": [{"model": m[k], "parameters": {"fisher": fisher[k], "weight": w}}
                              for k, w in (("ft1", 0.7), ("ft2", 0.3))]},
        "passthrough": {"merge_method": "passthrough", "models": [{"model": m["ft1"], "parameters": {"scale": 0.5}}],
                        "dtype": "float32"},
        "sce": {"merge_method": "sce", "base_model": m["base"], "dtype": "float32",
                "models": [{"model": m[k]} for k in ("ft1", "ft2", "ft3")], "parameters": {"select_topk": 0.4}},
        "nearswap": {"merge_method": "nearswap", "base_model": m["base"], "dtype": "float32",
                     "models": [{"model": m["ft1"]}], "parameters": {"t": 0.008}},
        "arcee_fusion": {"merge_method": "arcee_fusion", "base_model": m["base"], "dtype": "float32",
                         "models": [{"model": m["ft2"]}]},
        "ram": {"merge_method": "ram", "base_model": m["base"], "dtype": "float32",
                "models": [{"model": m[k]} for k in ("ft1", "ft2", "ft3")], "parameters": {"epsilon": 0.008}},
        "ramplus_tl": {"merge_method": "ramplus_tl", "base_model": m["base"], "dtype": "float32",
                       "models": [{"model": m[k]} for k in ("ft1", "ft2", "ft3")],
                       "parameters": {"epsilon": 0.01, "r": 0.5, "alpha": 0.5}},
        "slices_ties": {"merge_method": "ties", "base_model": m["base"], "dtype": "float32", "slices": [
            {"sources": [{"model": m["base"], "layer_range": [0, 2]},
                         {"model": m["ft1"], "layer_range": [0, 2], "parameters": {"weight": 0.7, "density": 0.5}},
                         {"model": m["ft2"], "layer_range": [0, 2], "parameters": {"weight": 0.4, "density": 0.3}}]},
            {"sources": [{"model": m["base"], "layer_range": [1, 2]},
                         {"model": m["ft3"], "layer_range": [1, 2], "parameters": {"weight": 1.0, "density": 0.2}}]}]},
    }


def test_every_method_is_covered(models_fp32, fisher) -> None:
    from lazymerge.planner.methods import METHODS

    covered = {r["merge_method"] for r in recipes({k: str(v) for k, v in models_fp32.items()}, fisher).values()}
    assert set(METHODS) <= covered, f"add a blocking case for: {sorted(set(METHODS) - covered)}"


CASES = ["linear", "task_arithmetic", "ties", "ties_rescale_norm_l2", "ties_count", "dare_ties", "dare_linear",
         "breadcrumbs", "breadcrumbs_ties", "della", "della_linear", "slerp", "model_stock",
         "model_stock_filter_wise", "nuslerp", "nuslerp_rows", "nuslerp_cols_base", "multislerp", "multislerp_base",
         "karcher", "fisher", "passthrough", "sce", "nearswap", "arcee_fusion", "ram", "ramplus_tl", "slices_ties"]


@pytest.mark.parametrize("case", CASES)
def test_blocked_equals_unblocked(models_fp32, fisher, tmp_path: Path, case: str) -> None:
    recipe = recipes({k: str(v) for k, v in models_fp32.items()}, fisher)[case]
    _lm().merge(recipe, tmp_path / "whole", seed=4, memory="unlimited")
    want = files_bytes(tmp_path / "whole")
    for i, kw in enumerate(BLOCKINGS):
        if "max_block_rows" in kw:
            p = _lm().plan(recipe, seed=4, **kw)
            assert max(p.blocks.values()) > 1, kw     # really blocked
            p.close()
        _lm().merge(recipe, tmp_path / f"b{i}", seed=4, **kw)
        assert files_bytes(tmp_path / f"b{i}") == want, (case, kw)


def test_multi_stage_blocked_equals_unblocked(models_fp32, tmp_path: Path) -> None:
    """Each stage has whole-tensor statistics (top-k, Gram): the later stage recomputes the earlier one's blocks
    in its own blocking, and the bytes do not change."""
    m = {k: str(v) for k, v in models_fp32.items()}
    docs = [
        {"name": "a", "merge_method": "breadcrumbs_ties", "base_model": m["base"], "dtype": "float32",
         "models": [{"model": m["ft1"], "parameters": {"weight": 1.0, "density": 0.6}},
                    {"model": m["ft2"], "parameters": {"weight": 0.5, "density": 0.6}}]},
        {"name": "b", "merge_method": "model_stock", "base_model": m["base"], "dtype": "float32",
         "models": [{"model": "a"}, {"model": m["ft3"]}]},
        {"name": "c", "merge_method": "slerp", "base_model": "b", "dtype": "float32",
         "models": [{"model": "b"}, {"model": "a"}], "parameters": {"t": 0.4}},
    ]
    text = yaml.safe_dump_all(docs, sort_keys=False)
    _lm().merge(text, tmp_path / "whole", memory="unlimited")
    want = files_bytes(tmp_path / "whole")
    for i, kw in enumerate(BLOCKINGS):
        _lm().merge(text, tmp_path / f"b{i}", **kw)
        assert files_bytes(tmp_path / f"b{i}") == want, kw
