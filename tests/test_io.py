"""io layer against safetensors' own reader and writer (the independent reference)."""
from __future__ import annotations

import errno
import json
import os
import struct
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from lazymerge.errors import CheckpointError, OutputError
from lazymerge.io.checkpoint import Checkpoint
from lazymerge.io.shards import ShardReader, read_header
from lazymerge.io.writer import CheckpointWriter, OutTensor, plan_layout
from lazymerge.units import parse_size

CODES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.int64: "I64"}


def sample_tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "w.bf16": torch.randn(37, 11, generator=g).bfloat16(),
        "w.f32": torch.randn(9, 4, 3, generator=g),
        "w.f16": torch.randn(20, 5, generator=g).half(),
        "vec": torch.randn(13, generator=g),
        "scalar": torch.tensor(2.5),
        "ids": torch.arange(6, dtype=torch.int64),
        "empty": torch.zeros(0, 4),
    }


def raw_file(path: Path, header: dict | bytes, data: bytes = b"", length: int | None = None) -> Path:
    """A safetensors file written by hand, so that it can be broken on purpose."""
    body = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(body) if length is None else length) + body + data)
    return path


# -- shards -------------------------------------------------------------------------------------------------------

def test_header_matches_safetensors(tmp_path: Path) -> None:
    tensors = sample_tensors()
    path = tmp_path / "m.safetensors"
    save_file(tensors, path, metadata={"format": "pt", "note": "x"})
    infos, metadata = read_header(path)
    with safe_open(path, "pt") as f:
        assert set(infos) == set(f.keys())
        assert metadata == f.metadata()
        for name in f.keys():
            s = f.get_slice(name)
            assert list(infos[name].shape) == s.get_shape()
            assert infos[name].dtype == s.get_dtype()
            assert infos[name].torch_dtype == tensors[name].dtype
            assert infos[name].nbytes == tensors[name].numel() * tensors[name].element_size()


@pytest.mark.parametrize("name", ["w.bf16", "w.f32", "w.f16", "vec", "ids"])
def test_row_reads_equal_load_file(tmp_path: Path, name: str) -> None:
    path = tmp_path / "m.safetensors"
    save_file(sample_tensors(), path)
    ref = load_file(path)[name]
    info = read_header(path)[0][name]
    with ShardReader(path) as reader:
        n = info.rows
        assert n == (ref.shape[0] if ref.dim() >= 2 else 1)        # a 1-d tensor is one row (lazymerge.shapes)
        for a, b in {(0, n), (0, 1), (min(3, n), min(7, n)), (n - 1, n), (min(4, n), min(4, n))}:
            want = ref[a:b] if ref.dim() >= 2 else (ref if b - a == 1 else ref.reshape(-1)[:0])
            got = reader.read(info, (a, b), dtype=None)
            assert got.dtype == ref.dtype and torch.equal(got, want)
            if ref.is_floating_point():
                assert torch.equal(reader.read(info, (a, b)), want.float())
        with pytest.raises(ValueError, match="out of range"):
            reader.read(info, (0, n + 1))
        whole = reader.read(info)
        assert whole.dtype == torch.float32 and torch.equal(whole, ref.float())


