"""`lazymerge eval --tasks` writes lm-eval's results layout and prints lm-eval's table; `--compare-inputs` with
tasks; `lazymerge search --objective task:NAME[:METRIC]`; one-line errors."""
from __future__ import annotations

import json

import pytest

pytest.importorskip("lm_eval")
pytest.importorskip("transformers")

from click.testing import CliRunner  # noqa: E402
from evalkit import make_finetune, make_model, one_thread  # noqa: E402,F401
from lmevalkit import write_tasks  # noqa: E402

from lazymerge.cli import main  # noqa: E402


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("lmevalcli")
    base = make_model(root / "base", "llama", seed=2)
    ft = make_finetune(base, root / "ft", seed=21, std=0.1)
    recipe = root / "recipe.yaml"
    recipe.write_text(json.dumps({"merge_method": "linear", "dtype": "float32", "models": [
        {"model": str(base), "parameters": {"weight": 0.3}}, {"model": str(ft), "parameters": {"weight": 0.7}}]}))
    return {"root": root, "base": base, "ft": ft, "recipe": recipe, "tasks": write_tasks(root / "tasks")}


def cli(*args: str):
    return CliRunner().invoke(main, list(args))


def one_line_error(res, *words: str) -> None:
    """A one-line `error: ...`, or click's usage error (usage, hint, then one `Error: ...` line)."""
    assert res.exit_code != 0
    lines = [ln for ln in res.output.strip().splitlines() if ln.strip()]
    if res.exit_code == 2 and lines[0].startswith("Usage:"):
        lines = lines[2:]
    assert len(lines) == 1 and lines[0].startswith(("error: ", "Error: ")), res.output
    for w in words:
        assert w in lines[0], (w, lines[0])


def test_eval_tasks_writes_lm_evals_results_and_samples(setup, tmp_path):
    out = tmp_path / "results"
    res = cli("eval", str(setup["recipe"]), "--tasks", "tiny_mc,tiny_gen", "--include-path", str(setup["tasks"]),
              "--limit", "4", "--log-samples", "--output-path", str(out), "--memory", "64KiB", "-q")
    assert res.exit_code == 0, res.output
    assert "|Version|Filter|n-shot|" in res.stdout and "exact_match" in res.stdout
    assert "peak RSS" in res.stderr and "budget 64.00 KiB" in res.stderr
    (model_dir,) = out.iterdir()                       # lm-eval's layout: OUT/<model name>/results_<date>.json
    (results,) = model_dir.glob("results_*.json")
    data = json.loads(results.read_text())
    assert set(data["results"]) == {"tiny_mc", "tiny_gen"}
    assert data["config"]["model_args"]["pretrained"] == str(setup["recipe"])
    assert data["config"]["lazymerge"]["budget"] == 64 * 1024
    for task, requests in (("tiny_mc", 4), ("tiny_gen", 1)):
        (samples,) = model_dir.glob(f"samples_{task}_*.jsonl")
        rows = [json.loads(line) for line in samples.read_text().splitlines()]
        assert [r["doc_id"] for r in rows] == [0, 1, 2, 3]
        assert all(len(r["resps"]) == requests for r in rows)
    # the table printed is lm-eval's, with the values written
    rows = [[c.strip() for c in line.split("|")] for line in res.stdout.splitlines()]
    acc_row = next(r for r in rows if len(r) > 7 and r[1] == "tiny_mc")
    assert acc_row[5] == "acc" and float(acc_row[7]) == data["results"]["tiny_mc"]["acc,none"]


def test_compare_inputs_with_tasks(setup):
    from lazymerge.tasks import TaskRun, comparison_table

    res = cli("eval", str(setup["recipe"]), "--tasks", "tiny_ll", "--include-path", str(setup["tasks"]),
              "--compare-inputs", "--json", "-q")
    assert res.exit_code == 0, res.output
    runs = json.loads(res.stdout)
    assert [r["model"] for r in runs][:2] == [str(setup["base"]), str(setup["ft"])]
    assert runs[2]["model"].startswith("merge")
    ppl = [r["results"]["results"]["tiny_ll"]["perplexity,none"] for r in runs]
    assert len(set(ppl)) == 3                          # three different models, three different scores
    table = comparison_table([TaskRun(r["model"], r["results"]) for r in runs]).splitlines()
    assert table[0].split()[1:] == ["tiny_ll", "acc", "tiny_ll", "perplexity"]
    assert [float(line.split()[-1]) for line in table[1:]] == pytest.approx(ppl, rel=1e-4)


def test_search_on_a_task_metric(setup, tmp_path):
    import lazymerge
    from lazymerge.errors import RecipeError
    from lazymerge.tasks import TaskOptions, run_tasks

    study, best = tmp_path / "s.db", tmp_path / "best.yaml"
    kwargs = dict(trials=2, study=study, best_file=best, objective="task:tiny_mc:acc",
                  include_path=setup["tasks"], limit=6)
    report = lazymerge.search(str(setup["recipe"]), None, ["models[0].parameters.weight=0..1"], **kwargs)
    assert report.objective == "tiny_mc acc" and len(report.trials) == 2
    assert report.best_score == max(t.score for t in report.trials)
    # the reported score is lm-eval's acc of that candidate, evaluated again on its own
    import yaml

    again = run_tasks(yaml.safe_load(best.read_text()), TaskOptions(tasks=("tiny_mc",),
                                                                     include_path=str(setup["tasks"]), limit=6))
    assert again.results["results"]["tiny_mc"]["acc,none"] == report.best_score
    with pytest.raises(RecipeError, match="objective is tiny_mc acc"):
        lazymerge.search(str(setup["recipe"]), setup["tasks"] / "tiny_ppl.jsonl",
                         ["models[0].parameters.weight=0..1"], trials=3, study=study, best_file=best)


def test_task_errors_are_one_line(setup, monkeypatch):
    base = str(setup["base"])
    one_line_error(cli("eval", base, "--tasks", "tiny_mc", "--data", str(setup["recipe"])), "--tasks")
    one_line_error(cli("eval", base, "--data", str(setup["recipe"]), "--limit", "3"), "--limit needs --tasks")
    one_line_error(cli("search", str(setup["recipe"]), "-s", "models[0].parameters.weight=0..1",
                       "--objective", "accuracy"), "task:NAME")
    one_line_error(cli("eval", base, "--tasks", "tiny_mc", "--include-path", str(setup["root"] / "nope")),
                   "not a directory")
    # an unknown name is looked up among lm-eval's built-in tasks too (indexing them takes seconds: here the
    # index is the include path's alone)
    import lm_eval.tasks

    local = lm_eval.tasks.TaskManager
    monkeypatch.setattr(lm_eval.tasks, "TaskManager",
                        lambda include_path=None, **kw: local(include_path=include_path, include_defaults=False))
    one_line_error(cli("eval", base, "--tasks", "tiny_mx", "--include-path", str(setup["tasks"]), "-q"),
                   "unknown task 'tiny_mx'", "did you mean tiny_mc")
