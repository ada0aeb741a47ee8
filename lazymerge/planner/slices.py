"""Which inputs feed each output tensor: whole models (`models:`) or layer slices (`slices:`), as mergekit means them.

mergekit turns a `models:` recipe into one slice covering every layer (its `normalize_config`), and plans a
`slices:` recipe as (mergekit/plan.py):

- output layers are numbered consecutively across slices; layer k of a slice reads layer `a + k` of each source
  (its `layer_range: [a, b]`), and every source of a slice must span the same number of layers;
- gradients are positioned within each slice: t = k / (n - 1) for layer k of an n-layer slice (1 when n == 1);
- non-layer tensors: the *pre* ones (embeddings) are merged over the *first* slice's sources with that slice's
  parameters, the *post* ones (final norm, lm_head) over the *last* slice's sources with its parameters, and
  both read every gradient at t = 0 (mergekit's `plan_module`). A frankenmerge `A [0, 24] + B [8, 32]` thus
  starts with A's embeddings and ends with B's head, the model its last layers were trained with; the tensor
  names come from the lead model (a tied head is found through its embedding);
- parameters resolve source-in-slice > slice > global (`ConfigReader.parameter`); per-model parameters match
  filters against the source's own tensor name, method-wide ones against the output name. lazymerge also accepts
  a `models:` list next to `slices:` as per-model defaults (between slice and global), which mergekit rejects.

Layers are found by name pattern (`params.layer_split`), not by a model list: the decoder stack is the layer
prefix (`model.layers.`, `transformer.h.`, `encoder.layer.`) with the most tensors; any other stack (a vision
tower) is treated like a non-layer tensor. Everything here works from headers and runs once per checkpoint or
per output tensor, never a scan of all tensors per tensor.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

from ..errors import RecipeError
from .keys import check_keys, mapping, model_fields
from .params import is_post, layer_split

SLICE_KEYS = ("sources", "parameters", "base_model")
SOURCE_KEYS = ("model", "layer_range", "parameters")
NUM_LAYERS_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")

Levels = list[tuple[Mapping[str, Any], str]]


@dataclass(frozen=True)
class SliceSource:
    """One `- model: M, layer_range: [a, b]` entry of a slice."""

    model: str
    layer_range: tuple[int, int]
    parameters: dict[str, Any]
    where: str                        # "recipe.yaml: slices[1].sources[0]", for messages


@dataclass(frozen=True)
class OutputSlice:
    sources: tuple[SliceSource, ...]
    parameters: dict[str, Any]
    base_model: str | None
    where: str

    @property
    def num_layers(self) -> int:
        a, b = self.sources[0].layer_range
        return b - a


def parse_slices(raw: Any, source: str) -> list[OutputSlice]:
    """Structure of `slices:` (keys, types, equal lengths); models and layer counts are checked when planning."""
    if not isinstance(raw, list) or not raw:
        raise RecipeError(f"{source}: slices: must be a non-empty list of '- sources: [...]' entries")
    out = []
    for i, item in enumerate(raw):
        where = f"{source}: slices[{i}]"
        if not isinstance(item, Mapping):
            raise RecipeError(f"{where}: must be a mapping with a 'sources' list")
        check_keys(where, item, SLICE_KEYS)
        srcs = item.get("sources")
        if not isinstance(srcs, list) or not srcs:
            raise RecipeError(f"{where}.sources: must be a non-empty list of '- model: PATH, layer_range: [a, b]'")
        sources = []
        for j, s in enumerate(srcs):
            sw = f"{where}.sources[{j}]"
            model, params = model_fields(s, sw, SOURCE_KEYS)
            lr = s.get("layer_range")
            if (not isinstance(lr, (list, tuple)) or len(lr) != 2
                    or not all(isinstance(v, int) and not isinstance(v, bool) for v in lr)
                    or not 0 <= lr[0] < lr[1]):
                raise RecipeError(f"{sw}.layer_range: must be [start, end] with 0 <= start < end, not {lr!r}")
            sources.append(SliceSource(model, (lr[0], lr[1]), params, sw))
        lengths = {s.layer_range[1] - s.layer_range[0] for s in sources}
        if len(lengths) > 1:
            raise RecipeError(f"{where}.sources: every source of a slice must span the same number of layers, "
                              f"got {', '.join(str(list(s.layer_range)) for s in sources)}")
        base = item.get("base_model")
        if base is not None and not isinstance(base, str):
            raise RecipeError(f"{where}.base_model: must be a path to a checkpoint directory")
        out.append(OutputSlice(tuple(sources), mapping(item.get("parameters"), f"{where}.parameters"), base, where))
    return out


# -- layers of a checkpoint ---------------------------------------------------------------------------------


@dataclass
class LayerIndex:
    """A checkpoint's tensors by decoder layer, from its names alone."""

    prefix: str | None                                  # the decoder stack, e.g. "model.layers."
    layers: dict[int, list[str]] = field(default_factory=dict)
    other: list[str] = field(default_factory=list)      # non-layer tensors (and other stacks)

    @property
    def num_layers(self) -> int:
        return max(self.layers) + 1 if self.layers else 0

    @classmethod
    def of(cls, names: Any) -> "LayerIndex":
        split = {}
        count: dict[str, int] = {}
        for nm in names:
            parts = layer_split(nm)
            if parts is not None:
                split[nm] = parts
                count[parts[0]] = count.get(parts[0], 0) + 1
        prefix = max(count, key=lambda p: (count[p], p)) if count else None
        idx = cls(prefix)
        for nm in names:
            parts = split.get(nm)
            if parts is not None and parts[0] == prefix:
                idx.layers.setdefault(parts[1], []).append(nm)
            else:
                idx.other.append(nm)
        return idx


