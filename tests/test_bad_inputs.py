"""Bad inputs, table-driven: each case makes its own broken file / recipe / output and runs `lazymerge run`.

For every case the user must see exactly one `error: ...` line naming the file, tensor or key, a non-zero exit
status and no traceback; and nothing on disk may change: no output or temporary directory, no lock file left
behind, and the inputs byte-for-byte as they were (a snapshot of every file under the case's directory and of the
shared input models is compared before and after).

The table runs in-process through click's CliRunner (fast); a representative subset runs again through the real
entry point in subprocesses (`python -m lazymerge.cli`), where a traceback would really reach the terminal.
"""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import struct
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from conftest import SHARD_NAMES, write_recipe
from lazymerge.cli import main

REPO = Path(__file__).resolve().parent.parent
S1, S2 = SHARD_NAMES
NORM0 = "model.layers.0.input_layernorm.weight"      # (32,) F32 in shard 1
NORM0B = "model.layers.0.post_attention_layernorm.weight"
Q0 = "model.layers.0.self_attn.q_proj.weight"


# ---------------------------------------------------------------------------------------------------------------
# helpers to break things
# ---------------------------------------------------------------------------------------------------------------
class Ctx:
    """One case's world: its own directory, the shared (read-only) models, and helpers to make broken copies."""

    def __init__(self, tmp: Path, models: dict[str, Path]) -> None:
        self.tmp = tmp
        self.m = models
        self.out = tmp / "out"

    def clone(self, name: str = "ft1") -> Path:
        dst = self.tmp / f"{name}-copy"
        if not dst.exists():
            shutil.copytree(self.m[name], dst)
        return dst

    def recipe(self, ft1: Path | None = None, ft2: Path | None = None, **ft1_params: object) -> Path:
        rec = {
            "merge_method": "ties",
            "base_model": str(self.m["base"]),
            "models": [
                {"model": str(ft1 or self.m["ft1"]), "parameters": {"weight": 0.5, "density": 0.5, **ft1_params}},
                {"model": str(ft2 or self.m["ft2"]), "parameters": {"weight": 0.5, "density": 0.5}},
            ],
        }
        return write_recipe(self.tmp, rec)

    def text_recipe(self, text: str) -> Path:
        p = self.tmp / "recipe.yaml"
        p.write_text(text)
        return p

    def run(self, recipe: Path, *extra: str) -> list[str]:
        return ["run", str(recipe), str(self.out), "-q", *extra]

    def broken_ft1(self, fn: Callable[[Path], None]) -> list[str]:
        """Clone ft1, apply fn to the clone, and merge with it."""
        ft = self.clone()
        fn(ft)
        return self.run(self.recipe(ft1=ft))


def split(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def join(path: Path, header: dict | bytes, data: bytes, n: int | None = None) -> None:
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text) if n is None else n) + text + data)


def edit_header(shard: str, fn: Callable[[dict], object]) -> Callable[[Path], None]:
    def apply(model: Path) -> None:
        header, data = split(model / shard)
        fn(header)
        join(model / shard, header, data)
    return apply


def set_entry(name: str, key: str, value: object) -> Callable[[dict], None]:
    return lambda h: h[name].__setitem__(key, value)


def edit_index(fn: Callable[[dict], object]) -> Callable[[Path], None]:
    def apply(model: Path) -> None:
        p = model / "model.safetensors.index.json"
        data = json.loads(p.read_text())
        fn(data)
        p.write_text(json.dumps(data))
    return apply


def edit_tensors(shard: str, fn: Callable[[dict], object]) -> Callable[[Path], None]:
    def apply(model: Path) -> None:
        tensors = load_file(model / shard)
        fn(tensors)
        save_file(tensors, model / shard, metadata={"format": "pt"})
    return apply


def outside_file(ctx: Ctx) -> Path:
    """A perfectly valid safetensors file outside the model directory (what an escaping index points at)."""
    d = ctx.tmp / "elsewhere"
    d.mkdir(exist_ok=True)
    shutil.copy(ctx.m["ft2"] / S1, d / "secret.safetensors")
    return d / "secret.safetensors"


