"""Compile one recipe (one stage of a multi-stage recipe) into tensor jobs: which inputs, parameters and method
make each output tensor. Headers only; every problem with the inputs is found here, with a one-line message.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import shapes
from ..dtypes import FLOAT_CODES
from ..errors import CheckpointError, RecipeError
from ..io.models import ModelOpener, source_key
from .graph import SourceRef, TensorBuilder
from .methods import BlockFn, Method, Param, Resolved
from .params import TensorPosition, is_post, layer_index, lookup_where
from .recipe import Recipe
from .slices import (Group, LayerIndex, TensorSpec, check_layer_ranges, config_num_layers, embedding_name,
                     is_head, slice_specs, sliced_config, ties_embeddings)
from .stages import StageOutput, stage_key
from .vocab import non_tokenizer, plan_vocab

_NUM_RE = re.compile(r"(\d+)")


def _natural_key(name: str) -> tuple:
    """Embeddings first, then layers in numeric order, then the head: shards group whole layers."""
    layer = layer_index(name)
    group = 1 if layer is not None else (2 if is_post(name) else 0)
    return (group, layer if layer is not None else -1,
            tuple(int(p) if p.isdigit() else p for p in _NUM_RE.split(name)))


@dataclass(eq=False)
class TensorJob:
    """How one output tensor of a stage is computed: its inputs, its resolved parameters, its method. The output
    stage's jobs are emitted and written; an earlier stage's jobs are emitted inside the later stage's tensors
    that load them (`graph.TensorBuilder`)."""

    name: str
    shape: tuple[int, ...]
    out_dtype: str
    refs: list[SourceRef]
    base: int | None
    contributors: list[int]
    lead: int
    method: Method
    params: Resolved | None           # None: not a float tensor, copied from `lead` as stored
    vocab: Any = None                 # planner.vocab.VocabPlan when its rows are mapped token by token

    def emit(self, tb: TensorBuilder) -> BlockFn:
        if self.params is None:
            return lambda j: tb.load(self.lead, j, raw=True)
        # random streams are keyed by a model's rank among the merged models, not by its position among the
        # inputs, so listing the base among `models` (or slicing all layers) does not change DARE/DELLA masks
        return self.method.build(tb, self.contributors, list(range(len(self.contributors))), self.params)


@dataclass
class StagePlan:
    """One compiled recipe (one stage of a multi-stage recipe): its output tensors' jobs and its output config."""

    recipe: Recipe
    method: Method
    jobs: list[TensorJob]
    config: dict[str, Any] | None
    aux_files: list[Path]
    src_keys: list[str]               # every input, in first-use order (models, base, parameter checkpoints)
    base_key: str | None
    lead_key: str
    vocab: Any = None


