"""Compile a recipe into a validated Plan: a task graph whose every size is known from headers alone.

Everything that can be wrong with a merge is found here, before a byte of tensor data is read: missing models,
missing or mismatched tensors, unknown methods or parameters, out-of-range values. The plan also fixes the
output layout (which tensor goes to which shard, at which offset), which is what makes writes order-free and
the output bit-identical whatever the schedule.
"""
from __future__ import annotations

from typing import Any

from ..errors import RecipeError
from ..units import parse_size
from .emit import emit_plan
from .keys import check_keys, closest
from .methods import METHODS, Method
from .plan import Plan, resolve_budget
from .recipe import Recipe
from .stage_compiler import StageCompiler
from .stages import StageOutput, resolve_stages, stage_key

def _check_param_names(r: Recipe, m: Method) -> None:
    """Parameter names at every level: global and slice-level take any of the method's parameters; models and
    slice sources only per-model ones (mergekit never reads a method-wide parameter there)."""
    names = tuple(p.name for p in m.params)
    check_keys(f"{r.source}: parameters", r.parameters, names)
    per_model = tuple(p.name for p in m.params if p.per_model)
    places = [(e.parameters, f"{r.source}: models[{i}].parameters") for i, e in enumerate(r.models)]
    for sl in r.slices or ():
        check_keys(f"{sl.where}.parameters", sl.parameters, names)
        places += [(s.parameters, f"{s.where}.parameters") for s in sl.sources]
    for params, where in places:
        for key in params:
            if key not in per_model:
                hint = (" (a method-wide parameter: put it under the top-level or the slice's 'parameters')"
                        if key in names else "")
                raise RecipeError(f"{where}: unknown key '{key}' for {m.name}{hint or closest(key, per_model)}; "
                                  f"valid keys: {', '.join(per_model)}")


def _method_of(r: Recipe) -> Method:
    """The recipe's method, with the checks that need no checkpoint."""
    method = METHODS.get(r.merge_method)
    if method is None:
        raise RecipeError(f"{r.source}: merge_method: unknown method '{r.merge_method}'"
                          f"{closest(r.merge_method, list(METHODS))}; available: {', '.join(sorted(METHODS))}")
    has_base = bool(r.base_model) or any(sl.base_model for sl in r.slices or ())
    if method.base == "required" and not has_base:
        raise RecipeError(f"{r.source}: base_model: missing; {method.name} needs a base model")
    _check_param_names(r, method)
    return method


def compile_plan(recipe: Any, *, memory: "int | str | None" = None, shard_size: "int | str" = "5GB",
                 seed: int = 0, allow_pickle: bool = False, max_block_rows: int | None = None,
                 stage: str | None = None) -> Plan:
    """Compile a recipe (one document, or a multi-stage recipe whose output is `stage`, the unnamed document
    or the last one) into a Plan. Raises a LazyMergeError subclass on any problem."""
    chain = resolve_stages(recipe, stage)
    methods = [_method_of(r) for r in chain]
    budget = resolve_budget(memory)
    try:
        shard_bytes = parse_size(shard_size)
    except ValueError as exc:
        raise RecipeError(f"shard_size: {exc}") from None

    sources: dict[str, Any] = {}
    try:
        stages: dict[str, StageOutput] = {}
        for r, method in zip(chain[:-1], methods[:-1]):
            st = StageCompiler(r, method, sources, stages, allow_pickle).compile()
            stages[stage_key(str(r.name))] = StageOutput(str(r.name), {j.name: j for j in st.jobs}, st.config,
                                                         st.aux_files)
        final = StageCompiler(chain[-1], methods[-1], sources, stages, allow_pickle).compile()
        return emit_plan(final, sources, budget, shard_bytes, seed, max_block_rows)
    except BaseException:
        for c in sources.values():
            c.close()
        raise


