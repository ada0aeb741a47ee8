"""How a checkpoint's tensors become the model's parameters: transformers' own loading rules, applied to the
headers up front and to the tensors one unit (a decoder layer) at a time.

Checkpoints do not always name their tensors as the model class names its parameters: GPT-2 and OPT checkpoints
leave out the base-model prefix, a Mixtral checkpoint (and every MoE merge, as mergekit-moe writes them) stores one
tensor per expert under `block_sparse_moe` where transformers 5 holds the experts fused under `mlp`, and a tied
head has no tensor of its own. `from_pretrained` resolves all of this with its conversion mapping (renamings, and
converters such as MergeModulelist + Concatenate) and its tie rules. Evaluation never loads the model whole, so it
applies the same rules by name when the stream opens, and runs a converter when the unit that holds its parameters
is loaded. What `from_pretrained` could only leave uninitialised (a parameter no tensor provides, an untied head
that is missing) is a one-line error here, before any work; so is a shape that does not match the config.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch
from torch import nn

from ..errors import CheckpointError


@dataclass(frozen=True)
class Group:
    """Checkpoint tensors that fill some parameters together: one tensor as it is (`converter` None), or the
    inputs of one of transformers' converters (e.g. every expert's w1 and w3 -> one fused gate_up_proj)."""

    key: str                          # the parameter transformers keys the group on
    targets: tuple[str, ...]          # every parameter it fills
    sources: tuple[str, ...]          # checkpoint tensors, in the order transformers collects them
    patterns: tuple[str, ...]         # per source: the converter's pattern it is collected under
    converter: Any = None             # a transformers WeightConverter (a template, copied for each use)
    nbytes: int = 0                   # float32 bytes of its sources (what a converter holds besides its output)


def _transformers_rules(model: nn.Module) -> tuple[list, list, Callable[..., tuple[str, str | None]]] | None:
    """transformers' renamings and converters for this model and its key-renaming function, or None where
    transformers has no conversion mapping (before 5.0: checkpoint names are the parameter names)."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key
    except ImportError:
        return None
    mapping = get_model_conversion_mapping(model)
    return ([m for m in mapping if isinstance(m, WeightRenaming)],
            [m for m in mapping if isinstance(m, WeightConverter)], rename_source_key)


def _natural(name: str) -> list:
    """transformers' key order (dot_natural_key): numeric parts as numbers, so expert 10 follows expert 9."""
    return [(0, int(p)) if p.isdigit() else (1, p) for p in name.split(".")]


def _strip_or_add_prefix(name: str, prefix: str, params: dict[str, Any]) -> str:
    """The base-model prefix rule of `from_pretrained` (without a conversion mapping): GPT-2's `h.0.attn...`
    is `transformer.h.0.attn...`."""
    if name in params or not prefix:
        return name
    if f"{prefix}.{name}" in params:
        return f"{prefix}.{name}"
    if name.startswith(prefix + ".") and name[len(prefix) + 1:] in params:
        return name[len(prefix) + 1:]
    return name


def _tied_pairs(model: Any, head: str, embed: str) -> dict[str, str]:
    """{parameter: parameter it is tied to}, as transformers decides it for this config."""
    expand = getattr(model, "get_expanded_tied_weights_keys", None)
    if expand is not None:
        return dict(expand(all_submodels=True))
    text = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return {head: embed} if getattr(text, "tie_word_embeddings", False) and head != embed else {}


