"""Recipes: the mergekit-compatible YAML (or dict) a user writes, parsed into plain dataclasses.

Parsing is strict on structure (unknown keys, wrong types) and says which key is wrong and what the closest
valid key is, because a misspelt `desnity:` that silently falls back to a default is the worst kind of merge bug.
Method-specific checks (which parameters a method takes, their ranges) live in `planner.methods`.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

from ..errors import RecipeError

TOP_KEYS = (
    "merge_method", "base_model", "models", "slices", "parameters", "dtype", "out_dtype",
    "tokenizer_source", "tokenizer", "chat_template", "name", "seed",
)
MODEL_KEYS = ("model", "parameters")
DTYPES = {
    "float32": "F32", "fp32": "F32", "float": "F32",
    "float16": "F16", "fp16": "F16", "half": "F16",
    "bfloat16": "BF16", "bf16": "BF16",
    "float64": "F64",
}


def closest(key: str, valid: tuple[str, ...] | list[str]) -> str:
    """The ' (did you mean X?)' suffix for an unknown key, or '' when nothing is close."""
    match = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.6)
    return f" (did you mean '{match[0]}'?)" if match else ""


def check_keys(where: str, given: Mapping[str, Any], valid: tuple[str, ...]) -> None:
    for key in given:
        if key not in valid:
            raise RecipeError(
                f"{where}: unknown key '{key}'{closest(str(key), valid)}; valid keys: {', '.join(valid)}"
            )


@dataclass(frozen=True)
class ModelEntry:
    """One input model as written in the recipe: a path (or `base+adapter`), and its own parameters."""

    model: str
    parameters: dict[str, Any] = field(default_factory=dict)


@dataclass
class Recipe:
    merge_method: str
    models: list[ModelEntry]
    base_model: str | None = None
    parameters: dict[str, Any] = field(default_factory=dict)
    dtype: str | None = None          # safetensors code, e.g. "BF16"
    out_dtype: str | None = None
    tokenizer_source: str | None = None
    slices: list[dict[str, Any]] | None = None
    source: str = "<recipe>"          # where the recipe came from, for error messages
    raw: dict[str, Any] = field(default_factory=dict)

    @property
    def output_dtype(self) -> str | None:
        return self.out_dtype or self.dtype


class _SafeLoaderNoAliases(yaml.SafeLoader):
    """SafeLoader never constructs Python objects; we also refuse aliases so a 'billion laughs' recipe can't
    blow up memory, and recipes never need them."""

    def compose_node(self, parent, index):  # type: ignore[override]
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.MarkedYAMLError(None, None, "YAML aliases (*name) are not allowed in recipes",
                                       event.start_mark)
        return super().compose_node(parent, index)


def load_yaml(text: str, source: str) -> Any:
    try:
        return yaml.load(text, Loader=_SafeLoaderNoAliases)  # noqa: S506 - a SafeLoader subclass
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = exc.problem or exc.context or "invalid YAML"
        raise RecipeError(f"{source}: YAML error{where}: {problem}") from None
    except yaml.YAMLError as exc:
        raise RecipeError(f"{source}: YAML error: {str(exc).splitlines()[0]}") from None


def read_recipe_source(recipe: "str | Path | Mapping[str, Any] | Recipe") -> tuple[Any, str]:
    """Accept a path, YAML text, or a mapping; return (data, source name for messages)."""
    if isinstance(recipe, Mapping):
        return dict(recipe), "<recipe>"
    if isinstance(recipe, Path) or (isinstance(recipe, str) and "\n" not in recipe and recipe.endswith((".yaml", ".yml"))):
        path = Path(recipe)
        if not path.is_file():
            raise RecipeError(f"{path}: recipe file does not exist")
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise RecipeError(f"{path}: cannot read recipe: {exc}") from None
        return load_yaml(text, str(path)), str(path)
    if isinstance(recipe, str):
        return load_yaml(recipe, "<recipe>"), "<recipe>"
    raise RecipeError(f"recipe must be a path, YAML text or a mapping, not {type(recipe).__name__}")


def _dtype(value: Any, key: str, source: str) -> str | None:
    if value is None:
        return None
    code = DTYPES.get(str(value).lower())
    if code is None:
        raise RecipeError(f"{source}: {key}: unknown dtype '{value}'; use one of float32, float16, bfloat16")
    return code


def _mapping(value: Any, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise RecipeError(f"{where}: must be a mapping of name: value, not {type(value).__name__}")
    return {str(k): v for k, v in value.items()}


def _model_entry(item: Any, where: str) -> ModelEntry:
    if isinstance(item, str):
        return ModelEntry(item)
    if not isinstance(item, Mapping):
        raise RecipeError(f"{where}: each model must be a mapping with a 'model' key")
    check_keys(where, item, MODEL_KEYS)
    model = item.get("model")
    if not isinstance(model, str) or not model:
        raise RecipeError(f"{where}.model: must be a path to a checkpoint directory")
    return ModelEntry(model, _mapping(item.get("parameters"), f"{where}.parameters"))


def parse_recipe(recipe: "str | Path | Mapping[str, Any] | Recipe") -> Recipe:
    """Structure only: keys, types, dtypes. Paths and method parameters are validated by the planner."""
    if isinstance(recipe, Recipe):
        return recipe
    data, source = read_recipe_source(recipe)
    if not isinstance(data, Mapping):
        raise RecipeError(f"{source}: a recipe must be a YAML mapping with a 'merge_method' key")
    check_keys(source, data, TOP_KEYS)
    method = data.get("merge_method")
    if not isinstance(method, str) or not method:
        raise RecipeError(f"{source}: merge_method: missing; e.g. 'merge_method: linear'")
    models_raw = data.get("models")
    slices = data.get("slices")
    if models_raw is None and slices is None:
        raise RecipeError(f"{source}: models: missing; list the models to merge")
    if models_raw is not None and not isinstance(models_raw, list):
        raise RecipeError(f"{source}: models: must be a list of '- model: PATH' entries")
    models = [_model_entry(m, f"{source}: models[{i}]") for i, m in enumerate(models_raw or [])]
    if slices is not None and not isinstance(slices, list):
        raise RecipeError(f"{source}: slices: must be a list of '- sources: [...]' entries")
    base = data.get("base_model")
    if base is not None and not isinstance(base, str):
        raise RecipeError(f"{source}: base_model: must be a path to a checkpoint directory")
    tok = data.get("tokenizer_source")
    if tok is not None and not isinstance(tok, str):
        raise RecipeError(f"{source}: tokenizer_source: must be 'base', 'union' or a model path")
    return Recipe(
        merge_method=method,
        models=models,
        base_model=base,
        parameters=_mapping(data.get("parameters"), f"{source}: parameters"),
        dtype=_dtype(data.get("dtype"), "dtype", source),
        out_dtype=_dtype(data.get("out_dtype"), "out_dtype", source),
        tokenizer_source=tok,
        slices=slices,
        source=source,
        raw=dict(data),
    )


def dump_recipe(recipe: Recipe) -> str:
    """The recipe as YAML, saved next to the output so a merge can be reproduced."""
    return yaml.safe_dump(recipe.raw, sort_keys=False)
