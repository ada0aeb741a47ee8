"""`lazymerge eval --tasks`: lm-eval tasks on a checkpoint or a recipe, with lm-eval's own task manager,
evaluator and results writer, so results and `samples_*.jsonl` files have lm-eval's layout and the printed table
is lm-eval's. The model is `lazymerge.lm_eval.LazyMergeLM` (layer-streaming, within `--memory`).

Also here: the same tasks on each input of a recipe and on its merge (`--compare-inputs`), and a task metric as
the objective of `lazymerge search` (`--objective task:NAME[:METRIC]`).
"""
from __future__ import annotations

import contextlib
import math
import os
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

from .errors import LazyMergeError, RecipeError
from .evaluate.runner import input_targets
from .units import human as format_size


@dataclass(frozen=True)
class TaskOptions:
    """What `lazymerge eval --tasks` passes to lm-eval (and the model's budget options)."""

    tasks: tuple[str, ...]
    include_path: str | None = None
    num_fewshot: int | None = None
    limit: float | None = None               # lm-eval's --limit: a count, or a fraction below 1
    log_samples: bool = False
    output_path: str | None = None
    memory: Any = None
    device: str = "cpu"
    seed: int = 0
    batch_size: int | None = None
    activations: Any = None                  # hidden states held at once (more sequences: several passes)
    verbosity: str = "ERROR"
    progress: bool = True                    # lazymerge's progress bars (lm-eval shows its own)
    bootstrap_iters: int | None = None       # lm-eval's stderr resamples (None: its default; 0: no stderr)


@dataclass
class TaskRun:
    """One model's lm-eval results (lm-eval's dict) and what lazymerge's streaming cost."""

    label: str
    results: dict[str, Any]
    report: dict[str, Any] = field(default_factory=dict)
    files: list[Path] = field(default_factory=list)


def _lm_eval() -> Any:
    try:
        import lm_eval
    except ImportError:
        raise LazyMergeError("--tasks needs lm-eval: pip install 'lazymerge[tasks]'") from None
    return lm_eval


def task_manager(opts: TaskOptions) -> Any:
    """lm-eval's TaskManager for `opts.tasks`. Tasks all found under --include-path are loaded from it alone
    (indexing lm-eval's thousands of built-in tasks takes seconds); otherwise the built-ins are indexed too, the
    include path taking precedence as in lm-eval's own command."""
    _lm_eval()
    from lm_eval.tasks import TaskManager
    from lm_eval.utils import setup_logging

    setup_logging(opts.verbosity)              # lm-eval logs task loading at INFO/WARNING (LMEVAL_LOG_LEVEL wins)

    if opts.include_path is not None:
        if not Path(opts.include_path).is_dir():
            raise LazyMergeError(f"--include-path {opts.include_path}: not a directory")
        local = TaskManager(include_path=opts.include_path, include_defaults=False)
        if all(t in local.all_tasks or _is_task_file(t) for t in opts.tasks):
            return local
    tm = TaskManager(include_path=opts.include_path)
    unknown = [t for t in opts.tasks if t not in tm.all_tasks and not _is_task_file(t)]
    if unknown:
        import difflib

        near = difflib.get_close_matches(unknown[0], tm.all_tasks, n=3)
        raise LazyMergeError(f"--tasks: unknown task '{unknown[0]}'" + (f" (did you mean {', '.join(near)}?)"
                                                                         if near else "")
                             + "; `lm_eval ls tasks` lists them, --include-path adds a directory of task YAMLs")
    return tm


def _is_task_file(name: str) -> bool:
    return name.endswith((".yaml", ".yml")) and Path(name).is_file()


