"""lazymerge on a long-lived cluster: a real `dask scheduler` + `dask worker` pair (one worker process, two threads)
started once for the module, as a user runs them. What a worker process keeps between runs must never change a
run's bytes; two runs in one worker process at once must not see each other's working directory; a run that has
ended must not write into a later one; a worker that joined after the preflight is checked before it computes.

Every run is held at a known point (`livecluster.Hook`, `distributed.Event`), never raced.
"""
from __future__ import annotations

import hashlib
import shutil
import threading
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner

distributed = pytest.importorskip("distributed")

import lazymerge  # noqa: E402
from lazymerge.cli import main  # noqa: E402
from lazymerge.errors import MergeAborted, OutputError  # noqa: E402
from lazymerge.synth import ModelShape, make_checkpoint  # noqa: E402
from livecluster import REPO, Hook, LiveCluster, event  # noqa: E402

SHAPE = ModelShape("live-test", hidden=64, intermediate=176, layers=2, heads=4, kv_heads=4, vocab=300)
BOUND_S = 60          # a bound on a wait that the fix makes immediate, so that today's code fails, not hangs


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    root = tmp_path_factory.mktemp("live")
    (root / "worker-cwd").mkdir()
    cluster = LiveCluster(root)
    try:
        cluster.start_worker(nthreads=2, cwd=root / "worker-cwd")
        with distributed.Client(cluster.address, timeout=60) as client:
            client.wait_for_workers(1, timeout=120)
            cluster.client = client
            yield cluster
    finally:
        cluster.close()


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("live_models")
    base = make_checkpoint(root / "base", SHAPE, seed=21, dtype=torch.float32)
    out = {"root": root, "base": base}
    for i, name in enumerate(("a", "b", "c"), 1):
        out[name] = make_checkpoint(root / name, SHAPE, seed=21 + i, dtype=torch.float32, base=base, noise=0.02)
    return out


def ties(m: dict, wa: float, wb: float, density: float = 0.5, a: str | None = None) -> dict:
    return {"merge_method": "ties", "base_model": str(m["base"]),
            "models": [{"model": a or str(m["a"]), "parameters": {"weight": wa, "density": density}},
                       {"model": str(m["b"]), "parameters": {"weight": wb, "density": density}}]}


def sha256s(out: Path) -> dict[str, str]:
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(Path(out).iterdir())
            if f.name != "lazymerge_report.json"}


def cli_run(recipe: Path, out: Path, address: str, *extra: str):
    return CliRunner().invoke(main, ["run", str(recipe), str(out), "-q", "--cluster", address, *extra])


# ---------------------------------------------------------------------------------------------------------------
# the reproduced bug: a re-run on the live cluster wrote the old merge
# ---------------------------------------------------------------------------------------------------------------
def test_edited_recipe_merged_again_into_the_same_out_equals_its_local_merge(live, models, tmp_path: Path) -> None:
    a = tmp_path / "a"
    shutil.copytree(models["a"], a)
    recipe = tmp_path / "recipe.yaml"
    out = tmp_path / "out"
    versions = [ties(models, 0.6, 0.4, a=str(a)), ties(models, 0.9, 0.1, a=str(a)),
                ties(models, 0.9, 0.1, density=0.8, a=str(a))]
    for i, r in enumerate(versions):
        recipe.write_text(yaml.safe_dump(r))
        result = cli_run(recipe, out, live.address, *(["--overwrite"] if i else []))
        assert result.exit_code == 0, result.output
        local = tmp_path / f"local{i}"
        lazymerge.merge(recipe, local)
        assert sha256s(out) == sha256s(local), f"recipe version {i}"
    assert sha256s(tmp_path / "local0") != sha256s(tmp_path / "local1")      # the edits change the merge
    # the recipe unchanged, one input's weights rewritten in place (same names, shapes and size)
    make_checkpoint(a, SHAPE, seed=99, dtype=torch.float32, base=models["base"], noise=0.05, overwrite=True)
    result = cli_run(recipe, out, live.address, "--overwrite")
    assert result.exit_code == 0, result.output
    lazymerge.merge(recipe, tmp_path / "local-new-a")
    assert sha256s(tmp_path / "local-new-a") != sha256s(tmp_path / "local2")
    assert sha256s(out) == sha256s(tmp_path / "local-new-a")


