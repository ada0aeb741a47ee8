"""The stable Python API: `plan` and `merge`. Tools embed lazymerge through these two calls, never the CLI."""
from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, Callable, Union

import torch

from .engine.report import Progress, Report
from .errors import LazyMergeError
from .io.gguf.layout import gguf_options
from .merging import DEFAULT_SHARD_SIZE, RecipeLike, merge_recipe
from .options import RunOptions
from .planner.compile import compile_plan
from .planner.plan import Plan


def plan(recipe: RecipeLike, *, memory: int | str | None = None, shard_size: int | str | None = None,
         seed: int = 0, allow_pickle: bool = False, max_block_rows: int | None = None,
         stage: str | None = None, out: str | Path | None = None, gguf_type: str | None = None,
         format: str | None = None) -> Plan:
    """Validate a recipe and compile it into a Plan (task graph + output layout) from checkpoint headers only.

    `recipe` is a path to a YAML file, YAML text, or a mapping in mergekit's format; its models may be hub ids,
    whose headers are read with HTTP range requests (no shard is downloaded). `memory` is the budget for
    tensors lazymerge allocates (bytes or "2GiB"; None = a fraction of available RAM; "unlimited"). A
    multi-stage recipe (several `---` documents with `name:`) produces the stage named `stage`, else its unnamed
    document, else its last one. Raises a `LazyMergeError` subclass with a one-line message on any problem.
    Call `Plan.close()` when done with it. `out`, `gguf_type` and `format` say what `merge` would write (a GGUF
    when `out` ends in .gguf or a GGUF type or format is given), so the plan is that output's.
    """
    gguf = gguf_options(Path(out or "model"), gguf_type, format, shard_size)
    return compile_plan(recipe, memory=memory, shard_size=DEFAULT_SHARD_SIZE if shard_size is None else shard_size,
                        seed=seed, allow_pickle=allow_pickle, max_block_rows=max_block_rows, stage=stage, gguf=gguf)


def merge(recipe: RecipeLike, out: str | Path, *, memory: int | str | None = None,
          shard_size: int | str | None = None, seed: int = 0, device: str | torch.device = "cpu",
          progress: Callable[[Progress], None] | None = None, overwrite: bool = False, resume: bool = False,
          strict: bool = False, allow_pickle: bool = False, workers: int | None = None,
          max_block_rows: int | None = None, cancel: threading.Event | None = None,
          stage: str | None = None, cluster: Any = None, stream_inputs: bool = False,
          write_model_card: bool = True, copy_tokenizer: bool = True, gguf_type: str | None = None,
          format: str | None = None) -> Report:
    """Run a merge into `out` (a Hugging Face checkpoint directory that appears only when complete).

    GGUF output (docs/gguf.md): `out` ending in `.gguf` is written as that GGUF file (llama.cpp's split files
    when `shard_size` is given); `gguf_type` is its tensor type (auto, f32, f16, bf16, q8_0, q4_0, q4_1, q5_0,
    q5_1; default auto: bf16, or f16 for a float16 merge). `gguf_type` or `format="gguf"` with another `out` make
    it a directory holding `<name>.gguf`. `shard_size` defaults to 5GB safetensors shards, one GGUF file.

    The same recipe, inputs and seed give bit-identical output whatever `memory`, `workers` or block size.
    `progress(Progress)` is called after each task. Returns the Report also saved as OUT/lazymerge_report.json.

    Models may be hub ids (`org/name`, `org/name@revision`, `base+adapter`), pinned to a commit when the merge
    starts (`Report.inputs`). Their files the plan needs are downloaded into the Hugging Face cache, or, with
    `stream_inputs`, read straight from the hub with range requests and never stored (docs/hub.md).

    `cluster` runs the merge on Dask (`pip install 'lazymerge[dask]'`): a `distributed.Client`, `"local:N"` (a
    LocalCluster of N worker processes) or a scheduler address `"tcp://HOST:PORT"`; `memory` is then per
    worker, and inputs and `out` must be at the same paths on every worker. See `lazymerge.cluster`.

    `write_model_card` writes OUT/README.md, a model card with Hugging Face front matter (hub ids as `base_model`,
    `tags: [merge, lazymerge]`, the recipe), as mergekit does. `copy_tokenizer=False` leaves the inputs'
    tokenizer files out (a tokenizer the merge builds, `tokenizer_source: union`, is still written). A GGUF
    written as a `.gguf` file is that file alone (no card); a GGUF in a directory gets the card beside it.
    """
    options = RunOptions(memory=memory, shard_size=shard_size, seed=seed, allow_pickle=allow_pickle,
                         max_block_rows=max_block_rows, stage=stage, stream_inputs=stream_inputs,
                         device=str(device), strict=strict, workers=workers)
    return merge_recipe(recipe, out, options, progress=progress, overwrite=overwrite, resume=resume,
                        cancel=cancel, cluster=cluster, write_model_card=write_model_card,
                        copy_tokenizer=copy_tokenizer, gguf_type=gguf_type, format=format)


