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
from typing import Any, Mapping

import networkx as nx
import psutil

from ..errors import CheckpointError, RecipeError
from ..io.adapters import open_model, parse_model_ref
from ..io.checkpoint import Checkpoint
from ..io.writer import OutTensor, ShardLayout, parse_size, plan_layout
from .graph import SourceRef, TaskList, TensorBuilder
from .methods import METHODS, Method, Param, Resolved
from .params import TensorPosition, layer_index, lookup
from .recipe import Recipe, check_keys, closest, parse_recipe

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
        lines += [f"warning       {w}" for w in self.warnings]
        return "\n".join(lines)

    def close(self) -> None:
        for ckpt in self.sources.values():
            ckpt.close()


# -- helpers -----------------------------------------------------------------------------------------------

_NUM_RE = re.compile(r"(\d+)")


def _natural_key(name: str) -> tuple:
    """Embeddings first, then layers in numeric order, then the head: shards group whole layers."""
    layer = layer_index(name)
    pos = TensorPosition.of(name, layer, 1)
    group = 1 if layer is not None else (2 if pos.t == 1.0 else 0)
    return (group, layer if layer is not None else -1,
            tuple(int(p) if p.isdigit() else p for p in _NUM_RE.split(name)))


def _open_models(r: Recipe, m: Method, allow_pickle: bool) -> tuple[dict[str, Checkpoint], list[str], str | None,
                                                                    list[str]]:
    """Open every checkpoint the recipe names: models, base, and parameters that are checkpoints themselves
    (e.g. a model's Fisher matrix). Returns sources, model keys (recipe order), base key, extra keys."""
    sources: dict[str, Checkpoint] = {}

    def open_one(ref: str, where: str) -> str:
        base, adapter = parse_model_ref(Path(ref).expanduser())
        key = str(base.resolve()) + (f"+{adapter.resolve()}" if adapter is not None else "")
        if key not in sources:
            for part in (base, adapter):
                if part is not None and not part.exists():
                    raise CheckpointError(f"{part}: model directory does not exist ({where})")
            sources[key] = open_model(ref if adapter is None else f"{base}+{adapter}", allow_pickle=allow_pickle)
        return key

    try:
        model_keys = [open_one(m.model, f"{r.source}: models[{i}].model") for i, m in enumerate(r.models)]
        base_key = open_one(r.base_model, f"{r.source}: base_model") if r.base_model else None
        extra = []
        for p in m.params:
            if p.kind is not Path:
                continue
            levels = [(e.parameters, f"{r.source}: models[{i}].parameters") for i, e in enumerate(r.models)]
            for params, where in levels + [(r.parameters, f"{r.source}: parameters")]:
                if p.name in params:
                    if not isinstance(params[p.name], str):
                        raise RecipeError(f"{where}.{p.name}: must be a path to a checkpoint directory")
                    key = open_one(params[p.name], f"{where}.{p.name}")
                    if key not in extra and key not in model_keys and key != base_key:
                        extra.append(key)
    except BaseException:
        for c in sources.values():
            c.close()
        raise
    return sources, model_keys, base_key, extra


def _source_key(p: Path) -> str:
    return str(p.expanduser().resolve())


def _check_param_names(r: Recipe, m: Method) -> None:
    names = tuple(p.name for p in m.params)
    check_keys(f"{r.source}: parameters", r.parameters, names)
    per_model = tuple(p.name for p in m.params if p.per_model)
    for i, entry in enumerate(r.models):
        for key in entry.parameters:
            if key not in per_model:
                hint = " (a global parameter: put it under the top-level 'parameters')" if key in names else ""
                raise RecipeError(f"{r.source}: models[{i}].parameters: unknown key '{key}' for "
                                  f"{m.name}{hint or closest(key, per_model)}; valid keys: {', '.join(per_model)}")


def _resolve(r: Recipe, m: Method, contributors: list[int], pos: TensorPosition) -> Resolved:
    def value(p: Param, levels: list[tuple[Mapping[str, Any], str]], where: str) -> Any:
        v, found = lookup(p.name, levels, pos)
        if not found:
            if p.required:
                raise RecipeError(f"{where}.{p.name}: missing; {m.name} needs '{p.name}'")
            return p.default
        return p.coerce(v, f"{where}.{p.name}")

    glob_level = [(r.parameters, f"{r.source}: parameters")]
    models = []
    for i in contributors:
        levels = [(r.models[i].parameters, f"{r.source}: models[{i}].parameters")] + glob_level
        models.append({p.name: value(p, levels, f"{r.source}: models[{i}].parameters")
                       for p in m.params if p.per_model})
    glob = {p.name: value(p, glob_level, f"{r.source}: parameters") for p in m.params if not p.per_model}
    return Resolved(models, glob)


def _blocks(rows: int, block_rows: int) -> list[tuple[int, int]]:
    return [(a, min(a + block_rows, rows)) for a in range(0, rows, block_rows)]


# -- the compiler ------------------------------------------------------------------------------------------


def compile_plan(recipe: Any, *, memory: "int | str | None" = None, shard_size: "int | str" = "5GB",
                 seed: int = 0, allow_pickle: bool = False, max_block_rows: int | None = None) -> Plan:
    r = parse_recipe(recipe)
    method = METHODS.get(r.merge_method)
    if method is None:
        raise RecipeError(f"{r.source}: merge_method: unknown method '{r.merge_method}'"
                          f"{closest(r.merge_method, list(METHODS))}; available: {', '.join(sorted(METHODS))}")
    if r.slices is not None:
        raise RecipeError(f"{r.source}: slices: not supported yet; list whole models under 'models'")
    if method.base == "required" and not r.base_model:
        raise RecipeError(f"{r.source}: base_model: missing; {method.name} needs a base model")
    _check_param_names(r, method)
    budget = resolve_budget(memory)
    try:
        shard_bytes = parse_size(shard_size)
    except ValueError as exc:
        raise RecipeError(f"shard_size: {exc}") from None

    sources, model_keys, base_key, extra_keys = _open_models(r, method, allow_pickle)
    try:
        return _compile(r, method, sources, model_keys, base_key, extra_keys, budget, shard_bytes, seed,
                        max_block_rows)
    except BaseException:
        for c in sources.values():
            c.close()
        raise


