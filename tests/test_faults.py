"""Faults: SIGKILL at chosen points and --resume, Ctrl-C, a second run on the same output, a full disk.

The merges killed here run in subprocesses of the real CLI, held at a named point by a test hold
(lazymerge/testhold.py, tests/holdkit.py): the run stops by itself after its n-th write task, its n-th journaled
shard, or just before the finished output is renamed into place, and waits there until the test kills,
interrupts or releases it. Nothing depends on how fast the merge is; every test still checks the state it killed
the run in (the journal, the shard files' bytes) and the real output afterwards.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from safetensors.torch import save_file

from conftest import write_recipe
import lazymerge
from holdkit import HANG_S, Hold
from lazymerge.cli import main

REPO = Path(__file__).resolve().parent.parent
N_TENSORS = 10
SHAPE = (512, 256)                     # 512 KiB of float32: one tensor per 1 MB shard
TENSOR_BYTES = SHAPE[0] * SHAPE[1] * 4
RUN_OPTS = ["--memory", "1MiB", "--shard-size", "1MB", "--workers", "1", "-q"]


@pytest.fixture(scope="module")
def merge(tmp_path_factory) -> dict:
    """Three models, a TIES recipe whose tensors are each written in several row blocks under a 1 MiB budget (one
    tensor per shard), the number of write tasks per tensor, and the reference output of an uninterrupted run."""
    root = tmp_path_factory.mktemp("faults")
    g = torch.Generator().manual_seed(7)
    base = {f"model.layers.{i}.mlp.up_proj.weight": torch.randn(SHAPE, generator=g) for i in range(N_TENSORS)}
    paths = {}
    for name, scale in (("base", 0.0), ("a", 0.01), ("b", 0.02)):
        d = root / name
        d.mkdir()
        save_file({k: v + scale * torch.randn(SHAPE, generator=g) for k, v in base.items()},
                  d / "model.safetensors", metadata={"format": "pt"})
        paths[name] = d
    recipe = write_recipe(root, {
        "merge_method": "ties", "base_model": paths["base"],
        "models": [{"model": paths["a"], "parameters": {"weight": 0.6, "density": 0.5}},
                   {"model": paths["b"], "parameters": {"weight": 0.4, "density": 0.5}}],
    })
    plan = lazymerge.plan(recipe, memory="1MiB", shard_size="1MB")
    plan.close()
    writes = set(plan.blocks.values())
    assert len(writes) == 1 and min(writes) >= 2, plan.blocks    # every tensor in the same number of row blocks
    ref = root / "reference"
    result = CliRunner().invoke(main, ["run", str(recipe), str(ref), *RUN_OPTS])
    assert result.exit_code == 0, result.stderr
    shards = sorted(p.name for p in ref.glob("*.safetensors"))
    assert len(shards) == N_TENSORS
    return {"recipe": recipe, "ref": ref, "shards": shards, "models": paths, "writes": writes.pop()}


# ---------------------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------------------
def tmp_of(out: Path) -> Path:
    return out.parent / f".{out.name}.lazymerge-tmp"


def lock_of(out: Path) -> Path:
    return out.parent / f".{out.name}.lazymerge.lock"


def _default_sigint() -> None:
    """In the child: Ctrl-C's default action, as in a terminal, even when the suite itself runs with SIGINT ignored
    (a background job of a non-interactive shell ignores it, and exec keeps that)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start(merge: dict, out: Path, hold: Hold, *extra: str, recipe: Path | None = None) -> subprocess.Popen:
    """`lazymerge run` in a subprocess that stops at `hold`; returns once it is held there."""
    with open(out.parent / f"{out.name}.stderr", "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "lazymerge.cli", "run", str(recipe or merge["recipe"]),
                                 str(out), *RUN_OPTS, *extra], cwd=REPO, stdout=subprocess.DEVNULL, stderr=err,
                                env=hold.env(), preexec_fn=_default_sigint)
    try:
        hold.wait(proc)
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    return proc


def kill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=HANG_S) == -signal.SIGKILL


