"""lazymerge on a Dask cluster: partitions, bit-identity with a local run, worker and client deaths, preflight.

One LocalCluster of 2 worker processes serves the whole module (starting one costs seconds: every worker imports
torch). The checkpoints are small Llama-shaped models, but big enough (about 4 MiB each) that partitions span
many 64 KiB pages, so both the pages workers write themselves and the edge pages they hand back are exercised.
Every cluster output is compared byte for byte (sha256 of every file but the report) with a local run.
"""
from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
import torch
import yaml
from click.testing import CliRunner

distributed = pytest.importorskip("distributed")

import lazymerge  # noqa: E402
from lazymerge.cli import main  # noqa: E402
from lazymerge.cluster.partition import PAGE, partition_layout, page_split  # noqa: E402
from lazymerge.errors import CheckpointError  # noqa: E402
from lazymerge.cluster.worker import RangeWriter  # noqa: E402
from lazymerge.io.writer import CheckpointWriter, OutTensor, plan_layout  # noqa: E402
from lazymerge.synth import ModelShape, make_checkpoint  # noqa: E402
from holdkit import Hold  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------------------------------------------------------
# partitioning (pure)
# ---------------------------------------------------------------------------------------------------------------
def _layout(sizes: list[int], shard_size: int):
    return plan_layout([OutTensor(f"t{i}", (n,), "U8") for i, n in enumerate(sizes)], shard_size)


@pytest.mark.parametrize("workers,shard_size", [(1, 10**9), (2, 10**9), (4, 300_000), (2, 150_000), (8, 100_000)])
def test_partitions_cover_every_tensor_once_in_contiguous_runs(workers: int, shard_size: int) -> None:
    sizes = [70_000 + 13_001 * (i % 7) for i in range(23)]
    layout = _layout(sizes, shard_size)
    parts = partition_layout(layout, workers)
    names = [n for p in parts for n in p.tensors]
    assert sorted(names) == sorted(f"t{i}" for i in range(len(sizes)))
    assert len(names) == len(set(names))
    where = {t.name: (s.filename, len(s.header) + off, t.nbytes) for s in layout for t, off in s.tensors}
    for p in parts:
        files = {where[n][0] for n in p.tensors}
        assert files == {p.filename}
        offs = sorted(where[n][1:] for n in p.tensors)
        assert offs[0][0] == p.start and offs[-1][0] + offs[-1][1] == p.stop
        assert all(a + n == b for (a, n), (b, _) in zip(offs, offs[1:]))       # no gap: one byte range
    if len(layout) >= 2 * workers:
        assert len(parts) == len(layout)                        # enough shards: one partition each
    else:
        assert len(parts) >= min(len(sizes), 2 * workers)       # else two per worker, where tensors allow


def test_partitions_skip_finished_shards_and_are_deterministic() -> None:
    layout = _layout([100_000] * 9, 250_000)
    done = {layout[0].filename, layout[2].filename}
    parts = partition_layout(layout, 2, skip=done)
    assert {p.filename for p in parts} == {s.filename for s in layout} - done
    assert parts == partition_layout(layout, 2, skip=done)


def test_page_split_gives_no_page_to_two_partitions() -> None:
    """Any two partitions of one file: the pages one writes directly are touched by no other partition, and
    direct + edges tile the partition's range exactly."""
    layout = _layout([5_000, 70_000, 3, 131_072, 65_536, 200_001, 9, 64_000], 10**9)
    parts = partition_layout(layout, 4)
    assert len(parts) > 2 and len({p.filename for p in parts}) == 1
    for p in parts:
        (a, b), edges = page_split(p.start, p.stop)
        assert b == a or (a % PAGE == 0 and b % PAGE == 0)
        covered = sorted([(a, b)] * (b > a) + edges)
        assert covered[0][0] == p.start and covered[-1][1] == p.stop
        assert all(x[1] == y[0] for x, y in zip(covered, covered[1:]))
        assert len(edges) <= 2 and sum(hi - lo for lo, hi in edges) < 2 * PAGE   # at most two pages back
        for q in parts:
            if q is not p and b > a:
                # q's bytes fall in no page that p writes
                assert q.stop <= a or q.start >= b


class RecordingRangeWriter(RangeWriter):
    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.direct_writes: list[tuple[int, int]] = []

    def _pwrite(self, data, offset):
        self.direct_writes.append((offset, offset + len(data)))
        super()._pwrite(data, offset)


