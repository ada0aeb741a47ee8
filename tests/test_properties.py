"""Property tests: untrusted bytes and YAML never produce anything but a result or a clean, one-line error.

- the safetensors header reader (`read_header`) on random bytes, on a valid length prefix + random JSON, and on
  random tensor entries; whatever it accepts must be safe to read (no byte outside the file, no overlap);
- the checkpoint index reader (`Checkpoint.open`) on random `weight_map`s, including escaping paths;
- the recipe parser on random text, random YAML token soup (tags, anchors, aliases) and random structured recipes:
  `parse_recipe` and the path `lazymerge.plan` takes (`stages.resolve_stages`: every `---` document, the stage
  graph), including multi-stage recipes whose stages refer to each other.

Example counts are bounded so the file runs in well under 20 s; no example database is written.
"""
from __future__ import annotations

import datetime
import json
import os
import shutil
import struct
import tempfile
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from lazymerge.errors import CheckpointError, LazyMergeError, RecipeError
from lazymerge.io.checkpoint import Checkpoint
from lazymerge.dtypes import DTYPES
from lazymerge.io.shards import ShardReader, read_header
from lazymerge.planner.recipe import TOP_KEYS, Recipe, parse_recipe
from lazymerge.planner.stages import resolve_stages

SETTINGS = dict(deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow,
                                                                    HealthCheck.function_scoped_fixture])
WORK = Path(tempfile.mkdtemp(prefix="lazymerge-props-"))


@pytest.fixture(scope="module", autouse=True)
def _cleanup():
    yield
    shutil.rmtree(WORK, ignore_errors=True)


def one_line(exc: BaseException) -> str:
    msg = str(exc)
    assert msg and len(msg.splitlines()) == 1, repr(msg)
    return msg


# ---------------------------------------------------------------------------------------------------------------
# safetensors headers
# ---------------------------------------------------------------------------------------------------------------
def check_file(raw: bytes) -> None:
    path = WORK / "fuzz.safetensors"
    path.write_bytes(raw)
    try:
        tensors, metadata = read_header(path)
    except CheckpointError as exc:
        assert str(path) in one_line(exc)
        event("refused")
        return
    event(f"accepted, {min(len(tensors), 2)}+ tensors")
    # accepted: every tensor lies inside the file, sizes agree with dtype x shape, no two overlap
    size = len(raw)
    spans = []
    for name, info in tensors.items():
        assert isinstance(name, str) and info.dtype in DTYPES
        assert info.nbytes == info.numel * info.itemsize
        assert 8 <= info.start and info.start + info.nbytes <= size
        if info.nbytes:
            spans.append((info.start, info.start + info.nbytes))
    spans.sort()
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())
    with ShardReader(path) as reader:          # and reading it never touches a byte outside the file
        for info in tensors.values():
            t = reader.read(info, dtype=None)
            assert t.numel() == info.numel


@settings(max_examples=150, **SETTINGS)
@given(st.binary(max_size=300))
def test_random_bytes(raw: bytes) -> None:
    check_file(raw)


@settings(max_examples=150, **SETTINGS)
@given(st.integers(min_value=0, max_value=2**64 - 1), st.binary(max_size=200))
def test_random_length_prefix(n: int, rest: bytes) -> None:
    check_file(struct.pack("<Q", n) + rest)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=True) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12,
)


@settings(max_examples=100, **SETTINGS)
@given(json_values, st.binary(max_size=64))
def test_random_json_header(header: object, data: bytes) -> None:
    text = json.dumps(header).encode()
    check_file(struct.pack("<Q", len(text)) + text + data)


dims = st.integers(min_value=-2, max_value=6) | st.sampled_from([2**40, 2**63, 2**64 + 1]) | json_values
entries = st.fixed_dictionaries({}, optional={
    "dtype": st.sampled_from(sorted(DTYPES) + ["F128", "", "f32"]) | json_values,
    "shape": st.lists(dims, max_size=3) | json_values,
    "data_offsets": st.lists(st.integers(min_value=-4, max_value=80), min_size=0, max_size=3) | json_values,
})


@settings(max_examples=150, **SETTINGS)
@given(st.dictionaries(st.sampled_from(["a", "b", "c", "__metadata__", ""]), entries, max_size=4),
       st.integers(min_value=0, max_value=96), st.integers(min_value=0, max_value=7))
def test_random_tensor_entries(header: dict, data_len: int, pad: int) -> None:
    """Entries close to valid ones, so that many are accepted and the read-back invariants really run."""
    text = json.dumps(header).encode() + b" " * pad
    check_file(struct.pack("<Q", len(text)) + text + bytes(range(256))[:data_len] * 1)


