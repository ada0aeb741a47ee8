"""Parameter search: choose a recipe's `weight`, `density`, `t` ... by the perplexity of the merge, out of core.

Each trial writes the sampled values into a copy of the recipe at their places (`models[0].parameters.density`,
`parameters.t[1]`) and evaluates that candidate lazily (layer by layer, never written). optuna proposes the
values (TPE by default, seeded; CMA-ES as an option) and keeps the study in SQLite, committed after every trial:
a search killed at any point and started again with the same command continues, every completed trial kept.
"""
from __future__ import annotations

import copy
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import yaml

from .. import testhold
from ..errors import LazyMergeError, RecipeError
from ..planner.methods import METHODS
from ..io.models import pin_refs, resolve_refs
from ..options import RunOptions
from ..planner.recipe import load_yaml, read_documents
from .data import DataError
from .runner import _evaluate

_TOKEN = re.compile(r"(\.?)([A-Za-z_][\w-]*)|\[(\d+)\]")
STUDY_NAME = "lazymerge-search"
MIN_FAIL_LIMIT = 10     # failed trials in a row that stop a search (or its `trials`, when more)


@dataclass(frozen=True)
class SpaceDim:
    """One searched value: where it sits in the recipe and its range; `integer` for a whole-number value (an
    integer parameter such as karcher's max_iter, or an integer in the recipe where no parameter is declared,
    such as a layer_range bound), searched over the integers LOW..HIGH."""

    path: str
    low: float
    high: float
    log: bool = False
    integer: bool = False

    @property
    def steps(self) -> list["str | int"]:
        return parse_path(self.path)


@dataclass(frozen=True)
class Trial:
    number: int
    params: dict[str, float]
    perplexity: float | None
    nll: float | None
    state: str
    score: float | None = None          # the objective as reported: the perplexity, or a task metric


@dataclass
class SearchReport:
    best_params: dict[str, float]
    best_perplexity: float
    best_recipe: dict[str, Any]
    trials: list[Trial] = field(default_factory=list)
    best_file: Path | None = None
    out: Path | None = None
    objective: str = "perplexity"       # or a task metric, e.g. "arc_easy acc"
    best_score: float | None = None     # the objective's best value as reported (= best_perplexity by default)

    def table(self) -> str:
        names = sorted({k for t in self.trials for k in t.params})
        head = ["trial"] + names + [self.objective, "state"]
        rows = [[str(t.number)] + [f"{t.params[n]:.4f}" if n in t.params else "-" for n in names]
                + [f"{t.score:.4f}" if t.score is not None else "-", t.state] for t in self.trials]
        widths = [max(len(r[i]) for r in [head] + rows) for i in range(len(head))]
        fmt = "  ".join(f"{{:>{w}}}" for w in widths)
        return "\n".join(fmt.format(*r) for r in [head] + rows)

    def summary(self) -> str:
        lines = [self.table(), "",
                 f"best          {self.objective} {self.best_score:.4f} with "
                 + ", ".join(f"{k}={v:.4f}" for k, v in self.best_params.items())]
        if self.best_file is not None:
            lines.append(f"best recipe   {self.best_file}")
        if self.out is not None:
            lines.append(f"merged        {self.out}")
        return "\n".join(lines)


def parse_path(path: str) -> list["str | int"]:
    steps: list[str | int] = []
    pos = 0
    for m in _TOKEN.finditer(path):
        if m.start() != pos or (m.group(2) is not None and bool(m.group(1)) != bool(steps)):
            break                                   # a gap, or a key without its dot (or a leading dot)
        steps.append(m.group(2) if m.group(2) is not None else int(m.group(3)))
        pos = m.end()
    if pos != len(path) or not steps:
        raise RecipeError(f"search space: '{path}' is not a recipe path (like models[0].parameters.weight or "
                          "parameters.t[1])")
    return steps


def parse_space(spec: str) -> SpaceDim:
    """`PATH=LOW..HIGH` (append `:log` for a log-uniform range)."""
    path, sep, rng = spec.partition("=")
    log = rng.endswith(":log")
    rng = rng[:-4] if log else rng
    lo, sep2, hi = rng.partition("..")
    try:
        if not sep or not sep2:
            raise ValueError
        low, high = float(lo), float(hi)
    except ValueError:
        raise RecipeError(f"search space: '{spec}' is not PATH=LOW..HIGH (e.g. parameters.t=0..1)") from None
    if not (math.isfinite(low) and math.isfinite(high)) or low >= high:
        raise RecipeError(f"search space: '{spec}': need finite LOW < HIGH")
    return SpaceDim(path.strip(), low, high, log)