def test_range_writers_and_client_edges_rebuild_the_local_file(tmp_path: Path) -> None:
    """Without Dask: partitions of one shard written by RangeWriters in scattered row blocks, their edge bytes
    stored by the client, give the file CheckpointWriter writes alone; workers pwrite whole pages only."""
    g = torch.Generator().manual_seed(5)
    shapes = [(3, 7), (1000, 40), (5,), (300, 129), (2, 2), (2048, 32), (77, 1000), (1,)]
    tensors = {f"t{i}": torch.randn(s, generator=g) for i, s in enumerate(shapes)}
    layout = plan_layout([OutTensor(n, tuple(t.shape), "F32") for n, t in tensors.items()], 10**9)

    def rows(name):
        t = tensors[name]
        if t.dim() < 2:                      # a 0-d/1-d tensor is one row, written whole (lazymerge.shapes)
            return [(0, t)]
        n = t.shape[0]
        cuts = sorted({0, n, *torch.randint(0, n, (3,), generator=g).tolist()})
        return [(a, t[a:b]) for a, b in zip(cuts, cuts[1:])][::-1]      # out of order, uneven blocks

    with CheckpointWriter(tmp_path / "local", layout) as w:
        for name in tensors:
            for a, block in rows(name):
                w.write_rows(name, a, block)
        w.finalize(config=None, aux_files=[], extra_files={})
    client = CheckpointWriter(tmp_path / "cluster", layout)
    client.open()
    parts = partition_layout(layout, 3)
    assert len(parts) >= 4
    for part in parts:
        rw = RecordingRangeWriter(client.tmp_dir / part.filename, layout[part.shard], part)
        with rw:
            for name in part.tensors:
                for a, block in rows(name):
                    rw.write_rows(name, a, block)
        assert rw.written == part.nbytes
        for lo, hi in rw.direct_writes:
            assert PAGE * (-(-part.start // PAGE)) <= lo and hi <= part.stop // PAGE * PAGE
        client.write_external(part.filename, part.nbytes, list(rw.edges()))
    client.finalize(config=None, aux_files=[], extra_files={})
    assert sha256s(tmp_path / "cluster") == sha256s(tmp_path / "local")


# ---------------------------------------------------------------------------------------------------------------
# fixtures
# ---------------------------------------------------------------------------------------------------------------
SHAPE = ModelShape("cluster-test", hidden=128, intermediate=352, layers=4, heads=4, kv_heads=4, vocab=1000)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, str]:
    """base, a, b, c: float32 Llama-shaped checkpoints of about 4 MiB (a, b, c = base + noise), from
    lazymerge.synth (real Hugging Face layout: config, tokenizer files)."""
    root = tmp_path_factory.mktemp("cluster_models")
    base = make_checkpoint(root / "base", SHAPE, seed=11, dtype=torch.float32)
    out = {"base": str(base)}
    for i, (name, noise) in enumerate((("a", 0.01), ("b", 0.01), ("c", 0.02)), 1):
        out[name] = str(make_checkpoint(root / name, SHAPE, seed=11 + i, dtype=torch.float32, base=base,
                                        noise=noise))
    return out


@pytest.fixture(scope="module")
def client():
    """A LocalCluster of 2 worker processes (one thread each), shut down at the end of the module."""
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0",
                                  silence_logs=50) as cluster, distributed.Client(cluster) as c:
        c.wait_for_workers(2, timeout=600)
        yield c


def sha256s(out: Path) -> dict[str, str]:
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(Path(out).iterdir())
            if f.name != "lazymerge_report.json"}


def tmp_of(out: Path) -> Path:
    return out.parent / f".{out.name}.lazymerge-tmp"