class Evil:
    """Unpickling this runs a shell command: what a malicious pytorch_model.bin does under plain torch.load."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


# ---------------------------------------------------------------------------------------------------------------
# the cases
# ---------------------------------------------------------------------------------------------------------------
def c_truncated(ctx: Ctx) -> list[str]:
    def cut(m: Path) -> None:
        raw = (m / S1).read_bytes()
        (m / S1).write_bytes(raw[:len(raw) * 2 // 3])
    return ctx.broken_ft1(cut)


def c_empty_shard(ctx: Ctx) -> list[str]:
    return ctx.broken_ft1(lambda m: (m / S1).write_bytes(b""))


def c_header_past_eof(ctx: Ctx) -> list[str]:
    def grow(m: Path) -> None:
        header, data = split(m / S1)
        join(m / S1, header, data, n=(m / S1).stat().st_size + 100)
    return ctx.broken_ft1(grow)


def c_header_absurd(ctx: Ctx) -> list[str]:
    return ctx.broken_ft1(lambda m: join(m / S1, b"{}", b"", n=2**63))


def c_header_not_json(ctx: Ctx) -> list[str]:
    return ctx.broken_ft1(lambda m: join(m / S1, b"this is not json at all!", split(m / S1)[1]))


def c_header_not_utf8(ctx: Ctx) -> list[str]:
    return ctx.broken_ft1(lambda m: join(m / S1, b'{"\xff\xfe": 1}  ', split(m / S1)[1]))


def c_header_list(ctx: Ctx) -> list[str]:
    return ctx.broken_ft1(lambda m: join(m / S1, b"[1, 2, 3]", split(m / S1)[1]))


def c_header_nested(ctx: Ctx) -> list[str]:
    return ctx.broken_ft1(lambda m: join(m / S1, b"[" * 200_000 + b"]" * 200_000, b""))


def c_offsets_past_eof(ctx: Ctx) -> list[str]:
    def move(h: dict) -> None:
        size = max(e["data_offsets"][1] for k, e in h.items() if k != "__metadata__")
        h[NORM0]["data_offsets"] = [size, size + 128]
    return ctx.broken_ft1(edit_header(S1, move))


def c_offsets_overlap(ctx: Ctx) -> list[str]:
    return ctx.broken_ft1(edit_header(S1, lambda h: h[NORM0B].__setitem__("data_offsets",
                                                                          list(h[NORM0]["data_offsets"]))))


def relayout(last: str, gap: int = 0, trailing: int = 0) -> Callable[[Path], None]:
    """Rewrite shard 1 by hand (header JSON + bytes) with tensor `last` moved to the end of the data section,
    `gap` junk bytes just before it and `trailing` junk bytes after it; every other tensor stays contiguous.
    Each tensor's own bytes stay intact: only the tiling of the data section is broken."""
    def apply(model: Path) -> None:
        header, data = split(model / S1)
        meta = header.pop("__metadata__", None)
        order = sorted((k for k in header if k != last), key=lambda k: header[k]["data_offsets"][0]) + [last]
        out = bytearray()
        for k in order:
            a, b = header[k]["data_offsets"]
            if k == last:
                out += b"\xab" * gap
            header[k]["data_offsets"] = [len(out), len(out) + b - a]
            out += data[a:b]
        out += b"\xcd" * trailing
        join(model / S1, {**({"__metadata__": meta} if meta else {}), **header}, bytes(out))
    return apply


def c_offsets_hole(ctx: Ctx) -> list[str]:
    return ctx.broken_ft1(relayout(NORM0, gap=16))


def c_trailing_bytes(ctx: Ctx) -> list[str]:
    return ctx.broken_ft1(relayout(NORM0, trailing=8))


def c_offsets_reversed(ctx: Ctx) -> list[str]:
    return ctx.broken_ft1(edit_header(S1, lambda h: h[NORM0].__setitem__(
        "data_offsets", list(reversed(h[NORM0]["data_offsets"])))))


def c_offsets_negative(ctx: Ctx) -> list[str]:
    return ctx.broken_ft1(edit_header(S1, set_entry(NORM0, "data_offsets", [-128, 0])))


def c_dtype_contradicts_size(ctx: Ctx) -> list[str]:
    return ctx.broken_ft1(edit_header(S1, set_entry(NORM0, "dtype", "BF16")))


def c_dtype_unknown(ctx: Ctx) -> list[str]:
    return ctx.broken_ft1(edit_header(S1, set_entry(NORM0, "dtype", "F128")))


def c_dtype_not_string(ctx: Ctx) -> list[str]:
    return ctx.broken_ft1(edit_header(S1, set_entry(NORM0, "dtype", ["F32"])))


