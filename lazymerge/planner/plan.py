"""Compile a recipe into a validated Plan: a task graph whose every size is known from headers alone.

Everything that can be wrong with a merge is found here, before a byte of tensor data is read: missing models,
missing or mismatched tensors, unknown methods or parameters, out-of-range values. The plan also fixes the
output layout (which tensor goes to which shard, at which offset), which is what makes writes order-free and
the output bit-identical whatever the schedule.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import networkx as nx
import psutil

from ..errors import CheckpointError, RecipeError, printable
from ..io.adapters import open_model, parse_model_ref
from ..io.checkpoint import Checkpoint
from ..io.writer import OutTensor, ShardLayout, parse_size, plan_layout
from .graph import SourceRef, TaskList, TensorBuilder
from .methods import METHODS, BlockFn, Method, Param, Resolved, emit_tensor
from .params import TensorPosition, is_post, layer_index, leaves, lookup_where
from .recipe import Recipe, closest
from .slices import (Group, LayerIndex, TensorSpec, check_layer_ranges, config_num_layers, embedding_name,
                     is_head, slice_specs, sliced_config, ties_embeddings)
from .stages import StageOutput, resolve_stages, stage_key
from .vocab import non_tokenizer, plan_vocab

ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
            "F8_E4M3": 1, "F8_E5M2": 1}
FLOAT_CODES = {"F64", "F32", "F16", "BF16"}
TORCH_DTYPE_NAME = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64"}
DEFAULT_MEMORY_FRACTION = 0.6


def resolve_budget(memory: "int | str | None") -> int | None:
    """Bytes lazymerge may allocate for tensors; None = unlimited. Default: a fraction of available RAM."""
    if memory is None:
        return int(psutil.virtual_memory().available * DEFAULT_MEMORY_FRACTION)
    if isinstance(memory, str) and memory.strip().lower() in ("unlimited", "inf", "none", "0"):
        return None
    if memory == 0:
        return None
    try:
        value = parse_size(memory)
    except ValueError as exc:
        raise RecipeError(f"memory: {exc}") from None
    if value <= 0:
        raise RecipeError(f"memory: must be positive, got {memory!r}")
    return value


@dataclass
class Plan:
    """A compiled merge: the graph, its inputs, its output layout and what it will cost."""

    recipe: Recipe
    method: Method
    tasks: TaskList
    sources: dict[str, Checkpoint]
    outputs: list[OutTensor]
    layout: list[ShardLayout]
    budget: int | None
    seed: int
    config: dict[str, Any] | None
    aux_files: list[Path]
    blocks: dict[str, int] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    extra_files: dict[str, bytes] = field(default_factory=dict)   # e.g. a merged tokenizer
    _graph: nx.DiGraph | None = None

    @property
    def graph(self) -> nx.DiGraph:
        """The task DAG (networkx), built on first use: the scheduler only needs the ordered task list."""
        if self._graph is None:
            self._graph = self.tasks.to_graph()
        return self._graph

    @property
    def bytes_read(self) -> int:
        return sum(t.attrs["read_bytes"] for t in self.tasks.tasks if t.op == "load")

    @property
    def bytes_written(self) -> int:
        return sum(s.size for s in self.layout)

    @property
    def est_peak(self) -> int:
        return self.tasks.peak_bytes()

    def summary(self) -> str:
        from ..engine.report import human

        blocked = {k: v for k, v in self.blocks.items() if v > 1}
        lines = [
            f"method        {self.method.name}",
            f"models        {len(self.sources)} checkpoints",
            f"tensors       {len(self.outputs)} ({len(blocked)} split into row blocks)",
            f"tasks         {len(self.tasks.tasks)}",
            f"read          {human(self.bytes_read)}",
            f"write         {human(self.bytes_written)} in {len(self.layout)} shard(s)",
            f"budget        {human(self.budget) if self.budget else 'unlimited'}",
            f"est. peak     {human(self.est_peak)} of tensors (one task at a time)",
        ]
        lines += [f"warning       {printable(w)}" for w in self.warnings]
        return "\n".join(lines)

    def close(self) -> None:
        for ckpt in self.sources.values():
            ckpt.close()


# -- helpers -----------------------------------------------------------------------------------------------

_NUM_RE = re.compile(r"(\d+)")


def _natural_key(name: str) -> tuple:
    """Embeddings first, then layers in numeric order, then the head: shards group whole layers."""
    layer = layer_index(name)
    group = 1 if layer is not None else (2 if is_post(name) else 0)
    return (group, layer if layer is not None else -1,
            tuple(int(p) if p.isdigit() else p for p in _NUM_RE.split(name)))


def _check_param_names(r: Recipe, m: Method) -> list[str]:
    """Parameter names and values at every level; returns the warnings. Global and slice-level parameters take
    any of the method's parameters; models and slice sources only per-model ones (mergekit never reads a
    method-wide parameter there). A parameter of another method is ignored with a warning, as mergekit ignores
    it (published model_stock recipes carry a per-model `weight`); a key no method knows is a typo. Every value
    a parameter can take, each point of a gradient included, must be in its range."""
    names = tuple(p.name for p in m.params)
    per_model = tuple(p.name for p in m.params if p.per_model)
    known = tuple(sorted({p.name for meth in METHODS.values() for p in meth.params}))
    places = [(r.parameters, f"{r.source}: parameters", names)]
    places += [(e.parameters, f"{r.source}: models[{i}].parameters", per_model) for i, e in enumerate(r.models)]
    for sl in r.slices or ():
        places.append((sl.parameters, f"{sl.where}.parameters", names))
        places += [(s.parameters, f"{s.where}.parameters", per_model) for s in sl.sources]
    ignored: dict[str, list[str]] = {}
    for params, where, valid in places:
        for key, value in params.items():
            if key not in valid:
                valid_text = f"valid keys: {', '.join(valid)}" if valid else "it takes none here"
                if key in names:
                    raise RecipeError(f"{where}: unknown key '{key}' for {m.name} (a method-wide parameter: put "
                                      f"it under the top-level or the slice's 'parameters'); {valid_text}")
                if key not in known:
                    raise RecipeError(f"{where}: unknown key '{key}' for {m.name}"
                                      f"{closest(key, valid) or closest(key, known)}; {valid_text}")
                ignored.setdefault(key, []).append(where.removeprefix(f"{r.source}: "))
                continue
            param = m.param(key)
            for leaf, at in leaves(value, f"{where}.{key}"):
                if not (param.kind is float and isinstance(leaf, str)):   # mergekit steps through string lists
                    param.coerce(leaf, at)
    return [f"{r.source}: '{key}' has no effect for {m.name}; ignored, as mergekit does ({', '.join(wheres)})"
            for key, wheres in ignored.items()]


def _method_of(r: Recipe) -> tuple[Method, list[str]]:
    """The recipe's method, with the checks that need no checkpoint, and their warnings."""
    method = METHODS.get(r.merge_method)
    if method is None:
        raise RecipeError(f"{r.source}: merge_method: unknown method '{r.merge_method}'"
                          f"{closest(r.merge_method, list(METHODS))}; available: {', '.join(sorted(METHODS))}")
    has_base = bool(r.base_model) or any(sl.base_model for sl in r.slices or ())
    if method.base == "required" and not has_base:
        raise RecipeError(f"{r.source}: base_model: missing; {method.name} needs a base model")
    return method, _check_param_names(r, method)


