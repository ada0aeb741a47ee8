"""Recipes: the mergekit-compatible YAML (or dict) a user writes, parsed into plain dataclasses.

Parsing is strict on structure (unknown keys, wrong types) and says which key is wrong and what the closest
valid key is, because a misspelt `desnity:` that silently falls back to a default is the worst kind of merge bug.
Method-specific checks (which parameters a method takes, their ranges) live in `planner.methods`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

from ..dtypes import RECIPE_NAMES
from ..errors import RecipeError
from ..io.models import pin_refs
from .keys import check_keys, mapping, model_fields
from .slices import OutputSlice, parse_slices

TOP_KEYS = (
    "merge_method", "base_model", "models", "slices", "parameters", "dtype", "out_dtype",
    "tokenizer_source", "tokenizer", "chat_template", "name", "seed",
)
MODEL_KEYS = ("model", "parameters")
TOKENIZER_KEYS = ("source", "tokens", "pad_to_multiple_of")


@dataclass(frozen=True)
class TokenizerSetting:
    """What a recipe says about the output's tokenizer: `tokenizer_source: X`, or a `tokenizer:` block."""

    source: str | None = None         # "base", "union" or a model (path, "model:path", a stage); None: not set
    tokens: dict[str, Any] = field(default_factory=dict)   # per-token rules, as written (planner/vocab.py)
    pad_to_multiple_of: int | None = None
    key: str = "tokenizer_source"     # where `source` was given, for messages


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
    tokenizer: TokenizerSetting = field(default_factory=TokenizerSetting)
    slices: "list[OutputSlice] | None" = None
    source: str = "<recipe>"          # where the recipe came from, for error messages
    raw: dict[str, Any] = field(default_factory=dict)
    name: str | None = None           # a stage's name in a multi-document recipe
    documents: list[dict[str, Any]] | None = None   # multi-stage: every stage this output needs, this one last
    stage_names: frozenset[str] = frozenset()       # multi-stage: model references that name a stage

    @property
    def output_dtype(self) -> str | None:
        return self.out_dtype or self.dtype


class _SafeLoaderNoAliases(yaml.SafeLoader):
    """SafeLoader never constructs Python objects; we also refuse aliases so a 'billion laughs' recipe can't
    blow up memory, and explicit tags (`!!python/object`, `!include`, `!!float x`), which a recipe never needs and
    which are the way YAML files try to construct things. Recipes need neither."""

    def compose_node(self, parent, index):  # type: ignore[override]
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.MarkedYAMLError(None, None, "YAML aliases (*name) are not allowed in recipes",
                                       event.start_mark)
        event = self.peek_event()
        tag = getattr(event, "tag", None)
        if tag is not None and isinstance(event, (yaml.ScalarEvent, yaml.SequenceStartEvent,
                                                  yaml.MappingStartEvent)):
            raise yaml.MarkedYAMLError(None, None, f"YAML tags ({tag}) are not allowed in recipes",
                                       event.start_mark)
        return super().compose_node(parent, index)


def load_yaml(text: str, source: str, *, all_documents: bool = False) -> Any:
    """One YAML document (or, `all_documents`, the list of every `---` document) with one-line errors."""
    try:
        if all_documents:
            return list(yaml.load_all(text, Loader=_SafeLoaderNoAliases))  # noqa: S506 - a SafeLoader subclass
        return yaml.load(text, Loader=_SafeLoaderNoAliases)  # noqa: S506 - a SafeLoader subclass
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = exc.problem or exc.context or "invalid YAML"
        raise RecipeError(f"{source}: YAML error{where}: {problem}") from None
    except yaml.YAMLError as exc:
        raise RecipeError(f"{source}: YAML error: {(str(exc).splitlines() or [type(exc).__name__])[0]}") from None
    except RecursionError:
        raise RecipeError(f"{source}: YAML error: nested too deeply to be a recipe") from None
    except (ValueError, TypeError, ArithmeticError, LookupError, AttributeError) as exc:
        # PyYAML's constructors raise these for scalars that look like a type but aren't (`2001-13-45`)
        raise RecipeError(f"{source}: YAML error: cannot read a value: {exc}") from None


def _is_path(recipe: Any) -> bool:
    return isinstance(recipe, Path) or (isinstance(recipe, str) and "\n" not in recipe
                                         and recipe.endswith((".yaml", ".yml")))


def _read_text(recipe: "str | Path") -> str:
    path = Path(recipe)
    if not path.is_file():
        raise RecipeError(f"{path}: recipe file does not exist")
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise RecipeError(f"{path}: cannot read recipe: {exc}") from None


def read_recipe_source(recipe: "str | Path | Mapping[str, Any] | Recipe") -> tuple[Any, str]:
    """Accept a path, YAML text, or a mapping; return (data, source name for messages)."""
    if isinstance(recipe, Mapping):
        return dict(recipe), "<recipe>"
    if _is_path(recipe):
        return load_yaml(_read_text(recipe), str(recipe)), str(recipe)   # type: ignore[arg-type]
    if isinstance(recipe, str):
        return load_yaml(recipe, "<recipe>"), "<recipe>"
    raise RecipeError(f"recipe must be a path, YAML text or a mapping, not {type(recipe).__name__}")