def recipes(m: dict[str, str]) -> dict[str, object]:
    ties = {"merge_method": "ties", "base_model": m["base"],
            "models": [{"model": m["a"], "parameters": {"weight": 0.6, "density": 0.5}},
                       {"model": m["b"], "parameters": {"weight": 0.4, "density": 0.5}}]}
    return {
        "ties": ties,
        "dare_ties": {**ties, "merge_method": "dare_ties", "dtype": "bfloat16"},
        "slerp": {"merge_method": "slerp", "base_model": m["base"], "parameters": {"t": [0.1, 0.7]},
                  "models": [{"model": m["base"]}, {"model": m["c"]}]},
        "frankenmerge": {"merge_method": "passthrough", "slices": [
            {"sources": [{"model": m["a"], "layer_range": [0, 3]}]},
            {"sources": [{"model": m["b"], "layer_range": [1, 4]}]}]},
        "multi_stage": yaml.safe_dump_all([
            {"name": "sft", "merge_method": "task_arithmetic", "base_model": m["base"],
             "models": [{"model": m["a"], "parameters": {"weight": 1.0}}]},
            {"merge_method": "dare_ties", "base_model": m["base"],
             "models": [{"model": "sft", "parameters": {"weight": 0.7, "density": 0.6}},
                        {"model": m["b"], "parameters": {"weight": 0.5, "density": 0.5}}]}], sort_keys=False),
        # a MoE: each worker compiles the plan again and fills its router source itself (lazymerge.moe.routers)
        "moe": {"base_model": m["base"], "gate_mode": "random", "experts_per_token": 1,
                "experts": [{"source_model": m["a"]}, {"source_model": m["b"], "noise_scale": 0.01}]},
    }


# ---------------------------------------------------------------------------------------------------------------
# bit-identical to a local run
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method,shard_size", [
    ("ties", "5GB"),              # one shard: 4 partitions share the file, meeting at edge pages
    ("dare_ties", "1MB"), ("slerp", "1MB"), ("frankenmerge", "2MB"), ("multi_stage", "1MB"),
    ("moe", "1MB")])
def test_cluster_output_is_bit_identical_to_local(client, models, tmp_path: Path, method: str,
                                                  shard_size: str) -> None:
    recipe = recipes(models)[method]
    local = tmp_path / "local"
    lazymerge.merge(recipe, local, shard_size=shard_size, seed=3)
    out = tmp_path / "cluster"
    report = lazymerge.merge(recipe, out, shard_size=shard_size, seed=3, memory="1MiB", cluster=client)
    assert sha256s(out) == sha256s(local)
    assert report.tensors == json.loads((local / "lazymerge_report.json").read_text())["tensors"]
    assert report.bytes_written == sum(f.stat().st_size - 8 - int.from_bytes(f.open("rb").read(8), "little")
                                       for f in local.glob("*.safetensors"))
    assert not tmp_of(out).exists()


# ---------------------------------------------------------------------------------------------------------------
# the client killed, then --resume on the same cluster
# ---------------------------------------------------------------------------------------------------------------
def test_client_killed_then_resume_is_bit_identical(client, models, tmp_path: Path) -> None:
    recipe_file = tmp_path / "recipe.yaml"
    recipe_file.write_text(yaml.safe_dump(recipes(models)["ties"]))
    opts = ["--shard-size", "400KB", "--memory", "128KiB", "--workers", "1", "-q"]
    local = tmp_path / "local"
    lazymerge.merge(recipe_file, local, shard_size="400KB")
    n_shards = len(list(local.glob("*.safetensors")))
    out = tmp_path / "cluster"
    hold = Hold(tmp_path, "shard", 2)                           # the client stops once it journaled 2 shards
    env = hold.env({**os.environ, "PYTHONPATH": str(REPO)})
    proc = subprocess.Popen([sys.executable, "-m", "lazymerge.cli", "run", str(recipe_file), str(out), *opts,
                             "--cluster", client.scheduler.address], env=env, stderr=subprocess.PIPE)
    try:
        hold.wait(proc)
        done = json.loads((tmp_of(out) / "journal.json").read_text())["shards"]
        proc.send_signal(signal.SIGKILL)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()
    assert len(done) == 2 < n_shards and not out.exists()      # killed with some shards journaled, not all
    # the budget does not change the bytes: the resumed run may go faster than the killed one
    result = CliRunner().invoke(main, ["run", str(recipe_file), str(out), "--shard-size", "400KB", "-q",
                                       "--resume", "--cluster", client.scheduler.address])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "lazymerge_report.json").read_text())
    assert report["resumed_tensors"] > 0
    # only the shards not journaled were recomputed
    assert report["bytes_written"] == sum(data_bytes(f) for f in local.glob("*.safetensors") if f.name not in done)
    assert sha256s(out) == sha256s(local)


def data_bytes(shard: Path) -> int:
    with open(shard, "rb") as f:
        return shard.stat().st_size - 8 - int.from_bytes(f.read(8), "little")