def stderr_of(out: Path) -> str:
    return (out.parent / f"{out.name}.stderr").read_text()


def journaled(out: Path) -> set[str]:
    try:
        return set(json.loads((tmp_of(out) / "journal.json").read_text())["shards"])
    except (OSError, ValueError, KeyError):
        return set()


def partly_written(out: Path, done: set[str]) -> set[str]:
    """Shards that are not journaled but already have some data bytes (fresh shards are all zeros)."""
    found = set()
    tmp = tmp_of(out)
    try:
        names = [p.name for p in tmp.iterdir() if p.name.endswith(".safetensors") and p.name not in done]
    except OSError:
        return found
    for name in names:
        try:
            raw = (tmp / name).read_bytes()
        except OSError:
            continue
        if len(raw) < 8:
            continue
        (n,) = struct.unpack("<Q", raw[:8])
        data = raw[8 + n:]
        if data.count(0) < len(data):
            found.add(name)
    return found


def assert_identical(out: Path, ref: Path) -> None:
    """Every file but the report (wall time, bytes...) is byte-for-byte the reference's."""
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(p.name for p in ref.iterdir())
    for name in names:
        if name != "lazymerge_report.json":
            assert (out / name).read_bytes() == (ref / name).read_bytes(), name


def visible(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if not p.name.startswith(".") and not p.name.endswith(".stderr")
                  and not p.name.startswith("hold-"))


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def resume(merge: dict, out: Path, *extra: str) -> dict:
    result = CliRunner().invoke(main, ["run", str(merge["recipe"]), str(out), *RUN_OPTS, *extra])
    assert result.exit_code == 0, result.stderr
    return json.loads((out / "lazymerge_report.json").read_text())


# ---------------------------------------------------------------------------------------------------------------
# SIGKILL and --resume
# ---------------------------------------------------------------------------------------------------------------
KILL_POINTS = {                  # (event, n as a function of the write tasks per tensor)
    "mid_first_shard": ("write", lambda w: 1),             # one row block of the first shard written, none done
    "after_first_shard": ("shard", lambda w: 1),           # the first shard journaled
    "mid_later_shard": ("write", lambda w: 3 * w + 1),     # three shards journaled, the fourth partly written
}


@pytest.mark.parametrize("point", list(KILL_POINTS))
def test_sigkill_then_resume_is_bit_identical(point: str, merge: dict, tmp_path: Path) -> None:
    out = tmp_path / "out"
    event, n = KILL_POINTS[point]
    kill(start(merge, out, Hold(tmp_path, event, n(merge["writes"]))))

    done = journaled(out)
    partial = partly_written(out, done)
    # the point we meant to hit is the point we hit
    if point == "mid_first_shard":
        assert not done and len(partial) == 1
    elif point == "after_first_shard":
        assert len(done) == 1 and not partial
    else:
        assert len(done) == 3 and len(partial) == 1
    # nothing half-written is visible: no output directory, only hidden temporary files
    assert not out.exists() and visible(tmp_path) == []

    corrupted = None
    if point == "mid_later_shard":
        # a finished shard damaged after the crash must be detected by its checksum and recomputed
        corrupted = sorted(done)[1]
        with open(tmp_of(out) / corrupted, "r+b") as f:
            f.seek(-5, os.SEEK_END)
            byte = f.read(1)
            f.seek(-5, os.SEEK_END)
            f.write(bytes([byte[0] ^ 0xFF]))

    report = resume(merge, out, "--resume")
    assert_identical(out, merge["ref"])
    kept = len(done) - (1 if corrupted else 0)
    assert report["resumed_tensors"] == kept                      # every intact finished shard was kept ...
    assert report["bytes_written"] == (N_TENSORS - kept) * TENSOR_BYTES   # ... and only the rest recomputed
    assert leftovers(tmp_path) == []                              # temp dir and (stale) lock are gone


