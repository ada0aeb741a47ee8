"""Multi-stage recipes: several named merges in one YAML file, a later one using an earlier one's output.

The format is mergekit-multimerge's: `---`-separated documents, each a recipe with a `name:`; a model reference
(`model:`, `base_model:`, a slice source) equal to another document's name means that document's output. At most
one document may be unnamed. The output is the stage named by the caller (`stage=` / `--stage`), else the unnamed
document, else the last one; only the stages it depends on are planned, dependencies first, in any file order.

Where mergekit-multimerge writes every intermediate merge to disk and reads it back, lazymerge keeps an earlier
stage's tensors in the task graph: a later stage loads them as *virtual sources* (`graph.TensorBuilder`), so an
intermediate is computed block by block where it is consumed and never stored. It stays float32 there, whereas
mergekit rounds it to the stage's `dtype` when it saves it: a multi-stage merge with `dtype: bfloat16` agrees
with mergekit's only to that rounding (float32 stages agree exactly).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import RecipeError
from ..dtypes import itemsize
from ..io.shards import TensorInfo
from .moe_recipe import is_moe_document, moe_recipe
from .recipe import Recipe, read_documents, recipe_from_data

STAGE_KEY_PREFIX = "stage:"


def stage_key(name: str) -> str:
    """The key of a stage's output among a plan's sources (never a resolved path: those are absolute)."""
    return STAGE_KEY_PREFIX + name


def model_refs(r: Recipe) -> list[str]:
    """Every model reference of a recipe (models, base, slice sources and slice bases)."""
    refs = [m.model for m in r.models]
    if r.base_model:
        refs.append(r.base_model)
    for sl in r.slices or ():
        refs += [s.model for s in sl.sources]
        if sl.base_model:
            refs.append(sl.base_model)
    return refs


def document_recipe(data: Any, source: str) -> Recipe:
    """One document: a MoE config (planner/moe_recipe.py) or a merge recipe (`recipe.recipe_from_data`)."""
    return moe_recipe(data, source) if is_moe_document(data) else recipe_from_data(data, source)


def resolve_stages(recipe: Any, stage: str | None = None) -> list[Recipe]:
    """The recipes to plan, dependencies first and the output last. A single-document recipe is one stage."""
    if isinstance(recipe, Recipe):
        if stage is not None and stage != recipe.name:
            raise RecipeError(f"{recipe.source}: stage: no stage named '{stage}'")
        return [recipe]
    docs, source = read_documents(recipe)
    if len(docs) == 1:
        r = document_recipe(docs[0], source)
        if stage is not None and stage != r.name:
            raise RecipeError(f"{source}: stage: no stage named '{stage}'"
                              + (f"; the recipe's only stage is '{r.name}'" if r.name else ""))
        return [r]
    recipes: dict[str | None, Recipe] = {}
    for i, doc in enumerate(docs):
        name = doc.get("name") if isinstance(doc, dict) else None
        label = f"{source}: stage '{name}'" if isinstance(name, str) and name else f"{source}: document {i + 1}"
        r = document_recipe(doc, label)
        if r.name in recipes:
            raise RecipeError(f"{label}: name: '{r.name}' names two stages" if r.name is not None else
                              f"{label}: only one document may be unnamed (the output); name the others")
        recipes[r.name] = r
    if stage is not None:
        if stage not in recipes:
            named = ", ".join(str(n) for n in recipes if n is not None)
            raise RecipeError(f"{source}: stage: no stage named '{stage}'; stages: {named}")
        target = recipes[stage]
    else:
        target = recipes.get(None) or list(recipes.values())[-1]
    names = {n for n in recipes if n is not None}

    order: list[Recipe] = []
    state: dict[int, str] = {}

    def visit(r: Recipe, path: list[str]) -> None:
        if state.get(id(r)) == "done":
            return
        if state.get(id(r)) == "active":
            raise RecipeError(f"{r.source}: stages depend on each other in a cycle: {' -> '.join(path)}")
        state[id(r)] = "active"
        for ref in model_refs(r):
            if ref in names:
                visit(recipes[ref], path + [ref])
            elif ref.split("+", 1)[0] in names:
                raise RecipeError(f"{r.source}: '{ref}': an adapter on a stage's output is not supported")
        state[id(r)] = "done"
        order.append(r)

    visit(target, [str(target.name or "output")])
    docs_used = [dict(r.raw) for r in order]
    for r in order:
        r.stage_names = frozenset(names)
    target.documents = docs_used
    return order


@dataclass
class StageOutput:
    """An earlier stage's output, used by later stages like a checkpoint whose tensors are computed in the graph:
    names, shapes and dtypes (its output dtypes) for planning, and each tensor's job for `TensorBuilder`."""

    name: str
    jobs: dict[str, Any]                          # output tensor name -> planner.stage_compiler.TensorJob
    config: dict[str, Any] | None
    aux: list[Path]
    tensors: dict[str, TensorInfo] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.path = Path(f"<stage {self.name}>")
        for nm, job in self.jobs.items():
            size = itemsize(job.out_dtype)
            self.tensors[nm] = TensorInfo(nm, job.out_dtype, tuple(job.shape), self.path, 0,
                                          math.prod(job.shape) * size)

    def aux_files(self) -> list[Path]:
        return list(self.aux)

    def close(self) -> None:
        pass
