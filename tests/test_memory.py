"""The engine's recycled buffers (lazymerge/memory.py) and its page-cache hygiene (lazymerge/io/pagecache.py).

The pool must never lend a buffer that a live tensor still references, must keep idle buffers within the limit
the scheduler gives it, and must not change a merge's output by a single bit. Reads must leave the page cache as
they found it: the pages a merge brought in are dropped, pages that were cached before it stay.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
import torch

import lazymerge
from lazymerge import memory
from lazymerge.io import pagecache
from lazymerge.io.checkpoint import Checkpoint

from conftest import write_checkpoint, write_recipe

MiB = 1 << 20
pytestmark = pytest.mark.skipif(not memory._POOLABLE, reason="this torch cannot count storage references")


def test_a_buffer_is_lent_again_only_when_no_tensor_references_it() -> None:
    with memory.pooled() as pool:
        a = memory.empty((1024, 1024), torch.float32)         # 4 MiB: pooled
        ptr = a.data_ptr()
        view = a[10:]
        arr = view.numpy()                                    # numpy views keep the storage too
        del a, view
        b = memory.empty((1024, 1024), torch.float32)
        assert b.data_ptr() != ptr                            # `arr` still references the first buffer
        del arr
        c = memory.empty((512, 1024), torch.float64)          # same bytes, another dtype and shape
        assert c.data_ptr() == ptr and c.dtype == torch.float64 and c.shape == (512, 1024)
        d = memory.empty((1280, 1024), torch.float32)         # 5 MiB: nothing idle, a fresh buffer
        dptr = d.data_ptr()
        assert dptr not in (ptr, b.data_ptr())
        del b, c, d
        assert pool.idle_bytes() == 13 * MiB
        pool.trim(5 * MiB)                                    # least recently lent first: b's, then the first
        assert pool.idle_bytes() == 5 * MiB
        e = memory.empty((1024, 1024), torch.float32)
        assert e.data_ptr() == dptr                           # a smaller block in the idle 5 MiB buffer
    f = memory.empty((1024, 1024), torch.float32)            # outside a run: a fresh buffer every time
    assert memory._pool is None and f.shape == (1024, 1024)


def _big_models(root: Path) -> dict[str, Path]:
    """base + 2 fine-tunes with blocks big enough (>= 4 MiB as float32) to go through the pool."""
    g = torch.Generator().manual_seed(3)
    base = {"model.layers.0.mlp.up_proj.weight": torch.randn(2048, 1024, generator=g),
            "model.layers.0.mlp.down_proj.weight": torch.randn(1024, 2048, generator=g),
            "model.norm.weight": torch.randn(1024, generator=g)}
    out = {"base": write_checkpoint(root / "base", base, dtype=torch.bfloat16, tag="base")}
    for i in (1, 2):
        ft = {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in base.items()}
        out[f"ft{i}"] = write_checkpoint(root / f"ft{i}", ft, dtype=torch.bfloat16, tag=f"ft{i}")
    return out


def _digest(directory: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(directory.glob("*.safetensors")):
        h.update(f.read_bytes())
    return h.hexdigest()


def test_recycled_buffers_leave_the_merge_bit_identical(tmp_path, monkeypatch) -> None:
    models = _big_models(tmp_path / "in")
    recipe = write_recipe(tmp_path, {
        "merge_method": "ties", "base_model": str(models["base"]), "dtype": "bfloat16",
        "models": [{"model": str(models[k]), "parameters": {"weight": 0.5, "density": 0.4}} for k in ("ft1", "ft2")]})
    fresh = []
    real_fresh = memory._fresh
    monkeypatch.setattr(memory, "_fresh", lambda *a: fresh.append(a) or real_fresh(*a))
    # one worker: which block dies before which is born is then fixed, so the count of reuses is too (with two
    # workers it depends on the schedule, and on a loaded machine may be zero)
    lazymerge.merge(recipe, tmp_path / "pooled", memory="256MiB", workers=1)
    pooled_allocs = len(fresh)
    lazymerge.merge(recipe, tmp_path / "pooled2", memory="256MiB")       # any schedule: the same bytes
    monkeypatch.setattr(memory, "_POOLABLE", False)
    fresh.clear()
    lazymerge.merge(recipe, tmp_path / "plain", memory="256MiB", workers=1)
    assert len(fresh) > pooled_allocs                        # the pool did reuse buffers
    assert _digest(tmp_path / "pooled") == _digest(tmp_path / "plain") == _digest(tmp_path / "pooled2")


def _droppable(directory: Path) -> bool:
    """Whether this file system drops clean pages on request (tmpfs, for one, keeps them: nothing to test)."""
    probe = directory / "probe.bin"
    probe.write_bytes(os.urandom(1 << 20))
    fd = os.open(probe, os.O_RDONLY)
    try:
        os.fsync(fd)
        pagecache.drop(fd, 0, 1 << 20)
    finally:
        os.close(fd)
    frac = pagecache.cached_fraction(probe)
    probe.unlink()
    return frac is not None and frac < 0.5


def test_reads_leave_the_page_cache_as_they_found_it(tmp_path) -> None:
    models = _big_models(tmp_path)
    if not _droppable(tmp_path):
        pytest.skip("this file system keeps clean pages cached (tmpfs?)")
    files = sorted(models["base"].glob("*.safetensors"))
    cold, warm = files
    for f in files:                                           # `cold`: out of the cache; `warm`: read just before
        fd = os.open(f, os.O_RDONLY)
        os.fsync(fd)
        pagecache.drop(fd, 0, f.stat().st_size)
        os.close(fd)
    warm.read_bytes()
    assert pagecache.cached_fraction(cold) < 0.1 and pagecache.cached_fraction(warm) > 0.9
    with Checkpoint.open(models["base"]) as ckpt:
        for name, info in ckpt.tensors.items():
            ref = ckpt.read(name, dtype=None, evict=False)    # evict=False: what a re-reading phase asks
            assert torch.equal(ckpt.read(name, (0, info.rows)), ref.float())
    assert pagecache.cached_fraction(cold) < 0.1              # the pages the reads brought in are gone again
    assert pagecache.cached_fraction(warm) > 0.9              # the user's cached pages are still there


def test_direct_reads_equal_cached_reads_at_any_offset(tmp_path) -> None:
    """Ranges not cached at open are read with O_DIRECT into an aligned buffer: tensors at odd offsets, one
    ending at the end of the file (a short read), and rows in the middle all come back as safetensors stores them."""
    from safetensors.torch import load_file, save_file

    g = torch.Generator().manual_seed(0)
    tensors = {"a_odd": torch.randint(0, 255, (4099,), dtype=torch.uint8, generator=g),     # shifts what follows
               "b_bf16": torch.randn(3000, 700, generator=g).to(torch.bfloat16),
               "c_f32": torch.randn(513, 1031, generator=g),
               "z_last": torch.randn(4097, generator=g).to(torch.bfloat16)}
    path = tmp_path / "model.safetensors"
    save_file(tensors, str(path))
    if not _droppable(tmp_path):
        pytest.skip("this file system keeps clean pages cached (tmpfs?)")
    ref = {k: v.clone() for k, v in load_file(str(path)).items()}
    fd = os.open(path, os.O_RDONLY)
    os.fsync(fd)
    pagecache.drop(fd, 0, path.stat().st_size)          # out of the cache: the reads below go around it
    os.close(fd)
    with Checkpoint.open(tmp_path) as ckpt:
        reader = ckpt.reader(ckpt.tensors["b_bf16"].file)
        for name, t in ref.items():
            info = ckpt.tensors[name]
            got = ckpt.read(name, dtype=None)
            assert torch.equal(got, t) and got.data_ptr() % 64 == 0, name     # aligned as torch's allocator
            assert torch.equal(ckpt.read_stored(name), t), name                  # may be a view of the buffer
            rows = (info.rows // 3, info.rows // 3 + 5) if t.dim() > 1 else (0, 1)   # 1-d: one row
            assert torch.equal(ckpt.read(name, rows, dtype=None), t[rows[0]:rows[1]] if t.dim() > 1 else t), name
        if reader._direct_ok:                                 # the file system took direct reads
            assert reader._direct_fd is not None


def test_a_block_read_by_several_phases_stays_cached_until_its_last_read(tmp_path) -> None:
    """When a multi-pass method cannot keep its input blocks (`share_loads` does not fit), every load of a block
    but the last asks to leave it in the page cache; the last one drops it."""
    from lazymerge.engine import ops
    from lazymerge.planner.graph import TaskList, Task, mark_rereads

    def load(rows: tuple[int, int]) -> Task:
        return Task(ops.Load("m", "w", rows, 8), (), 8, "w", 0, 0)

    tl = TaskList(["a0", "a1", "b0", "b1", "c0"], [load((0, 2)), load((2, 4)), load((0, 2)), load((2, 4)),
                                                   load((0, 2))])
    marked = mark_rereads(tl)
    assert [t.attrs.evict for t in marked.tasks] == [False, False, False, True, True]
    assert marked.keys == tl.keys
    models = _big_models(tmp_path / "in")
    recipe = write_recipe(tmp_path, {
        "merge_method": "ties", "base_model": str(models["base"]), "dtype": "bfloat16",
        "models": [{"model": str(models[k]), "parameters": {"weight": 0.5, "density": 0.4}} for k in ("ft1", "ft2")]})
    plan = lazymerge.plan(recipe, memory="3MiB")               # blocks too big to keep: phases read again
    loads = [t.attrs for t in plan.tasks.tasks if isinstance(t.attrs, ops.Load)]
    by_block: dict[tuple, list[bool]] = {}
    for a in loads:
        by_block.setdefault((a.model, a.name, a.rows), []).append(a.evict)
    multi = [v for v in by_block.values() if len(v) > 1]
    assert multi and all(v == [False] * (len(v) - 1) + [True] for v in multi)
    assert all(v == [True] for v in by_block.values() if len(v) == 1)