def read_documents(recipe: Any) -> tuple[list[Any], str]:
    """Like `read_recipe_source`, but every `---` document of a multi-stage recipe (a list of mappings is also
    accepted); empty documents are dropped."""
    if isinstance(recipe, Mapping):
        return [dict(recipe)], "<recipe>"
    if isinstance(recipe, (list, tuple)):
        return list(recipe), "<recipe>"
    if _is_path(recipe):
        docs, source = load_yaml(_read_text(recipe), str(recipe), all_documents=True), str(recipe)
    elif isinstance(recipe, str):
        docs, source = load_yaml(recipe, "<recipe>", all_documents=True), "<recipe>"
    else:
        raise RecipeError(f"recipe must be a path, YAML text or a mapping, not {type(recipe).__name__}")
    docs = [d for d in docs if d is not None]
    if not docs:
        raise RecipeError(f"{source}: empty recipe; a recipe is a YAML mapping with a 'merge_method' key")
    return docs, source


def _dtype(value: Any, key: str, source: str) -> str | None:
    if value is None:
        return None
    code = RECIPE_NAMES.get(str(value).lower())
    if code is None:
        raise RecipeError(f"{source}: {key}: unknown dtype '{value}'; use one of float32, float16, bfloat16")
    return code


def _model_entry(item: Any, where: str) -> ModelEntry:
    if isinstance(item, str):
        return ModelEntry(item)
    return ModelEntry(*model_fields(item, where, MODEL_KEYS))


def parse_recipe(recipe: "str | Path | Mapping[str, Any] | Recipe") -> Recipe:
    """Structure only: keys, types, dtypes. Paths and method parameters are validated by the planner."""
    if isinstance(recipe, Recipe):
        return recipe
    data, source = read_recipe_source(recipe)
    return recipe_from_data(data, source)


def tokenizer_setting(raw: Mapping[str, Any], where: str) -> TokenizerSetting:
    """The one parser of `tokenizer_source: X` and of the `tokenizer:` block (source, tokens, pad_to_multiple_of);
    their meaning is planner/vocab.py's."""
    ts, tb = raw.get("tokenizer_source"), raw.get("tokenizer")
    if ts is not None and tb is not None:
        raise RecipeError(f"{where}: tokenizer: give either 'tokenizer_source' or a 'tokenizer' block, not both")
    if tb is None:
        if ts is not None and (not isinstance(ts, str) or not ts):
            raise RecipeError(f"{where}: tokenizer_source: must be 'base', 'union' or a model path")
        return TokenizerSetting(ts, {}, None, "tokenizer_source")
    if not isinstance(tb, Mapping):
        raise RecipeError(f"{where}: tokenizer: must be a mapping with keys {', '.join(TOKENIZER_KEYS)}")
    check_keys(f"{where}: tokenizer", tb, TOKENIZER_KEYS)
    src = tb.get("source", "union")
    if not isinstance(src, str) or not src:
        raise RecipeError(f"{where}: tokenizer.source: must be 'base', 'union' or a model path")
    tokens = tb.get("tokens") or {}
    if not isinstance(tokens, Mapping):
        raise RecipeError(f"{where}: tokenizer.tokens: must be a mapping of token: {{source: ..., force: ...}}")
    pad = tb.get("pad_to_multiple_of")
    if pad is not None and (isinstance(pad, bool) or not isinstance(pad, int) or pad < 1):
        raise RecipeError(f"{where}: tokenizer.pad_to_multiple_of: must be a positive integer, not {pad!r}")
    return TokenizerSetting(src, dict(tokens), pad, "tokenizer.source")


def recipe_from_data(data: Any, source: str) -> Recipe:
    """One recipe (one document of a multi-stage recipe) from its parsed YAML."""
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
    if slices is not None:
        slices = parse_slices(slices, source)
    name = data.get("name")
    if name is not None and (not isinstance(name, str) or not name):
        raise RecipeError(f"{source}: name: must be a non-empty string (a stage's name)")
    base = data.get("base_model")
    if base is not None and not isinstance(base, str):
        raise RecipeError(f"{source}: base_model: must be a path to a checkpoint directory")
    tokenizer = tokenizer_setting(data, source)
    return Recipe(
        merge_method=method,
        models=models,
        base_model=base,
        parameters=mapping(data.get("parameters"), f"{source}: parameters"),
        dtype=_dtype(data.get("dtype"), "dtype", source),
        out_dtype=_dtype(data.get("out_dtype"), "out_dtype", source),
        tokenizer=tokenizer,
        slices=slices,
        source=source,
        raw=dict(data),
        name=name,
    )


def dump_recipe(recipe: Recipe, pins: Mapping[str, str] | None = None) -> str:
    """The recipe as YAML, saved next to the output so a merge can be reproduced (a multi-stage recipe: the stages
    it needs, as `---` documents, the output last). Hub references are pinned to the commits that were read,
    each noted in a comment with the revision it was written as."""
    pins = dict(pins or {})
    head = "".join(f"# {ref} -> {sha}\n" for ref, sha in sorted(pins.items()))
    if head:
        head = "# hub inputs, pinned to the commits this merge read:\n" + head
    if recipe.documents and len(recipe.documents) > 1:
        return head + yaml.safe_dump_all(pin_refs(recipe.documents, pins), sort_keys=False)
    return head + yaml.safe_dump(pin_refs(recipe.raw, pins), sort_keys=False)