def _compile(r: Recipe, method: Method, sources: dict[str, Checkpoint], model_keys: list[str],
             base_key: str | None, extra_keys: list[str], budget: int | None, shard_bytes: int, seed: int,
             max_block_rows: int | None) -> Plan:
    # Inputs of every tensor job: the recipe's models in order, then the base if it isn't one of them, then
    # checkpoints named by parameters (Fisher matrices).
    src_keys = list(model_keys)
    if base_key is not None and base_key not in src_keys:
        src_keys.append(base_key)
    src_keys += [k for k in extra_keys if k not in src_keys]
    base_idx = src_keys.index(base_key) if base_key is not None else None
    if method.in_models_base_contributes:
        contributors = list(range(len(model_keys)))
    else:
        contributors = [i for i, k in enumerate(model_keys) if k != base_key]
    n = len(contributors)
    if n < method.min_models or (method.max_models is not None and n > method.max_models):
        want = (f"exactly {method.min_models}" if method.min_models == method.max_models
                else f"at least {method.min_models}")
        raise RecipeError(f"{r.source}: models: {method.name} needs {want} model(s)"
                          f"{' besides the base' if not method.in_models_base_contributes and base_key else ''},"
                          f" got {n}")
    if method.in_models_base_contributes and base_key not in model_keys:
        raise RecipeError(f"{r.source}: base_model: {method.name} interpolates from the base model, which must "
                          f"also be one of the listed models")

    lead_key = base_key or model_keys[0]
    lead = sources[lead_key]
    names = sorted(lead.tensors, key=_natural_key)
    _check_tensors(r, sources, src_keys, lead_key, names)

    num_layers = 1 + max((layer_index(nm) or 0) for nm in names) if names else 1
    if lead.config and isinstance(lead.config.get("num_hidden_layers"), int):
        num_layers = lead.config["num_hidden_layers"]

    share = budget // 2 if budget else None
    tasks = TaskList()
    outputs: list[OutTensor] = []
    blocks_of: dict[str, int] = {}
    for name in names:
        info = lead.tensors[name]
        out_dtype = (r.output_dtype or info.dtype) if info.dtype in FLOAT_CODES else info.dtype
        shape = tuple(info.shape)
        rows = shape[0] if len(shape) >= 2 else 1
        refs = [SourceRef(k, name, sources[k].tensors[name].nbytes // max(rows, 1)) for k in src_keys]
        pos = TensorPosition.of(name, layer_index(name), num_layers)

        def build(block_rows: int) -> TensorBuilder:
            tb = TensorBuilder(name, shape, _blocks(rows, block_rows), refs, base_idx, out_dtype, seed)
            if info.dtype not in FLOAT_CODES:
                # integer buffers (position ids, masks) are copied from the lead model, never merged
                for j in range(len(tb.blocks)):
                    tb.write(tb.load(src_keys.index(lead_key), j, raw=True), j, ITEMSIZE[out_dtype])
            else:
                params = _resolve(r, method, contributors, pos)
                for pm in params.models:
                    for pname, v in pm.items():
                        if isinstance(v, Path):
                            pm[pname] = src_keys.index(_source_key(v))
                method.build(tb, [contributors[c] for c in range(n)], contributors, params)
            return tb

        block_rows = min(rows, max_block_rows) if max_block_rows else rows
        tb = build(block_rows)
        if share is not None and len(tb.blocks) == 1 and rows > 1:
            peak = tb.out.peak_bytes()
            if peak > share:
                tb = build(max(1, math.floor(rows * share / peak)))
        tasks.extend(tb.out)
        blocks_of[name] = len(tb.blocks)
        outputs.append(OutTensor(name, shape, out_dtype))

    config = dict(lead.config) if lead.config else None
    out_codes = {o.dtype for o in outputs if o.dtype in FLOAT_CODES}
    if config is not None and len(out_codes) == 1:
        config["torch_dtype"] = TORCH_DTYPE_NAME[out_codes.pop()]
    aux = _tokenizer_files(r, sources, lead_key)
    return Plan(recipe=r, method=method, tasks=tasks, sources=sources, outputs=outputs,
                layout=plan_layout(outputs, shard_bytes), budget=budget, seed=seed, config=config,
                aux_files=aux, blocks=blocks_of)


def _check_tensors(r: Recipe, sources: dict[str, Checkpoint], src_keys: list[str], lead_key: str,
                   names: list[str]) -> None:
    lead = sources[lead_key]
    for key in src_keys:
        if key == lead_key:
            continue
        ck = sources[key]
        missing = [nm for nm in names if nm not in ck.tensors]
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise CheckpointError(f"{ck.path}: tensor '{missing[0]}'{more} is missing (present in {lead.path})")
        for nm in names:
            a, b = lead.tensors[nm].shape, ck.tensors[nm].shape
            if tuple(a) != tuple(b):
                raise CheckpointError(f"{ck.path}: tensor '{nm}' has shape {list(b)}, but {lead.path} has {list(a)}")


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