def test_sigkill_then_rerun_without_resume(merge: dict, tmp_path: Path) -> None:
    """Without --resume a killed run's leftovers are never used nor visible, and a plain re-run starts clean."""
    out = tmp_path / "out"
    kill(start(merge, out, Hold(tmp_path, "write", 2 * merge["writes"] + 1)))
    assert len(journaled(out)) == 2 and len(partly_written(out, journaled(out))) == 1
    assert not out.exists() and visible(tmp_path) == []
    assert lock_of(out).exists()                                  # stale: its owner is dead
    report = resume(merge, out)
    assert report["resumed_tensors"] == 0 and report["bytes_written"] == N_TENSORS * TENSOR_BYTES
    assert_identical(out, merge["ref"])
    assert leftovers(tmp_path) == []


def test_sigkill_during_finalize_leaves_no_output(merge: dict, tmp_path: Path) -> None:
    """Killed as the run finishes (every file written in the temporary directory, its journal dropped, not yet
    renamed): no output appears, and a --resume run ends with the reference output."""
    out = tmp_path / "out"
    kill(start(merge, out, Hold(tmp_path, "finalize", 1)))
    assert (tmp_of(out) / "lazymerge_report.json").exists() and not (tmp_of(out) / "journal.json").exists()
    assert not out.exists() and visible(tmp_path) == []
    resume(merge, out, "--resume")
    assert_identical(out, merge["ref"])
    assert leftovers(tmp_path) == []


def test_resume_ignores_shards_of_a_different_recipe(merge: dict, tmp_path: Path) -> None:
    """Finished shards are kept only for the same recipe and inputs: same shapes but other weights recompute."""
    out = tmp_path / "out"
    recipe = Path(merge["recipe"])
    other = write_recipe(tmp_path, {**yaml.safe_load(recipe.read_text()), "parameters": {"normalize": False}},
                         name="other.yaml")
    kill(start(merge, out, Hold(tmp_path, "shard", 2), recipe=other))
    assert len(journaled(out)) == 2
    report = resume(merge, out, "--resume")
    assert report["resumed_tensors"] == 0
    assert_identical(out, merge["ref"])


