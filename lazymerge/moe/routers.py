"""The router pass of a MoE plan: computes the router tensors the planner described (`planner.moe_routers`).

It sits above the planner because `hidden` runs the base model (`lazymerge.evaluate.stream`), which compiles plans
itself; the planner only records what is needed. `lazymerge.merge` calls `prepare_routers` before the graph runs,
so that the pass (the base model, layer by layer) never overlaps the copies; a cluster worker, which compiles the
plan again from the recipe, calls `bind_routers` so that it computes them only if it writes a router tensor. Both
give the same bytes: the random modes are seeded by the run seed and the tensor name, the prompt modes are a
deterministic forward.
"""
from __future__ import annotations

from typing import Any, Callable

import torch

from ..planner.moe_recipe import PROMPT_MODES
from ..planner.moe_routers import RouterPass
from ..planner.moe_sources import RouterSource
from .gates import prompt_gates, random_router


def router_values(spec: RouterPass, base: Any, progress: Callable[[Any], None] | None = None,
                  warnings: list[str] | None = None) -> dict[str, torch.Tensor]:
    """Every router tensor of `spec` (name -> float tensor); `base` is the opened base model (cheap_embed
    reads its embedding rows). `progress` gets an `EvalProgress` per layer of a `hidden` pass; a base layer
    larger than the budget is appended to `warnings`."""
    if spec.mode not in PROMPT_MODES:
        return {t.name: random_router(spec.mode, spec.seed, t.name, t.shape) for t in spec.tensors}
    vecs = prompt_gates(spec.mode, base, spec.target, spec.base_dir, list(spec.prompts), spec.layers,
                        memory=spec.memory, progress=progress, warnings=warnings)
    return {t.name: vecs[t.layer, t.columns[0]:t.columns[1]] for t in spec.tensors}


def _routers_of(plan: Any) -> RouterSource | None:
    routers = getattr(plan, "routers", None)
    return routers if isinstance(routers, RouterSource) else None


def bind_routers(plan: Any, progress: Callable[[Any], None] | None = None) -> None:
    """Give a MoE plan's router source the means to compute its values (on first read); no-op for other plans."""
    routers = _routers_of(plan)
    if routers is not None:
        spec = routers.spec
        compute: Callable[[], dict[str, torch.Tensor]] = \
            lambda: router_values(spec, plan.sources.get(spec.base_key), progress, plan.warnings)
        routers.bind(compute)


def prepare_routers(plan: Any, progress: Callable[[Any], None] | None = None) -> None:
    """Compute a MoE plan's routers now (before its graph runs); no-op for other plans. What a merge does, and
    what an evaluation of a MoE recipe does (`evaluate.stream.open_stream(prepare=...)`): one mechanism."""
    bind_routers(plan, progress)
    routers = _routers_of(plan)
    if routers is not None:
        routers.compute()