class StageCompiler:
    """Compiles one recipe against the checkpoints opened so far (shared by all stages) and the earlier stages'
    outputs. Work is per output tensor and per input, with per-checkpoint caches: no per-tensor scans."""

    def __init__(self, r: Recipe, method: Method, sources: dict[str, Any], stages: dict[str, StageOutput],
                 opener: ModelOpener):
        self.r = r
        self.method = method
        self.sources = sources
        self.stages = stages
        self.opener = opener
        self._ref_keys: dict[str, str] = {}
        self._layer_index: dict[str, LayerIndex] = {}
        self._embedding: dict[str, str | None] = {}
        self.src_keys: list[str] = []

    # -- inputs ------------------------------------------------------------------------------------------
    def get(self, key: str) -> Any:
        return self.stages[key] if key in self.stages else self.sources[key]

    def open_ref(self, ref: str, where: str) -> str:
        """The key of a model reference, opening the checkpoint on first use; a stage's name is its output."""
        key = self._ref_keys.get(ref)
        if key is not None:
            return key
        if ref in self.r.stage_names:
            key = stage_key(ref)
        else:
            # a local path, a hub id (org/name[@revision]) or base+adapter; hub ids resolve once per compile
            key = source_key(ref)
            if key not in self.sources:
                self.sources[key] = self.opener.open(ref, where)
        self._ref_keys[ref] = key
        if key not in self.src_keys:
            self.src_keys.append(key)
        return key

    def layers(self, key: str) -> LayerIndex:
        if key not in self._layer_index:
            self._layer_index[key] = LayerIndex.of(self.get(key).tensors)
        return self._layer_index[key]

    def find(self, key: str, name: str) -> tuple[str, Any] | None:
        """(name, info) of tensor `name` in input `key`; a missing head of a model with tied embeddings is its
        input embedding (mergekit's `tied_names`)."""
        ck = self.get(key)
        info = ck.tensors.get(name)
        if info is not None:
            return name, info
        if is_head(name) and ties_embeddings(ck.config):
            if key not in self._embedding:
                self._embedding[key] = embedding_name(ck.tensors)
            emb = self._embedding[key]
            if emb is not None:
                return emb, ck.tensors[emb]
        return None

    # -- groups of inputs --------------------------------------------------------------------------------
    def _count_check(self, n: int, where: str, base_given: bool) -> None:
        m = self.method
        if n < m.min_models or (m.max_models is not None and n > m.max_models):
            want = f"exactly {m.min_models}" if m.min_models == m.max_models else f"at least {m.min_models}"
            raise RecipeError(f"{where}: {m.name} needs {want} model(s)"
                              f"{' besides the base' if not m.in_models_base_contributes and base_given else ''},"
                              f" got {n}")

    def models_group(self) -> tuple[Group, str | None]:
        r, m = self.r, self.method
        glob = [(r.parameters, f"{r.source}: parameters")]
        keys = [self.open_ref(e.model, f"{r.source}: models[{i}].model") for i, e in enumerate(r.models)]
        levels = [[(e.parameters, f"{r.source}: models[{i}].parameters")] + glob for i, e in enumerate(r.models)]
        base_key = self.open_ref(r.base_model, f"{r.source}: base_model") if r.base_model else None
        n_models = len(keys)
        if base_key is not None and base_key not in keys:
            keys.append(base_key)
            levels.append(list(glob))
        base = keys.index(base_key) if base_key is not None else None
        if m.in_models_base_contributes:
            # slerp-like: the base is an input like the others; mergekit adds it when only base_model names it
            contributors = list(range(len(keys)))
        else:
            contributors = [i for i in range(n_models) if keys[i] != base_key]
        self._count_check(len(contributors), f"{r.source}: models", base_key is not None)
        if m.in_models_base_contributes and base_key is None:
            raise RecipeError(f"{r.source}: base_model: missing; {m.name} interpolates from the base model")
        return Group(keys, levels, glob, base, contributors, f"{r.source}: models"), base_key

    def slice_groups(self) -> tuple[list[Group], str | None]:
        r, m = self.r, self.method
        glob = [(r.parameters, f"{r.source}: parameters")]
        # `models:` next to `slices:` gives per-model defaults (a lazymerge extension; see slices.py)
        model_level: dict[str, tuple[dict, str]] = {}
        for i, e in enumerate(r.models):
            model_level[self.open_ref(e.model, f"{r.source}: models[{i}].model")] = (
                e.parameters, f"{r.source}: models[{i}].parameters")
        top_base = self.open_ref(r.base_model, f"{r.source}: base_model") if r.base_model else None
        groups, used = [], set()
        for sl in r.slices or ():
            keys = [self.open_ref(s.model, f"{s.where}.model") for s in sl.sources]
            used.update(keys)
            base_key = (self.open_ref(sl.base_model, f"{sl.where}.base_model") if sl.base_model else top_base)
            base = keys.index(base_key) if base_key in keys else None
            if base is None and (m.base == "required" or m.in_models_base_contributes):
                ref = sl.base_model or r.base_model
                raise RecipeError(f"{sl.where}.sources: {m.name} merges against the base model '{ref}', which "
                                  f"must be one of the slice's sources")
            slice_level = (sl.parameters, f"{sl.where}.parameters")
            levels = [[(s.parameters, f"{s.where}.parameters"), slice_level]
                      + ([model_level[k]] if k in model_level else []) + glob for s, k in zip(sl.sources, keys)]
            if m.in_models_base_contributes or base is None:
                contributors = list(range(len(keys)))
            else:
                b = sl.sources[base]
                contributors = [j for j, (s, k) in enumerate(zip(sl.sources, keys))
                                if not (k == keys[base] and s.layer_range == b.layer_range)]
            self._count_check(len(contributors), f"{sl.where}.sources", base is not None)
            groups.append(Group(keys, levels, [slice_level] + glob, base, contributors, sl.where))
        for k, (_, where) in model_level.items():
            if k not in used:
                raise RecipeError(f"{where.rsplit('.', 1)[0]}: this model is in no slice; with 'slices', "
                                  f"'models' only sets per-model parameters")
        return groups, top_base

    # -- the stage ---------------------------------------------------------------------------------------
    def compile(self) -> StagePlan:
        r = self.r
        if r.slices is None:
            group, base_key = self.models_group()
            lead_key = base_key or group.keys[0]
            lead = self.get(lead_key)
            names = sorted(lead.tensors, key=_natural_key)
            found = config_num_layers(lead.config)
            num_layers = found[1] if found else 1 + max((layer_index(nm) or 0 for nm in names), default=0)
            specs = [TensorSpec(nm, TensorPosition.of(nm, layer_index(nm), num_layers).t, group,
                                [nm] * len(group.keys)) for nm in names]
            config = dict(lead.config) if lead.config else None
        else:
            groups, base_key = self.slice_groups()
            lead_key = base_key or groups[0].keys[0]
            lead = self.get(lead_key)
            check_layer_ranges(r.slices, groups, self.layers, lambda k: self.get(k).path)
            specs, origins = slice_specs(r.slices, groups, self.layers, self.layers(lead_key))
            specs.sort(key=lambda sp: _natural_key(sp.name))
            seen: set[str] = set()
            for sp in specs:
                if sp.name in seen:
                    raise RecipeError(f"{r.source}: slices: two output tensors would be named '{sp.name}'")
                seen.add(sp.name)
            config = sliced_config(lead.config, origins, lambda k: self.get(k).config)
        self.vocab = plan_vocab(r.raw, r.source, {**self.sources, **self.stages}, list(self.src_keys), base_key,
                                lead_key, opener=self.opener)
        jobs = [self.job(sp, lead) for sp in specs]
        vp = self.vocab
        # a tokenizer setting always gives a VocabPlan with the output's tokenizer files (planner/vocab.py); without
        # one, or when only the embedding rows are cut, the lead's tokenizer is the output's
        aux = non_tokenizer(lead.aux_files()) if vp is not None and vp.files else lead.aux_files()
        if vp is not None and config is not None:
            config["vocab_size"] = vp.out_vocab
        return StagePlan(r, self.method, jobs, config, aux, list(self.src_keys), base_key, lead_key, vp)

    def job(self, sp: TensorSpec, lead: Any) -> TensorJob:
        g = sp.group
        li = g.lead
        found = self.find(g.keys[li], sp.names[li])
        if found is None:
            raise CheckpointError(f"{self.get(g.keys[li]).path}: tensor '{sp.names[li]}' is missing (present in "
                                  f"{lead.path})")
        lead_path = self.get(g.keys[li]).path
        info = found[1]
        shape = tuple(info.shape)
        vp = self.vocab if self.vocab is not None and sp.name in self.vocab.tensors else None
        if vp is not None:
            shape = (vp.out_vocab, *shape[1:])
        rows = shapes.rows(shape)
        refs = []
        for key, name in zip(g.keys, sp.names):
            hit = self.find(key, name)
            ck = self.get(key)
            if hit is None:
                raise CheckpointError(f"{ck.path}: tensor '{name}' is missing (present in {lead_path})")
            got = tuple(hit[1].shape)
            if (got[1:] != shape[1:]) if vp is not None else (got != shape):
                raise CheckpointError(f"{ck.path}: tensor '{hit[0]}' has shape {list(hit[1].shape)}, but "
                                      f"{lead_path} has {list(shape)}")
            if (hit[1].dtype in FLOAT_CODES) != (info.dtype in FLOAT_CODES):
                # an integer buffer is copied, a float weight merged: the two cannot be mixed
                raise CheckpointError(f"{ck.path}: tensor '{hit[0]}' has dtype {hit[1].dtype}, but {lead_path} "
                                      f"has {info.dtype}")
            own_rows = shapes.rows(got) if vp is not None else rows
            refs.append(self._ref(key, hit[0], hit[1], own_rows))
        is_float = info.dtype in FLOAT_CODES
        out_dtype = (self.r.output_dtype or info.dtype) if is_float else info.dtype
        params = self.resolve(sp, refs, shape, rows) if is_float else None
        if vp is not None:
            self._vocab_names(vp, sp.name, refs)
        return TensorJob(sp.name, shape, out_dtype, refs, g.base, list(g.contributors), li, self.method, params,
                         vocab=vp)

    def _vocab_names(self, vp: Any, name: str, refs: list[SourceRef]) -> None:
        """Which tensor of each source the vocab fills of output tensor `name` read: its own for this output (a
        tied model's head is its embedding), also for a source that fills rows without being an input of it."""
        names = vp.names.setdefault(name, {})
        for ref in refs:
            names.setdefault(ref.model, ref.name)
        for key in sorted({e[0] for fills in vp.fill.values() for f in fills.values() for e in f} - set(names)):
            hit = self.find(key, name)
            if hit is None:
                raise CheckpointError(f"{self.get(key).path}: tensor '{name}' is missing (its rows fill the tokens "
                                      "other models lack)")
            names[key] = hit[0]

    def _ref(self, key: str, name: str, info: Any, rows: int) -> SourceRef:
        if key in self.stages:
            return SourceRef(key, name, 0, job=self.stages[key].jobs[name])
        return SourceRef(key, name, info.nbytes // max(rows, 1), stored=self.sources[key].has_stored_form(name))

    def resolve(self, sp: TensorSpec, refs: list[SourceRef], shape: tuple[int, ...], rows: int) -> Resolved:
        """Parameters for one tensor: per-model ones through each input's levels (filters matched against the
        input's own tensor name, as mergekit does), method-wide ones through the group's (the output name)."""
        m, g = self.method, sp.group

        def value(p: Param, levels: Any, pos: TensorPosition) -> Any:
            v, where = lookup_where(p.name, levels, pos)
            if where is None:
                if p.required:
                    raise RecipeError(f"{levels[0][1]}.{p.name}: missing; {m.name} needs '{p.name}'")
                return p.default
            return p.coerce(v, f"{where}.{p.name}")

        models = []
        for c in g.contributors:
            pos = TensorPosition(sp.names[c], sp.t)
            pm = {p.name: value(p, g.levels[c], pos) for p in m.params if p.per_model}
            for pname, v in pm.items():
                if isinstance(v, Path):
                    pm[pname] = self._param_checkpoint(v, refs, c, shape, rows, g.levels[c], pname)
            models.append(pm)
        pos = TensorPosition(sp.name, sp.t)
        glob = {p.name: value(p, g.glob_levels, pos) for p in m.params if not p.per_model}
        return Resolved(models, glob)

    def _param_checkpoint(self, path: Path, refs: list[SourceRef], c: int, shape: tuple[int, ...], rows: int,
                          levels: Any, pname: str) -> int:
        """A parameter that is a checkpoint (a model's Fisher matrix): an extra input read with the same tensor
        name as model c's. Returns its index among the tensor's inputs."""
        where = next((w for prm, w in levels if pname in prm), self.r.source)
        key = self.open_ref(str(path), f"{where}.{pname}")
        name = refs[c].name
        for i, ref in enumerate(refs):
            if ref.model == key and ref.name == name:
                return i
        ck = self.get(key)
        info = ck.tensors.get(name)
        if info is None:
            raise CheckpointError(f"{ck.path}: tensor '{name}' is missing ({where}.{pname})")
        vp = self.vocab if self.vocab is not None and name in self.vocab.tensors else None
        if (tuple(info.shape)[1:] != shape[1:]) if vp is not None else (tuple(info.shape) != shape):
            raise CheckpointError(f"{ck.path}: tensor '{name}' has shape {list(info.shape)}, but the model's "
                                  f"has {list(shape)}")
        if vp is not None:
            vp.follow(key, refs[c].model, int(info.shape[0]) if info.shape else 1)
        refs.append(self._ref(key, name, info, info.rows if vp else rows))
        return len(refs) - 1
