"""Compile a recipe into a validated Plan: a task graph whose every size is known from headers alone.

Everything that can be wrong with a merge is found here, before a byte of tensor data is read: missing models,
missing or mismatched tensors, unknown methods or parameters, out-of-range values. The plan also fixes the
output layout (which tensor goes to which shard, at which offset), which is what makes writes order-free and
the output bit-identical whatever the schedule.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import RecipeError
from ..io.models import ModelOpener, OpenOptions
from ..units import parse_size
from .emit import emit_plan
from .keys import closest
from .methods import METHODS, Method
from .moe import compile_moe
from .params import leaves
from .plan import Plan, resolve_budget
from .recipe import Recipe
from .stage_compiler import StageCompiler
from .stages import StageOutput, resolve_stages, stage_key

def _check_param_names(r: Recipe, m: Method) -> list[str]:
    """Parameter names and values at every level; returns the warnings. Global and slice-level parameters take
    any of the method's parameters; models and slice sources only per-model ones (mergekit never reads a
    method-wide parameter there). A parameter of another method is ignored with a warning, as mergekit ignores
    it (published model_stock recipes carry a per-model `weight`); a key no method knows is a typo. Every value
    a parameter can take, each point of a gradient included, must be in its range."""
    names = tuple(p.name for p in m.params)
    per_model = tuple(p.name for p in m.params if p.per_model)
    known = tuple(sorted({p.name for meth in METHODS.values() for p in meth.params}))
    places = [(r.parameters, f"{r.source}: parameters", names)]
    places += [(e.parameters, f"{r.source}: models[{i}].parameters", per_model) for i, e in enumerate(r.models)]
    for sl in r.slices or ():
        places.append((sl.parameters, f"{sl.where}.parameters", names))
        places += [(s.parameters, f"{s.where}.parameters", per_model) for s in sl.sources]
    ignored: dict[str, list[str]] = {}
    for params, where, valid in places:
        for key, value in params.items():
            if key not in valid:
                valid_text = f"valid keys: {', '.join(valid)}" if valid else "it takes none here"
                if key in names:
                    raise RecipeError(f"{where}: unknown key '{key}' for {m.name} (a method-wide parameter: put "
                                      f"it under the top-level or the slice's 'parameters'); {valid_text}")
                if key not in known:
                    raise RecipeError(f"{where}: unknown key '{key}' for {m.name}"
                                      f"{closest(key, valid) or closest(key, known)}; {valid_text}")
                ignored.setdefault(key, []).append(where.removeprefix(f"{r.source}: "))
                continue
            param = m.param(key)
            for leaf, at in leaves(value, f"{where}.{key}"):
                if not (param.kind is float and isinstance(leaf, str)):   # mergekit steps through string lists
                    param.coerce(leaf, at)
    return [f"{r.source}: '{key}' has no effect for {m.name}; ignored, as mergekit does ({', '.join(wheres)})"
            for key, wheres in ignored.items()]


def _method_of(r: Recipe) -> tuple[Method, list[str]]:
    """The recipe's method, with the checks that need no checkpoint, and their warnings."""
    method = METHODS.get(r.merge_method)
    if method is None:
        raise RecipeError(f"{r.source}: merge_method: unknown method '{r.merge_method}'"
                          f"{closest(r.merge_method, list(METHODS))}; available: {', '.join(sorted(METHODS))}")
    has_base = bool(r.base_model) or any(sl.base_model for sl in r.slices or ())
    if method.base == "required" and not has_base:
        raise RecipeError(f"{r.source}: base_model: missing; {method.name} needs a base model")
    return method, _check_param_names(r, method)


def compile_plan(recipe: Any, *, memory: "int | str | None" = None, shard_size: "int | str" = "5GB",
                 seed: int = 0, allow_pickle: bool = False, max_block_rows: int | None = None,
                 stage: str | None = None, stream_inputs: bool = False, gguf: Any = None) -> Plan:
    """Compile a recipe (one document, or a multi-stage recipe whose output is `stage`, the unnamed document
    or the last one) into a Plan. Raises a LazyMergeError subclass on any problem. Models named by hub id are
    pinned to a commit (`Plan.pins`) and planned from their headers; `stream_inputs`: a run reads their
    uncached files with range requests instead of downloading them. `gguf` (io.gguf.layout.GGUFOptions): the
    output is a GGUF, laid out and encoded as llama.cpp's converter would."""
    chain = resolve_stages(recipe, stage)
    moe = chain[-1].merge_method == "moe"      # the output may be a mixture of experts (planner/moe.py)
    for r in chain[:-1]:
        if r.merge_method == "moe":
            raise RecipeError(f"{r.source}: a MoE can only be the output stage, not the input of another stage")
    checked = [_method_of(r) for r in (chain[:-1] if moe else chain)]
    methods = [m for m, _ in checked]
    budget = resolve_budget(memory)
    try:
        shard_bytes = parse_size(shard_size)
    except ValueError as exc:
        raise RecipeError(f"shard_size: {exc}") from None

    sources: dict[str, Any] = {}
    opener = ModelOpener(OpenOptions(allow_pickle=allow_pickle, stream=stream_inputs))
    try:
        stages: dict[str, StageOutput] = {}
        read: list[Path] = []          # files the stages read besides their inputs' (what a resume compares)
        for r, method in zip(chain[:-1], methods):
            st = StageCompiler(r, method, sources, stages, opener).compile()
            stages[stage_key(str(r.name))] = StageOutput(str(r.name), {j.name: j for j in st.jobs}, st.config,
                                                         st.aux_files)
            read += st.vocab.read if st.vocab else []
        if moe:
            plan = compile_moe(chain[-1], sources, stages, budget=budget, shard_bytes=shard_bytes, seed=seed,
                               opener=opener, max_block_rows=max_block_rows, gguf=gguf)
        else:
            final = StageCompiler(chain[-1], methods[-1], sources, stages, opener).compile()
            plan = emit_plan(final, sources, budget, shard_bytes, seed, max_block_rows, gguf)
            plan.warnings[:0] = [w for _, notes in checked for w in notes]
            read += final.vocab.read if final.vocab else []
        plan.pins = opener.pins()
        plan.read_files = sorted(set(read))
        plan.warnings += [w for src in sources.values() for w in src.warnings]
        return plan
    except BaseException:
        for c in sources.values():
            c.close()
        raise


