"""`lazymerge demo`: generate small checkpoints, merge them with a built-in recipe, report.

The default recipe is TIES over a base and two fine-tunes, run under a deliberately small budget so that the
demo exercises row blocks and the scheduler's memory rule, not just a whole-tensor loop.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from .api import merge
from .synth import make_demo

DEMO_PARAMS: dict[str, dict[str, Any]] = {
    "linear": {},
    "task_arithmetic": {},
    "ties": {"density": 0.5},
    "dare_ties": {"density": 0.5},
    "dare_linear": {"density": 0.5},
    "breadcrumbs": {"density": 0.9, "gamma": 0.01},
    "breadcrumbs_ties": {"density": 0.9, "gamma": 0.01},
    "della": {"density": 0.5, "epsilon": 0.1},
    "della_linear": {"density": 0.5, "epsilon": 0.1},
}


def demo_recipe(method: str, base: Path, finetunes: list[Path]) -> dict[str, Any]:
    if method == "slerp":
        return {"merge_method": "slerp", "base_model": str(base),
                "models": [{"model": str(base)}, {"model": str(finetunes[0])}], "parameters": {"t": 0.5}}
    extra = DEMO_PARAMS.get(method, {})
    return {
        "merge_method": method,
        "base_model": str(base),
        "models": [{"model": str(p), "parameters": {"weight": 0.5, **extra}} for p in finetunes],
        "dtype": "bfloat16",
    }


def run_demo(workdir: Path, *, preset: str = "small", method: str = "ties", memory: str = "16MiB") -> str:
    workdir.mkdir(parents=True, exist_ok=True)
    base, finetunes = make_demo(workdir / "models", preset=preset)
    recipe = demo_recipe(method, base, finetunes)
    out = workdir / f"merged-{method}"
    report = merge(recipe, out, memory=memory, overwrite=True, seed=0)
    return f"models        {base.parent}\n" + report.summary()
