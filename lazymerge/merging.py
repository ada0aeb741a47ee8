"""A merge from recipe to output directory: compile the plan, compute a MoE's routers, run the graph (here, or
on a Dask cluster), close the plan.

This is `lazymerge.merge`'s body, kept below the API module so that consumers inside the package (the search
merges its best recipe) call it without importing the API that re-exports them: the API stays the top layer.
"""
from __future__ import annotations

import threading
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Mapping, Union

from ._version import __version__
from .card import model_card
from .engine.report import Progress, Report
from .errors import OutputError
from .io.gguf.layout import gguf_options
from .engine.run import run_plan
from .moe.routers import prepare_routers
from .options import DEFAULT_SHARD_SIZE, RunOptions
from .planner.compile import compile_plan
from .io.models import pin_refs
from .planner.recipe import Recipe, dump_recipe, read_documents
from .planner.tokenizer import TOKENIZER_FILES

RecipeLike = Union[str, Path, Mapping[str, Any], Recipe]   # a YAML path, YAML text, a dict, or a parsed Recipe


def merge_recipe(recipe: RecipeLike, out: str | Path, options: RunOptions = RunOptions(), *,
                 progress: Callable[[Progress], None] | None = None, overwrite: bool = False,
                 resume: bool = False, cancel: threading.Event | None = None, cluster: Any = None,
                 write_model_card: bool = True, copy_tokenizer: bool = True, gguf_type: str | None = None,
                 format: str | None = None) -> Report:
    """`lazymerge.merge` (see there for the arguments): `options` is how to compile and run, the same value here,
    in the engine and on every worker of a cluster; the keywords concern this run's output and its caller."""
    gguf = gguf_options(Path(out), gguf_type, format, options.shard_size)
    if gguf is not None and cluster is not None:
        raise OutputError("--cluster: GGUF output is written on one machine (drop --cluster, or merge to "
                          "safetensors on the cluster)")
    if options.shard_size is None:       # what the run and every worker record: the size in effect
        options = replace(options, shard_size=DEFAULT_SHARD_SIZE)
    p = compile_plan(recipe, **options.compile_args(), gguf=gguf)
    try:
        prepare_routers(p)   # a MoE's routers are computed before the graph runs (other plans: nothing to do)
        extra = {**p.extra_files, "lazymerge_recipe.yaml": dump_recipe(p.recipe, p.pins).encode()}
        if write_model_card:
            extra["README.md"] = model_card(p.recipe, _recipe_text(recipe, p.recipe)).encode()
        if not copy_tokenizer:   # the input's tokenizer files are not copied; a tokenizer the merge built still is
            p.aux_files = [f for f in p.aux_files if Path(f).name not in TOKENIZER_FILES]
        if cluster is not None:           # -- lazymerge.cluster: the same plan, partitioned over Dask workers
            from .cluster.driver import run_on_cluster

            if p.pins:                    # every worker reads the commits this client resolved
                docs = (recipe.documents or [recipe.raw]) if isinstance(recipe, Recipe) else read_documents(recipe)[0]
                recipe = pin_refs(docs, p.pins)
            return run_on_cluster(p, out, cluster, recipe=recipe, options=options, progress=progress,
                                  overwrite=overwrite, resume=resume, extra_files=extra, version=__version__,
                                  cancel=cancel)
        return run_plan(p, out, options, progress=progress, overwrite=overwrite, resume=resume, extra_files=extra,
                        version=__version__, cancel=cancel)
    finally:
        p.close()


def _recipe_text(recipe: RecipeLike, parsed: Recipe) -> str:
    """The recipe as the user wrote it (a file's or a string's text, comments kept), else as lazymerge saves it."""
    if isinstance(recipe, Path) or (isinstance(recipe, str) and "\n" not in recipe and Path(recipe).is_file()):
        return Path(recipe).read_text(encoding="utf-8")
    if isinstance(recipe, str):
        return recipe
    return dump_recipe(parsed)