def read_space_file(path: "str | Path") -> tuple[list[SpaceDim], dict[str, Any]]:
    """A search YAML: `space: {PATH: [LOW, HIGH]}` plus optional `trials`, `sampler`, `seed`."""
    p = Path(path)
    if not p.is_file():
        raise RecipeError(f"{p}: search file does not exist")
    data = load_yaml(p.read_text(encoding="utf-8"), str(p))
    if not isinstance(data, dict) or not isinstance(data.get("space"), dict):
        raise RecipeError(f"{p}: expected a mapping with 'space: {{PATH: [LOW, HIGH]}}'")
    dims = []
    for key, rng in data["space"].items():
        if not (isinstance(rng, list) and len(rng) == 2):
            raise RecipeError(f"{p}: space.{key}: expected [LOW, HIGH]")
        dims.append(parse_space(f"{key}={rng[0]}..{rng[1]}"))
    extra = {k: v for k, v in data.items() if k != "space"}
    bad = set(extra) - {"trials", "sampler", "seed"}
    if bad:
        raise RecipeError(f"{p}: unknown key '{sorted(bad)[0]}'; valid keys: space, trials, sampler, seed")
    return dims, extra


def _walk(doc: Any, steps: Sequence["str | int"], source: str, path: str) -> tuple[Any, "str | int"]:
    node = doc
    for i, step in enumerate(steps[:-1]):
        node = _step(node, step, source, path, steps[:i])
    _step(node, steps[-1], source, path, steps[:-1])           # must exist
    return node, steps[-1]


def _step(node: Any, step: "str | int", source: str, path: str, before: Sequence["str | int"]) -> Any:
    where = "".join(f"[{s}]" if isinstance(s, int) else f".{s}" for s in before).lstrip(".") or "the recipe"
    if isinstance(step, int):
        if isinstance(node, list) and 0 <= step < len(node):
            return node[step]
    elif isinstance(node, dict) and step in node:
        return node[step]
    raise RecipeError(f"{source}: search space: '{path}' is not in the recipe ({where} has no "
                      f"{'entry ' + str(step) if isinstance(step, int) else repr(step)})")


def _param_name(steps: Sequence["str | int"]) -> str | None:
    names = [s for s in steps if isinstance(s, str)]
    for i in range(len(names) - 1, 0, -1):
        if names[i - 1] == "parameters":
            return names[i]
    return None


def check_space(doc: dict[str, Any], dims: list[SpaceDim], source: str) -> list[SpaceDim]:
    """Every path names a number already in the recipe, and its range lies in the parameter's domain. Returns
    the dims with `integer` set where the value is a whole number (see SpaceDim)."""
    method = METHODS.get(doc.get("merge_method"))
    out = []
    for d in dims:
        node, last = _walk(doc, d.steps, source, d.path)
        value = node[last]
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise RecipeError(f"{source}: search space: '{d.path}' is {value!r}, not a number (search a "
                              "gradient's entries as PATH[i])")
        name = _param_name(d.steps)
        param = next((p for p in method.params if p.name == name), None) if method and name else None
        if param is not None and param.kind not in (float, int):
            raise RecipeError(f"{source}: search space: '{d.path}': {name} is not a numeric parameter")
        integer = param.kind is int if param is not None else isinstance(value, int)
        if integer:
            if not (float(d.low).is_integer() and float(d.high).is_integer()):
                raise RecipeError(f"{source}: search space: '{d.path}' is a whole number; give whole LOW..HIGH, "
                                  f"not {d.low:g}..{d.high:g}")
            d = SpaceDim(d.path, d.low, d.high, d.log, integer=True)
        out.append(d)
        if param is None:
            continue
        for bound in (d.low, d.high):
            try:
                param.coerce(bound, f"{source}: search space: '{d.path}' range {d.low:g}..{d.high:g}: {name}")
            except RecipeError as exc:
                raise RecipeError(f"{exc} (outside the domain of {name})") from None
    return out


def candidate(doc: dict[str, Any], dims: list[SpaceDim], values: dict[str, float]) -> dict[str, Any]:
    out = copy.deepcopy(doc)
    for d in dims:
        node, last = _walk(out, d.steps, "<recipe>", d.path)
        node[last] = int(values[d.path]) if d.integer else float(values[d.path])
    return out