@st.composite
def near_valid_files(draw: st.DrawFn) -> bytes:
    """Headers laid out the way writers do, then nudged: an offset off by a few bytes, a dtype swapped, the data
    section a little short or long. Most are refused, many are accepted, and the boundary is what is tested."""
    n = draw(st.integers(min_value=1, max_value=4))
    header: dict[str, object] = {}
    offset = 0
    for i in range(n):
        dtype = draw(st.sampled_from(sorted(DTYPES)))
        shape = draw(st.lists(st.integers(min_value=0, max_value=4), max_size=3))
        size = DTYPES[dtype][1]
        for d in shape:
            size *= d
        nudge = draw(st.sampled_from([0] * 8 + [-3, -1, 1, 2, size, -size]))
        begin = max(0, offset + (nudge if draw(st.booleans()) else 0))
        end = begin + size + (0 if draw(st.integers(0, 9)) else draw(st.integers(-2, 2)))
        if draw(st.integers(0, 9)) == 0:
            dtype = draw(st.sampled_from(sorted(DTYPES)))
        header[f"t{i}"] = {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}
        offset = max(offset, end)
    if draw(st.booleans()):
        header["__metadata__"] = {"format": "pt"}
    text = json.dumps(header).encode() + b" " * draw(st.integers(0, 7))
    data_len = max(0, offset + draw(st.sampled_from([0] * 6 + [-1, -4, 1, 16])))
    return struct.pack("<Q", len(text)) + text + bytes(i % 251 for i in range(data_len))


@settings(max_examples=200, **SETTINGS)
@given(near_valid_files())
def test_near_valid_files(raw: bytes) -> None:
    check_file(raw)


# ---------------------------------------------------------------------------------------------------------------
# checkpoint indexes
# ---------------------------------------------------------------------------------------------------------------
SHARD = "model-00001-of-00001.safetensors"
shard_names = st.sampled_from([SHARD] * 12 + ["missing.safetensors", "../outside.safetensors", "/etc/passwd",
                               "sub/../" + SHARD, "./" + SHARD, "link.safetensors", "", ".", "..",
                               "C:\\x.safetensors", "\\\\server\\share"]) | json_values


@settings(max_examples=150, **SETTINGS)
@given(st.dictionaries(st.sampled_from(["a", "b"] * 4 + ["c", "zz"]), shard_names, max_size=3) | json_values,
       st.booleans())
def test_random_index(weight_map: object, wrap: bool) -> None:
    root = WORK / "model"
    if not root.exists():
        root.mkdir()
        save_file({"a": torch.zeros(2), "b": torch.ones(3)}, root / SHARD)
        save_file({"x": torch.zeros(1)}, WORK / "outside.safetensors")
        (root / "link.safetensors").symlink_to(WORK / "outside.safetensors")
    index = {"metadata": {}, "weight_map": weight_map} if wrap else weight_map
    (root / "model.safetensors.index.json").write_text(json.dumps(index))
    try:
        ckpt = Checkpoint.open(root)
    except CheckpointError as exc:
        one_line(exc)
        event("refused")
        return
    event("accepted")
    with ckpt:
        for info in ckpt.tensors.values():       # accepted: every file is inside the model directory
            assert info.file.resolve().parent == root.resolve()
            ckpt.read(info.name)


# ---------------------------------------------------------------------------------------------------------------
# recipes
# ---------------------------------------------------------------------------------------------------------------
PLAIN = (dict, list, str, int, float, bool, type(None), bytes, datetime.date, datetime.datetime, set)


def plain(value: object) -> bool:
    """SafeLoader output only: no object a tag could have constructed."""
    if isinstance(value, dict):
        return all(plain(k) and plain(v) for k, v in value.items())
    if isinstance(value, (list, set, tuple)):
        return all(plain(v) for v in value)
    return isinstance(value, PLAIN)


def check_recipe(text: str) -> None:
    """Both entry points: `parse_recipe` (one document, `yaml.load`) and the path `lazymerge.plan` really takes,
    `stages.resolve_stages` (`read_documents`: every `---` document, `yaml.load_all`, then the stage graph)."""
    text = text if "\n" in text else text + "\n"
    try:
        r = parse_recipe(text)
    except RecipeError as exc:
        one_line(exc)
        event("refused")
    else:
        event("accepted")
        assert isinstance(r, Recipe) and isinstance(r.merge_method, str)
        assert plain(r.raw)
    check_stages(text)


def check_stages(recipe: object, stage: str | None = None) -> None:
    try:
        chain = resolve_stages(recipe, stage)
    except RecipeError as exc:
        one_line(exc)
        event("stages refused")
        return
    event(f"stages accepted ({min(len(chain), 3)}{'+' if len(chain) > 2 else ''})")
    assert chain and all(isinstance(r, Recipe) and plain(r.raw) for r in chain)
    names = [r.name for r in chain]
    assert len(set(names)) == len(names), names                 # each stage once, dependencies first


@settings(max_examples=200, **SETTINGS)
@given(st.text(max_size=200))
def test_random_text_recipe(text: str) -> None:
    check_recipe(text)


