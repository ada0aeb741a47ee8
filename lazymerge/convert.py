"""`lazymerge convert-config`: the simple merge configs people write by hand, turned into lazymerge recipes.

Input (JSON or YAML):

```yaml
strategy: weighted            # weighted | task_arithmetic | slerp | sequential
models:                       # a list of {path, weight} (a bare string is a path with the default weight)
  - {path: ./ft-a, weight: 0.7}
  - {path: ./ft-b, weight: 0.3}
base: ./base                  # task_arithmetic: required; slerp: the t = 0 end; not used otherwise
dtype: bfloat16               # optional, also out_dtype
```

| strategy | recipe | notes |
|---|---|---|
| `weighted` | `linear` | weights default 1 (an equal average); `normalize` (default true) as linear's |
| `task_arithmetic` | `task_arithmetic` | `base` required; an entry's `op: subtract` (or a negative weight) subtracts its task vector; `lambda` scales the sum |
| `slerp` | `slerp` | two models: `base` + one, or the first of two as the base; `t` from `t:`, else the second model's weight (with two weights `w1 / (w0 + w1)`), else 0.5 |
| `sequential` | a multi-stage recipe | `method: linear` (default) or `slerp`; each later model is merged into the result so far: stage i takes the previous result with weight `1 - w_i` and model i with `w_i` (default 0.5; the first model's weight, when given, pairs with the second's in the first stage). Every stage but the last is named `stage-i`; the last is the (unnamed) output |

Paths are kept as written (a recipe's relative paths are relative to where `lazymerge run` is started).
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Mapping

import yaml

from .errors import OutputError, RecipeError
from .dtypes import RECIPE_NAMES
from .planner.keys import closest
from .planner.recipe import load_yaml

STRATEGIES = ("weighted", "task_arithmetic", "slerp", "sequential")
# keys each strategy takes, besides `strategy` and `models`
STRATEGY_KEYS: dict[str, tuple[str, ...]] = {
    "weighted": ("dtype", "out_dtype", "normalize"),
    "task_arithmetic": ("base", "dtype", "out_dtype", "normalize", "lambda"),
    "slerp": ("base", "dtype", "out_dtype", "t"),
    "sequential": ("dtype", "out_dtype", "method"),
}
ALL_KEYS = ("strategy", "models") + tuple(dict.fromkeys(k for ks in STRATEGY_KEYS.values() for k in ks))
ENTRY_KEYS = ("path", "model", "weight", "op")
OPS = ("add", "subtract")
SEQUENTIAL_METHODS = ("linear", "slerp")


def _number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise RecipeError(f"{where}: must be a number, not {value!r}")
    return float(value)


def _unit(value: Any, where: str) -> float:
    v = _number(value, where)
    if not 0.0 <= v <= 1.0:
        raise RecipeError(f"{where}: {v!r} must be in [0, 1]")
    return v


def _path(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise RecipeError(f"{where}: must be a path to a checkpoint directory, not {value!r}")
    return value


def _check_top(data: Mapping[str, Any], strategy: str, source: str) -> None:
    valid = ("strategy", "models") + STRATEGY_KEYS[strategy]
    for key in data:
        if key in valid:
            continue
        if key in ALL_KEYS:
            users = [s for s in STRATEGIES if key in STRATEGY_KEYS[s]]
            raise RecipeError(f"{source}: {key}: not used by strategy '{strategy}' (only by "
                              f"{', '.join(users)}); valid keys: {', '.join(valid)}")
        raise RecipeError(f"{source}: unknown key '{key}'{closest(str(key), valid)}; valid keys: {', '.join(valid)}")


class _Entry:
    """One `models` entry: a path, an optional weight, an op."""

    def __init__(self, item: Any, i: int, source: str, strategy: str):
        where = f"{source}: models[{i}]"
        self.where = where
        if isinstance(item, str):
            item = {"path": item}
        if not isinstance(item, Mapping):
            raise RecipeError(f"{where}: must be a path or a mapping with 'path' and 'weight'")
        for key in item:
            if key not in ENTRY_KEYS:
                raise RecipeError(f"{where}: unknown key '{key}'{closest(str(key), ENTRY_KEYS)}; valid keys: "
                                  "path, weight, op")
        if "path" in item and "model" in item:
            raise RecipeError(f"{where}: give 'path' or 'model', not both")
        if "path" not in item and "model" not in item:
            raise RecipeError(f"{where}.path: missing; each model needs a path")
        self.path = _path(item.get("path", item.get("model")), f"{where}.path")
        self.weight = _number(item["weight"], f"{where}.weight") if "weight" in item else None
        op = item.get("op")
        if op is not None and strategy != "task_arithmetic":
            raise RecipeError(f"{where}.op: only strategy task_arithmetic adds or subtracts models")
        if op is not None and op not in OPS:
            raise RecipeError(f"{where}.op: must be add or subtract, not {op!r}{closest(str(op), OPS)}")
        self.op = op or "add"


def _dtypes(data: Mapping[str, Any], source: str) -> dict[str, str]:
    out = {}
    for key in ("dtype", "out_dtype"):
        if data.get(key) is None:
            continue
        v = data[key]
        if not isinstance(v, str) or v.lower() not in RECIPE_NAMES:
            raise RecipeError(f"{source}: {key}: unknown dtype {v!r}{closest(str(v), list(RECIPE_NAMES))}; use one of "
                              "float32, float16, bfloat16")
        out[key] = v
    return out


def _bool(data: Mapping[str, Any], key: str, source: str) -> bool:
    v = data[key]
    if not isinstance(v, bool):
        raise RecipeError(f"{source}: {key}: must be true or false, not {v!r}")
    return v


def _model(path: str, **params: Any) -> dict[str, Any]:
    return {"model": path, "parameters": params} if params else {"model": path}


def convert_config(data: Any, source: str = "<config>") -> list[dict[str, Any]]:
    """The lazymerge recipe(s) equivalent to a simple config: one recipe, or (`sequential`) the stages of a
    multi-stage recipe, the output last. Raises RecipeError (one line naming the key) on anything unclear."""
    if not isinstance(data, Mapping):
        raise RecipeError(f"{source}: a config must be a mapping with 'strategy' and 'models'")
    strategy = data.get("strategy")
    if strategy is None:
        raise RecipeError(f"{source}: strategy: missing; one of {', '.join(STRATEGIES)}")
    if strategy not in STRATEGIES:
        raise RecipeError(f"{source}: strategy: unknown strategy {strategy!r}{closest(str(strategy), STRATEGIES)};"
                          f" one of {', '.join(STRATEGIES)}")
    _check_top(data, strategy, source)
    models_raw = data.get("models")
    if not isinstance(models_raw, list) or not models_raw:
        raise RecipeError(f"{source}: models: must be a non-empty list of {{path, weight}} entries")
    entries = [_Entry(item, i, source, strategy) for i, item in enumerate(models_raw)]
    base = _path(data["base"], f"{source}: base") if data.get("base") is not None else None
    common = _dtypes(data, source)
    return {"weighted": _weighted, "task_arithmetic": _task_arithmetic, "slerp": _slerp,
            "sequential": _sequential}[strategy](data, entries, base, common, source)


def _weighted(data, entries, base, common, source) -> list[dict[str, Any]]:
    weights = [1.0 if e.weight is None else e.weight for e in entries]
    normalize = _bool(data, "normalize", source) if "normalize" in data else True
    if normalize and abs(sum(weights)) < 1e-12:
        raise RecipeError(f"{source}: models: the weights sum to 0, so they cannot be normalized "
                          "(set normalize: false)")
    recipe: dict[str, Any] = {"merge_method": "linear",
                              "models": [_model(e.path, weight=w) for e, w in zip(entries, weights)]}
    if "normalize" in data:
        recipe["parameters"] = {"normalize": normalize}
    return [{**recipe, **common}]


def _task_arithmetic(data, entries, base, common, source) -> list[dict[str, Any]]:
    if base is None:
        raise RecipeError(f"{source}: base: missing; task_arithmetic adds task vectors to a base model")
    models = []
    for e in entries:
        w = 1.0 if e.weight is None else e.weight
        models.append(_model(e.path, weight=-w if e.op == "subtract" else w))
    recipe: dict[str, Any] = {"merge_method": "task_arithmetic", "base_model": base, "models": models}
    params = {}
    if "normalize" in data:
        params["normalize"] = _bool(data, "normalize", source)
    if "lambda" in data:
        params["lambda"] = _number(data["lambda"], f"{source}: lambda")
    if params:
        recipe["parameters"] = params
    return [{**recipe, **common}]


def _slerp(data, entries, base, common, source) -> list[dict[str, Any]]:
    if base is not None:
        others = [e for e in entries if e.path != base]
        if len(others) != 1 or len(entries) - len(others) > 1:
            raise RecipeError(f"{source}: models: slerp interpolates between the base and exactly one other "
                              f"model, got {len(others)} besides the base")
        first, second = next((e for e in entries if e.path == base), None), others[0]
        a = base
    else:
        if len(entries) != 2:
            raise RecipeError(f"{source}: models: slerp interpolates between exactly two models (the first is "
                              f"t = 0), got {len(entries)}")
        first, second = entries
        a = first.path
    if "t" in data:
        for e in (first, second):
            if e is not None and e.weight is not None:
                raise RecipeError(f"{e.where}.weight: give slerp's 't' or the models' weights, not both")
        t = _unit(data["t"], f"{source}: t")
    elif second.weight is not None and first is not None and first.weight is not None:
        total = first.weight + second.weight
        if total <= 0 or first.weight < 0 or second.weight < 0:
            raise RecipeError(f"{source}: models: slerp weights must be >= 0 with a positive sum")
        t = second.weight / total
    elif second.weight is not None:
        t = _unit(second.weight, f"{second.where}.weight")
    else:
        t = 0.5
    recipe = {"merge_method": "slerp", "base_model": a, "models": [{"model": a}, {"model": second.path}],
              "parameters": {"t": t}}
    return [{**recipe, **common}]


def _sequential(data, entries, base, common, source) -> list[dict[str, Any]]:
    if len(entries) < 2:
        raise RecipeError(f"{source}: models: a sequential merge needs at least two models, got {len(entries)}")
    method = data.get("method", "linear")
    if method not in SEQUENTIAL_METHODS:
        raise RecipeError(f"{source}: method: must be linear or slerp, not {method!r}"
                          f"{closest(str(method), SEQUENTIAL_METHODS)}")
    stages: list[dict[str, Any]] = []
    prev = entries[0].path
    n = len(entries) - 1
    for i, e in enumerate(entries[1:], start=1):
        w = _unit(e.weight, f"{e.where}.weight") if e.weight is not None else 0.5
        w_prev = 1.0 - w
        if i == 1 and entries[0].weight is not None:
            w_prev = _number(entries[0].weight, f"{entries[0].where}.weight")
            if w_prev < 0 or w_prev + w <= 0:
                raise RecipeError(f"{entries[0].where}.weight: must be >= 0 with a positive sum with the second's")
        if method == "linear":
            stage: dict[str, Any] = {"merge_method": "linear",
                                     "models": [_model(prev, weight=w_prev), _model(e.path, weight=w)]}
        else:
            t = w / (w_prev + w)
            stage = {"merge_method": "slerp", "base_model": prev, "models": [{"model": prev}, {"model": e.path}],
                     "parameters": {"t": t}}
        stage.update(common)
        if i < n:
            stage = {"name": f"stage-{i}", **stage}
            prev = f"stage-{i}"
        stages.append(stage)
    return stages


def dump(recipes: list[dict[str, Any]]) -> str:
    """YAML text of the recipe(s): one document, or `---`-separated stages (the output last)."""
    if len(recipes) == 1:
        return yaml.safe_dump(recipes[0], sort_keys=False)
    return yaml.safe_dump_all(recipes, sort_keys=False, explicit_start=False)


def read_config(path: Path) -> Any:
    """A config file: JSON (by its .json suffix) or YAML, with one-line errors."""
    if not path.is_file():
        raise RecipeError(f"{path}: config file does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise RecipeError(f"{path}: cannot read config: {exc}") from None
    if path.suffix.lower() == ".json":
        try:
            return json.loads(text)
        except ValueError as exc:
            raise RecipeError(f"{path}: JSON error: {exc}") from None
    return load_yaml(text, str(path))


def convert_file(input: Path, out: Path | None) -> str | None:
    """Convert the config file `input`; write the recipe to `out` and return None, or return its text when `out`
    is None. One-line `LazyMergeError`s for every problem (the CLI's `convert-config` prints them)."""
    text = f"# converted from {input.name} by lazymerge convert-config\n" + dump(
        convert_config(read_config(input), str(input)))
    if out is None:
        return text
    if out.resolve() == input.resolve():
        raise OutputError(f"{out}: is the input config; choose another output file")
    try:
        out.write_text(text, encoding="utf-8")
    except OSError as exc:
        raise OutputError(f"{out}: cannot write: {exc.strerror or exc}") from None
    return None
