"""`lazymerge search --cluster`: the trials of a parameter search evaluated on Dask workers.

The client keeps the optuna study (SQLite, as a local search does) and drives it with ask/tell: it keeps one
trial in flight per worker (placed on a worker with none), each a task that evaluates one candidate recipe with
the local evaluator (layer by layer, within --memory, nothing written), and as each finishes it tells the study and
asks for the next, until the study holds the requested number of completed trials. A trial's value depends only
on its candidate values (evaluation is deterministic), never on the worker that ran it.

The data is read and tokenized once, here, with the recipe's tokenizer (a candidate differs from the recipe in
numbers only, never in tokenizer or positions), and the token windows travel with every trial: workers keep
nothing between trials, so a later search on the same cluster (another model family, edited data) cannot score on
an earlier one's tokens, and the data need not be on the workers at all.

Reproducibility: the completed trials' values are reproducible; the *proposals* of a seeded sampler are not
exactly, because the sampler sees the finished trials in completion order, which depends on timing (with two
workers the second proposal is made before the first result is known). A local search is the reproducible one.

Failures: a trial that raises fails in the study and stops the search with one line naming the trial and the
worker; a trial whose loss is not a number fails and the search goes on (`evaluate.search.FailureCount`). Resume: a
client killed mid-search leaves its in-flight trials RUNNING in the study; the next run marks them FAILED exactly
as a local run does (`evaluate.search.open_study`) and asks for new ones. Completed trials are kept. A worker that
dies mid-trial has its task rerun elsewhere by Dask.
"""
from __future__ import annotations

import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from .. import testhold
from .._version import __version__
from ..engine.run import input_files
from ..errors import LazyMergeError, OutputError
from ..evaluate.runner import _evaluate, evaluation_windows
from ..evaluate.search import FailureCount, SpaceDim, Trial, candidate, completed_count, suggest, trial_of
from ..io.paths import relative_to
from ..planner.compile import compile_plan
from .driver import _client_of, _distributed, _small_files, _wait_for_workers
from .preflight import check_inputs, check_workers, expected_files


@dataclass(frozen=True)
class TrialJob:
    """What every trial shares: the token windows to score (computed once by the client) and how to evaluate."""

    windows: torch.Tensor
    memory: Any
    batch: int
    device: str
    seed: int
    cwd: str                                 # relative model paths in the recipe are relative to it
    files: tuple[tuple[str, int], ...]       # every file a trial reads, with its size on the client
    version: str = __version__


def evaluate_trial(job: TrialJob, recipe: dict[str, Any]) -> tuple[float, float]:
    """Runs on a worker: evaluate one candidate recipe on the job's windows; (mean nll, perplexity). A
    LazyMergeError comes back as one line naming the worker."""
    try:
        check_inputs(job.files, job.version)     # also on a worker that joined after the preflight
        with relative_to(job.cwd):
            report, _ = _evaluate(recipe, "<windows>", memory=job.memory, seq_len=None, max_tokens=0,
                                  batch=job.batch, device=job.device, seed=job.seed, progress=None,
                                  windows=job.windows)
    except LazyMergeError as exc:
        raise type(exc)(f"worker {_worker_address()}: {exc}") from None
    return report.nll, report.perplexity


def _worker_address() -> str:
    try:
        from distributed import get_worker

        return get_worker().address
    except (ImportError, ValueError):
        return "?"


def _inputs(doc: dict[str, Any], memory: Any) -> list[Path]:
    """Every file a trial reads: the inputs' shards, configs and tokenizers (from the plan of the recipe as
    given: the searched values change no file)."""
    plan = compile_plan(doc, memory=memory)
    try:
        return [*input_files(plan), *_small_files(plan)]
    finally:
        plan.close()


def _failure(trial: Any, exc: BaseException) -> LazyMergeError:
    """One line for a trial that raised on its worker: its own message when it is a LazyMergeError (it names
    the worker), else the exception's type and first line (the worker's log holds the traceback)."""
    if isinstance(exc, LazyMergeError):
        return type(exc)(f"search: trial {trial.number}: {exc}")
    first = (str(exc).strip().splitlines() or [""])[0]
    return LazyMergeError(f"search: trial {trial.number} failed on a worker: {type(exc).__name__}: {first} "
                          "(the worker's log has the traceback)")


def run_trials(open_study: Callable[[], Any], doc: dict[str, Any], dims: list[SpaceDim], trials: int, *,
               cluster: Any, data: "str | Path", memory: Any, seq_len: int | None, max_tokens: int, batch: int,
               device: str, seed: int, on_trial: Callable[[Trial], None] | None = None) -> Any:
    """Open the study (once the cluster is reached and checked) and ask/tell it until it holds `trials` completed
    trials, each evaluated on a worker of `cluster`. Returns the study."""
    import optuna

    distributed = _distributed()
    windows = evaluation_windows(doc, data, memory=memory, seq_len=seq_len, max_tokens=max_tokens, device=device,
                                 seed=seed)
    files = expected_files(_inputs(doc, memory))
    job = TrialJob(windows, memory, batch, str(device), seed, os.getcwd(), files)
    with _client_of(cluster) as client:
        _wait_for_workers(client)
        workers = check_workers(client, files, None, [])
        study = open_study()
        token = uuid.uuid4().hex[:8]
        inflight: dict[Any, Any] = {}
        pending = distributed.as_completed()
        done = completed_count(study)
        failures = FailureCount(trials)

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
                    study.tell(trial, state=optuna.trial.TrialState.FAIL)
                    raise OutputError(f"search: trial {trial.number} killed every worker that ran it; see the "
                                      "workers' logs (out of memory? lower --memory)") from None
                except Exception as exc:
                    study.tell(trial, state=optuna.trial.TrialState.FAIL)
                    raise _failure(trial, exc) from None
                trial.set_user_attr("perplexity", ppl)
                frozen = study.tell(trial, nll)              # a loss that is not a number: FAIL
                if on_trial is not None:
                    on_trial(trial_of(frozen))
                failures.add(frozen)
                done += frozen.state == optuna.trial.TrialState.COMPLETE
                if testhold.ARMED:
                    testhold.reached("trial")
                if done + len(inflight) < trials:
                    launch()
        finally:
            client.cancel(list(inflight))
            for trial in inflight.values():                   # not finished: failed, as a killed run's would be
                study.tell(trial, state=optuna.trial.TrialState.FAIL)
    return study