def test_read_returns_a_copy_and_zero_d(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    save_file(sample_tensors(), path)
    infos = read_header(path)[0]
    with ShardReader(path) as reader:
        t = reader.read(infos["w.f32"], dtype=None)
        t.fill_(7.0)
        assert not torch.equal(reader.read(infos["w.f32"], dtype=None), t)
        scalar = reader.read(infos["scalar"])
        assert scalar.shape == () and scalar.item() == 2.5
        assert reader.read(infos["empty"]).shape == (0, 4)


def _break(tmp_path: Path, kind: str) -> Path:
    path = tmp_path / f"model-00001-of-00002-{kind}.safetensors"
    four = b"\0" * 16
    if kind == "short":
        path.write_bytes(b"\x01\x02")
    elif kind == "truncated":
        save_file({"a": torch.randn(100, 10)}, path)
        os.truncate(path, path.stat().st_size - 100)
    elif kind == "header_too_long":
        raw_file(path, {"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"1234", length=9999999)
    elif kind == "absurd_header":
        raw_file(path, b"{}", length=1 << 40)
    elif kind == "not_json":
        raw_file(path, b"this is not json")
    elif kind == "not_utf8":
        raw_file(path, b'{"\xff\xfe": 1}')
    elif kind == "not_object":
        raw_file(path, b"[1, 2]")
    elif kind == "overlap":
        raw_file(path, {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                        "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, four)
    elif kind == "size_contradicts_dtype":
        raw_file(path, {"a": {"dtype": "BF16", "shape": [4], "data_offsets": [0, 16]}}, four)
    elif kind == "unknown_dtype":
        raw_file(path, {"a": {"dtype": "F128", "shape": [1], "data_offsets": [0, 16]}}, four)
    elif kind == "bad_shape":
        raw_file(path, {"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, four)
    elif kind == "reversed_offsets":
        raw_file(path, {"a": {"dtype": "F32", "shape": [0], "data_offsets": [8, 4]}}, four)
    elif kind == "offsets_past_data":
        raw_file(path, {"a": {"dtype": "F32", "shape": [8], "data_offsets": [0, 32]}}, four)
    elif kind == "bad_metadata":
        raw_file(path, {"__metadata__": {"format": 1}}, b"")
    elif kind == "duplicate_key":
        raw_file(path, b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},'
                       b' "a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}', four)
    return path


@pytest.mark.parametrize("kind", [
    "short", "truncated", "header_too_long", "absurd_header", "not_json", "not_utf8", "not_object", "overlap",
    "size_contradicts_dtype", "unknown_dtype", "bad_shape", "reversed_offsets", "offsets_past_data",
    "bad_metadata", "duplicate_key"])
def test_malformed_file_raises_naming_it(tmp_path: Path, kind: str) -> None:
    path = _break(tmp_path, kind)
    with pytest.raises(CheckpointError, match=path.name) as exc:
        read_header(path)
    assert "\n" not in str(exc.value)
    # safetensors itself also refuses these files (proof they are really broken)
    with pytest.raises(Exception):
        load_file(path)


def test_header_error_message_names_lengths(tmp_path: Path) -> None:
    path = _break(tmp_path, "header_too_long")
    with pytest.raises(CheckpointError, match=r"header length 9999999 exceeds file size"):
        read_header(path)


# -- checkpoint ---------------------------------------------------------------------------------------------------

def sharded_dir(root: Path, tensors: dict[str, torch.Tensor], index: dict | None = None) -> Path:
    """Two shards plus index, written by safetensors itself."""
    root.mkdir(parents=True, exist_ok=True)
    names = sorted(tensors)
    parts = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for fname, part in parts.items():
        save_file({n: tensors[n] for n in part}, root / fname)
    wmap = {n: f for f, part in parts.items() for n in part}
    (root / "model.safetensors.index.json").write_text(json.dumps(index or {"metadata": {}, "weight_map": wmap}))
    return root


def test_checkpoint_sharded_reads(tmp_path: Path) -> None:
    tensors = sample_tensors()
    root = sharded_dir(tmp_path / "m", tensors)
    (root / "config.json").write_text('{"hidden_size": 4}')
    with Checkpoint.open(root) as ckpt:
        assert set(ckpt.tensors) == set(tensors)
        assert ckpt.config == {"hidden_size": 4}
        for name, ref in tensors.items():
            assert torch.equal(ckpt.read(name, dtype=None), ref)
        assert torch.equal(ckpt.read("w.bf16", (5, 9)), tensors["w.bf16"][5:9].float())
        with pytest.raises(CheckpointError, match="nope"):
            ckpt.read("nope")


def test_checkpoint_single_file_and_plain_shards(tmp_path: Path) -> None:
    tensors = sample_tensors()
    (tmp_path / "a").mkdir()
    save_file(tensors, tmp_path / "a" / "model.safetensors")
    assert set(Checkpoint.open(tmp_path / "a").tensors) == set(tensors)
    (tmp_path / "b").mkdir()
    save_file({"x": tensors["vec"]}, tmp_path / "b" / "one.safetensors")
    save_file({"y": tensors["scalar"]}, tmp_path / "b" / "two.safetensors")
    assert set(Checkpoint.open(tmp_path / "b").tensors) == {"x", "y"}


def test_checkpoint_not_a_directory(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        Checkpoint.open(tmp_path / "missing")
    (tmp_path / "f").write_text("x")
    with pytest.raises(CheckpointError, match="not a directory"):
        Checkpoint.open(tmp_path / "f")


@pytest.mark.parametrize("bad", ["/etc/passwd", "../outside.safetensors", "sub/../../outside.safetensors",
                                 "link.safetensors"])
def test_index_paths_must_stay_inside(tmp_path: Path, bad: str) -> None:
    save_file({"x": torch.ones(2)}, tmp_path / "outside.safetensors")
    root = tmp_path / "m"
    root.mkdir()
    (root / "link.safetensors").symlink_to(tmp_path / "outside.safetensors")
    (root / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": bad}}))
    with pytest.raises(CheckpointError, match="outside the model directory|absolute|'\\.\\.'") as exc:
        Checkpoint.open(root)
    assert bad in str(exc.value) or "outside" in str(exc.value)


def test_unindexed_symlink_escape_refused(tmp_path: Path) -> None:
    save_file({"x": torch.ones(2)}, tmp_path / "outside.safetensors")
    root = tmp_path / "m"
    root.mkdir()
    (root / "model.safetensors").symlink_to(tmp_path / "outside.safetensors")
    with pytest.raises(CheckpointError, match="outside the model directory"):
        Checkpoint.open(root)


def test_hub_cache_snapshot_symlinks_allowed(tmp_path: Path) -> None:
    repo = tmp_path / "models--org--name"
    (repo / "blobs").mkdir(parents=True)
    snap = repo / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    save_file({"x": torch.ones(3)}, repo / "blobs" / "deadbeef")
    (snap / "model.safetensors").symlink_to("../../blobs/deadbeef")
    assert torch.equal(Checkpoint.open(snap).read("x"), torch.ones(3))


def test_index_problems(tmp_path: Path) -> None:
    tensors = sample_tensors()
    root = sharded_dir(tmp_path / "missing", tensors)
    (root / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model-00002-of-00002.safetensors.*does not exist"):
        Checkpoint.open(root)

    root = sharded_dir(tmp_path / "absent", tensors)
    index = json.loads((root / "model.safetensors.index.json").read_text())
    index["weight_map"]["ghost"] = "model-00001-of-00002.safetensors"
    (root / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="ghost.*model.safetensors.index.json|model-00001.*ghost"):
        Checkpoint.open(root)

    root = sharded_dir(tmp_path / "nomap", tensors, index={"metadata": {}})
    with pytest.raises(CheckpointError, match="weight_map"):
        Checkpoint.open(root)

    root = sharded_dir(tmp_path / "badjson", tensors)
    (root / "model.safetensors.index.json").write_text("{oops")
    with pytest.raises(CheckpointError, match="model.safetensors.index.json"):
        Checkpoint.open(root)

    root = sharded_dir(tmp_path / "badconfig", tensors)
    (root / "config.json").write_text("{oops")
    with pytest.raises(CheckpointError, match="config.json"):
        Checkpoint.open(root)


def test_duplicate_tensor_names_both_shards(tmp_path: Path) -> None:
    root = tmp_path / "m"
    root.mkdir()
    save_file({"x": torch.ones(2)}, root / "a.safetensors")
    save_file({"x": torch.zeros(2)}, root / "b.safetensors")
    with pytest.raises(CheckpointError, match=r"'x'.*a\.safetensors.*b\.safetensors"):
        Checkpoint.open(root)
    (root / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"x": "a.safetensors", "y": "b.safetensors"}}))
    save_file({"x": torch.zeros(2), "y": torch.ones(1)}, root / "b.safetensors")
    with pytest.raises(CheckpointError, match=r"'x'.*a\.safetensors.*b\.safetensors"):
        Checkpoint.open(root)


def test_pickle_refused_then_loaded_with_allow_pickle(tmp_path: Path) -> None:
    tensors = {"a": torch.randn(4, 3).bfloat16(), "b": torch.randn(5)}
    root = tmp_path / "m"
    root.mkdir()
    torch.save(tensors, root / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="allow-pickle") as exc:
        Checkpoint.open(root)
    assert "pytorch_model.bin" in str(exc.value)
    with Checkpoint.open(root, allow_pickle=True) as ckpt:
        assert ckpt.tensors["a"].dtype == "BF16" and ckpt.tensors["a"].shape == (4, 3)
        assert ckpt.tensors["a"].file == root / "pytorch_model.bin"
        assert torch.equal(ckpt.read("a", (1, 3), dtype=None), tensors["a"][1:3])
        assert torch.equal(ckpt.read("b"), tensors["b"])


def test_pickle_index_and_malicious_pickle(tmp_path: Path) -> None:
    root = tmp_path / "m"
    root.mkdir()
    torch.save({"a": torch.ones(2)}, root / "pytorch_model-00001-of-00002.bin")
    torch.save({"b": torch.zeros(3)}, root / "pytorch_model-00002-of-00002.bin")
    (root / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": {
        "a": "pytorch_model-00001-of-00002.bin", "b": "pytorch_model-00002-of-00002.bin"}}))
    with Checkpoint.open(root, allow_pickle=True) as ckpt:
        assert torch.equal(ckpt.read("b"), torch.zeros(3))

    evil = tmp_path / "evil"
    evil.mkdir()
    torch.save({"a": torch.ones(1), "run": print}, evil / "pytorch_model.bin")  # not loadable weights-only
    with pytest.raises(CheckpointError, match="pytorch_model.bin"):
        Checkpoint.open(evil, allow_pickle=True)


def test_aux_files_and_check_finite(tmp_path: Path) -> None:
    root = tmp_path / "m"
    root.mkdir()
    save_file({"ok": torch.randn(300, 4), "bad": torch.tensor([[1.0, float("nan")], [0.0, 1.0]])},
              root / "model.safetensors")
    for name in ["tokenizer.json", "generation_config.json", "merges.txt", "random.txt"]:
        (root / name).write_text("{}")
    (tmp_path / "secret").write_text("x")
    (root / "vocab.json").symlink_to(tmp_path / "secret")
    with Checkpoint.open(root) as ckpt:
        assert sorted(p.name for p in ckpt.aux_files()) == ["generation_config.json", "merges.txt",
                                                            "tokenizer.json"]
        assert ckpt.check_finite("ok") and not ckpt.check_finite("bad")


# -- writer -------------------------------------------------------------------------------------------------------

def out_tensors(tensors: dict[str, torch.Tensor]) -> list[OutTensor]:
    return [OutTensor(n, tuple(t.shape), CODES[t.dtype]) for n, t in tensors.items()]


def write_all(writer: CheckpointWriter, tensors: dict[str, torch.Tensor], names=None, block: int = 4) -> None:
    for name in names or tensors:
        t = tensors[name]
        if t.dim() < 2:                        # a 0-d/1-d tensor is one row, written whole
            writer.write_rows(name, 0, t)
            continue
        for a in range(0, t.shape[0], block):
            writer.write_rows(name, a, t[a:a + block])


def test_plan_layout_shards() -> None:
    ts = [OutTensor("a", (10, 10), "F32"), OutTensor("b", (10,), "F32"), OutTensor("big", (100, 10), "F32"),
          OutTensor("c", (5,), "BF16")]
    layout = plan_layout(ts, 440)
    assert [s.filename for s in layout] == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    assert [[t.name for t, _ in s.tensors] for s in layout] == [["a", "b"], ["big"], ["c"]]
    assert [s.filename for s in plan_layout(ts, 10**9)] == ["model.safetensors"]
    for s in layout:
        assert len(s.header) % 8 == 0


def test_writer_output_loads_with_safetensors(tmp_path: Path) -> None:
    tensors = sample_tensors()
    out = tmp_path / "out"
    layout = plan_layout(out_tensors(tensors), 600)
    assert len(layout) > 1
    aux = tmp_path / "tokenizer.json"
    aux.write_text('{"t": 1}')
    with CheckpointWriter(out, layout) as w:
        write_all(w, tensors)
        w.finalize(config={"a": 1}, aux_files=[aux], extra_files={"README.md": b"hello"})
    assert sorted(os.listdir(tmp_path)) == ["out", "tokenizer.json"]  # nothing temporary left beside it
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(tensors)
    loaded = {}
    for fname in set(index["weight_map"].values()):
        with safe_open(out / fname, "pt") as f:
            assert {k for k, v in index["weight_map"].items() if v == fname} == set(f.keys())
        loaded.update(load_file(out / fname))
    assert set(loaded) == set(tensors)
    for name, t in tensors.items():
        assert loaded[name].dtype == t.dtype and torch.equal(loaded[name], t)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in loaded.values())
    assert json.loads((out / "config.json").read_text()) == {"a": 1}
    assert (out / "tokenizer.json").read_text() == '{"t": 1}' and (out / "README.md").read_bytes() == b"hello"
    assert set(os.listdir(out)) == {*index["weight_map"].values(), "model.safetensors.index.json", "config.json",
                                    "tokenizer.json", "README.md"}


def test_unaligned_layout_read_back(tmp_path: Path) -> None:
    """Our writer keeps the given order, so an F32 tensor can start at an odd offset; both readers cope."""
    tensors = {"odd": torch.randn(3).bfloat16(), "f": torch.randn(5, 3), "h": torch.randn(7).half()}
    out = tmp_path / "out"
    with CheckpointWriter(out, plan_layout(out_tensors(tensors), 10**6)) as w:
        write_all(w, tensors, block=2)
        w.finalize(config=None, aux_files=[], extra_files={})
    assert os.listdir(out) == ["model.safetensors"]
    ref = load_file(out / "model.safetensors")
    info = read_header(out / "model.safetensors")[0]
    assert info["f"].start % 4 != 0
    with ShardReader(out / "model.safetensors") as r:
        for name in tensors:
            assert torch.equal(ref[name], tensors[name])
            assert torch.equal(r.read(info[name], dtype=None), tensors[name])
        assert torch.equal(r.read(info["f"], (1, 4)), tensors["f"][1:4])


def test_concurrent_writes_any_order(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(1)
    tensors = {f"t{i}": torch.randn(64, 33, generator=g).bfloat16() for i in range(6)}
    out = tmp_path / "out"
    jobs = [(n, a) for n in tensors for a in range(0, 64, 8)]
    jobs = [jobs[i] for i in torch.randperm(len(jobs), generator=g).tolist()]
    with CheckpointWriter(out, plan_layout(out_tensors(tensors), 9000)) as w:
        with ThreadPoolExecutor(4) as pool:
            list(pool.map(lambda j: w.write_rows(j[0], j[1], tensors[j[0]][j[1]:j[1] + 8]), jobs))
        w.finalize(config=None, aux_files=[], extra_files={})
    index = json.loads((out / "model.safetensors.index.json").read_text())
    for name, fname in index["weight_map"].items():
        assert torch.equal(load_file(out / fname)[name], tensors[name])


def test_write_rows_rejects_wrong_dtype_and_shape(tmp_path: Path) -> None:
    with CheckpointWriter(tmp_path / "o", plan_layout([OutTensor("a", (4, 2), "BF16")], 10**6)) as w:
        with pytest.raises(ValueError, match="a"):
            w.write_rows("a", 0, torch.zeros(4, 2))
        with pytest.raises(ValueError, match="a"):
            w.write_rows("a", 3, torch.zeros(2, 2, dtype=torch.bfloat16))
        with pytest.raises(RuntimeError, match="incomplete"):
            w.finalize(config=None, aux_files=[], extra_files={})
    assert os.listdir(tmp_path) == []


def test_existing_output_refused_and_overwrite(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    tensors = {"a": torch.ones(2, 2)}
    layout = plan_layout(out_tensors(tensors), 10**6)
    with pytest.raises(OutputError, match=r"out.*--overwrite"):
        CheckpointWriter(out, layout).open()
    assert os.listdir(tmp_path) == ["out"]
    with CheckpointWriter(out, layout, overwrite=True) as w:
        write_all(w, tensors)
        w.finalize(config=None, aux_files=[], extra_files={})
    assert os.listdir(out) == ["model.safetensors"] and os.listdir(tmp_path) == ["out"]
    assert torch.equal(load_file(out / "model.safetensors")["a"], tensors["a"])


def test_lock_live_pid_refused_stale_taken_over(tmp_path: Path) -> None:
    layout = plan_layout([OutTensor("a", (2,), "F32")], 10**6)
    lock = tmp_path / ".out.lazymerge.lock"
    # a live process (it waits on its stdin until we close it, however long the test takes)
    sleeper = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    try:
        lock.write_text(f"{sleeper.pid}\n")
        with pytest.raises(OutputError, match=rf"another lazymerge run \(pid {sleeper.pid}\)"):
            CheckpointWriter(tmp_path / "out", layout).open()
        assert lock.read_text().strip() == str(sleeper.pid)
    finally:
        sleeper.kill()
        sleeper.wait()
        sleeper.stdin.close()
    w = CheckpointWriter(tmp_path / "out", layout)  # the owner is dead now: stale lock
    w.open()
    assert lock.read_text().strip() == str(os.getpid())
    with pytest.raises(OutputError, match="another lazymerge run"):
        CheckpointWriter(tmp_path / "out", layout).open()
    w.abort()
    assert os.listdir(tmp_path) == []


def test_disk_space_and_enospc(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil

    layout = plan_layout([OutTensor("a", (1000,), "F32")], 10**6)
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=100))
    with pytest.raises(OutputError, match=rf"{tmp_path.name}.*needs {layout[0].size} more bytes, 100 are free"):
        CheckpointWriter(tmp_path / "out", layout).open()
    monkeypatch.setattr(shutil, "disk_usage", real)
    assert os.listdir(tmp_path) == []

    def full(*a: object) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    with CheckpointWriter(tmp_path / "out", layout) as w:
        monkeypatch.setattr(os, "pwrite", full)
        with pytest.raises(OutputError, match=rf"disk full.*{layout[0].size} bytes"):
            w.write_rows("a", 0, torch.ones(1000))
        monkeypatch.undo()
    assert os.listdir(tmp_path) == []


def _crash_midway(tmp_path: Path, tensors: dict[str, torch.Tensor], layout, upto: int) -> None:
    w = CheckpointWriter(tmp_path / "out", layout)
    w.open()
    write_all(w, tensors, names=list(tensors)[:upto])
    w.abort(keep_partial=True)


def test_resume_keeps_completed_shard(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(3)
    tensors = {f"t{i}": torch.randn(16, 10, generator=g) for i in range(4)}
    layout = plan_layout(out_tensors(tensors), 1300)  # two tensors per shard
    assert len(layout) == 2
    _crash_midway(tmp_path, tensors, layout, upto=3)   # shard 1 complete, shard 2 half written
    first = tmp_path / ".out.lazymerge-tmp" / layout[0].filename
    inode = first.stat().st_ino

    w = CheckpointWriter(tmp_path / "out", layout, resume=True)
    w.open()
    assert w.completed_shards() == {layout[0].filename}
    assert w.tensors_done() == {"t0", "t1"}
    assert first.stat().st_ino == inode
    write_all(w, tensors, names=["t2", "t3"])
    w.finalize(config=None, aux_files=[], extra_files={})
    assert os.listdir(tmp_path) == ["out"]
    for s in layout:
        for name, t in load_file(tmp_path / "out" / s.filename).items():
            assert torch.equal(t, tensors[name])


def test_resume_detects_corrupted_shard_and_other_layout(tmp_path: Path) -> None:
    tensors = {f"t{i}": torch.full((16, 10), float(i)) for i in range(4)}
    layout = plan_layout(out_tensors(tensors), 1300)
    _crash_midway(tmp_path, tensors, layout, upto=3)
    first = tmp_path / ".out.lazymerge-tmp" / layout[0].filename
    with open(first, "r+b") as f:
        f.seek(first.stat().st_size - 3)
        f.write(b"\x99")
    w = CheckpointWriter(tmp_path / "out", layout, resume=True)
    w.open()
    assert w.completed_shards() == set() and w.tensors_done() == set()
    w.abort(keep_partial=True)

    _crash_midway(tmp_path, tensors, layout, upto=2)
    other = plan_layout(out_tensors(tensors), 10**6)
    w = CheckpointWriter(tmp_path / "out", other, resume=True)
    w.open()
    assert w.tensors_done() == set()
    assert sorted(os.listdir(tmp_path / ".out.lazymerge-tmp")) == ["journal.json", "model.safetensors"]
    w.abort()
    assert os.listdir(tmp_path) == []


def test_exception_in_context_removes_everything(tmp_path: Path) -> None:
    layout = plan_layout([OutTensor("a", (2,), "F32")], 10**6)
    with pytest.raises(KeyError):
        with CheckpointWriter(tmp_path / "out", layout):
            raise KeyError("boom")
    assert os.listdir(tmp_path) == []


def test_sigkill_leaves_no_output_then_resume(tmp_path: Path) -> None:
    """A run killed mid-write leaves no output directory; a resumed run completes it."""
    script = textwrap.dedent(f"""
        import os, signal, torch
        from lazymerge.io.writer import CheckpointWriter, OutTensor, plan_layout
        ts = [OutTensor(f"t{{i}}", (16, 10), "F32") for i in range(4)]
        w = CheckpointWriter({str(tmp_path / 'out')!r}, plan_layout(ts, 1300))
        w.open()
        for i in range(3):
            w.write_rows(f"t{{i}}", 0, torch.full((16, 10), float(i)))
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=Path(__file__).parent.parent)
    assert proc.returncode == -9
    assert not (tmp_path / "out").exists()
    tensors = {f"t{i}": torch.full((16, 10), float(i)) for i in range(4)}
    layout = plan_layout(out_tensors(tensors), 1300)
    with CheckpointWriter(tmp_path / "out", layout, resume=True) as w:
        assert w.tensors_done() == {"t0", "t1"}
        write_all(w, tensors, names=["t2", "t3"], block=16)
        w.finalize(config=None, aux_files=[], extra_files={})
    assert os.listdir(tmp_path) == ["out"]
    assert torch.equal(load_file(tmp_path / "out" / layout[0].filename)["t1"], tensors["t1"])


@pytest.mark.parametrize("text,expected", [("2GB", 2 * 10**9), ("2GiB", 2 << 30), ("500MB", 500 * 10**6),
                                           ("1.5G", 3 << 29), ("4096", 4096), (123, 123), ("10kb", 10**4)])
def test_parse_size(text: str | int, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "GB", "2XB", "-1GB", "0", "1.2.3G"])
def test_parse_size_invalid(text: str) -> None:
    with pytest.raises(ValueError, match="size"):
        parse_size(text)


def test_shard_checksum_from_memory_matches_the_file(tmp_path: Path, monkeypatch) -> None:
    """The journal's checksum comes from the bytes as they are written (in any order), never from reading the
    shard back (a second read of the whole output); a resume recomputes the same digest from the file."""
    import lazymerge.io.writer as W
    g = torch.Generator().manual_seed(5)
    t = torch.randn(40, 6, generator=g)
    layout = plan_layout(out_tensors({"t": t}), 10**6)
    w = CheckpointWriter(tmp_path / "out", layout)
    w.open()
    real_open = open
    def no_read_back(path, mode="r", *a, **k):
        assert not (str(path).endswith(".safetensors") and "r" in mode and "+" not in mode), "read back"
        return real_open(path, mode, *a, **k)
    monkeypatch.setattr("builtins.open", no_read_back)
    for a in (30, 10, 0, 20):              # out of order, as the scheduler may write them
        w.write_rows("t", a, t[a:a + 10].clone())
    monkeypatch.undo()
    rec = json.loads((tmp_path / ".out.lazymerge-tmp" / "journal.json").read_text())["shards"][layout[0].filename]
    assert [p[0] for p in rec["pieces"]] == sorted(p[0] for p in rec["pieces"]) and len(rec["pieces"]) == 5
    shard = tmp_path / ".out.lazymerge-tmp" / layout[0].filename
    assert W._file_digest(shard, rec["pieces"]) == rec["sha256"]
    assert rec["sha256"] != W._file_digest(shard, [[0, layout[0].size]])    # boundaries are part of it
    w.finalize(config=None, aux_files=[], extra_files={})
    assert torch.equal(load_file(tmp_path / "out" / layout[0].filename)["t"], t)