# ---------------------------------------------------------------------------------------------------------------
# preflight: a worker that cannot see an input
# ---------------------------------------------------------------------------------------------------------------
class HidePath(distributed.WorkerPlugin):
    """Test-only: on one worker, make a directory invisible (as on a node without that mount) by failing every
    open() beneath it with ENOENT."""

    name = "lazymerge-test-hide-path"

    def __init__(self, address: str, hidden: str):
        self.address, self.hidden = address, hidden

    def setup(self, worker) -> None:
        import builtins
        import errno

        if worker.address != self.address:
            return
        self.saved = (builtins.open, os.open)
        real_open, real_os_open = self.saved
        hidden = self.hidden

        def check(path) -> None:
            if os.path.abspath(os.fspath(path)).startswith(hidden):
                raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), os.fspath(path))

        def fake_open(file, *a, **k):
            if isinstance(file, (str, bytes, os.PathLike)):
                check(file)
            return real_open(file, *a, **k)

        def fake_os_open(path, *a, **k):
            check(path)
            return real_os_open(path, *a, **k)

        builtins.open, os.open = fake_open, fake_os_open

    def teardown(self, worker) -> None:
        import builtins

        if getattr(self, "saved", None):
            builtins.open, os.open = self.saved


def test_worker_that_cannot_see_an_input_fails_before_any_work(client, models, tmp_path: Path) -> None:
    recipe_file = tmp_path / "recipe.yaml"
    recipe_file.write_text(yaml.safe_dump(recipes(models)["ties"]))
    victim = sorted(client.scheduler_info()["workers"])[1]
    client.register_plugin(HidePath(victim, models["b"]))
    out = tmp_path / "cluster"
    try:
        result = CliRunner().invoke(main, ["run", str(recipe_file), str(out), "-q"],
                                    env={"DASK_SCHEDULER_ADDRESS": client.scheduler.address})
    finally:
        client.unregister_worker_plugin(HidePath.name)
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2
    err = [ln for ln in lines if ln.startswith("error:")]
    assert len(err) == 1, result.stderr
    assert victim in err[0] and f"{models['b']}/model.safetensors" in err[0], err[0]
    assert not out.exists() and not tmp_of(out).exists()
    submitted = client.run_on_scheduler(
        lambda dask_scheduler: [str(t[0]) for t in dask_scheduler.transition_log])
    assert not [k for k in submitted if k.startswith("lazymerge-") and str(out) in k] and \
        not any(str(t).startswith("lazymerge-") for t in client.run_on_scheduler(
            lambda dask_scheduler: list(dask_scheduler.tasks)))
    # through the Python API: the same one-line error, as a CheckpointError
    client.register_plugin(HidePath(victim, models["b"]))
    try:
        with pytest.raises(CheckpointError, match=f"^worker {victim}: .*cannot read"):
            lazymerge.merge(recipe_file, out, cluster=client)
    finally:
        client.unregister_worker_plugin(HidePath.name)


def test_cli_prints_dashboard_and_rejects_bad_cluster(client, models, tmp_path: Path) -> None:
    recipe_file = tmp_path / "recipe.yaml"
    recipe_file.write_text(yaml.safe_dump(recipes(models)["slerp"]))
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["run", str(recipe_file), str(out), "-q", "--cluster",
                                       client.scheduler.address])
    assert result.exit_code == 0, result.output
    assert "dashboard http" in result.stderr
    bad = CliRunner().invoke(main, ["run", str(recipe_file), str(tmp_path / "x"), "--cluster", "lokal:2"])
    assert bad.exit_code == 2 and bad.stderr.count("\n") == 1 and "lokal:2" in bad.stderr
    unset = CliRunner().invoke(main, ["run", str(recipe_file), str(tmp_path / "x"), "--cluster", "env"],
                               env={"DASK_SCHEDULER_ADDRESS": None})
    assert unset.exit_code == 2 and unset.stderr.count("\n") == 1 and "DASK_SCHEDULER_ADDRESS" in unset.stderr
    assert not (tmp_path / "x").exists()


