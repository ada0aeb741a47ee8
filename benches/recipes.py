"""The benchmark's recipes: mergekit-format YAML that lazymerge, mergekit and benches/naive_merge.py all accept.

Base + 2 fine-tunes, bf16 output, the parameters the peer figures (/work/shared/peer-figures.md) were measured with.
"""
from __future__ import annotations

from pathlib import Path

import yaml

METHODS = ("ties", "linear", "task_arithmetic", "dare_ties", "slerp", "della", "breadcrumbs_ties", "model_stock",
           "sce")


def recipe(method: str, base: Path, tunes: list[Path], dtype: str = "bfloat16") -> dict:
    base, tunes = str(base), [str(t) for t in tunes]
    if method == "linear":                         # model soup of all three, equal weights (normalize: true)
        return {"merge_method": "linear",
                "models": [{"model": m, "parameters": {"weight": 1.0}} for m in [base, *tunes]],
                "dtype": dtype}
    if method == "task_arithmetic":
        return {"merge_method": "task_arithmetic", "base_model": base,
                "models": [{"model": t, "parameters": {"weight": 0.5}} for t in tunes],
                "dtype": dtype}
    if method in ("ties", "dare_ties"):
        return {"merge_method": method, "base_model": base,
                "models": [{"model": t, "parameters": {"weight": 0.5, "density": 0.5}} for t in tunes],
                "dtype": dtype}
    if method == "slerp":                          # two models: the base and the first fine-tune, halfway
        return {"merge_method": "slerp", "base_model": base,
                "models": [{"model": base}, {"model": tunes[0]}],
                "parameters": {"t": 0.5},
                "dtype": dtype}
    if method == "della":                          # DELLA with TIES election: ranked drop probabilities 0.5 +- 0.1
        return {"merge_method": "della", "base_model": base,
                "models": [{"model": t, "parameters": {"weight": 0.5, "density": 0.5, "epsilon": 0.1}}
                           for t in tunes],
                "dtype": dtype}
    if method == "breadcrumbs_ties":               # keep 90%: drop the smallest 9% and the top 1% outliers
        return {"merge_method": "breadcrumbs_ties", "base_model": base,
                "models": [{"model": t, "parameters": {"weight": 0.5, "density": 0.9, "gamma": 0.01}}
                           for t in tunes],
                "dtype": dtype}
    if method == "model_stock":
        return {"merge_method": "model_stock", "base_model": base,
                "models": [{"model": t} for t in tunes],
                "dtype": dtype}
    if method == "sce":                            # select the 50% entries of largest variance across the deltas
        return {"merge_method": "sce", "base_model": base,
                "models": [{"model": t} for t in tunes],
                "parameters": {"select_topk": 0.5},
                "dtype": dtype}
    raise ValueError(f"unknown benchmark method {method!r} (choose from {', '.join(METHODS)})")


def input_models(rec: dict) -> list[str]:
    """The distinct checkpoints a recipe reads (what the I/O floor must read)."""
    seen: list[str] = []
    for m in ([rec["base_model"]] if rec.get("base_model") else []) + [m["model"] for m in rec["models"]]:
        if m not in seen:
            seen.append(m)
    return seen


def write_recipe(rec: dict, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(rec, sort_keys=False))
    return path
