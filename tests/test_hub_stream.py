"""`--stream-inputs`: hub models read straight from the (loopback) hub with range requests, never stored.

- the output is the local run's, byte for byte; no file holding tensor data lands in the cache; the hub serves
  at most 1.1x the safetensors bytes the run reads (each byte about once, rereads of a row block included);
- a transient error (503) is retried, a response broken off midway is resumed;
- a run killed (SIGKILL) at a known point of its transfers — the hub kills it when a given range request
  arrives — and resumed gives the same bytes again, and keeps the shards it had finished;
- `eval` of a hub model streams it layer by layer to the local model's perplexity.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import lazymerge
from hubfix import cached_shards, hub_env, published, rewrite, shard_hashes, write_text_data  # noqa: F401
from lazymerge.engine.ops import Load

REPO = Path(__file__).resolve().parents[1]
TIES = {"merge_method": "ties", "base_model": "org/base", "dtype": "bfloat16",
        "models": [{"model": "org/ft1", "parameters": {"weight": 0.6, "density": 0.5}},
                   {"model": "org/ft2", "parameters": {"weight": 0.4, "density": 0.7}},
                   {"model": "org/ft3", "parameters": {"weight": 0.3, "density": 0.6}}]}
# small row blocks, and a budget too small to keep a tensor's blocks between phases: rereads (evict=False)
BLOCKED = dict(memory="40KiB", max_block_rows=8)


def data_served(hub) -> int:
    return hub.bytes_served(suffix=".safetensors")


def test_streamed_run_stores_nothing_and_transfers_each_byte_once(published, hub_env: Path, tmp_path: Path,
                                                                   monkeypatch) -> None:
    local = tmp_path / "local"
    lazymerge.merge(rewrite(TIES, published.local), local, **BLOCKED)
    plan = lazymerge.plan(TIES, **BLOCKED)
    try:
        loads = [t.attrs for t in plan.tasks.tasks if isinstance(t.attrs, Load)]
        assert any(not a.evict for a in loads)              # the blocked plan rereads blocks: kept in memory
        assert plan.bytes_read > sum(info.nbytes for key in plan.sources
                                     for info in plan.sources[key].tensors.values())
    finally:
        plan.close()
    published.hub.reset()                                   # the headers are kept: only tensor data from here
    report = lazymerge.merge(TIES, tmp_path / "streamed", stream_inputs=True, **BLOCKED)
    assert shard_hashes(tmp_path / "streamed") == shard_hashes(local)
    assert not cached_shards(hub_env)
    served = data_served(published.hub)
    assert 0 < served <= 1.1 * report.bytes_read
    data = sum(f.stat().st_size for m in ("base", "ft1", "ft2", "ft3")
               for f in published.local[m].glob("*.safetensors"))
    assert served <= data                                   # each byte about once, though blocks are reread
    assert report.bytes_transferred == served
    # a transient error, retried by huggingface_hub, and a response broken off, resumed where it stopped
    faults = published.hub.faults
    published.hub.fail_next(1)
    published.hub.cut_next(1000)
    lazymerge.merge(TIES, tmp_path / "faults", stream_inputs=True, **BLOCKED)
    assert published.hub.faults == faults + 2
    assert shard_hashes(tmp_path / "faults") == shard_hashes(local)
    # a read-ahead window too small to keep the reread blocks: they are fetched again, the bytes are the same
    monkeypatch.setenv("LAZYMERGE_READAHEAD", "4KiB")
    published.hub.reset()
    lazymerge.merge(TIES, tmp_path / "small_window", stream_inputs=True, **BLOCKED)
    assert shard_hashes(tmp_path / "small_window") == shard_hashes(local)
    assert data_served(published.hub) > served
    # with the default budget (no row blocks) and read-ahead, the same bytes
    monkeypatch.delenv("LAZYMERGE_READAHEAD")
    published.hub.reset()
    lazymerge.merge(TIES, tmp_path / "streamed2", stream_inputs=True)
    assert shard_hashes(tmp_path / "streamed2") == shard_hashes(local)
    assert data_served(published.hub) <= data and not cached_shards(hub_env)


def test_streamed_run_killed_mid_transfer_resumes_bit_identical(published, hub_env: Path, tmp_path: Path,
                                                                monkeypatch) -> None:
    opts = ["--shard-size", "20KB", "--workers", "1", "-q", "--stream-inputs"]
    local = tmp_path / "local"
    lazymerge.merge(rewrite(TIES, published.local), local, shard_size="20KB")
    assert len(list(local.glob("*.safetensors"))) >= 3
    # with one worker and no read-ahead the range requests come in task order: count them in a first run,
    # then kill the second (a fresh cache, in a subprocess) when the middle one arrives
    monkeypatch.setenv("LAZYMERGE_READAHEAD", "0")
    lazymerge.merge(TIES, tmp_path / "count", shard_size="20KB", workers=1, stream_inputs=True)
    data_gets = [r for r in published.hub.requests if r[0] == "GET" and r[2] and int(r[2][6:].split("-")[0]) > 8]
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(TIES))
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HOME": str(tmp_path / "fresh")}
    proc = subprocess.Popen([sys.executable, "-m", "lazymerge.cli", "run", str(recipe), str(out), *opts],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    killed: list[int] = []

    def kill() -> None:
        killed.append(proc.pid)
        proc.send_signal(signal.SIGKILL)

    published.hub.hold(len(data_gets) // 2, kill)
    _, err = proc.communicate(timeout=300)
    assert killed and proc.returncode == -signal.SIGKILL, err.decode()
    journal = json.loads((tmp_path / ".out.lazymerge-tmp" / "journal.json").read_text())
    assert journal["shards"] and not out.exists()             # some shards finished before the kill
    assert not cached_shards(tmp_path / "fresh" / "hub")

    monkeypatch.delenv("LAZYMERGE_READAHEAD")
    published.hub.reset()
    report = lazymerge.merge(recipe, out, shard_size="20KB", resume=True, stream_inputs=True)
    assert report.resumed_tensors > 0
    assert shard_hashes(out) == shard_hashes(local)
    assert not cached_shards(hub_env)


def test_eval_streams_a_hub_model(published, hub_env: Path, tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    data = write_text_data(tmp_path / "data.txt", 400, seed=0)
    kw = dict(seq_len=32, max_tokens=192, memory="1MiB")
    want = lazymerge.evaluate(published.local["ft1"], data, **kw)
    got = lazymerge.evaluate("org/ft1", data, stream_inputs=True, **kw)
    assert got.perplexity == want.perplexity
    assert not cached_shards(hub_env)
    sizes = sum(f.stat().st_size for f in published.local["ft1"].glob("*.safetensors"))
    assert data_served(published.hub) <= sizes              # headers and tensors, each byte once
