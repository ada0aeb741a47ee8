"""Where evaluation gets its weights: a checkpoint directory, or a recipe merged on the fly.

Both sources hand out tensors in the dtype a checkpoint stores them in (for a recipe: the recipe's output dtype,
cast by the engine's `write` op exactly as the writer casts), so evaluating a recipe and evaluating its written
merge compute on the same numbers. Two access patterns, because the model is never whole in memory:

- `load(names, dtype)`: whole tensors (one decoder layer's weights), converted to the compute dtype as their
  rows arrive (a stored copy never sits whole beside its converted one);
- `for_row_blocks(name, block_rows, fn)`: a large tensor (embedding, head) in consecutive fixed row blocks, in
  order, never whole.
"""
from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Protocol

import torch

from ..engine.sink import OrderedRowSink, TensorCollector, run_tensors
from ..errors import CheckpointError
from ..io.gguf import is_gguf_model
from ..io.hub import parse_hub_ref
from ..io.models import open_local, open_model, prepare_reads
from ..planner.compile import compile_plan
from ..planner.params import layer_index

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                   "added_tokens.json", "vocab.json", "merges.txt", "vocab.txt")


class WeightSource(Protocol):
    label: str                         # for messages and reports
    config_dir: Path                   # a directory with config.json (and the tokenizer files, if any)
    names: set[str]
    shapes: dict[str, tuple[int, ...]]
    over_budget: int                   # merge tasks that ran alone above the budget (recipes)
    weight_share: float                # fraction of the budget for the weights held (the rest: merge work)

    def load(self, names: list[str], dtype: torch.dtype) -> dict[str, torch.Tensor]: ...

    def for_row_blocks(self, name: str, block_rows: int, fn: Callable[[int, torch.Tensor], None]) -> None: ...

    def close(self) -> None: ...