def _blocks(rows: int, block_rows: int) -> list[tuple[int, int]]:
    return [(a, min(a + block_rows, rows)) for a in range(0, rows, block_rows)]


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


class _StageCompiler:
    """Compiles one recipe against the checkpoints opened so far (shared by all stages) and the earlier stages'
    outputs. Work is per output tensor and per input, with per-checkpoint caches: no per-tensor scans."""

    def __init__(self, r: Recipe, method: Method, sources: dict[str, Any], stages: dict[str, StageOutput],
                 allow_pickle: bool):
        self.r = r
        self.method = method
        self.sources = sources
        self.stages = stages
        self.allow_pickle = allow_pickle
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
            base, adapter = parse_model_ref(Path(ref).expanduser())
            key = str(base.resolve()) + (f"+{adapter.resolve()}" if adapter is not None else "")
            if key not in self.sources:
                for part in (base, adapter):
                    if part is not None and not part.exists():
                        raise CheckpointError(f"{part}: model directory does not exist ({where})")
                self.sources[key] = open_model(ref if adapter is None else f"{base}+{adapter}",
                                               allow_pickle=self.allow_pickle)
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
                                lead_key)
        jobs = [self.job(sp, lead) for sp in specs]
        vp = self.vocab
        if vp is not None and vp.files:
            aux = non_tokenizer(lead.aux_files())
        else:
            aux = _tokenizer_files(r, {**self.sources, **self.stages}, lead_key)
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
        rows = shape[0] if len(shape) >= 2 else 1
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
            own_rows = (got[0] if len(got) >= 2 else 1) if vp is not None else rows
            refs.append(self._ref(key, hit[0], hit[1], own_rows))
        is_float = info.dtype in FLOAT_CODES
        out_dtype = (self.r.output_dtype or info.dtype) if is_float else info.dtype
        params = self.resolve(sp, refs, shape, rows) if is_float else None
        return TensorJob(sp.name, shape, out_dtype, refs, g.base, list(g.contributors), li, self.method, params,
                         vocab=vp)

    def _ref(self, key: str, name: str, info: Any, rows: int) -> SourceRef:
        if key in self.stages:
            return SourceRef(key, name, 0, job=self.stages[key].jobs[name])
        return SourceRef(key, name, info.nbytes // max(rows, 1))

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
        refs.append(self._ref(key, name, info, (info.shape[0] if len(info.shape) >= 2 else 1) if vp else rows))
        return len(refs) - 1


# -- the compiler ------------------------------------------------------------------------------------------


def compile_plan(recipe: Any, *, memory: "int | str | None" = None, shard_size: "int | str" = "5GB",
                 seed: int = 0, allow_pickle: bool = False, max_block_rows: int | None = None,
                 stage: str | None = None) -> Plan:
    """Compile a recipe (one document, or a multi-stage recipe whose output is `stage`, the unnamed document
    or the last one) into a Plan. Raises a LazyMergeError subclass on any problem."""
    chain = resolve_stages(recipe, stage)
    moe = chain[-1].merge_method == "moe"      # MoE hook: the output may be a mixture of experts (planner/moe.py)
    for r in chain[:-1]:
        if r.merge_method == "moe":
            raise RecipeError(f"{r.source}: a MoE can only be the output stage, not the input of another stage")
    checked = [_method_of(r) for r in (chain[:-1] if moe else chain)]
    methods = [m for m, _ in checked]
    budget = resolve_budget(memory)
    try:
        shard_bytes = parse_size(shard_size)
    except ValueError as exc:
        raise RecipeError(f"shard_size: {exc}") from None

    sources: dict[str, Any] = {}
    try:
        stages: dict[str, StageOutput] = {}
        for r, method in zip(chain[:-1], methods):
            st = _StageCompiler(r, method, sources, stages, allow_pickle).compile()
            stages[stage_key(str(r.name))] = StageOutput(str(r.name), {j.name: j for j in st.jobs}, st.config,
                                                         st.aux_files)
        if moe:   # --- MoE hook ---
            from .moe import compile_moe

            return compile_moe(chain[-1], sources, stages, budget=budget, shard_bytes=shard_bytes, seed=seed,
                               allow_pickle=allow_pickle, max_block_rows=max_block_rows)
        final = _StageCompiler(chain[-1], methods[-1], sources, stages, allow_pickle).compile()
        plan = _emit(final, sources, budget, shard_bytes, seed, max_block_rows)
        plan.warnings[:0] = [w for _, notes in checked for w in notes]
        return plan
    except BaseException:
        for c in sources.values():
            c.close()
        raise


def _emit(st: StagePlan, sources: dict[str, Any], budget: int | None, shard_bytes: int, seed: int,
          max_block_rows: int | None) -> Plan:
    """The output stage's task graph: every job emitted block by block and written, with row blocks sized so
    that one tensor's working set fits its share of the budget."""
    share = budget // 2 if budget else None
    tasks = TaskList()
    outputs: list[OutTensor] = []
    blocks_of: dict[str, int] = {}
    for job in st.jobs:
        shape = job.shape
        rows = shape[0] if len(shape) >= 2 else 1

        def build(block_rows: int, job: TensorJob = job, shape: tuple[int, ...] = shape,
                  rows: int = rows) -> TensorBuilder:
            tb = TensorBuilder(job.name, shape, _blocks(rows, block_rows), job.refs, job.base, job.out_dtype, seed,
                               vocab=job.vocab)
            emit_tensor(tb, job.emit(tb))
            return tb

        block_rows = min(rows, max_block_rows) if max_block_rows else rows
        tb = build(block_rows)
        if share is not None and len(tb.blocks) == 1 and rows > 1:
            peak = tb.out.peak_bytes()
            if peak > share:
                tb = build(max(1, math.floor(rows * share / peak)))
        tasks.extend(tb.out)
        blocks_of[job.name] = len(tb.blocks)
        outputs.append(OutTensor(job.name, shape, job.out_dtype))

    config = dict(st.config) if st.config else None
    out_codes = {o.dtype for o in outputs if o.dtype in FLOAT_CODES}
    if config is not None and len(out_codes) == 1:
        config["torch_dtype"] = TORCH_DTYPE_NAME[out_codes.pop()]
    return Plan(recipe=st.recipe, method=st.method, tasks=tasks, sources=sources, outputs=outputs,
                layout=plan_layout(outputs, shard_bytes), budget=budget, seed=seed, config=config,
                aux_files=st.aux_files, blocks=blocks_of,
                warnings=list(st.vocab.warnings) if st.vocab else [],
                extra_files=dict(st.vocab.files) if st.vocab else {})


def _tokenizer_files(r: Recipe, sources: dict[str, Checkpoint], lead_key: str) -> list[Path]:
    src = r.tokenizer_source
    if src in (None, "base"):
        return sources[lead_key].aux_files()
    if src == "union":
        raise RecipeError(f"{r.source}: tokenizer_source: 'union' is not supported yet")
    key = str(Path(src).expanduser().resolve())
    if key not in sources:
        if not Path(src).is_dir():
            raise RecipeError(f"{r.source}: tokenizer_source: '{src}' is not 'base', 'union' or a model directory")
        return Checkpoint.open(Path(src)).aux_files()
    return sources[key].aux_files()