def c_shape_negative(ctx: Ctx) -> list[str]:
    return ctx.broken_ft1(edit_header(S1, set_entry(NORM0, "shape", [-32])))


def c_duplicate_key(ctx: Ctx) -> list[str]:
    def dup(m: Path) -> None:
        header, data = split(m / S1)
        text = json.dumps(header)[:-1] + f", {json.dumps(NORM0)}: {json.dumps(header[NORM0B])}}}"
        join(m / S1, text.encode(), data)
    return ctx.broken_ft1(dup)


def c_metadata_not_strings(ctx: Ctx) -> list[str]:
    return ctx.broken_ft1(edit_header(S1, lambda h: h.__setitem__("__metadata__", {"format": 1})))


def c_entry_not_object(ctx: Ctx) -> list[str]:
    return ctx.broken_ft1(edit_header(S1, lambda h: h.__setitem__(NORM0, 5)))


def c_control_chars_in_name(ctx: Ctx) -> list[str]:
    def rename(h: dict) -> None:
        h["evil\x1b[2J\nname"] = {**h.pop(NORM0), "dtype": "F128"}
    return ctx.broken_ft1(edit_header(S1, rename))


def c_index_missing_shard(ctx: Ctx) -> list[str]:
    return ctx.broken_ft1(edit_index(lambda d: d["weight_map"].__setitem__(
        Q0, "model-00009-of-00009.safetensors")))


def c_index_dotdot(ctx: Ctx) -> list[str]:
    outside_file(ctx)
    return ctx.broken_ft1(edit_index(lambda d: d["weight_map"].__setitem__(Q0, "../elsewhere/secret.safetensors")))


def c_index_absolute(ctx: Ctx) -> list[str]:
    secret = outside_file(ctx)
    return ctx.broken_ft1(edit_index(lambda d: d["weight_map"].__setitem__(Q0, str(secret))))


def c_index_symlink_out(ctx: Ctx) -> list[str]:
    secret = outside_file(ctx)

    def link(m: Path) -> None:
        (m / "innocent.safetensors").symlink_to(secret)
        edit_index(lambda d: d["weight_map"].__setitem__(Q0, "innocent.safetensors"))(m)
    return ctx.broken_ft1(link)


def c_unindexed_symlink_out(ctx: Ctx) -> list[str]:
    secret = outside_file(ctx)

    def link(m: Path) -> None:
        (m / "model.safetensors.index.json").unlink()
        (m / "model-00003-of-00003.safetensors").symlink_to(secret)
    return ctx.broken_ft1(link)


def c_index_not_json(ctx: Ctx) -> list[str]:
    return ctx.broken_ft1(lambda m: (m / "model.safetensors.index.json").write_text("{'weight_map': "))


def c_index_no_weight_map(ctx: Ctx) -> list[str]:
    return ctx.broken_ft1(edit_index(lambda d: d.pop("weight_map")))


def c_index_value_not_string(ctx: Ctx) -> list[str]:
    return ctx.broken_ft1(edit_index(lambda d: d["weight_map"].__setitem__(Q0, [S1])))


def c_index_wrong_shard(ctx: Ctx) -> list[str]:
    return ctx.broken_ft1(edit_index(lambda d: d["weight_map"].__setitem__(Q0, S2)))


def c_tensor_in_two_shards(ctx: Ctx) -> list[str]:
    def dup(m: Path) -> None:
        q = load_file(m / S1)[Q0]
        edit_tensors(S2, lambda t: t.__setitem__(Q0, q))(m)
    return ctx.broken_ft1(dup)


def c_model_missing(ctx: Ctx) -> list[str]:
    return ctx.run(ctx.recipe(ft1=ctx.tmp / "no-such-model"))


def c_model_is_file(ctx: Ctx) -> list[str]:
    f = ctx.tmp / "a-file"
    f.write_text("hello")
    return ctx.run(ctx.recipe(ft1=f))


def c_model_empty(ctx: Ctx) -> list[str]:
    (ctx.tmp / "empty-model").mkdir()
    return ctx.run(ctx.recipe(ft1=ctx.tmp / "empty-model"))


def _pickle_model(ctx: Ctx) -> Path:
    d = ctx.tmp / "pickled"
    d.mkdir()
    torch.save(load_file(ctx.m["ft1"] / S1) | load_file(ctx.m["ft1"] / S2), d / "pytorch_model.bin")
    return d