# ---------------------------------------------------------------------------------------------------------------
# a worker killed mid-partition (last: its worker restarts in the background)
# ---------------------------------------------------------------------------------------------------------------
class KillOnce(distributed.WorkerPlugin):
    """Test-only: SIGKILLs its worker process inside a lazymerge partition, the first time (across workers:
    `marker`) a write task has finished there and the temporary output has grown (a test hold, armed in the worker
    process: lazymerge/testhold.py), and records what it saw."""

    name = "lazymerge-test-kill-once"

    def __init__(self, marker: str, tmp_dir: str):
        self.marker, self.tmp_dir = marker, tmp_dir

    def setup(self, worker) -> None:
        from lazymerge import testhold

        self.worker, self.before = worker, None
        testhold.arm("write", 1, action=self._at_write)

    def transition(self, key, start, finish, **kwargs) -> None:
        if finish == "executing" and str(key).startswith("lazymerge-") and self.before is None:
            self.before = self._allocated()                # the client's preallocated shards, before our writes

    def teardown(self, worker) -> None:
        from lazymerge import testhold

        testhold.arm(None)

    def _allocated(self) -> int:
        return sum(os.stat(p).st_blocks for p in Path(self.tmp_dir).glob("*.safetensors"))

    def _at_write(self, info: dict) -> None:
        from lazymerge import testhold

        if os.path.exists(self.marker):
            return
        if self._allocated() == self.before:            # this block went to an edge page the client writes
            testhold.arm("write", 1, action=self._at_write)   # wait for the next write task
            return
        try:
            fd = os.open(self.marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return
        executing = [str(k) for k, ts in list(self.worker.state.tasks.items())
                     if ts.state == "executing" and str(k).startswith("lazymerge-")]
        os.write(fd, json.dumps({"executing": executing, "pid": os.getpid(), "grew": True}).encode())
        os.fsync(fd)
        os.close(fd)
        os.kill(os.getpid(), signal.SIGKILL)


def test_worker_killed_mid_partition_merge_completes_bit_identical(client, models, tmp_path: Path) -> None:
    recipe = recipes(models)["ties"]
    local = tmp_path / "local"
    lazymerge.merge(recipe, local, shard_size="1MB")
    out = tmp_path / "cluster"
    marker = tmp_path / "killed.json"
    pids = set(client.run(os.getpid).values())
    client.register_plugin(KillOnce(str(marker), str(tmp_of(out))))
    try:
        lazymerge.merge(recipe, out, shard_size="1MB", memory="256KiB", workers=1, cluster=client)
    finally:
        client.unregister_worker_plugin(KillOnce.name)
    seen = json.loads(marker.read_text())
    assert len(seen["executing"]) == 1 and seen["grew"], seen    # killed inside a partition, after writes
    assert seen["pid"] in pids and not alive(seen["pid"])          # a worker process of ours really died
    assert sha256s(out) == sha256s(local)


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


# ---------------------------------------------------------------------------------------------------------------
# hub models streamed by the workers (--stream-inputs)
# ---------------------------------------------------------------------------------------------------------------
from hubfix import cached_shards, hub_env, published, rewrite, shard_hashes  # noqa: E402,F401


def _set_env(values: dict[str, str | None]) -> None:
    for k, v in values.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def test_workers_stream_their_partitions_from_the_hub(client, published, hub_env: Path, tmp_path: Path) -> None:
    from lazymerge.io.remote import TRANSFERRED

    recipe = {"merge_method": "ties", "base_model": "org/base", "dtype": "bfloat16",
              "models": [{"model": "org/ft1", "parameters": {"weight": 0.6, "density": 0.5}},
                         {"model": "org/ft2", "parameters": {"weight": 0.4, "density": 0.7}}]}
    local = tmp_path / "local"
    lazymerge.merge(rewrite(recipe, published.local), local, shard_size="30KB")
    lazymerge.plan(recipe).close()        # headers and small files cached here: from now on, tensor data only
    env = {k: os.environ.get(k) for k in ("HF_ENDPOINT", "HF_HOME", "HF_HUB_DISABLE_PROGRESS_BARS")}
    client.run(_set_env, env)             # the workers were started before this test chose its hub and cache
    try:
        published.hub.reset()
        here = TRANSFERRED.value
        report = lazymerge.merge(recipe, tmp_path / "cluster", shard_size="30KB", cluster=client,
                                 stream_inputs=True)
    finally:
        client.run(_set_env, {k: None for k in env})
    assert shard_hashes(tmp_path / "cluster") == shard_hashes(local)
    served = published.hub.bytes_served(suffix=".safetensors")
    assert TRANSFERRED.value == here and served > 0          # the workers read the tensor data, not the client
    assert served <= 1.1 * report.bytes_read and report.bytes_transferred == served
    assert not cached_shards(hub_env)