def evaluate(target: Union[RecipeLike, str, Path], data: "str | Path", *, memory: int | str | None = None,
             seq_len: int | None = None, max_tokens: int = 4096, batch: int = 4,
             device: str | torch.device = "cpu", seed: int = 0, progress: Callable[[Any], None] | None = None,
             stream_inputs: bool = False):
    """Perplexity of a checkpoint directory, a hub id, or a recipe's merge (computed layer by layer, never
    written) on `data`, holding one decoder layer's weights at a time within `memory`. Returns an `EvalReport`.
    `stream_inputs`: hub models are read with range requests as the layers need them, never stored.

    The data is tokenized with the target's tokenizer: each document with its defaults, documents joined with
    EOS, cut to `max_tokens`, then to full windows of `seq_len` (default min(512, the model's positions)).
    Needs transformers and accelerate (pip install 'lazymerge[eval]').
    """
    from .evaluate.runner import evaluate as run_eval

    return run_eval(target, data, memory=memory, seq_len=seq_len, max_tokens=max_tokens, batch=batch,
                    device=device, seed=seed, progress=progress, stream_inputs=stream_inputs)


def compare_inputs(recipe: RecipeLike, data: "str | Path", **kwargs: Any) -> list:
    """`evaluate` for each input model of `recipe` and for its merge, on the same windows: a list of
    EvalReports, inputs first, the merge last. Keyword arguments as for `evaluate`."""
    from .evaluate.runner import compare_inputs as run_compare

    return run_compare(recipe, data, **kwargs)


def generate(target: Union[RecipeLike, str, Path], prompt: str, *, max_new_tokens: int = 20,
             memory: int | str | None = None, device: str | torch.device = "cpu", seed: int = 0,
             progress: Callable[[Any], None] | None = None, stream_inputs: bool = False) -> str:
    """Greedy continuation of `prompt` by a checkpoint or a recipe's merge: the whole model when it fits
    `memory`, else streamed layer by layer for every new token (slow, within the budget)."""
    from .evaluate.generate import generate as run_generate

    return run_generate(target, prompt, max_new_tokens=max_new_tokens, memory=memory, device=device, seed=seed,
                        progress=progress, stream_inputs=stream_inputs)


def search(recipe: RecipeLike, data: "str | Path | None", space: list, *, trials: int = 20,
           study: "str | Path | None" = None, sampler: str = "tpe", seed: int = 0, memory: int | str | None = None,
           seq_len: int | None = None, max_tokens: int = 4096, batch: int = 4, device: str = "cpu",
           best_file: "str | Path | None" = "best.yaml", out: "str | Path | None" = None,
           on_trial: Callable[[Any], None] | None = None, progress: Callable[[Any], None] | None = None,
           cluster: Any = None, objective: str = "perplexity", include_path: "str | Path | None" = None,
           num_fewshot: int | None = None, limit: float | None = None):
    """Search recipe values (`space`: ["models[0].parameters.weight=0..1", ...]) for the lowest perplexity of
    the merge on `data`, each candidate evaluated layer by layer and never written. `study`: an SQLite file that
    keeps every completed trial, so an interrupted search continues where it stopped. Returns a SearchReport;
    writes the best recipe to `best_file` and merges it into `out` when given. Needs optuna
    (pip install 'lazymerge[search]'). `cluster` evaluates the trials on Dask workers, one per worker at a time,
    the study staying here: a `distributed.Client`, `"local:N"`, `"tcp://HOST:PORT"` or `"env"`
    (DASK_SCHEDULER_ADDRESS), as for `merge`.

    `objective="task:NAME[:METRIC]"` maximises an lm-eval task metric instead (lower is better where lm-eval
    says so; default METRIC: the task's first), each candidate scored by lm-eval on the layer-streaming model
    (`include_path`, `num_fewshot`, `limit` as for `lazymerge eval --tasks`; pip install 'lazymerge[tasks]')."""
    from .evaluate.search import search as run_search

    score, label = None, "perplexity"
    if objective != "perplexity":
        from .tasks import TaskObjective, TaskOptions, task_scorer

        obj = TaskObjective.parse(objective)
        if cluster is not None:
            raise LazyMergeError("search --cluster evaluates perplexity only; run a task objective without "
                                 "--cluster")
        score = task_scorer(obj, TaskOptions(tasks=(obj.task,), include_path=None if include_path is None
                                             else str(include_path), num_fewshot=num_fewshot, limit=limit,
                                             memory=memory, device=device, seed=seed, progress=False))
        label = obj.label
    elif data is None:
        raise LazyMergeError("search: the perplexity objective needs data (--data)")
    trials_on = None
    if cluster is not None:
        import functools

        from .cluster.search import run_trials

        trials_on = functools.partial(run_trials, cluster=cluster)
    return run_search(recipe, data, space, trials=trials, study=study, sampler=sampler, seed=seed, memory=memory,
                      seq_len=seq_len, max_tokens=max_tokens, batch=batch, device=device, best_file=best_file,
                      out=out, on_trial=on_trial, progress=progress, run_trials=trials_on, score=score,
                      objective=label)