TOKENS = ["merge_method", "models", "model", "parameters", "base_model", "dtype", "slices", "weight", "density",
          "ties", "linear", "./m", ": ", ":", "- ", "-", "\n", "  ", "    ", "[", "]", "{", "}", ",", "'", '"',
          "&a ", "*a", "&b ", "*b", "<<: ", "!!python/object/apply:os.system ", "!!python/name:os.system ",
          "!!python/object:__main__.X ", "!!binary ", "!!set ", "!!timestamp ", "!!float ", "!!int ", "!!str ",
          "!!map ", "!!seq ", "!foo ", "!<tag:x> ", "? ", "---\n", "...\n", "%YAML 1.1\n", "%TAG ! !!\n", "|", ">",
          "#", "0.5", "1e999", "-.inf", ".nan", "null", "~", "yes", "0x1F", "2001-12-14", "\t", "\x00", "\u2028",
          "é"]


@settings(max_examples=200, **SETTINGS)
@given(st.lists(st.sampled_from(TOKENS), max_size=40))
def test_yaml_token_soup(tokens: list[str]) -> None:
    check_recipe("".join(tokens))


scalars = st.none() | st.booleans() | st.integers(-10, 10) | st.floats(allow_nan=True) | st.text(max_size=6) \
    | st.sampled_from(["ties", "linear", "slerp", "./m", "bfloat16", "float8"])
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3)
                      | st.dictionaries(st.sampled_from(["model", "parameters", "weight", "density", "filter",
                                                         "value", "t", "x"]) | st.text(max_size=4),
                                        inner, max_size=3), max_leaves=10)


model_entries = st.fixed_dictionaries({"model": st.sampled_from(["./a", "./b"]) | scalars},
                                      optional={"parameters": values, "modle": values}) | scalars
recipes = st.fixed_dictionaries(
    {"merge_method": st.sampled_from(["ties", "linear", "slerp"]) | scalars,
     "models": st.lists(model_entries, max_size=3) | values},
    optional={k: values for k in TOP_KEYS if k not in ("merge_method", "models")} | {"paramters": values},
)


@settings(max_examples=200, **SETTINGS)
@given(recipes | st.dictionaries(st.sampled_from(list(TOP_KEYS) + ["paramters", "modles", "x"])
                                 | st.text(max_size=5), values, max_size=6),
       st.booleans())
def test_structured_random_recipe(data: dict, flow: bool) -> None:
    try:
        text = yaml.safe_dump(data, default_flow_style=flow, allow_unicode=True)
    except yaml.YAMLError:
        return
    check_recipe(text)
    # the same data given as a mapping takes the same path minus YAML
    try:
        parse_recipe(data)
    except LazyMergeError as exc:
        one_line(exc)


_names = st.sampled_from(["a", "b", "c", "./m"])
stage_names = st.one_of(_names, _names, _names, _names, scalars)
stage_docs = st.fixed_dictionaries(
    {"merge_method": st.sampled_from(["linear", "ties", "slerp", "passthrough"]),
     "models": st.lists(st.fixed_dictionaries({"model": stage_names | st.sampled_from(["./m", "a+./ad"])},
                                              optional={"parameters": values}) | stage_names, max_size=3)},
    optional={"name": stage_names, "base_model": stage_names, "dtype": st.sampled_from(["bfloat16", "x"]) | values,
              "tokenizer_source": st.sampled_from(["base", "union"]) | stage_names})


@settings(max_examples=200, **SETTINGS)
@given(st.lists(st.one_of(stage_docs, stage_docs, stage_docs, values), min_size=1, max_size=4),
       st.sampled_from([None, "a", "b", "zzz"]),
       st.booleans())
def test_structured_multi_stage_recipe(docs: list, stage: str | None, flow: bool) -> None:
    """Multi-document recipes with stage names referring to each other (cycles, duplicates, unknown stages)
    through the real path: YAML text with `---` documents, and the same documents as a list."""
    try:
        text = yaml.safe_dump_all(docs, default_flow_style=flow, allow_unicode=True)
    except yaml.YAMLError:
        return
    check_stages(text, stage)
    try:
        resolve_stages(docs, stage)
    except LazyMergeError as exc:
        one_line(exc)


@pytest.mark.parametrize("text", [
    "merge_method: !!python/object/apply:os.system ['touch PWNED']\n",
    "merge_method: ties\nmodels: !!python/object/new:subprocess.Popen [['touch', 'PWNED']]\n",
    "a: &x [1]\nb: *x\n",
])
def test_constructing_yaml_never_runs(text: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(RecipeError):
        parse_recipe(text)
    with pytest.raises(RecipeError):
        resolve_stages("merge_method: linear\nname: s\nmodels: [./m]\n---\n" + text)
    assert not (tmp_path / "PWNED").exists()
    assert os.listdir(tmp_path) == []