# ---------------------------------------------------------------------------------------------------------------
# Ctrl-C, two runs, disk full
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("with_resume", [False, True])
def test_ctrl_c_stops_at_once_and_cleans_up(with_resume: bool, merge: dict, tmp_path: Path) -> None:
    """Ctrl-C with shards still to write: exit 130 with one line, no more work done (the journal is the one at
    the interrupt), nothing visible, the lock released; temporary files removed, or kept for --resume."""
    out = tmp_path / "out"
    extra = ["--resume"] if with_resume else []
    proc = start(merge, out, Hold(tmp_path, "shard", 1), *extra)
    at_interrupt = journaled(out)
    assert len(at_interrupt) == 1
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=HANG_S) == 130
    lines = [ln for ln in stderr_of(out).splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "interrupted" in lines[0], lines
    assert not out.exists() and visible(tmp_path) == []
    assert not lock_of(out).exists()
    if not with_resume:
        assert leftovers(tmp_path) == []                          # every temporary file removed
    else:
        # asked to be resumable: finished shards are kept for the next --resume, and the message says so
        assert "--resume" in lines[0] and journaled(out) == at_interrupt
        report = resume(merge, out, "--resume")
        assert report["resumed_tensors"] == 1
        assert_identical(out, merge["ref"])
        assert leftovers(tmp_path) == []


def test_second_run_on_same_output_is_refused(merge: dict, tmp_path: Path) -> None:
    out = tmp_path / "out"
    hold = Hold(tmp_path, "write", 1)
    first = start(merge, out, hold)                               # held with the lock taken, mid-merge
    assert lock_of(out).read_text().strip() == str(first.pid)
    for extra in ([], ["--resume"], ["--overwrite"]):
        result = CliRunner().invoke(main, ["run", str(merge["recipe"]), str(out), *RUN_OPTS, *extra])
        assert result.exit_code == 2
        lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
        assert len(lines) == 1 and f"pid {first.pid}" in lines[0] and str(out) in lines[0], lines
    hold.release(first)
    assert first.wait(timeout=HANG_S) == 0, stderr_of(out)           # the first run was not disturbed
    assert_identical(out, merge["ref"])
    assert leftovers(tmp_path) == []


@pytest.fixture
def small_fs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A 1 MiB filesystem: a real tmpfs where we may mount one (root), else a disk_usage that says so."""
    d = tmp_path / "small"
    d.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1M", "tmpfs", str(d)],
                             capture_output=True).returncode == 0 if os.geteuid() == 0 else False
    if not mounted:
        real = shutil.disk_usage

        def fake(path):
            usage = real(path)
            inside = Path(os.path.abspath(path)) == d or d in Path(os.path.abspath(path)).parents
            return usage._replace(free=min(usage.free, 1 << 20)) if inside else usage
        monkeypatch.setattr(shutil, "disk_usage", fake)
    try:
        yield d
    finally:
        if mounted:
            subprocess.run(["umount", str(d)], check=True)


def test_not_enough_space_is_refused_up_front(merge: dict, small_fs: Path) -> None:
    out = small_fs / "out"
    result = CliRunner().invoke(main, ["run", str(merge["recipe"]), str(out), *RUN_OPTS])
    assert result.exit_code == 2, result.stderr
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, lines
    need = N_TENSORS * TENSOR_BYTES
    assert str(small_fs) in lines[0] and "free disk space" in lines[0], lines[0]
    needed = int(lines[0].split("needs ")[1].split()[0])
    assert need <= needed <= need + N_TENSORS * 4096                  # data plus the shards' headers
    assert os.listdir(small_fs) == []
    # and `plan` warns before anything runs
    result = CliRunner().invoke(main, ["plan", str(merge["recipe"]), "--out", str(out), "--memory", "1MiB",
                                       "--shard-size", "1MB"])
    assert result.exit_code == 0, result.stderr
    assert "free in" in result.stderr and str(small_fs) in result.stderr


def test_disk_full_mid_write(merge: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """ENOSPC after a few shards: one line naming the directory and the bytes needed, nothing left behind."""
    out = tmp_path / "out"
    real = os.pwrite
    calls = {"n": 0}

    def pwrite(fd: int, data, offset: int) -> int:
        calls["n"] += 1
        if calls["n"] > 3 * N_TENSORS + 40:                          # headers, then a few shards' worth of rows
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", pwrite)
    result = CliRunner().invoke(main, ["run", str(merge["recipe"]), str(out), *RUN_OPTS])
    monkeypatch.undo()
    assert isinstance(result.exception, SystemExit) and result.exit_code == 2, result.exception
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"error: {tmp_path}: disk full while writing model-"), lines[0]
    assert f"needs {sum((merge['ref'] / s).stat().st_size for s in merge['shards'])} bytes" in lines[0]
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("exchange", [True, False])
def test_overwrite_replaces_whole_directory(exchange: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--overwrite swaps the finished output in (atomically where renameat2 exists, else by two renames) and
    leaves no trace of the old one; without renameat2 support the fallback gives the same result."""
    from lazymerge.io import writer as W

    if exchange:
        probe = [tmp_path / "probe-a", tmp_path / "probe-b"]
        for p in probe:
            p.mkdir()
        available = W._exchange(*probe)
        for p in probe:
            p.rmdir()
        if not available:
            pytest.skip("renameat2(RENAME_EXCHANGE) is not available on this filesystem")
        real = W._exchange
        used = []
        monkeypatch.setattr(W, "_exchange", lambda a, b: used.append(real(a, b)) or used[-1])
    else:
        monkeypatch.setattr(W, "_exchange", lambda a, b: False)
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    layout = W.plan_layout([W.OutTensor("t", (4, 2), "F32")], 10**6)
    with W.CheckpointWriter(out, layout, overwrite=True) as w:
        w.write_rows("t", 0, torch.arange(8, dtype=torch.float32).reshape(4, 2))
        w.finalize(config=None, aux_files=[], extra_files={})
    assert sorted(p.name for p in out.iterdir()) == ["model.safetensors"]
    assert os.listdir(tmp_path) == ["out"]
    if exchange:
        assert used == [True], "the atomic exchange was available but not used"
