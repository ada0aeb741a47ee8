"""`lazymerge search`: finds a known optimum, and a SIGKILLed search continues without losing a completed trial."""
from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
optuna = pytest.importorskip("optuna")

from evalkit import make_search_set, one_thread  # noqa: E402,F401
from holdkit import Hold  # noqa: E402

import lazymerge  # noqa: E402
from lazymerge.errors import RecipeError  # noqa: E402

SEQ, MAX = 32, 480


@pytest.fixture(scope="module")
def search_set(tmp_path_factory):
    """base, two fine-tunes far apart, and eval text sampled from ft1: the best linear mix leans to ft1."""
    return make_search_set(tmp_path_factory.mktemp("search"))


def test_search_finds_the_model_the_data_came_from(search_set, tmp_path):
    s = search_set
    # the premise: the data is much likelier under ft1 than under ft2
    e1 = lazymerge.evaluate(s["ft1"], s["data"], seq_len=SEQ, max_tokens=MAX)
    e2 = lazymerge.evaluate(s["ft2"], s["data"], seq_len=SEQ, max_tokens=MAX)
    assert e1.nll < e2.nll
    report = lazymerge.search(s["recipe"], s["data"], ["models[0].parameters.weight=0..1"], trials=12, seed=0,
                              study=tmp_path / "s.db", memory="32KiB", seq_len=SEQ, max_tokens=MAX,
                              best_file=tmp_path / "best.yaml", out=tmp_path / "merged")
    assert len([t for t in report.trials if t.state == "COMPLETE"]) == 12
    assert report.best_params["models[0].parameters.weight"] > 0.7
    # the best recipe file holds the best value, and evaluating it gives the reported perplexity
    best = lazymerge.evaluate(tmp_path / "best.yaml", s["data"], memory="32KiB", seq_len=SEQ, max_tokens=MAX)
    assert best.perplexity == report.best_perplexity
    assert report.best_perplexity == min(t.perplexity for t in report.trials)
    # --out: the best recipe merged and written; the same numbers from the written checkpoint
    written = lazymerge.evaluate(tmp_path / "merged", s["data"], memory="32KiB", seq_len=SEQ, max_tokens=MAX)
    assert written.perplexity == report.best_perplexity


def test_space_file(tmp_path):
    from lazymerge.evaluate.search import SpaceDim, read_space_file

    f = tmp_path / "search.yaml"
    f.write_text("space:\n  models[0].parameters.weight: [0, 1]\n  parameters.t[1]: [0.2, 0.8]\ntrials: 7\n")
    dims, extra = read_space_file(f)
    assert dims == [SpaceDim("models[0].parameters.weight", 0.0, 1.0), SpaceDim("parameters.t[1]", 0.2, 0.8)]
    assert extra == {"trials": 7}
    f.write_text("space: {parameters.t: [0, 1]}\ntrails: 3\n")
    with pytest.raises(RecipeError, match="unknown key 'trails'"):
        read_space_file(f)


def _completed(db: Path) -> list[tuple]:
    if not db.exists():
        return []
    try:
        with sqlite3.connect(db) as c:
            return c.execute("select t.number, v.value from trials t join trial_values v using (trial_id) "
                             "where t.state = 'COMPLETE' order by t.number").fetchall()
    except sqlite3.OperationalError:            # tables not created yet
        return []


def test_sigkill_then_rerun_keeps_every_completed_trial(search_set, tmp_path):
    s = search_set
    recipe = tmp_path / "recipe.yaml"
    import yaml

    recipe.write_text(yaml.safe_dump(s["recipe"]))
    db = tmp_path / "study.db"
    cmd = [sys.executable, "-m", "lazymerge.cli", "search", str(recipe), "--data", str(s["data"]), "--space",
           "models[0].parameters.weight=0..1", "--trials", "4", "--study", str(db), "--seq-len", str(SEQ),
           "--max-tokens", str(MAX), "--memory", "64KiB", "--best", str(tmp_path / "best.yaml"), "-q"]
    env = {**os.environ, "PYTHONPATH": str(Path(lazymerge.__file__).parent.parent), "OMP_NUM_THREADS": "1"}
    hold = Hold(tmp_path, "trial", 2)                  # the search stops once its second trial is stored
    proc = subprocess.Popen(cmd, env=hold.env(env), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        hold.wait(proc)
        proc.send_signal(signal.SIGKILL)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    before = _completed(db)
    assert len(before) == 2
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    after = _completed(db)
    assert len(after) == 4
    assert set(before) <= set(after)            # same numbers, same values
    assert (tmp_path / "best.yaml").exists()


@pytest.mark.parametrize("space, message", [
    ("models[0].parameters.density=0..1", "is not in the recipe"),
    ("models[3].parameters.weight=0..1", "models has no entry 3"),
    ("parameters.t=0..1", "has no 'parameters'"),
    ("models[0].parameters.weight=1..0", "LOW < HIGH"),
    ("models[0]parameters.weight=0..1", "not a recipe path"),
])
def test_bad_space_is_one_line_error(search_set, space, message):
    with pytest.raises(RecipeError, match=message.replace("[", r"\[")) as err:
        lazymerge.search(search_set["recipe"], search_set["data"], [space], trials=1, best_file=None)
    assert "\n" not in str(err.value)


def test_range_outside_domain(search_set):
    recipe = {"merge_method": "ties", "base_model": str(search_set["ft2"]),
              "models": [{"model": str(search_set["ft1"]), "parameters": {"weight": 1.0, "density": 0.5}}]}
    with pytest.raises(RecipeError, match=r"density: 1.5 must be in \(0, 1\].*outside the domain"):
        lazymerge.search(recipe, search_set["data"], ["models[0].parameters.density=0.2..1.5"], trials=1,
                         best_file=None)


def test_cmaes_sampler_runs_in_range(search_set, tmp_path):
    pytest.importorskip("cmaes")
    space = ["models[0].parameters.weight=0.1..1", "models[1].parameters.weight=0.1..0.5"]
    report = lazymerge.search(search_set["recipe"], search_set["data"], space, trials=3, sampler="cmaes", seed=1,
                              study=tmp_path / "c.db", memory="1MiB", seq_len=SEQ, max_tokens=MAX, best_file=None)
    assert len(report.trials) == 3 and all(t.state == "COMPLETE" for t in report.trials)
    for t in report.trials:
        assert 0.1 <= t.params["models[0].parameters.weight"] <= 1
        assert 0.1 <= t.params["models[1].parameters.weight"] <= 0.5