def run_tasks(target: Any, opts: TaskOptions, *, label: str | None = None, manager: Any = None) -> TaskRun:
    """Evaluate `target` (checkpoint directory or recipe, merged layer by layer and never written) on the tasks;
    writes lm-eval's results (and samples) under `opts.output_path` when given."""
    lm_eval = _lm_eval()
    from .lm_eval import LazyMergeLM

    if opts.verbosity == "ERROR":
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    manager = manager or task_manager(opts)
    name = label or (str(target) if isinstance(target, (str, Path)) else "recipe")
    model_args = {"pretrained": name, "memory": opts.memory, "device": opts.device, "seed": opts.seed}
    tracker = None
    if opts.output_path is not None:
        from lm_eval.loggers import EvaluationTracker

        tracker = EvaluationTracker(output_path=opts.output_path)
    lm = LazyMergeLM(target, memory=opts.memory, device=opts.device, seed=opts.seed, batch_size=opts.batch_size,
                     activations=opts.activations)
    lm.progress_bars = opts.progress
    try:
        with contextlib.redirect_stdout(sys.stderr):    # lm-eval prints progress notes; stdout is for results
            results = lm_eval.simple_evaluate(model=lm, model_args=model_args, tasks=list(opts.tasks),
                                              num_fewshot=opts.num_fewshot, limit=opts.limit,
                                              log_samples=opts.log_samples, evaluation_tracker=tracker,
                                              task_manager=manager, verbosity=opts.verbosity,
                                              batch_size=opts.batch_size, device=opts.device,
                                              **({} if opts.bootstrap_iters is None
                                                 else {"bootstrap_iters": opts.bootstrap_iters}))
        report = lm.model.report()
    finally:
        lm.close()
    run = TaskRun(name, results, report)
    if tracker is not None:
        samples = results.pop("samples", None) if opts.log_samples else None
        tracker.save_results_aggregated(results=results, samples=samples)
        if samples is not None:
            for task in results["configs"]:
                tracker.save_results_samples(task_name=task, samples=samples[task])
        out = Path(opts.output_path)
        run.files = sorted(p for p in out.rglob("*") if p.is_file() and tracker.date_id in p.name)
    return run


def table(run: TaskRun) -> str:
    """lm-eval's results table (and its groups table, when there are groups)."""
    from lm_eval.utils import make_table

    text = make_table(run.results)
    if run.results.get("groups"):
        text += "\n" + make_table(run.results, "groups")
    return text


def cost_line(run: TaskRun) -> str:
    r = run.report
    budget = "unlimited" if r.get("budget") is None else format_size(r["budget"])
    parts = [f"budget {budget}", f"peak RSS {format_size(r.get('peak_rss', 0))} "
             f"(at start {format_size(r.get('start_rss', 0))})",
             f"activations {format_size(r.get('activation_bytes', 0))}"]
    if r.get("kv_peak_bytes"):
        parts.append(f"KV cache {format_size(r['kv_peak_bytes'])} in memory, "
                     f"{format_size(r.get('kv_spilled_bytes', 0))} spilled")
    if r.get("weights_spilled_bytes"):
        parts.append(f"merged weights spilled {format_size(r['weights_spilled_bytes'])}")
    parts.append(f"model time {r.get('wall_s', 0.0):.1f} s")
    return f"{run.label}: " + ", ".join(parts)


def metric_values(results: dict[str, Any]) -> dict[tuple[str, str], float]:
    """(task, metric,filter) -> value, stderr entries left out."""
    out = {}
    for task, metrics in results.get("results", {}).items():
        for key, value in metrics.items():
            if (isinstance(value, (int, float)) and not isinstance(value, bool) and "_stderr" not in key
                    and key not in ("sample_len", "sample_count")):
                out[(task, key)] = float(value)
    return out


def comparison_table(runs: list[TaskRun]) -> str:
    """One row per model (inputs first, the merge last), one column per task metric."""
    cols = sorted({k for r in runs for k in metric_values(r.results)})
    head = ["model"] + [f"{t} {m.replace(',none', '')}" for t, m in cols]
    rows = []
    for r in runs:
        vals = metric_values(r.results)
        rows.append([r.label] + [f"{vals[c]:.4f}" if c in vals else "-" for c in cols])
    widths = [max(len(x[i]) for x in [head] + rows) for i in range(len(head))]
    fmt = "  ".join(["{:<%d}" % widths[0]] + ["{:>%d}" % w for w in widths[1:]])
    return "\n".join(fmt.format(*x) for x in [head] + rows)


