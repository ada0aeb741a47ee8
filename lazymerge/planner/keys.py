"""Structure checks shared by every part of a recipe: unknown keys (with a "did you mean"), mappings, model entries.

Kept apart from recipe.py so that recipe.py (the top level) and slices.py (the `slices:` list) both use them
without importing each other.
"""
from __future__ import annotations

import difflib
from typing import Any, Mapping

from ..errors import RecipeError


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


def mapping(value: Any, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise RecipeError(f"{where}: must be a mapping of name: value, not {type(value).__name__}")
    return {str(k): v for k, v in value.items()}


def model_fields(item: Any, where: str, valid: tuple[str, ...]) -> tuple[str, dict[str, Any]]:
    """The `model` path and `parameters` of a `- model: ...` entry (in `models:` or a slice's `sources:`)."""
    if not isinstance(item, Mapping):
        raise RecipeError(f"{where}: must be a mapping with a 'model' key")
    check_keys(where, item, valid)
    model = item.get("model")
    if not isinstance(model, str) or not model:
        raise RecipeError(f"{where}.model: must be a path to a checkpoint directory")
    return model, mapping(item.get("parameters"), f"{where}.parameters")