def test_edited_tokenizer_source_directory_merged_again_equals_its_local_merge(live, tmp_path: Path) -> None:
    """The output vocabulary from a directory that is none of the models (`tokenizer_source: DIR`): no input
    file changes when its tokenizer.json is edited, only the rows the alignment takes, so a worker that kept the
    plan compiled from the old tokenizer wrote the old alignment."""
    import json

    from test_vocab import make_abc

    abc = make_abc(tmp_path / "m")
    tok = tmp_path / "tok"
    shutil.copytree(abc["B"], tok)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"merge_method": "linear", "tokenizer_source": str(tok), "dtype": "float32",
                                      "models": [{"model": str(abc["A"]), "parameters": {"weight": 0.5}},
                                                 {"model": str(abc["C"]), "parameters": {"weight": 0.5}}]}))
    out = tmp_path / "out"
    for i in range(2):
        if i:                           # two tokens' ids swapped: the same file size, the same shapes
            doc = json.loads((tok / "tokenizer.json").read_text())
            vocab = doc["model"]["vocab"]
            vocab["a"], vocab["b"] = vocab["b"], vocab["a"]
            (tok / "tokenizer.json").write_text(json.dumps(doc))
        result = cli_run(recipe, out, live.address, *(["--overwrite"] if i else []))
        assert result.exit_code == 0, result.output
        lazymerge.merge(recipe, tmp_path / f"local{i}")
        assert sha256s(out) == sha256s(tmp_path / f"local{i}"), f"tokenizer version {i}"
    assert sha256s(tmp_path / "local0") != sha256s(tmp_path / "local1")      # the edit changes the merge


def test_relative_paths_mean_the_clients_directory(live, models, tmp_path: Path, monkeypatch) -> None:
    """The worker runs in another directory holding other models at the same relative names: the merge reads the
    client's, as a local run does."""
    decoys = live.root / "worker-cwd"
    for name, other in (("base", "c"), ("a", "b"), ("b", "a")):
        shutil.copytree(models[other], decoys / name)
    try:
        monkeypatch.chdir(models["root"])
        recipe = tmp_path / "recipe.yaml"
        recipe.write_text(yaml.safe_dump({"merge_method": "ties", "base_model": "base", "models": [
            {"model": "a", "parameters": {"weight": 0.6, "density": 0.5}},
            {"model": "b", "parameters": {"weight": 0.4, "density": 0.5}}]}))
        lazymerge.merge(recipe, tmp_path / "local")
        result = cli_run(recipe, tmp_path / "out", live.address)
        assert result.exit_code == 0, result.output
        assert sha256s(tmp_path / "out") == sha256s(tmp_path / "local")
    finally:
        for name in ("base", "a", "b"):
            shutil.rmtree(decoys / name, ignore_errors=True)


def test_run_compiles_the_recipe_before_it_connects(live, models, tmp_path: Path) -> None:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({**ties(models, 0.6, 0.4), "merge_method": "tiez"}))
    result = CliRunner().invoke(main, ["run", str(recipe), str(tmp_path / "out"), "--cluster", live.address])
    assert result.exit_code == 2
    assert result.stderr.count("\n") == 1 and "tiez" in result.stderr, result.stderr   # no "cluster ..." line first


# ---------------------------------------------------------------------------------------------------------------
# two searches' trials at once in one worker process: each in its own client's directory
# ---------------------------------------------------------------------------------------------------------------
class RaceHold:
    """For `_evaluate` on the worker: the first call (trial A) goes on only once a second call (trial B) has
    started, and B only once A is done; A tells the test it has started."""

    def __call__(self, original):
        a_started, b_started, a_done = threading.Event(), threading.Event(), threading.Event()
        calls = []
        lock = threading.Lock()

        def wrapped(*args, **kwargs):
            with lock:
                calls.append(None)
                n = len(calls)
            if n == 1:
                a_started.set()
                distributed.Event("race-a-started").set()
                b_started.wait()
                try:
                    return original(*args, **kwargs)
                finally:
                    a_done.set()
            if n == 2:
                b_started.set()
                a_done.wait()
            return original(*args, **kwargs)

        return wrapped