def compare_tasks(recipe: Any, opts: TaskOptions) -> list[TaskRun]:
    """The tasks on each input model of `recipe` and on its merge: inputs first, the merge last. Each model
    tokenizes the tasks' text with its own tokenizer, as lm-eval does."""
    # the comparison table shows values only: no stderr bootstrap (lm-eval forks a pool for it per run; in a
    # process that has run several evaluations a pool worker was seen never to exit, hanging the run)
    if opts.bootstrap_iters is None:
        opts = replace(opts, bootstrap_iters=0)
    manager = task_manager(opts)
    runs = []
    for i, (label, target) in enumerate(input_targets(recipe)):
        o = opts if opts.output_path is None else replace(opts, output_path=str(Path(opts.output_path) / f"input{i}"))
        runs.append(run_tasks(target, o, label=label, manager=manager))
    o = opts if opts.output_path is None else replace(opts, output_path=str(Path(opts.output_path) / "merge"))
    runs.append(run_tasks(recipe, o, label=f"merge ({recipe if isinstance(recipe, (str, Path)) else 'recipe'})",
                          manager=manager))
    return runs


# -- search ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TaskObjective:
    """`task:NAME[:METRIC]`: maximise (or minimise, where lm-eval says lower is better) a task metric."""

    task: str
    metric: str | None = None

    @classmethod
    def parse(cls, spec: str) -> "TaskObjective":
        kind, _, rest = spec.partition(":")
        if kind != "task" or not rest or rest.count(":") > 1:
            raise RecipeError(f"--objective '{spec}': expected perplexity or task:NAME[:METRIC] "
                              "(e.g. task:arc_easy:acc)")
        name, _, metric = rest.partition(":")
        return cls(name, metric or None)

    @property
    def label(self) -> str:
        return f"{self.task} {self.metric}" if self.metric else self.task


def task_scorer(objective: TaskObjective, opts: TaskOptions) -> Callable[[Any], tuple[float, float]]:
    """A search's score function: a candidate recipe -> (value to minimise, the metric as lm-eval reports it)."""
    manager = task_manager(replace(opts, tasks=(objective.task,)))
    # no stderr: a trial needs the metric alone (lm-eval's bootstrap forks a pool and resamples 100000 times)
    o = replace(opts, tasks=(objective.task,), log_samples=False, output_path=None, bootstrap_iters=0)

    def score(candidate: Any) -> tuple[float, float]:
        run = run_tasks(candidate, o, label="candidate", manager=manager)
        value, higher = pick_metric(run.results, objective)
        if not math.isfinite(value):
            raise LazyMergeError(f"{objective.label}: the candidate's metric is {value}")
        return (-value if higher else value), value

    return score


def pick_metric(results: dict[str, Any], objective: TaskObjective) -> tuple[float, bool]:
    """The objective's value in lm-eval's results and whether higher is better (lm-eval's `higher_is_better`);
    without a METRIC, the task's first metric."""
    metrics = results.get("results", {}).get(objective.task)
    if metrics is None:
        raise LazyMergeError(f"{objective.label}: lm-eval returned no results for task '{objective.task}' "
                             "(a group? name one of its tasks)")
    keys = [k for k, v in metrics.items() if "_stderr" not in k and isinstance(v, (int, float))
            and not isinstance(v, bool)]
    names = {k.split(",")[0]: k for k in keys}
    want = objective.metric or (keys[0].split(",")[0] if keys else None)
    key = objective.metric if objective.metric in metrics else names.get(want or "")
    if key is None:
        raise LazyMergeError(f"{objective.label}: task '{objective.task}' has no metric '{objective.metric}' "
                             f"(it reports: {', '.join(sorted(names))})")
    higher = results.get("higher_is_better", {}).get(objective.task, {}).get(key.split(",")[0], True)
    return float(metrics[key]), bool(higher)