def c_pickle_refused(ctx: Ctx) -> list[str]:
    return ctx.run(ctx.recipe(ft1=_pickle_model(ctx)))


def c_pickle_malicious(ctx: Ctx) -> list[str]:
    d = ctx.tmp / "evil"
    d.mkdir()
    with open(d / "pytorch_model.bin", "wb") as f:
        pickle.dump({"model.norm.weight": Evil(ctx.tmp / "PWNED")}, f)
    return ctx.run(ctx.recipe(ft1=d), "--allow-pickle")


def c_config_not_json(ctx: Ctx) -> list[str]:
    return ctx.broken_ft1(lambda m: (m / "config.json").write_text("{hidden_size: 32"))


def c_shape_mismatch(ctx: Ctx) -> list[str]:
    return ctx.broken_ft1(edit_tensors(S1, lambda t: t.__setitem__(Q0, torch.zeros(32, 33))))


def c_tensor_missing(ctx: Ctx) -> list[str]:
    def drop(m: Path) -> None:
        edit_tensors(S1, lambda t: t.pop(Q0))(m)
        edit_index(lambda d: d["weight_map"].pop(Q0))(m)
    return ctx.broken_ft1(drop)


def _poison(value: float) -> Callable[[Path], None]:
    def apply(m: Path) -> None:
        def f(t: dict) -> None:
            t[Q0][3, 5] = value
        edit_tensors(S1, f)(m)
    return apply


def c_nan_strict(ctx: Ctx) -> list[str]:
    return ctx.broken_ft1(_poison(float("nan"))) + ["--strict"]


def c_inf_strict(ctx: Ctx) -> list[str]:
    return ctx.broken_ft1(_poison(float("-inf"))) + ["--strict"]


def c_yaml_object(ctx: Ctx) -> list[str]:
    return ctx.run(ctx.text_recipe(f"merge_method: !!python/object/apply:os.system ['touch {ctx.tmp}/PWNED']\n"
                                   "models: [a, b]\n"))


def c_yaml_name(ctx: Ctx) -> list[str]:
    return ctx.run(ctx.text_recipe("merge_method: ties\nmodels: !!python/name:os.system\n"))


def c_yaml_custom_tag(ctx: Ctx) -> list[str]:
    return ctx.run(ctx.text_recipe("merge_method: ties\nmodels: !include other.yaml\n"))


def c_yaml_bad_timestamp(ctx: Ctx) -> list[str]:
    return ctx.run(ctx.text_recipe("merge_method: ties\nbase_model: 2001-13-45\n"))


def c_yaml_alias(ctx: Ctx) -> list[str]:
    return ctx.run(ctx.text_recipe(
        f"merge_method: ties\nbase_model: {ctx.m['base']}\nparameters: &p {{weight: 0.5, density: 0.5}}\n"
        f"models:\n  - {{model: {ctx.m['ft1']}, parameters: *p}}\n  - {{model: {ctx.m['ft2']}, parameters: *p}}\n"))