def _sampler(optuna: Any, name: str, seed: int) -> Any:
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed)
    if name in ("cmaes", "cma-es"):
        try:
            import cmaes  # noqa: F401  (optuna's CMA-ES sampler needs it)
        except ImportError:
            raise LazyMergeError("search: --sampler cmaes needs the cmaes package: "
                                 "pip install 'lazymerge[search]'") from None
        return optuna.samplers.CmaEsSampler(seed=seed, warn_independent_sampling=False)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    raise RecipeError(f"search: sampler '{name}' is unknown; use tpe, cmaes or random")


def search(recipe: Any, data: "str | Path | None", space: Sequence["str | SpaceDim"], *, trials: int = 20,
           study: "str | Path | None" = None, sampler: str = "tpe", seed: int = 0, memory: Any = None,
           seq_len: int | None = None, max_tokens: int = 4096, batch: int = 4, device: str = "cpu",
           best_file: "str | Path | None" = "best.yaml", out: "str | Path | None" = None,
           on_trial: Callable[[Trial], None] | None = None, progress: Callable[[Any], None] | None = None,
           run_trials: Callable[..., Any] | None = None,
           score: Callable[[dict[str, Any]], tuple[float, float]] | None = None,
           objective: str = "perplexity") -> SearchReport:
    """Search `space` (`PATH=LOW..HIGH` strings or SpaceDims) for the recipe values with the lowest perplexity
    on `data`, until `trials` trials have completed in the study (a re-run with the same `study` file continues).
    Writes the best recipe to `best_file`, and merges it into `out` when given. `run_trials` completes the
    trials elsewhere instead of one by one here: called as run_trials(open_study, doc, dims, trials, data=,
    memory=, seq_len=, max_tokens=, batch=, device=, seed=, on_trial=), it opens the study with `open_study()`
    once it is ready to run trials (so that a cluster that cannot be reached leaves no study file), asks and tells
    it, and returns it (`lazymerge.cluster.search.run_trials` on Dask workers); the study, its resume and the
    report stay here. `score` replaces the perplexity on `data` as the objective (`objective` names it): a
    candidate recipe -> (value to minimise, value to report), e.g. minus an lm-eval task metric
    (`lazymerge.tasks.task_scorer`).

    A trial whose loss is not a number (a degenerate candidate: NaN weights) fails in the study and the search
    goes on; after `max(trials, MIN_FAIL_LIMIT)` failed trials in a row it stops with a one-line error."""
    try:
        import optuna
    except ImportError:
        raise LazyMergeError("search needs optuna: pip install 'lazymerge[search]'") from None
    if isinstance(trials, bool) or not isinstance(trials, int) or trials < 1:
        raise RecipeError(f"search: trials must be a whole number of at least 1, not {trials!r}")
    doc, dims = _read_search(recipe, space)
    if data is not None and not Path(data).exists():
        raise DataError(f"{data}: data file does not exist")
    pins = resolve_refs(doc)       # hub models: every trial (and the best recipe) reads the same commits
    doc = pin_refs(doc, pins) if pins else doc

    def opened() -> Any:
        return open_study(optuna, study, sampler, seed, dims, objective)

    if run_trials is not None:
        st = run_trials(opened, doc, dims, trials, data=data, memory=memory, seq_len=seq_len,
                        max_tokens=max_tokens, batch=batch, device=device, seed=seed, on_trial=on_trial)
        return _finish(st, doc, dims, best_file=best_file, out=out, memory=memory, seed=seed, device=device)
    st = opened()
    windows_box: dict[str, Any] = {}

    def objective_fn(trial: Any) -> float:
        values = suggest(trial, dims)
        if score is not None:
            value, shown = score(candidate(doc, dims, values))
            trial.set_user_attr("score", shown)
            return value
        report, win = _evaluate(candidate(doc, dims, values), data, memory=memory, seq_len=seq_len,
                                max_tokens=max_tokens, batch=batch, device=device, seed=seed, progress=progress,
                                windows=windows_box.get("w"))
        windows_box["w"] = win
        trial.set_user_attr("perplexity", report.perplexity)
        return report.nll

    failures = FailureCount(trials)

    def report_trial(_study: Any, frozen: Any) -> None:
        if on_trial is not None:
            on_trial(trial_of(frozen))
        failures.add(frozen)

    while completed_count(st) < trials:
        st.optimize(objective_fn, n_trials=1, catch=(), callbacks=[report_trial])
        if testhold.ARMED:
            testhold.reached("trial")
    return _finish(st, doc, dims, best_file=best_file, out=out, memory=memory, seed=seed, device=device)