def config_num_layers(config: Mapping[str, Any] | None) -> tuple[str, int] | None:
    """(key, value) of the layer count in a HF config (`num_hidden_layers`, GPT-2's `n_layer`, ...)."""
    if not config:
        return None
    for key in NUM_LAYERS_KEYS:
        if isinstance(config.get(key), int) and not isinstance(config.get(key), bool):
            return key, config[key]
    return None


PER_LAYER_KEYS = ("layer_types",)      # config lists with one entry per layer (Gemma 3, Qwen 3: sliding/full)


def sliced_config(config: dict[str, Any] | None, origins: list[tuple[str, int]], config_of: Any,
                  ) -> dict[str, Any] | None:
    """The output config of a sliced model: the lead's, with its layer count set to the output's, and per-layer
    lists (`layer_types`) rebuilt from the layer each output layer comes from."""
    if config is None:
        return None
    config = dict(config)
    found = config_num_layers(config)
    config[found[0] if found else "num_hidden_layers"] = len(origins)
    for key in PER_LAYER_KEYS:
        if isinstance(config.get(key), list):
            values = []
            for src, layer in origins:
                lst = (config_of(src) or {}).get(key)
                if not isinstance(lst, list) or layer >= len(lst):
                    break
                values.append(lst[layer])
            else:
                config[key] = values
                continue
            del config[key]          # unknown for some layer: let the architecture's default apply
    return config


# -- tensor specs -------------------------------------------------------------------------------------------


@dataclass
class Group:
    """The inputs shared by a run of output tensors: one slice, or (without slices) the whole models list."""

    keys: list[str]                   # opened checkpoint key of each input
    levels: list[Levels]              # each input's per-model parameter levels, most specific first
    glob_levels: Levels               # method-wide parameter levels
    base: int | None                  # index of the base model among the inputs
    contributors: list[int]           # the inputs that are merged (the base only for slerp-like methods)
    where: str                        # "recipe.yaml: slices[2]" / "recipe.yaml: models", for messages

    @property
    def lead(self) -> int:
        """The input whose dtype the output takes and whose buffers non-float tensors copy."""
        return self.base if self.base is not None else 0


@dataclass
class TensorSpec:
    """One output tensor: its name, its gradient position, and each input's tensor name (renumbered layers)."""

    name: str
    t: float
    group: Group
    names: list[str]


def slice_specs(slices: list[OutputSlice], groups: list[Group], index_of: Any, lead_names: Any,
                ) -> tuple[list[TensorSpec], list[tuple[str, int]]]:
    """Output tensors of a `slices:` recipe, in mergekit's order (pre weights, layers, post weights), and where
    each output layer comes from (the key and layer of the slice's lead source). `index_of(key)` is the (cached)
    LayerIndex of an opened checkpoint; `lead_names` the lead model's, whose non-layer tensors the output keeps."""
    specs: list[TensorSpec] = []
    origins: list[tuple[str, int]] = []
    for nm in lead_names.other:
        if not is_post(nm):
            specs.append(TensorSpec(nm, 0.0, groups[0], [nm] * len(groups[0].keys)))
    offset = 0
    for sl, g in zip(slices, groups):
        tmpl = g.lead
        src_t = sl.sources[tmpl]
        tmpl_index = index_of(g.keys[tmpl])
        n = sl.num_layers
        for k in range(n):
            t = k / (n - 1) if n > 1 else 1.0
            origins.append((g.keys[tmpl], src_t.layer_range[0] + k))
            for nm in tmpl_index.layers.get(src_t.layer_range[0] + k, ()):
                pre, _, rest = layer_split(nm)  # type: ignore[misc]
                names = [f"{pre}{s.layer_range[0] + k}{rest}" for s in sl.sources]
                specs.append(TensorSpec(f"{pre}{offset + k}{rest}", t, g, names))
        offset += n
    for nm in lead_names.other:
        if is_post(nm):
            specs.append(TensorSpec(nm, 0.0, groups[-1], [nm] * len(groups[-1].keys)))
    return specs, origins


def check_layer_ranges(slices: list[OutputSlice], groups: list[Group], index_of: Any, path_of: Any) -> None:
    """Every layer_range must lie within its model's layers (once per source, not per tensor)."""
    for sl, g in zip(slices, groups):
        for s, key in zip(sl.sources, g.keys):
            have = index_of(key).num_layers
            if s.layer_range[1] > have:
                raise RecipeError(f"{s.where}.layer_range: {list(s.layer_range)} goes past the last layer of "
                                  f"{path_of(key)}, which has {have} layer(s)")


# -- tied embeddings ----------------------------------------------------------------------------------------

HEAD_NAMES = ("lm_head.weight", "embed_out.weight", "cls.predictions.decoder.weight")
EMBED_SUFFIXES = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight", "embed_in.weight",
                  "tok_embeddings.weight", "shared.weight")


def ties_embeddings(config: Mapping[str, Any] | None) -> bool:
    """Whether a model's output head is its input embedding (transformers' default when the key is absent)."""
    if not config:
        return True
    if "tie_word_embeddings" in config:
        return bool(config["tie_word_embeddings"])
    text = config.get("text_config")
    if isinstance(text, Mapping) and "tie_word_embeddings" in text:
        return bool(text["tie_word_embeddings"])
    return True


def embedding_name(names: Any) -> str | None:
    """A checkpoint's input embedding (`model.embed_tokens.weight`, `transformer.wte.weight`, ...)."""
    for suffix in EMBED_SUFFIXES:
        for nm in names:
            if nm.endswith(suffix) and layer_split(nm) is None:
                return nm
    return None


def is_head(name: str) -> bool:
    return name.endswith(HEAD_NAMES) and layer_split(name) is None