def c_yaml_billion_laughs(ctx: Ctx) -> list[str]:
    lines = ["a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    for i, (prev, cur) in enumerate(zip("abcdefgh", "bcdefghi")):
        lines.append(f"{cur}: &{cur} [*{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}, *{prev}]")
    return ctx.run(ctx.text_recipe("\n".join(lines) + "\nmerge_method: ties\n"))


def c_yaml_syntax(ctx: Ctx) -> list[str]:
    return ctx.run(ctx.text_recipe("merge_method: ties\nmodels:\n  - model: [unclosed\n"))


def c_yaml_not_mapping(ctx: Ctx) -> list[str]:
    return ctx.run(ctx.text_recipe("- merge_method: ties\n- models: []\n"))


def c_yaml_nested(ctx: Ctx) -> list[str]:
    return ctx.run(ctx.text_recipe("merge_method: " + "[" * 20_000 + "]" * 20_000 + "\n"))


def c_recipe_not_utf8(ctx: Ctx) -> list[str]:
    p = ctx.tmp / "recipe.yaml"
    p.write_bytes(b"merge_method: \xff\xfe ties\n")
    return ctx.run(p)


def c_recipe_missing(ctx: Ctx) -> list[str]:
    return ctx.run(ctx.tmp / "nope.yaml")


def c_unknown_top_key(ctx: Ctx) -> list[str]:
    p = ctx.recipe()
    p.write_text(p.read_text() + "paramters: {normalize: true}\n")
    return ctx.run(p)


def c_control_chars_in_key(ctx: Ctx) -> list[str]:
    p = ctx.recipe()
    p.write_text(p.read_text() + '"pa\\e[31mrams\\nx": 1\n')
    return ctx.run(p)


def c_unknown_model_key(ctx: Ctx) -> list[str]:
    return ctx.run(ctx.text_recipe(f"merge_method: ties\nbase_model: {ctx.m['base']}\n"
                                   f"models:\n  - modle: {ctx.m['ft1']}\n"))


def c_unknown_param(ctx: Ctx) -> list[str]:
    return ctx.run(ctx.recipe(desnity=0.5))


def c_unknown_method(ctx: Ctx) -> list[str]:
    p = ctx.recipe()
    p.write_text(p.read_text().replace("merge_method: ties", "merge_method: tiez"))
    return ctx.run(p)


def c_unknown_dtype(ctx: Ctx) -> list[str]:
    p = ctx.recipe()
    p.write_text(p.read_text() + "dtype: float8\n")
    return ctx.run(p)


def c_out_exists(ctx: Ctx) -> list[str]:
    ctx.out.mkdir()
    (ctx.out / "precious.txt").write_text("do not touch")
    return ctx.run(ctx.recipe())


def c_out_is_file(ctx: Ctx) -> list[str]:
    ctx.out.write_text("a file where the output should go")
    return ctx.run(ctx.recipe())


def c_out_inside_input(ctx: Ctx) -> list[str]:
    ft = ctx.clone()
    return ["run", str(ctx.recipe(ft1=ft)), str(ft / "merged"), "-q"]


def c_out_is_input_overwrite(ctx: Ctx) -> list[str]:
    ft = ctx.clone()
    return ["run", str(ctx.recipe(ft1=ft)), str(ft), "-q", "--overwrite"]


def c_out_contains_input_overwrite(ctx: Ctx) -> list[str]:
    ft = ctx.clone()
    return ["run", str(ctx.recipe(ft1=ft)), str(ctx.tmp), "-q", "--overwrite"]


def c_out_locked(ctx: Ctx) -> list[str]:
    (ctx.tmp / ".out.lazymerge.lock").write_text(f"{os.getpid()}\n")
    return ctx.run(ctx.recipe())


def c_out_parent_is_file(ctx: Ctx) -> list[str]:
    (ctx.tmp / "a-file").write_text("x")
    return ["run", str(ctx.recipe()), str(ctx.tmp / "a-file" / "out"), "-q"]


def c_bad_memory(ctx: Ctx) -> list[str]:
    return ctx.run(ctx.recipe(), "--memory", "lots")


def c_bad_shard_size(ctx: Ctx) -> list[str]:
    return ctx.run(ctx.recipe(), "--shard-size", "huge")


def c_bad_device(ctx: Ctx) -> list[str]:
    return ctx.run(ctx.recipe(), "--device", "tpu")


@dataclass
class Case:
    build: Callable[[Ctx], list[str]]
    words: list[str] | Callable[[Ctx], list[str]]
    code: int = 2
    marks: list = field(default_factory=list)


CASES: dict[str, Case] = {
    # safetensors files
    "truncated_shard": Case(c_truncated, [S1, "truncated"]),
    "empty_shard": Case(c_empty_shard, [S1, "0 bytes", "too short"]),
    "header_length_past_eof": Case(c_header_past_eof, [S1, "header length", "exceeds file size"]),
    "header_length_absurd": Case(c_header_absurd, [S1, "header length", "limit"]),
    "header_not_json": Case(c_header_not_json, [S1, "not valid UTF-8 JSON"]),
    "header_not_utf8": Case(c_header_not_utf8, [S1, "not valid UTF-8 JSON"]),
    "header_json_list": Case(c_header_list, [S1, "not a JSON object"]),
    "header_json_nested_bomb": Case(c_header_nested, [S1, "nested too deeply"]),
    "offsets_past_eof": Case(c_offsets_past_eof, [S1, NORM0, "data ends at byte"]),
    "offsets_overlap": Case(c_offsets_overlap, [S1, NORM0, NORM0B, "overlap"]),
    "offsets_reversed": Case(c_offsets_reversed, [S1, NORM0, "begin", "> end"]),
    "offsets_leave_hole": Case(c_offsets_hole, ["ft1-copy", S1, NORM0, "16-byte hole", "tile the data section"]),
    "trailing_bytes": Case(c_trailing_bytes, ["ft1-copy", S1, "8 trailing byte(s)", f"last tensor '{NORM0}'"]),
    "offsets_negative": Case(c_offsets_negative, [S1, NORM0, "data_offsets"]),
    "dtype_contradicts_size": Case(c_dtype_contradicts_size, [S1, NORM0, "dtype BF16", "need 64"]),
    "dtype_unknown": Case(c_dtype_unknown, [S1, NORM0, "unsupported dtype 'F128'"]),
    "dtype_not_string": Case(c_dtype_not_string, [S1, NORM0, "unsupported dtype"]),
    "shape_negative": Case(c_shape_negative, [S1, NORM0, "shape"]),
    "header_duplicate_key": Case(c_duplicate_key, [S1, "duplicate key", NORM0]),
    "metadata_not_strings": Case(c_metadata_not_strings, [S1, "__metadata__"]),
    "entry_not_object": Case(c_entry_not_object, [S1, NORM0, "not an object"]),
    "control_chars_in_tensor_name": Case(c_control_chars_in_name, [S1, "'evil\\x1b[2J\\nname'", "F128"]),
    # indexes and paths
    "index_missing_shard": Case(c_index_missing_shard, ["model-00009-of-00009.safetensors", "does not exist"]),
    "index_dotdot_escape": Case(c_index_dotdot, ["model.safetensors.index.json", "'..'", "inside the model"]),
    "index_absolute_path": Case(c_index_absolute, ["model.safetensors.index.json", "absolute"]),
    "index_symlink_escape": Case(c_index_symlink_out, ["innocent.safetensors", "outside the model directory"]),
    "unindexed_symlink_escape": Case(c_unindexed_symlink_out, ["model-00003-of-00003.safetensors",
                                                               "outside the model directory"]),
    "index_not_json": Case(c_index_not_json, ["model.safetensors.index.json", "not valid JSON"]),
    "index_without_weight_map": Case(c_index_no_weight_map, ["model.safetensors.index.json", "weight_map"]),
    "index_value_not_string": Case(c_index_value_not_string, ["model.safetensors.index.json", Q0,
                                                              "not a string"]),
    "index_wrong_shard": Case(c_index_wrong_shard, [S2, Q0, "not in this shard"]),
    "tensor_in_two_shards": Case(c_tensor_in_two_shards, [Q0, S1, S2, "appears in both"]),
    # model directories
    "model_missing": Case(c_model_missing, ["no-such-model", "does not exist"]),
    "model_is_a_file": Case(c_model_is_file, ["a-file", "not a directory"]),
    "model_dir_empty": Case(c_model_empty, ["empty-model", "no *.safetensors"]),
    "pickle_refused": Case(c_pickle_refused, ["pickled", "pytorch_model.bin", "--allow-pickle"]),
    "pickle_malicious_allowed": Case(c_pickle_malicious, ["pytorch_model.bin", "weights_only=True"]),
    "config_not_json": Case(c_config_not_json, ["config.json", "not valid JSON"]),
    # models that disagree, bad values
    "shape_mismatch": Case(c_shape_mismatch, ["ft1-copy", Q0, "shape [32, 33]", "[32, 32]"]),
    "tensor_missing": Case(c_tensor_missing, ["ft1-copy", Q0, "missing"]),
    "nan_with_strict": Case(c_nan_strict, ["ft1-copy", Q0, "NaN", "--strict"]),
    "inf_with_strict": Case(c_inf_strict, ["ft1-copy", Q0, "Inf", "--strict"]),
    # recipes
    "yaml_python_object_tag": Case(c_yaml_object, ["recipe.yaml", "line 1", "tags", "python/object/apply:os.system",
                                                   "not allowed"]),
    "yaml_python_name_tag": Case(c_yaml_name, ["recipe.yaml", "line 2", "tags", "python/name:os.system"]),
    "yaml_custom_tag": Case(c_yaml_custom_tag, ["recipe.yaml", "tags (!include)", "not allowed"]),
    "yaml_timestamp_out_of_range": Case(c_yaml_bad_timestamp, ["recipe.yaml", "cannot read a value", "month"]),
    "yaml_anchor_alias": Case(c_yaml_alias, ["recipe.yaml", "line 5", "aliases"]),
    "yaml_billion_laughs": Case(c_yaml_billion_laughs, ["recipe.yaml", "aliases"]),
    "yaml_syntax_error": Case(c_yaml_syntax, ["recipe.yaml", "YAML error at line"]),
    "yaml_not_a_mapping": Case(c_yaml_not_mapping, ["recipe.yaml", "mapping"]),
    "yaml_nested_bomb": Case(c_yaml_nested, ["recipe.yaml", "nested too deeply"]),
    "recipe_not_utf8": Case(c_recipe_not_utf8, ["recipe.yaml", "cannot read recipe"]),
    "recipe_missing": Case(c_recipe_missing, ["nope.yaml", "does not exist"]),
    "unknown_top_key": Case(c_unknown_top_key, ["'paramters'", "did you mean 'parameters'", "valid keys:",
                                                "merge_method"]),
    "control_chars_in_recipe_key": Case(c_control_chars_in_key, ["unknown key 'pa\\x1b[31mrams\\nx'"]),
    "unknown_model_key": Case(c_unknown_model_key, ["models[0]", "'modle'", "did you mean 'model'",
                                                    "valid keys: model, parameters"]),
    "unknown_parameter": Case(c_unknown_param, ["models[0].parameters", "'desnity'", "did you mean 'density'",
                                                "valid keys:"]),
    "unknown_method": Case(c_unknown_method, ["merge_method", "'tiez'", "did you mean 'ties'"]),
    "unknown_dtype": Case(c_unknown_dtype, ["dtype", "float8"]),
    # the output directory
    "out_exists": Case(c_out_exists, ["out", "already exists", "--overwrite"]),
    "out_is_a_file": Case(c_out_is_file, ["out", "already exists", "--overwrite"]),
    "out_inside_input": Case(c_out_inside_input, ["merged", "inside input model directory", "ft1-copy"]),
    "out_is_input_with_overwrite": Case(c_out_is_input_overwrite, ["inside input model directory", "ft1-copy"]),
    "out_contains_input_with_overwrite": Case(c_out_contains_input_overwrite,
                                              ["contains input model directory", "ft1-copy"]),
    "out_locked_by_live_run": Case(c_out_locked, lambda ctx: ["out", f"pid {os.getpid()}", "another lazymerge"]),
    "out_parent_is_a_file": Case(c_out_parent_is_file, ["a-file", "cannot create"]),
    # options
    "bad_memory": Case(c_bad_memory, ["memory", "lots"]),
    "bad_shard_size": Case(c_bad_shard_size, ["shard_size", "huge"]),
    "bad_device": Case(c_bad_device, ["device", "tpu"]),
}


# ---------------------------------------------------------------------------------------------------------------
# running a case and checking the invariants
# ---------------------------------------------------------------------------------------------------------------
def snapshot(*roots: Path) -> dict[str, object]:
    """Every entry under the roots (hidden ones included): files by content hash, links by target, dirs."""
    out: dict[str, object] = {}
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            for name in dirnames + filenames:
                p = Path(dirpath) / name
                if p.is_symlink():
                    out[str(p)] = ("link", os.readlink(p))
                elif p.is_dir():
                    out[str(p)] = "dir"
                else:
                    out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def check_failure(name: str, ctx: Ctx, code: int, stderr: str, before: dict, after: dict) -> None:
    case = CASES[name]
    words = case.words(ctx) if callable(case.words) else case.words
    assert "Traceback" not in stderr, stderr
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, f"expected one line, got:\n{stderr}"
    assert lines[0].startswith("error: "), lines[0]
    for w in words:
        assert w in lines[0], f"{w!r} not in {lines[0]!r}"
    assert code == case.code, (code, lines[0])
    created = sorted(set(after) - set(before))
    removed = sorted(set(before) - set(after))
    changed = sorted(k for k in set(before) & set(after) if before[k] != after[k])
    assert not (created or removed or changed), f"disk changed: +{created} -{removed} ~{changed}"


@pytest.fixture(scope="module")
def frozen_models(models_fp32: dict[str, Path]) -> dict[str, Path]:
    return models_fp32


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input(name: str, frozen_models: dict[str, Path], tmp_path: Path) -> None:
    ctx = Ctx(tmp_path, frozen_models)
    argv = CASES[name].build(ctx)
    before = snapshot(tmp_path, *frozen_models.values())
    result = CliRunner().invoke(main, argv)
    after = snapshot(tmp_path, *frozen_models.values())
    # anything but SystemExit is an exception escaping the CLI: a traceback for the user
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    check_failure(name, ctx, result.exit_code, result.stderr, before, after)


def test_table_is_big_enough() -> None:
    assert len(CASES) >= 30


# Through the real entry point, in parallel subprocesses (each pays the interpreter + torch start-up once).
SUBPROCESS_CASES = [
    "truncated_shard", "index_dotdot_escape", "pickle_malicious_allowed", "nan_with_strict",
    "yaml_python_object_tag",
]


def test_bad_inputs_through_real_entry_point(frozen_models: dict[str, Path], tmp_path: Path) -> None:
    runs = []
    for name in SUBPROCESS_CASES:
        d = tmp_path / name
        d.mkdir()
        ctx = Ctx(d, frozen_models)
        argv = CASES[name].build(ctx)
        runs.append((name, ctx, argv))
    before = {name: snapshot(ctx.tmp) for name, ctx, _ in runs}
    models_before = snapshot(*frozen_models.values())
    started = [(name, ctx, subprocess.Popen([sys.executable, "-m", "lazymerge.cli", *argv], cwd=REPO,
                                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
               for name, ctx, argv in runs]
    procs = []
    for name, ctx, p in started:
        _, err = p.communicate(timeout=600)
        procs.append((name, ctx, p.returncode, err))
    for name, ctx, code, err in procs:
        check_failure(name, ctx, code, err, before[name], snapshot(ctx.tmp))
    assert snapshot(*frozen_models.values()) == models_before


# ---------------------------------------------------------------------------------------------------------------
# what is not an error
# ---------------------------------------------------------------------------------------------------------------
def test_nan_without_strict_warns_naming_the_tensor(frozen_models: dict[str, Path], tmp_path: Path) -> None:
    ctx = Ctx(tmp_path, frozen_models)
    argv = ctx.broken_ft1(_poison(float("nan")))
    result = CliRunner().invoke(main, argv)
    assert result.exit_code == 0, result.stderr
    warnings = [ln for ln in (result.stdout + result.stderr).splitlines() if "warning" in ln]
    assert len(warnings) == 1 and Q0 in warnings[0] and "NaN" in warnings[0] and "ft1-copy" in warnings[0]
    report = json.loads((ctx.out / "lazymerge_report.json").read_text())
    assert any(Q0 in w for w in report["warnings"])


def test_malicious_pickle_never_runs(frozen_models: dict[str, Path], tmp_path: Path) -> None:
    """Belt and braces for the table's pickle case: the payload's side effect is absent."""
    ctx = Ctx(tmp_path, frozen_models)
    result = CliRunner().invoke(main, c_pickle_malicious(ctx))
    assert result.exit_code == 2
    assert not (tmp_path / "PWNED").exists()


def test_refused_pickle_never_invites_the_unsafe_option(frozen_models: dict[str, Path], tmp_path: Path) -> None:
    """torch's refusal advises retrying with weights_only=False, which would run the payload: our one line
    keeps torch's reason and drops that advice."""
    ctx = Ctx(tmp_path, frozen_models)
    result = CliRunner().invoke(main, c_pickle_malicious(ctx))
    assert result.exit_code == 2
    line = result.stderr.strip()
    assert "Unsupported operand" in line, line          # torch's reason: the pickle opcode it refused to run
    for advice in ("False", "trusted source", "arbitrary code", "Re-running"):
        assert advice not in line, line


def test_pickle_allowed_loads_with_weights_only(frozen_models: dict[str, Path], tmp_path: Path) -> None:
    ctx = Ctx(tmp_path, frozen_models)
    argv = ctx.run(ctx.recipe(ft1=_pickle_model(ctx)), "--allow-pickle")
    result = CliRunner().invoke(main, argv)
    assert result.exit_code == 0, result.stderr
    assert (ctx.out / "model.safetensors").exists() or (ctx.out / "model.safetensors.index.json").exists()


def test_dtype_kind_mismatch_between_models(frozen_models: dict[str, Path], tmp_path: Path) -> None:
    ctx = Ctx(tmp_path, frozen_models)

    def to_int(t: dict) -> None:
        t[NORM0] = t[NORM0].to(torch.int64)
    argv = ctx.broken_ft1(edit_tensors(S1, to_int))
    result = CliRunner().invoke(main, argv)
    assert result.exit_code == 2
    assert "dtype" in result.stderr and NORM0 in result.stderr, result.stderr
    assert NORM0 in result.stderr and "dtype" in result.stderr
