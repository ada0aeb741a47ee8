"""`lazymerge search --cluster`: the trials of a parameter search evaluated on Dask workers.

The client keeps the optuna study (SQLite, as a local search does) and drives it with ask/tell: it keeps one
trial in flight per worker (placed on a worker with none), each a task that evaluates one candidate recipe with the local evaluator (layer by
layer, within --memory, nothing written), and as each finishes it tells the study and asks for the next, until
the study holds the requested number of completed trials. A trial's value depends only on its candidate values
(evaluation is deterministic), never on the worker that ran it.

Reproducibility: the completed trials' values are reproducible; the *proposals* of a seeded sampler are not
exactly, because the sampler sees the finished trials in completion order, which depends on timing (with two
workers the second proposal is made before the first result is known). A local search is the reproducible one.

Resume: a client killed mid-search leaves its in-flight trials RUNNING in the study; the next run marks them
FAILED exactly as a local run does (`evaluate.search.open_study`) and asks for new ones. Completed trials are
kept. A worker that dies mid-trial has its task rerun elsewhere by Dask.
"""
from __future__ import annotations

import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from .. import testhold
from ..errors import LazyMergeError, OutputError
from ..evaluate.data import DataError
from ..evaluate.search import SpaceDim, Trial, candidate, completed_count, suggest, trial_of
from .driver import _client_of, _distributed, _small_files, _wait_for_workers
from .preflight import check_workers


@dataclass(frozen=True)
class TrialJob:
    """What every trial shares: the evaluation settings, with the data at its absolute path."""

    data: str
    memory: Any
    seq_len: int | None
    max_tokens: int
    batch: int
    device: str
    seed: int
    cwd: str


_WINDOWS: dict[TrialJob, Any] = {}     # per worker process: the tokenized eval windows, as a local search reuses


def evaluate_trial(job: TrialJob, recipe: dict[str, Any]) -> tuple[float, float]:
    """Runs on a worker: evaluate one candidate recipe; (mean nll, perplexity). Relative model paths mean what
    they meant on the client. A LazyMergeError comes back as one line naming the worker."""
    from ..evaluate.runner import _evaluate

    here = os.getcwd()
    moved = here != job.cwd and os.path.isdir(job.cwd)
    try:
        if moved:
            os.chdir(job.cwd)
        report, win = _evaluate(recipe, job.data, memory=job.memory, seq_len=job.seq_len, max_tokens=job.max_tokens,
                                batch=job.batch, device=job.device, seed=job.seed, progress=None,
                                windows=_WINDOWS.get(job))
    except LazyMergeError as exc:
        raise type(exc)(f"worker {_worker_address()}: {exc}") from None
    finally:
        if moved:
            os.chdir(here)
    _WINDOWS[job] = win
    return report.nll, report.perplexity


def _worker_address() -> str:
    try:
        from distributed import get_worker

        return get_worker().address
    except (ImportError, ValueError):
        return "?"


def _inputs(doc: dict[str, Any], memory: Any, data: Path) -> list[Path]:
    """Every file a trial reads: the data, and the inputs' shards, configs and tokenizers (from the plan of the
    recipe as given: the searched values change no file)."""
    from ..engine.run import input_files
    from ..planner.compile import compile_plan

    plan = compile_plan(doc, memory=memory)
    try:
        return [data, *input_files(plan), *_small_files(plan)]
    finally:
        plan.close()


def run_trials(study: Any, doc: dict[str, Any], dims: list[SpaceDim], trials: int, *, cluster: Any,
               data: "str | Path", memory: Any, seq_len: int | None, max_tokens: int, batch: int, device: str,
               seed: int, on_trial: Callable[[Trial], None] | None = None) -> None:
    """Ask/tell `study` until it holds `trials` completed trials, each evaluated on a worker of `cluster`."""
    import optuna

    distributed = _distributed()
    data_path = Path(os.path.abspath(data))
    if not data_path.is_file():
        raise DataError(f"{data_path}: data file does not exist")
    job = TrialJob(str(data_path), memory, seq_len, max_tokens, batch, str(device), seed, os.getcwd())
    inputs = _inputs(doc, memory, data_path)
    with _client_of(cluster) as client:
        _wait_for_workers(client)
        workers = check_workers(client, inputs, None, [])
        token = uuid.uuid4().hex[:8]
        inflight: dict[Any, Any] = {}
        pending = distributed.as_completed()
        done = completed_count(study)

        free = list(workers)
        placed: dict[Any, str] = {}

        def launch() -> None:
            # one trial per worker: each goes to a worker with none in flight (a worker with many threads would
            # otherwise take two); loosely, so that a trial whose worker died runs elsewhere
            trial = study.ask()
            recipe = candidate(doc, dims, suggest(trial, dims))
            addr = free.pop(0)
            fut = client.submit(evaluate_trial, job, recipe, key=f"lazymerge-trial-{token}-{trial.number}",
                                pure=False, workers=[addr], allow_other_workers=True)
            inflight[fut] = trial
            placed[fut] = addr
            pending.add(fut)

        try:
            while len(inflight) < min(len(workers), trials - done):
                launch()
            for fut in pending:
                trial = inflight.pop(fut)
                free.append(placed.pop(fut))
                try:
                    nll, ppl = fut.result()
                except distributed.KilledWorker:
                    raise OutputError(f"search: trial {trial.number} killed every worker that ran it; see the "
                                      "workers' logs (out of memory? lower --memory)") from None
                trial.set_user_attr("perplexity", ppl)
                frozen = study.tell(trial, nll)
                done += 1
                if on_trial is not None:
                    on_trial(trial_of(frozen))
                if testhold.ARMED:
                    testhold.reached("trial")
                if done + len(inflight) < trials:
                    launch()
        finally:
            client.cancel(list(inflight))
            for trial in inflight.values():                   # not finished: failed, as a killed run's would be
                study.tell(trial, state=optuna.trial.TrialState.FAIL)