def test_concurrent_trials_each_use_their_clients_directory(live, tmp_path: Path, monkeypatch,
                                                              request) -> None:
    pytest.importorskip("transformers")
    pytest.importorskip("optuna")
    from evalkit import corpus, make_finetune, make_model, write_texts

    from lazymerge.evaluate.search import candidate, parse_space

    base = make_model(tmp_path / "base", "llama", seed=5, word_level=True)
    s = {"ft1": make_finetune(base, tmp_path / "ft1", seed=51, std=0.2),
         "ft2": make_finetune(base, tmp_path / "ft2", seed=52, std=0.2),
         "data": write_texts(tmp_path / "data.txt", corpus(8))}
    dirs = {"A": tmp_path / "A", "B": tmp_path / "B"}
    # B, and the worker's own directory: the same names, other models
    dirs["worker"] = live.root / "worker-cwd"
    for tag, (m1, m2) in (("A", ("ft1", "ft2")), ("B", ("ft2", "ft1")), ("worker", ("ft2", "ft2"))):
        shutil.copytree(s[m1], dirs[tag] / "m1")
        shutil.copytree(s[m2], dirs[tag] / "m2")
        shutil.copyfile(s["data"], dirs[tag] / "data.txt")
    request.addfinalizer(lambda: [shutil.rmtree(dirs["worker"] / n, ignore_errors=True) for n in ("m1", "m2")])
    recipe = {"merge_method": "linear", "dtype": "float32",
              "models": [{"model": "m1", "parameters": {"weight": 0.5}}, {"model": "m2", "parameters": {"weight": 0.25}}]}
    space = ["models[0].parameters.weight=0..1"]
    kw = dict(trials=1, seed=0, memory="64KiB", seq_len=32, max_tokens=480, best_file=None, cluster=live.client)
    reports: dict = {}

    def search(tag: str) -> None:
        try:
            reports[tag] = lazymerge.search(recipe, dirs[tag] / "data.txt", space, **kw)
        except BaseException as exc:       # noqa: BLE001  (reported below)
            reports[tag] = exc

    started = event("race-a-started", live.client)
    with Hook(live.client, RaceHold(), ("lazymerge.cluster.search", "_evaluate"),
              ("lazymerge.evaluate.runner", "_evaluate")):
        monkeypatch.chdir(dirs["A"])
        ta = threading.Thread(target=search, args=("A",))
        ta.start()
        assert started.wait(BOUND_S), "trial A never started"
        monkeypatch.chdir(dirs["B"])               # search B runs from another directory
        tb = threading.Thread(target=search, args=("B",))
        tb.start()
        ta.join(BOUND_S * 2)
        tb.join(BOUND_S * 2)
    started.clear()
    assert not isinstance(reports["A"], BaseException), reports["A"]
    assert not isinstance(reports["B"], BaseException), reports["B"]
    for tag in "AB":
        monkeypatch.chdir(dirs[tag])
        t = reports[tag].trials[0]
        want = lazymerge.evaluate(candidate(recipe, [parse_space(space[0])], t.params), "data.txt",
                                  memory="64KiB", seq_len=32, max_tokens=480)
        assert t.nll == want.nll, tag


# ---------------------------------------------------------------------------------------------------------------
# a cancel while partitions run
# ---------------------------------------------------------------------------------------------------------------
class HoldAll:
    """For `worker_name` (the first thing a partition does): every call says so and waits for the release."""

    def __init__(self, prefix: str):
        self.prefix = prefix

    def __call__(self, original):
        prefix = self.prefix

        def wrapped(*args, **kwargs):
            distributed.Event(prefix + "held").set()
            distributed.Event(prefix + "release").wait()
            return original(*args, **kwargs)

        return wrapped


def test_cancel_is_seen_while_partitions_run(live, models, tmp_path: Path) -> None:
    out = tmp_path / "out"
    cancel = threading.Event()
    outcome: list = []

    def merge() -> None:
        try:
            lazymerge.merge(ties(models, 0.6, 0.4), out, cluster=live.client, cancel=cancel)
            outcome.append(None)
        except BaseException as exc:      # noqa: BLE001
            outcome.append(exc)

    held, release = event("cancel-held", live.client), event("cancel-release", live.client)
    with Hook(live.client, HoldAll("cancel-"), ("lazymerge.cluster.worker", "worker_name")):
        t = threading.Thread(target=merge)
        t.start()
        try:
            assert held.wait(BOUND_S), "no partition started"
            cancel.set()
            t.join(BOUND_S)                # the partitions are still held: only the cancel can end the run
            assert not t.is_alive(), "the cancel was not seen while the partitions ran"
        finally:
            release.set()
            t.join(BOUND_S)
    held.clear()
    release.clear()
    assert isinstance(outcome[0], MergeAborted), outcome
    assert not out.exists() and not (tmp_path / ".out.lazymerge-tmp").exists()


# ---------------------------------------------------------------------------------------------------------------
# a worker that joins after the preflight (last: it replaces the module's worker)
# ---------------------------------------------------------------------------------------------------------------
def test_worker_joining_after_preflight_is_checked(live, models, tmp_path: Path, monkeypatch) -> None:
    """The preflight saw only the first worker; the partitions run on one that joined later with another
    lazymerge: it must refuse, naming itself and the versions, not merge unchecked."""
    import lazymerge.cluster.driver as driver

    other = tmp_path / "other"
    shutil.copytree(REPO / "lazymerge", other / "lazymerge", ignore=shutil.ignore_patterns("__pycache__"))
    (other / "lazymerge" / "_version.py").write_text('"""Test copy."""\n__version__ = "0.0.0+other"\n')
    real = driver.check_workers
    first = sorted(live.client.scheduler_info()["workers"])

    def then_replace(*args, **kwargs):
        answer = real(*args, **kwargs)
        live.start_worker(nthreads=2, pythonpath=str(other), name="late")
        live.client.wait_for_workers(2, timeout=120)
        live.client.retire_workers(first)
        return answer

    monkeypatch.setattr(driver, "check_workers", then_replace)
    with pytest.raises(OutputError, match=r"^worker tcp://\S+: .*0\.0\.0\+other") as err:
        lazymerge.merge(ties(models, 0.6, 0.4), tmp_path / "out", cluster=live.client)
    late = [a for a, w in live.client.scheduler_info()["workers"].items() if w.get("name") == "late"]
    assert late and late[0] in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "out").exists()