class ParamMap:
    """For a model skeleton and a weight source's tensor shapes: which tensors fill which parameters."""

    def __init__(self, model: nn.Module, shapes: dict[str, tuple[int, ...]], label: str, *, head: str,
                 embed: str):
        self.model, self.label = model, label
        self._cls = type(model).__name__
        params = {n: tuple(p.shape) for n, p in model.named_parameters(remove_duplicate=False)}
        self.shapes = params                  # every parameter's shape as the config makes it
        groups: dict[str, dict] = {}
        rules = _transformers_rules(model)
        prefix = getattr(model, "base_model_prefix", "")
        meta = model.state_dict() if rules is not None else None
        for name in sorted(shapes, key=_natural):
            if rules is None:
                target, pattern = _strip_or_add_prefix(name, prefix, params), None
            else:
                renamings, converters, rename = rules
                target, pattern = rename(name, renamings, converters, prefix, meta)
                if target not in meta and name in meta:
                    target, pattern = rename(name, [], [], prefix, meta)
            if target not in params:
                continue                  # a tensor the model does not use (old buffers): transformers skips it
            g = groups.setdefault(target, {"sources": [], "patterns": [], "converter": None})
            g["sources"].append(name)
            g["patterns"].append(pattern or name)
            if pattern is not None:
                g["converter"] = next(c for c in rules[1] if pattern in c.source_patterns)
        self.groups: dict[str, Group] = {}
        self.owner: dict[str, Group] = {}
        for key, g in groups.items():
            group = self._group(key, g, shapes, params)
            self.groups[key] = group
            for t in group.targets:
                self.owner[t] = group
        self.alias: dict[str, str] = {}
        for target, source in _tied_pairs(model, head, embed).items():
            if target not in self.owner and source in self.owner:
                self.alias[target] = source
            elif source not in self.owner and target in self.owner:
                self.alias[source] = target       # transformers ties symmetrically: the one present fills both
        self.head = head
        for p in params:
            if p not in self.owner and p not in self.alias:
                hint = ("; config.json does not tie the output head to the input embedding "
                        "(tie_word_embeddings is false), so it cannot stand in" if p == head else "")
                raise CheckpointError(f"{label}: no tensor '{p}' (needed by {self._cls}){hint}")

    def _group(self, key: str, g: dict, shapes: dict[str, tuple[int, ...]],
               params: dict[str, tuple[int, ...]]) -> Group:
        sources = tuple(g["sources"])
        nbytes = sum(4 * math.prod(shapes[s]) for s in sources)
        if g["converter"] is None:
            if len(sources) > 1:
                raise CheckpointError(f"{self.label}: tensors {sources[0]!r} and {sources[1]!r} both fill "
                                      f"{self._cls}'s parameter {key!r}")
            self._check_shape(sources[0], key, shapes[sources[0]], params[key])
            return Group(key, (key,), sources, sources, None, nbytes)
        group = Group(key, (), sources, tuple(g["patterns"]), g["converter"], nbytes)
        # run the converter on meta tensors: which parameters it fills, and with what shapes, from headers alone
        out = self._convert(group, {s: torch.empty(shapes[s], device="meta") for s in sources})
        for name, value in out.items():
            if name not in params:
                raise CheckpointError(f"{self.label}: {sources[0]!r} converts to {name!r}, which {self._cls} "
                                      "does not have")
            self._check_shape(sources[0], name, tuple(value.shape), params[name])
        return Group(key, tuple(out), sources, group.patterns, group.converter, nbytes)

    def _check_shape(self, source: str, param: str, got: tuple[int, ...], want: tuple[int, ...]) -> None:
        if tuple(got) != tuple(want):
            raise CheckpointError(f"{self.label}: tensor {source!r} has shape {list(got)}, but config.json makes "
                                  f"{self._cls}'s {param!r} {list(want)}")

    def _convert(self, group: Group, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        conv = copy.deepcopy(group.converter)
        for s, pattern in zip(group.sources, group.patterns):
            conv.add_tensor(group.key, s, pattern, (lambda t: lambda: t)(tensors.pop(s)))
        out = conv.convert(group.key, model=self.model, config=self.model.config)
        return {k: (v[0] if isinstance(v, list) else v) for k, v in out.items()}

    # -- queries -----------------------------------------------------------------------------------------
    def group_of(self, param: str) -> Group:
        return self.owner[self.alias.get(param, param)]

    def tensor_of(self, param: str) -> str:
        """The one checkpoint tensor that is `param` as stored (the embedding and the head are read in row
        blocks, never converted); a converted parameter there is a one-line refusal."""
        group = self.group_of(param)
        if group.converter is not None:
            raise CheckpointError(f"{self.label}: {param!r} is converted from {len(group.sources)} tensors on "
                                  "loading; evaluation reads it in row blocks and cannot")
        return group.sources[0]

    def sources(self, params: Iterable[str]) -> list[str]:
        seen: dict[str, None] = {}
        for p in params:
            for s in self.group_of(p).sources:
                seen[s] = None
        return list(seen)

    def transient_bytes(self, params: Iterable[str]) -> int:
        """Float32 bytes held besides the parameters while loading them: a converter's inputs next to its
        output (the largest group's)."""
        return max((self.group_of(p).nbytes for p in params if self.group_of(p).converter is not None), default=0)

    def load(self, params: list[str], read: Callable[[list[str]], dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """{parameter: value} for `params`; `read(names)` gives checkpoint tensors (converted to the compute
        dtype). Groups are loaded one after another, so a converter's inputs are held only while it runs."""
        out: dict[str, torch.Tensor] = {}
        done: dict[str, dict[str, torch.Tensor]] = {}
        for p in params:
            group = self.group_of(p)
            if group.key not in done:
                tensors = read(list(group.sources))
                done[group.key] = ({group.key: tensors[group.sources[0]]} if group.converter is None
                                   else self._convert(group, tensors))
            values = done[group.key]
            out[p] = values[self.alias.get(p, p)]
        return out


