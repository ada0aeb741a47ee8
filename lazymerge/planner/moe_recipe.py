"""A MoE document (a mergekit-moe config, or `merge_method: moe`) parsed into a `MoEConfig` and a `Recipe`, from
the YAML alone. Kept apart from planner/moe.py (the compiler) so that reading recipes (planner/stages.py) needs
none of the compiler's imports.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

from ..dtypes import RECIPE_NAMES
from ..errors import RecipeError
from .keys import check_keys, closest
from .recipe import ModelEntry, Recipe

GATE_MODES = ("hidden", "cheap_embed", "random", "uniform_random")
PROMPT_MODES = ("hidden", "cheap_embed")


@dataclass(frozen=True)
class Prompts:
    """One expert's prompts (an expert of the routed set, or a shared expert)."""

    positive: tuple[str, ...]
    negative: tuple[str, ...] = ()

MOE_KEYS = ("merge_method", "name", "base_model", "experts", "gate_mode", "dtype", "experts_per_token",
            "shared_experts", "architecture")
EXPERT_KEYS = ("source_model", "positive_prompts", "negative_prompts", "noise_scale", "residual_scale")


def is_moe_document(data: Any) -> bool:
    """A mergekit-moe config (`experts` and no `merge_method`) or a recipe with `merge_method: moe`."""
    if not isinstance(data, Mapping):
        return False
    method = data.get("merge_method")
    return method == "moe" or ("merge_method" not in data and "experts" in data)


# -- the config --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ExpertSpec:
    model: str
    prompts: Prompts
    noise_scale: float | None
    residual_scale: float | None
    where: str


@dataclass(frozen=True)
class MoEConfig:
    base_model: str
    experts: tuple[ExpertSpec, ...]
    shared_experts: tuple[ExpertSpec, ...]
    gate_mode: str
    dtype: str | None
    experts_per_token: int
    architecture: str | None
    source: str


def _prompts(value: Any, where: str) -> tuple[str, ...] | None:
    if value is None:
        return None
    if isinstance(value, str) or not isinstance(value, list) or not all(isinstance(p, str) for p in value):
        raise RecipeError(f"{where}: must be a list of strings")
    if not value:
        raise RecipeError(f"{where}: empty list; give at least one prompt or leave the key out")
    return tuple(value)


def _number(value: Any, where: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise RecipeError(f"{where}: must be a number, not {value!r}")
    return float(value)


def _expert(item: Any, where: str, mode: str) -> ExpertSpec:
    if not isinstance(item, Mapping):
        raise RecipeError(f"{where}: must be a mapping with a 'source_model' key")
    check_keys(where, item, EXPERT_KEYS)
    model = item.get("source_model")
    if not isinstance(model, str) or not model:
        raise RecipeError(f"{where}.source_model: missing; a path (or base+adapter, or a stage's name)")
    pos = _prompts(item.get("positive_prompts"), f"{where}.positive_prompts")
    neg = _prompts(item.get("negative_prompts"), f"{where}.negative_prompts")
    if mode in PROMPT_MODES and pos is None:
        raise RecipeError(f"{where}.positive_prompts: missing; gate_mode {mode} routes by the experts' prompts "
                          f"(or use gate_mode: random)")
    noise = _number(item.get("noise_scale"), f"{where}.noise_scale")
    if noise is not None and noise < 0:
        raise RecipeError(f"{where}.noise_scale: must be >= 0, got {noise}")
    return ExpertSpec(model, Prompts(pos or (), neg or ()), noise,
                      _number(item.get("residual_scale"), f"{where}.residual_scale"), where)


def parse_moe(data: Mapping[str, Any], source: str) -> MoEConfig:
    """Structure and values of a MoE config; everything that needs no checkpoint."""
    check_keys(source, data, MOE_KEYS)
    base = data.get("base_model")
    if not isinstance(base, str) or not base:
        raise RecipeError(f"{source}: base_model: missing; a MoE takes attention, norms and embeddings from it")
    mode = data.get("gate_mode", "hidden")
    if mode not in GATE_MODES:
        raise RecipeError(f"{source}: gate_mode: unknown mode {mode!r}{closest(str(mode), GATE_MODES)}; "
                          f"use one of {', '.join(GATE_MODES)}")
    raw = data.get("experts")
    if not isinstance(raw, list) or not raw:
        raise RecipeError(f"{source}: experts: must be a non-empty list of '- source_model: PATH' entries")
    experts = tuple(_expert(e, f"{source}: experts[{i}]", mode) for i, e in enumerate(raw))
    shared_raw = data.get("shared_experts") or []
    if not isinstance(shared_raw, list):
        raise RecipeError(f"{source}: shared_experts: must be a list of '- source_model: PATH' entries")
    shared = tuple(_expert(e, f"{source}: shared_experts[{i}]", mode) for i, e in enumerate(shared_raw))
    k = data.get("experts_per_token", 2)
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise RecipeError(f"{source}: experts_per_token: must be an integer >= 1, got {k!r}")
    if len(experts) < k:
        raise RecipeError(f"{source}: experts: {len(experts)} expert(s) but experts_per_token is {k}; "
                          f"give at least {k} experts or lower experts_per_token")
    if mode in PROMPT_MODES and len(experts) > 1 and len({e.prompts for e in experts}) == 1:
        raise RecipeError(f"{source}: experts: every expert has the same prompts, so the router cannot tell them "
                          f"apart; give each expert prompts for what it should receive")
    dtype = data.get("dtype")
    code = None
    if dtype is not None:
        code = RECIPE_NAMES.get(str(dtype).lower())
        if code is None:
            raise RecipeError(f"{source}: dtype: unknown dtype '{dtype}'; use one of float32, float16, bfloat16")
    arch = data.get("architecture")
    if arch is not None and (not isinstance(arch, str) or not arch):
        raise RecipeError(f"{source}: architecture: must be a name such as mixtral, qwen, qwen3")
    return MoEConfig(base, experts, shared, mode, code, k, arch, source)


def moe_recipe(data: Mapping[str, Any], source: str) -> Recipe:
    """The Recipe of a MoE document: its model references (base, experts) are what multi-stage recipes need."""
    cfg = parse_moe(data, source)
    name = data.get("name")
    if name is not None and (not isinstance(name, str) or not name):
        raise RecipeError(f"{source}: name: must be a non-empty string (a stage's name)")
    return Recipe(merge_method="moe", models=[ModelEntry(e.model) for e in cfg.experts + cfg.shared_experts],
                  base_model=cfg.base_model, dtype=cfg.dtype, source=source, raw=dict(data), name=name)
