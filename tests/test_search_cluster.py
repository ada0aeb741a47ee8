"""`lazymerge search --cluster`: trials evaluated on Dask workers give the values a local evaluation gives, and an
interrupted cluster search continues without losing a completed trial.

One LocalCluster of 2 worker processes serves the module (starting one costs seconds: every worker imports torch).
"""
from __future__ import annotations

import pytest

pytest.importorskip("transformers")
optuna = pytest.importorskip("optuna")
distributed = pytest.importorskip("distributed")

import lazymerge  # noqa: E402
from lazymerge.errors import LazyMergeError, OutputError  # noqa: E402
from lazymerge.evaluate.search import STUDY_NAME, candidate, parse_space  # noqa: E402
from test_search import MAX, SEQ, search_set  # noqa: E402,F401  (the fixture, shared)

SPACE = ["models[0].parameters.weight=0..1"]


@pytest.fixture(scope="module")
def client():
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0",
                                  silence_logs=40) as cluster, distributed.Client(cluster) as c:
        yield c


def _load(db):
    return optuna.load_study(study_name=STUDY_NAME, storage=f"sqlite:///{db}")


def test_cluster_trials_equal_local_evaluation(search_set, client, tmp_path):
    s = search_set
    seen = []
    with distributed.get_task_stream(client) as stream:
        report = lazymerge.search(s["recipe"], s["data"], SPACE, trials=4, seed=0, study=tmp_path / "s.db",
                                  memory="64KiB", seq_len=SEQ, max_tokens=MAX, best_file=tmp_path / "best.yaml",
                                  cluster=client, on_trial=seen.append)
    ran = [d for d in stream.data if str(d["key"]).startswith("lazymerge-trial")]
    assert len(ran) == 4 and len({d["worker"] for d in ran}) == 2          # both workers evaluated trials
    done = [t for t in report.trials if t.state == "COMPLETE"]
    assert len(done) == 4 and len(seen) == 4
    assert len({t.params[SPACE[0].split("=")[0]] for t in done}) == 4         # four different candidates
    dims = [parse_space(SPACE[0])]
    for t in done:
        local = lazymerge.evaluate(candidate(s["recipe"], dims, t.params), s["data"], memory="64KiB", seq_len=SEQ,
                                   max_tokens=MAX)
        assert t.nll == local.nll and t.perplexity == local.perplexity
    assert report.best_perplexity == min(t.perplexity for t in done)
    best = lazymerge.evaluate(tmp_path / "best.yaml", s["data"], memory="64KiB", seq_len=SEQ, max_tokens=MAX)
    assert best.perplexity == report.best_perplexity


def test_interrupted_cluster_search_continues(search_set, client, tmp_path):
    s = search_set
    db = tmp_path / "s.db"
    kw = dict(seed=3, study=db, memory="64KiB", seq_len=SEQ, max_tokens=MAX, best_file=None, cluster=client)

    def stop_after_two(t):
        if len([x for x in _load(db).get_trials() if x.state.name == "COMPLETE"]) >= 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        lazymerge.search(s["recipe"], s["data"], SPACE, trials=5, on_trial=stop_after_two, **kw)
    st = _load(db)
    before = {t.number: t.value for t in st.get_trials() if t.state.name == "COMPLETE"}
    assert len(before) == 2
    assert not [t for t in st.get_trials() if t.state.name == "RUNNING"]   # the in-flight trial: failed
    # a client SIGKILLed mid-trial leaves its trial RUNNING: the rerun fails it, as a local rerun does
    orphan = st.ask()
    orphan.suggest_float(SPACE[0].split("=")[0], 0, 1)
    report = lazymerge.search(s["recipe"], s["data"], SPACE, trials=5, **kw)
    after = {t.number: t.nll for t in report.trials if t.state == "COMPLETE"}
    assert len(after) == 5
    assert all(after[n] == v for n, v in before.items())                 # kept, same values
    assert next(t for t in report.trials if t.number == orphan.number).state == "FAIL"


def test_bad_cluster_address_is_one_line(search_set):
    with pytest.raises(OutputError, match="neither local:N nor a scheduler address") as err:
        lazymerge.search(search_set["recipe"], search_set["data"], SPACE, trials=1, best_file=None,
                         cluster="nowhere")
    assert "\n" not in str(err.value)


def test_missing_data_is_one_line(search_set, client, tmp_path):
    data = tmp_path / "gone.txt"
    with pytest.raises(LazyMergeError, match="gone.txt") as err:
        lazymerge.search(search_set["recipe"], data, SPACE, trials=1, best_file=None, cluster=client)
    assert "\n" not in str(err.value)


def test_cli_bad_cluster_is_one_line_error(search_set, tmp_path):
    from click.testing import CliRunner

    import yaml

    from lazymerge.cli import main

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(search_set["recipe"]))
    res = CliRunner().invoke(main, ["search", str(recipe), "--data", str(search_set["data"]), "--space", SPACE[0],
                                    "--study", str(tmp_path / "s.db"), "--cluster", "nowhere", "-q"])
    assert res.exit_code != 0
    assert "neither local:N nor a scheduler address" in res.output and len(res.output.strip().splitlines()) == 1