def _read_search(recipe: Any, space: Sequence["str | SpaceDim"]) -> tuple[dict[str, Any], list[SpaceDim]]:
    docs, source = read_documents(recipe)
    if len(docs) != 1 or not isinstance(docs[0], dict):
        raise RecipeError(f"{source}: search takes a single-document recipe")
    doc = docs[0]
    dims = [d if isinstance(d, SpaceDim) else parse_space(d) for d in space]
    if not dims:
        raise RecipeError("search: no --space given")
    if len({d.path for d in dims}) != len(dims):
        raise RecipeError("search: the same path is given twice in the space")
    return doc, check_space(doc, dims, source)


def open_study(optuna: Any, study: "str | Path | None", sampler: str, seed: int, dims: list[SpaceDim],
               objective: str = "perplexity") -> Any:
    """Create or reopen the study. Trials a killed run left RUNNING are marked FAILED (one client per study:
    nobody else is running them), so the search asks for new ones; completed trials are kept, local or cluster."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = None
    if study is not None:
        storage = f"sqlite:///{Path(study).expanduser().resolve()}"
    st = optuna.create_study(study_name=STUDY_NAME, storage=storage, load_if_exists=True, direction="minimize",
                             sampler=_sampler(optuna, sampler, seed))
    paths = sorted(d.path for d in dims)
    for t in st.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        if sorted(t.params) != paths:
            raise RecipeError(f"{study}: this study searched {', '.join(sorted(t.params))}; use another --study "
                              "file for a different space")
        for d in dims:
            if isinstance(t.distributions[d.path], optuna.distributions.IntDistribution) != d.integer:
                raise RecipeError(f"{study}: this study searched {d.path} as "
                                  f"{'a real number' if d.integer else 'a whole number'}; use another --study file")
    for t in st.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        st.tell(t.number, state=optuna.trial.TrialState.FAIL)     # left by a killed run: one process per study
    was = st.user_attrs.get("objective", "perplexity")
    if was != objective and completed_count(st):
        raise RecipeError(f"{study}: this study's objective is {was}; use another --study file for {objective}")
    st.set_user_attr("objective", objective)
    return st


def suggest(trial: Any, dims: list[SpaceDim]) -> dict[str, float]:
    return {d.path: trial.suggest_int(d.path, int(d.low), int(d.high), log=d.log) if d.integer
            else trial.suggest_float(d.path, d.low, d.high, log=d.log) for d in dims}


def completed_count(st: Any) -> int:
    import optuna

    return len(st.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)))


class FailureCount:
    """Failed trials in a row (a loss that is not a number): a search that only fails stops, with one line."""

    def __init__(self, trials: int):
        self.limit = max(trials, MIN_FAIL_LIMIT)
        self.in_a_row = 0

    def add(self, frozen: Any) -> None:
        if frozen.state.name == "COMPLETE":
            self.in_a_row = 0
            return
        self.in_a_row += 1
        if self.in_a_row >= self.limit:
            vals = ", ".join(f"{k}={v:g}" for k, v in frozen.params.items())
            raise LazyMergeError(f"search: {self.in_a_row} trials in a row failed (their loss is not a number; "
                                 f"the last at {vals}): is the space's range degenerate?")


def _finish(st: Any, doc: dict[str, Any], dims: list[SpaceDim], *, best_file: "str | Path | None",
            out: "str | Path | None", memory: Any, seed: int, device: str) -> SearchReport:
    import optuna

    completed = [t for t in st.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.COMPLETE]
    if not completed:
        raise LazyMergeError("search: no trial completed, so there is no best recipe")
    best = min(completed, key=lambda t: (t.value, t.number))
    best_recipe = candidate(doc, dims, best.params)
    objective = st.user_attrs.get("objective", "perplexity")
    report = SearchReport(best_params=dict(best.params), best_perplexity=best.user_attrs.get("perplexity"),
                          best_recipe=best_recipe, trials=[trial_of(t) for t in st.get_trials(deepcopy=False)],
                          objective=objective, best_score=trial_of(best).score)
    if best_file is not None:
        report.best_file = Path(best_file)
        report.best_file.write_text(yaml.safe_dump(best_recipe, sort_keys=False))
    if out is not None:
        from ..merging import merge_recipe

        merge_recipe(best_recipe, out, RunOptions(memory=memory, seed=seed, device=str(device)))
        report.out = Path(out)
    return report


def trial_of(t: Any) -> Trial:
    ppl = t.user_attrs.get("perplexity")
    return Trial(t.number, dict(t.params), ppl, t.value if ppl is not None else None, t.state.name,
                 t.user_attrs.get("score", ppl))