def has_tokenizer(directory: Path) -> bool:
    return any((directory / n).is_file() for n in ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt"))


class CheckpointWeights:
    """A checkpoint: a Hugging Face directory, a GGUF model (its config and tokenizer rebuilt from its metadata),
    or a hub id (its config and tokenizer downloaded, its weights downloaded or, with `stream`, read from the hub
    as the layers need them), read lazily through lazymerge's io."""

    def __init__(self, path: "str | Path", *, allow_pickle: bool = False, stream: bool = False,
                 budget: int | None = None):
        local = Path(path).expanduser()
        if local.is_dir() and not is_gguf_model(local) and not (local / "config.json").is_file():
            raise CheckpointError(f"{local}: no config.json (evaluation builds the model from it)")
        self.label = str(path)
        self.ckpt = open_local(local, allow_pickle=allow_pickle) if local.exists() else \
            open_model(str(path), allow_pickle=allow_pickle, stream=stream)
        self.config_dir = Path(self.ckpt.config_dir)
        self._stop: Callable[[], None] = lambda: None
        if not (self.config_dir / "config.json").is_file():
            self.ckpt.close()
            raise CheckpointError(f"{path}: no config.json (evaluation builds the model from it)")
        self.names = set(self.ckpt.tensors)
        self.shapes = {n: tuple(i.shape) for n, i in self.ckpt.tensors.items()}
        self.over_budget = 0
        self.weight_share = 1.0
        # a hub model: its files downloaded now, or its layers' tensors streamed ahead in the order the forward
        # loads them (embedding and head are read in row blocks of the evaluation's choosing: fetched on demand)
        layered = sorted((n for n in self.names if layer_index(n) is not None),
                         key=lambda n: (layer_index(n), self.ckpt.tensors[n].start))
        try:
            self._stop = prepare_reads([(self.ckpt, n, None, True) for n in layered] +
                                       [(self.ckpt, n, None, False) for n in self.names if layer_index(n) is None],
                                       budget)
        except BaseException:
            self.ckpt.close()
            raise

    def load(self, names: list[str], dtype: torch.dtype) -> dict[str, torch.Tensor]:
        # io converts through a small staging buffer: the stored bytes never sit whole beside the result
        return {n: self.ckpt.read(n, dtype=dtype) for n in names}

    def for_row_blocks(self, name: str, block_rows: int, fn: Callable[[int, torch.Tensor], None]) -> None:
        rows = self.shapes[name][0]
        for a in range(0, rows, max(1, block_rows)):
            fn(a, self.ckpt.read(name, rows=(a, min(a + block_rows, rows)), dtype=None))

    def close(self) -> None:
        self._stop()
        self.ckpt.close()


class RecipeWeights:
    """A recipe, compiled with the public planner; tensors are computed by the engine when asked for, by running
    the part of the task graph that ends in them with an in-memory sink instead of the writer. Nothing is written
    but a temporary directory holding the merged config.json and tokenizer files (the model's skeleton and
    tokenizer are built from them)."""

    def __init__(self, recipe: Any, *, memory: int | None, seed: int = 0, device: torch.device,
                 workers: int = 2, allow_pickle: bool = False, stage: str | None = None,
                 prepare: Callable[[Any], None] | None = None, stream: bool = False):
        # half the budget for the merge's working set: the other half holds the layer being assembled
        self.plan = compile_plan(recipe, memory="unlimited" if memory is None else max(1, memory // 2),
                                 seed=seed, allow_pickle=allow_pickle, stage=stage, stream_inputs=stream)
        self.label = str(recipe) if isinstance(recipe, (str, Path)) and len(str(recipe)) < 200 else "recipe"
        self.device, self.workers = device, workers
        self.names = {o.name for o in self.plan.outputs}
        self.shapes = {o.name: tuple(o.shape) for o in self.plan.outputs}
        self.over_budget = 0
        self.weight_share = 0.5
        self._tmp = Path(tempfile.mkdtemp(prefix="lazymerge-eval-"))
        self.config_dir = self._tmp
        try:
            if self.plan.config is None:
                raise CheckpointError(f"{self.label}: the merged model has no config.json "
                                      "(its lead model has none); evaluation builds the model from it")
            if prepare is not None:
                prepare(self.plan)    # a MoE's routers, computed as the merge computes them (open_stream)
            (self._tmp / "config.json").write_text(json.dumps(self.plan.config))
            for f in self.plan.aux_files:
                if f.name in TOKENIZER_FILES:
                    shutil.copyfile(f, self._tmp / f.name)
            for name, data in self.plan.extra_files.items():    # a merged tokenizer overrides the lead's
                if name in TOKENIZER_FILES:
                    (self._tmp / name).write_bytes(data)
        except BaseException:
            self.close()
            raise

    def _run(self, names: list[str], sink: Any) -> None:
        stats = run_tensors(self.plan, names, sink, device=self.device, budget=self.plan.budget,
                            workers=self.workers)
        self.over_budget += stats.over_budget_tasks

    def load(self, names: list[str], dtype: torch.dtype) -> dict[str, torch.Tensor]:
        sink = TensorCollector({n: self.shapes[n] for n in names}, dtype)
        self._run(names, sink)
        return {n: sink.tensors[n] for n in names}

    def for_row_blocks(self, name: str, block_rows: int, fn: Callable[[int, torch.Tensor], None]) -> None:
        self._run([name], OrderedRowSink(name, self.shapes[name][0], block_rows, fn))

    def close(self) -> None:
        self.plan.close()
        shutil.rmtree(self._tmp, ignore_errors=True)


def is_recipe(target: Any) -> bool:
    """A mapping, YAML text, or a file (not a directory) is a recipe; a directory, a GGUF model or a hub id is a
    checkpoint."""
    if isinstance(target, (str, Path)):
        p = Path(target).expanduser()
        if p.is_dir() or (p.is_file() and is_gguf_model(p)):
            return False
        if isinstance(target, str) and "\n" in target:
            return True
        return p.suffix.lower() in (".yaml", ".yml") or p.is_file()
    return True


def open_target(target: Any, *, memory: int | None, seed: int = 0, device: torch.device, workers: int = 2,
                allow_pickle: bool = False, prepare: Callable[[Any], None] | None = None,
                stream: bool = False) -> WeightSource:
    if is_recipe(target):
        return RecipeWeights(target, memory=memory, seed=seed, device=device, workers=workers,
                             allow_pickle=allow_pickle, prepare=prepare, stream=stream)
    p = Path(target).expanduser()
    if not p.exists() and parse_hub_ref(str(target)) is None:
        raise CheckpointError(f"{target}: does not exist (expected a checkpoint directory, a GGUF file, a hub id or "
                              "a recipe file)")
    return CheckpointWeights(p if p.exists() else str(target), allow_pickle=allow_pickle, stream=stream,
                             budget=memory)
