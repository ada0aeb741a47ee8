"""Parameter values as mergekit recipes write them, resolved to one number per tensor.

A value may be a scalar, a gradient (a list of numbers spread evenly over the layers and interpolated
piecewise-linearly), or a list of `{filter: SUBSTRING, value: V}` entries where the first matching filter wins and
an entry without a filter (or with filter `*`) is the default. Filter values may themselves be gradients.
Non-layer tensors, before the layers (embeddings) or after them (final norm, lm_head), read every gradient at its
start, t = 0, as mergekit 0.1.5 does (`weight: [0.2, 0.8]` gives lm_head 0.2). With slices, a gradient spans each slice's own layers (mergekit's
`plan_slice`: t = k / (n - 1) for layer k of an n-layer slice, 1 for a one-layer slice).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Mapping

from ..errors import RecipeError

_LAYER_RE = re.compile(r"(?:^|\.)(?:layers|h|layer|blocks|block)\.(\d+)\.")
_POST_HINTS = ("lm_head", "norm.weight", "norm.bias", "ln_f", "final_layernorm", "score.", "classifier", "pooler",
               "cls.predictions", "cls.seq_relationship")


def layer_index(name: str) -> int | None:
    """The decoder-layer index in a tensor name (`model.layers.12.mlp...`, `transformer.h.3...`,
    `encoder.layer.3...`), by pattern, so new architectures work without a model list."""
    m = _LAYER_RE.search(name)
    return int(m.group(1)) if m else None


def layer_split(name: str) -> tuple[str, int, str] | None:
    """`model.layers.12.mlp.up_proj.weight` -> ("model.layers.", 12, ".mlp.up_proj.weight"): the stack prefix,
    the index and the rest, so slices can renumber a layer without knowing the architecture."""
    m = _LAYER_RE.search(name)
    if m is None:
        return None
    return name[:m.start(1)], int(m.group(1)), name[m.end(1):]


def is_post(name: str) -> bool:
    """A non-layer tensor that sits after the layers (final norm, lm_head, classifier heads): mergekit's
    "post weights", which with slices are merged over the last slice's sources (the embeddings over the first's)."""
    return any(h in name for h in _POST_HINTS) and "layers." not in name


@dataclass(frozen=True)
class TensorPosition:
    """Where a tensor sits, for gradients: its relative position t in [0, 1] over the layers."""

    name: str
    t: float

    @classmethod
    def of(cls, name: str, layer: int | None, num_layers: int) -> "TensorPosition":
        if layer is None:
            return cls(name, 0.0)          # pre and post tensors alike: mergekit's ConfigReader(t=0)
        return cls(name, layer_t(layer, num_layers))


def layer_t(k: int, n: int) -> float:
    """Gradient position of layer k of n, as mergekit computes it per slice (plan_slice): k / (n - 1), and 1
    for a one-layer slice."""
    return min(k / (n - 1), 1.0) if n > 1 else 1.0     # clamped: a second stack (vision tower) may be longer


def _gradient(values: list[Any], t: float, where: str) -> Any:
    if values and all(isinstance(v, str) for v in values):
        return values[int(t * (len(values) - 1))]          # mergekit steps through non-numeric lists
    nums = []
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise RecipeError(f"{where}: a gradient must be a list of numbers, found {v!r}")
        nums.append(float(v))
    if len(nums) == 1:
        return nums[0]
    pos = t * (len(nums) - 1)
    i = min(int(pos), len(nums) - 2)
    frac = pos - i
    return nums[i] * (1.0 - frac) + nums[i + 1] * frac


def is_filter_list(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, Mapping) for v in value)


def check_filter_entry(entry: Mapping[str, Any], where: str) -> None:
    """`{filter: SUBSTRING, value: V}`. `pattern:` gets its own hint: mergekit's gradient-slerp example spells it
    so, and mergekit silently reads such an entry as unfiltered, applying its value to every tensor."""
    extra = set(entry) - {"filter", "value"}
    if "pattern" in extra:
        raise RecipeError(f"{where}: filter entries are written {{filter: SUBSTRING, value: V}}; write 'filter:' "
                          f"instead of 'pattern:' (mergekit ignores 'pattern' and applies the value everywhere)")
    if extra or "value" not in entry:
        raise RecipeError(f"{where}: filter entries are {{filter: SUBSTRING, value: V}}, found {dict(entry)}")


def leaves(value: Any, where: str) -> list[tuple[Any, str]]:
    """Every concrete value a parameter can take, with where it is written: the scalar itself, each point of a
    gradient, the values of a filter list (themselves scalars or gradients). For checks that must hold whatever
    the layer count: a gradient point that falls between layers is still checked."""
    if is_filter_list(value):
        out = []
        for i, entry in enumerate(value):
            check_filter_entry(entry, where)
            out += leaves(entry["value"], f"{where}[{i}].value")
        return out
    if isinstance(value, list):
        return [(v, f"{where}[{i}]") for i, v in enumerate(value)]
    return [(value, where)]


def resolve(value: Any, pos: TensorPosition, where: str) -> Any:
    """One concrete value of a parameter for the tensor at `pos`. Returns None when a filter list has no match
    and no default (the caller then falls back to the next level: per-model -> global -> method default)."""
    if is_filter_list(value):
        for entry in value:
            check_filter_entry(entry, where)
            flt = entry.get("filter")
            if flt is None or flt == "*" or str(flt) in pos.name:
                return resolve(entry["value"], pos, where)
        return None
    if isinstance(value, list):
        return _gradient(value, pos.t, where)
    return value


def lookup(name: str, levels: list[tuple[Mapping[str, Any], str]], pos: TensorPosition) -> tuple[Any, bool]:
    """Resolve parameter `name` through levels (most specific first). Returns (value, found)."""
    v, where = lookup_where(name, levels, pos)
    return v, where is not None


def lookup_where(name: str, levels: list[tuple[Mapping[str, Any], str]], pos: TensorPosition,
                 ) -> tuple[Any, str | None]:
    """Like `lookup`, returning the level that gave the value (for messages), or None when none did."""
    for params, where in levels:
        if name in params:
            v = resolve(params[name], pos, f"{where}.{name}")
            if v is not None:
                return v, where
    return None, None
