"""The output directory is a well-formed Hugging Face checkpoint: sharded safetensors + index, config.json with the
output dtype, tokenizer files copied, lazymerge's report and recipe; inputs are left untouched."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open

from conftest import AUX_FILES, llama_shapes, plain_recipe, read_all, read_all_f32

ST_DTYPES = {"float32": ("F32", torch.float32, 4), "bfloat16": ("BF16", torch.bfloat16, 2),
             "float16": ("F16", torch.float16, 2)}


def _lm():
    import lazymerge

    return lazymerge


def tree_hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(root).rglob("*")) if p.is_file()}


def check_layout(out: Path, st_code: str, torch_dtype: torch.dtype, itemsize: int) -> dict:
    index = json.loads((out / "model.safetensors.index.json").read_text())
    wm = index["weight_map"]
    shapes = llama_shapes()
    # every tensor listed exactly once (a JSON object cannot repeat keys silently: check the raw text too)
    assert sorted(wm) == sorted(shapes)
    raw = (out / "model.safetensors.index.json").read_text()
    for n in shapes:
        assert raw.count(f'"{n}"') == 1, f"{n} listed more than once in the index"
    files = sorted(set(wm.values()))
    n_files = len(files)
    for f in files:
        assert (out / f).is_file(), f"{f} listed in the index but missing"
    # HF shard names
    if n_files > 1:
        assert files == [f"model-{i:05d}-of-{n_files:05d}.safetensors" for i in range(1, n_files + 1)]
    # every tensor in the file the index says, nothing else in any file
    seen: dict[str, str] = {}
    total = 0
    for f in files:
        with safe_open(str(out / f), framework="pt") as sf:
            for n in sf.keys():
                assert n not in seen, f"{n} stored in both {seen[n]} and {f}"
                seen[n] = f
                t = sf.get_tensor(n)
                assert tuple(t.shape) == shapes[n], n
                assert t.dtype == torch_dtype, f"{n}: {t.dtype}"
                total += t.numel() * t.element_size()
    assert seen == wm
    assert index["metadata"]["total_size"] == total
    assert total == sum(itemsize * int(torch.tensor(s).prod()) for s in shapes.values())
    # the raw header dtype codes
    for f in files:
        with open(out / f, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(n))
        for k, v in header.items():
            if k != "__metadata__":
                assert v["dtype"] == st_code, f"{f}:{k} dtype {v['dtype']}"
    return index


@pytest.mark.parametrize("out_dtype", ["float32", "bfloat16"])
def test_sharded_output_round_trips(models_fp32, tmp_path, out_dtype):
    m = models_fp32
    before = {k: tree_hashes(p) for k, p in m.items()}
    recipe = {
        "merge_method": "ties",
        "base_model": m["base"],
        "models": [{"model": m["ft1"], "parameters": {"weight": 0.5, "density": 0.5}},
                   {"model": m["ft2"], "parameters": {"weight": 0.5, "density": 0.5}}],
        "dtype": "float32",
        "out_dtype": out_dtype,
    }
    out = tmp_path / "out"
    report = _lm().merge(plain_recipe(recipe), out, shard_size="20KB", seed=0)
    st_code, tdtype, itemsize = ST_DTYPES[out_dtype]
    index = check_layout(out, st_code, tdtype, itemsize)
    n_files = len(set(index["weight_map"].values()))
    # ~118 KB of float32 (59 KB bf16) in 20 KB shards: several shards (a single tensor may exceed a shard)
    assert n_files >= 3, f"only {n_files} shard(s) for shard_size=20KB"

    cfg = json.loads((out / "config.json").read_text())
    assert cfg["torch_dtype"] == out_dtype
    assert cfg["architectures"] == ["LlamaForCausalLM"]
    assert cfg["hidden_size"] == 32 and cfg["num_hidden_layers"] == 2

    # tokenizer and generation config copied byte for byte from the base model
    for f in AUX_FILES:
        assert (out / f).is_file(), f"{f} not copied"
        assert (out / f).read_bytes() == (m["base"] / f).read_bytes(), f"{f} not the base model's"

    rep = json.loads((out / "lazymerge_report.json").read_text())
    assert isinstance(rep, dict)
    saved = yaml.safe_load((out / "lazymerge_recipe.yaml").read_text())
    assert saved["merge_method"] == "ties"

    n_tensors = report.tensors if isinstance(report.tensors, int) else len(report.tensors)
    assert n_tensors == len(llama_shapes())
    assert report.bytes_written >= index["metadata"]["total_size"]
    assert report.bytes_read > 0

    # no temporary leftovers next to the output
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != "out"]
    assert leftovers == [], f"left behind: {leftovers}"

    # inputs unmodified
    assert {k: tree_hashes(p) for k, p in m.items()} == before

    # values survive the round trip (compared in float32 against the unsharded read of the same output)
    vals = read_all_f32(out)
    assert set(vals) == set(llama_shapes())
    assert all(bool(torch.isfinite(v).all()) for v in vals.values())


def test_tokenizer_source_model(models_fp32, tmp_path):
    m = models_fp32
    before = {k: tree_hashes(p) for k, p in m.items()}
    recipe = {
        "merge_method": "linear",
        "base_model": m["base"],
        "models": [{"model": m["ft1"], "parameters": {"weight": 0.5}},
                   {"model": m["ft2"], "parameters": {"weight": 0.5}}],
        "tokenizer_source": m["ft2"],
        "dtype": "float32",
    }
    out = tmp_path / "out"
    _lm().merge(plain_recipe(recipe), out, shard_size="20KB", seed=0)
    check_layout(out, "F32", torch.float32, 4)
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        assert (out / f).read_bytes() == (m["ft2"] / f).read_bytes(), f"{f} not taken from tokenizer_source"
    assert json.loads((out / "tokenizer_config.json").read_text())["name_or_path"] == "tiny-llama-ft2"
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "float32"
    assert {k: tree_hashes(p) for k, p in m.items()} == before


def test_single_shard_when_it_fits(models_bf16, tmp_path):
    m = models_bf16
    recipe = {
        "merge_method": "slerp",
        "base_model": m["base"],
        "models": [{"model": m["base"]}, {"model": m["ft1"]}],
        "parameters": {"t": 0.5},
        "dtype": "bfloat16",
    }
    out = tmp_path / "out"
    _lm().merge(plain_recipe(recipe), out, seed=0)      # default shard_size 5GB
    st_files = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(st_files) == 1, st_files
    # whether or not an index is written for one shard, every tensor must be readable and bf16
    vals = read_all(out)
    assert set(vals) == set(llama_shapes())
    assert all(v.dtype == torch.bfloat16 for v in vals.values())
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    for f in AUX_FILES:
        assert (out / f).read_bytes() == (m["base"] / f).read_bytes(), f
