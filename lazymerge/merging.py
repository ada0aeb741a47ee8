"""A merge from recipe to output directory: compile the plan, compute a MoE's routers, run the graph (here, or
on a Dask cluster), close the plan.

This is `lazymerge.merge`'s body, kept below the API module so that consumers inside the package (the search
merges its best recipe) call it without importing the API that re-exports them: the API stays the top layer.
"""
from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, Callable, Mapping, Union

import torch

from ._version import __version__
from .engine.report import Progress, Report
from .errors import OutputError
from .io.gguf.layout import gguf_options
from .engine.run import run_plan
from .moe.routers import prepare_routers
from .planner.compile import compile_plan
from .planner.recipe import Recipe, dump_recipe

RecipeLike = Union[str, Path, Mapping[str, Any], Recipe]   # a YAML path, YAML text, a dict, or a parsed Recipe
DEFAULT_SHARD_SIZE = "5GB"         # safetensors shards; a GGUF is one file unless a size is given


def merge_recipe(recipe: RecipeLike, out: str | Path, *, memory: int | str | None = None,
                 shard_size: int | str | None = None, seed: int = 0, device: str | torch.device = "cpu",
                 progress: Callable[[Progress], None] | None = None, overwrite: bool = False,
                 resume: bool = False, strict: bool = False, allow_pickle: bool = False,
                 workers: int | None = None, max_block_rows: int | None = None,
                 cancel: threading.Event | None = None, stage: str | None = None, cluster: Any = None,
                 gguf_type: str | None = None, format: str | None = None) -> Report:
    """`lazymerge.merge` (see there for the arguments)."""
    gguf = gguf_options(Path(out), gguf_type, format, shard_size)
    if gguf is not None and cluster is not None:
        raise OutputError("--cluster: GGUF output is written on one machine (drop --cluster, or merge to "
                          "safetensors on the cluster)")
    shard_size = DEFAULT_SHARD_SIZE if shard_size is None else shard_size
    p = compile_plan(recipe, memory=memory, shard_size=shard_size, seed=seed, allow_pickle=allow_pickle,
                     max_block_rows=max_block_rows, stage=stage, gguf=gguf)
    try:
        prepare_routers(p)   # a MoE's routers are computed before the graph runs (other plans: nothing to do)
        extra = {**p.extra_files, "lazymerge_recipe.yaml": dump_recipe(p.recipe).encode()}
        if cluster is not None:           # -- lazymerge.cluster: the same plan, partitioned over Dask workers
            from .cluster.driver import run_on_cluster

            return run_on_cluster(p, out, cluster, recipe=recipe, stage=stage, memory=memory,
                                  shard_size=shard_size, allow_pickle=allow_pickle, max_block_rows=max_block_rows,
                                  device=device, progress=progress, overwrite=overwrite, resume=resume,
                                  strict=strict, workers=workers, extra_files=extra, version=__version__,
                                  cancel=cancel)
        return run_plan(p, out, device=device, progress=progress, overwrite=overwrite, resume=resume,
                        strict=strict, workers=workers, extra_files=extra, version=__version__, cancel=cancel)
    finally:
        p.close()
