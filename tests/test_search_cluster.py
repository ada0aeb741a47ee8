"""`lazymerge search --cluster`: trials evaluated on Dask workers give the values a local evaluation gives, and an
interrupted cluster search continues without losing a completed trial.

One LocalCluster of 2 worker processes serves the module (starting one costs seconds: every worker imports torch).
"""
from __future__ import annotations

import pytest
import torch

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


# ---------------------------------------------------------------------------------------------------------------
# issue 26: nothing a worker keeps between searches changes a trial; failures are one line and FAIL in the study
# ---------------------------------------------------------------------------------------------------------------
def _bpe_family(root):
    """Another model family for the same data: a byte-level BPE tokenizer (other ids for the same text)."""
    from evalkit import make_finetune, make_model

    base = make_model(root / "bpe-base", "llama", seed=6)
    return {"merge_method": "linear", "dtype": "float32",
            "models": [{"model": str(make_finetune(base, root / "bpe-1", seed=61, std=0.2)), "parameters": {"weight": 0.5}},
                       {"model": str(make_finetune(base, root / "bpe-2", seed=62, std=0.2)), "parameters": {"weight": 0.25}}]}


def test_second_search_with_another_tokenizer_scores_its_own_tokens(search_set, client, tmp_path):
    s = search_set
    kw = dict(trials=2, seed=0, memory="64KiB", seq_len=SEQ, max_tokens=MAX, best_file=None, cluster=client)
    lazymerge.search(s["recipe"], s["data"], SPACE, **kw)               # every worker has seen this family
    other = _bpe_family(tmp_path)
    report = lazymerge.search(other, s["data"], SPACE, **kw)
    dims = [parse_space(SPACE[0])]
    for t in report.trials:
        local = lazymerge.evaluate(candidate(other, dims, t.params), s["data"], memory="64KiB", seq_len=SEQ,
                                   max_tokens=MAX)
        assert t.nll == local.nll


class Boom:
    """For `_evaluate` on the workers: raise what a bug in a library would."""

    def __call__(self, original):
        def wrapped(*args, **kwargs):
            raise RuntimeError("boom\nsecond line")

        return wrapped


def test_trial_error_is_one_line_and_fails_the_trial(search_set, client, tmp_path):
    from livecluster import Hook

    db = tmp_path / "s.db"
    with Hook(client, Boom(), ("lazymerge.cluster.search", "_evaluate"), ("lazymerge.evaluate.runner", "_evaluate")):
        with pytest.raises(LazyMergeError, match=r"^search: trial \d+ .*RuntimeError: boom") as err:
            lazymerge.search(search_set["recipe"], search_set["data"], SPACE, trials=2, study=db, memory="64KiB",
                             seq_len=SEQ, max_tokens=MAX, best_file=None, cluster=client)
    assert "\n" not in str(err.value)
    states = [t.state.name for t in _load(db).get_trials()]
    assert states and "RUNNING" not in states and "FAIL" in states, states


def test_trials_that_all_fail_stop_with_one_line(search_set, client, tmp_path):
    """A model with NaN weights (not --strict: a warning) makes every candidate's loss NaN: each trial fails in
    the study, and the search stops with one line instead of reporting a best of nothing."""
    from safetensors.torch import load_file, save_file

    from evalkit import make_finetune

    nan = make_finetune(search_set["ft2"], tmp_path / "nan", seed=1, std=0.0)
    f = next(nan.glob("*.safetensors"))
    tensors = load_file(str(f))
    name = next(n for n in tensors if n.endswith("norm.weight"))
    tensors[name] = torch.full_like(tensors[name], float("nan"))
    save_file(tensors, str(f), metadata={"format": "pt"})
    recipe = {**search_set["recipe"], "models": [search_set["recipe"]["models"][0],
                                                 {"model": str(nan), "parameters": {"weight": 0.25}}]}
    db = tmp_path / "s.db"
    with pytest.raises(LazyMergeError, match="trials in a row failed") as err:
        lazymerge.search(recipe, search_set["data"], SPACE, trials=1, study=db, memory="64KiB", seq_len=SEQ,
                         max_tokens=MAX, best_file=None, cluster=client)
    assert "\n" not in str(err.value)
    states = [t.state.name for t in _load(db).get_trials()]
    assert set(states) == {"FAIL"}, states


def test_datasets_directory_as_data(search_set, client, tmp_path):
    datasets = pytest.importorskip("datasets")
    d = tmp_path / "ds"
    datasets.Dataset.from_dict({"text": [search_set["data"].read_text()]}).save_to_disk(str(d))
    report = lazymerge.search(search_set["recipe"], d, SPACE, trials=2, seed=0, memory="64KiB", seq_len=SEQ,
                              max_tokens=MAX, best_file=None, cluster=client)
    dims = [parse_space(SPACE[0])]
    for t in report.trials:
        local = lazymerge.evaluate(candidate(search_set["recipe"], dims, t.params), search_set["data"],
                                   memory="64KiB", seq_len=SEQ, max_tokens=MAX)
        assert t.nll == local.nll


def test_bad_cluster_leaves_no_study_file(search_set, tmp_path):
    db = tmp_path / "s.db"
    with pytest.raises(OutputError, match="neither local:N nor a scheduler address"):
        lazymerge.search(search_set["recipe"], search_set["data"], SPACE, trials=1, study=db, best_file=None,
                         cluster="nowhere")
    assert not db.exists()
