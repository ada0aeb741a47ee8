"""Multi-stage recipes (mergekit-multimerge's format): `---` documents with `name:`, a later stage naming an
earlier one as a model. The intermediates stay in the task graph (float32), so a multi-stage merge must equal
running the stages one after the other through the API with float32 intermediates written to disk."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from conftest import llama_shapes, read_all
from test_architectures import make_family


def _lm():
    import lazymerge

    return lazymerge


def files_bytes(out: Path) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in sorted(Path(out).glob("*.safetensors"))}


def sequential(docs: list[dict], tmp_path: Path, tag: str, **kw) -> Path:
    """Run each stage on its own through the API, in order, replacing stage names by the written outputs."""
    written: dict[str, str] = {}

    def patch(v):
        if isinstance(v, str):
            return written.get(v, v)
        if isinstance(v, list):
            return [patch(x) for x in v]
        if isinstance(v, dict):
            return {k: patch(x) for k, x in v.items()}
        return v

    for i, doc in enumerate(docs):
        doc = patch({k: v for k, v in doc.items() if k != "name"})
        out = tmp_path / f"{tag}-{i}"
        _lm().merge(doc, out, **kw)
        if "name" in docs[i]:
            written[docs[i]["name"]] = str(out)
    return out                                                  # the last stage's output


@pytest.fixture(scope="module")
def m(models_fp32) -> dict[str, str]:
    return {k: str(v) for k, v in models_fp32.items()}


def sequential_docs(m: dict[str, str]) -> list[dict]:
    """base -> + instruction model (task arithmetic) -> + alignment model (dare_ties, random) -> slerp toward ft3."""
    return [
        {"name": "sft", "merge_method": "task_arithmetic", "base_model": m["base"], "dtype": "float32",
         "models": [{"model": m["ft1"], "parameters": {"weight": 1.0}}]},
        {"name": "aligned", "merge_method": "dare_ties", "base_model": m["base"], "dtype": "float32",
         "models": [{"model": "sft", "parameters": {"weight": 0.7, "density": 0.6}},
                    {"model": m["ft2"], "parameters": {"weight": 0.5, "density": 0.5}}]},
        {"name": "final", "merge_method": "slerp", "base_model": "aligned", "dtype": "float32",
         "models": [{"model": "aligned"}, {"model": m["ft3"]}], "parameters": {"t": [0.2, 0.6]}},
    ]


@pytest.mark.parametrize("memory,block", [(None, None), ("64KiB", None), (None, 7)])
def test_sequential_merge_equals_stages_run_one_by_one(m, tmp_path: Path, memory, block) -> None:
    docs = sequential_docs(m)
    text = yaml.safe_dump_all(docs, sort_keys=False)
    _lm().merge(text, tmp_path / "multi", seed=5, memory=memory, max_block_rows=block)
    ref_out = sequential(docs, tmp_path, "seq", seed=5)
    assert files_bytes(tmp_path / "multi") == files_bytes(ref_out)
    # intermediates never reach the disk: only the output's tensors are written
    assert set(read_all(tmp_path / "multi")) == set(read_all(m["base"]))


def test_stage_order_in_file_and_selection(m, tmp_path: Path) -> None:
    """Dependencies may come after their users; the unnamed document is the output; `stage=` picks another."""
    docs = sequential_docs(m)
    final = {k: v for k, v in docs[2].items() if k != "name"}           # unnamed: the output
    text = yaml.safe_dump_all([final, docs[1], docs[0]], sort_keys=False)
    _lm().merge(text, tmp_path / "a", seed=5)
    assert files_bytes(tmp_path / "a") == files_bytes(sequential(docs, tmp_path, "seq", seed=5))
    _lm().merge(text, tmp_path / "b", seed=5, stage="aligned")
    assert files_bytes(tmp_path / "b") == files_bytes(sequential(docs[:2], tmp_path, "seq2", seed=5))
    p = _lm().plan(text, stage="sft")                                   # only what the stage needs
    assert p.method.name == "task_arithmetic" and len(p.sources) == 2
    p.close()


def test_saved_recipe_reproduces_the_merge(m, tmp_path: Path) -> None:
    text = yaml.safe_dump_all(sequential_docs(m), sort_keys=False)
    _lm().merge(text, tmp_path / "a", seed=2)
    saved = (tmp_path / "a" / "lazymerge_recipe.yaml").read_text()
    assert [d["name"] for d in yaml.safe_load_all(saved)] == ["sft", "aligned", "final"]
    _lm().merge(saved, tmp_path / "b", seed=2)
    assert files_bytes(tmp_path / "a") == files_bytes(tmp_path / "b")


def test_stage_with_slices_feeds_a_later_stage(tmp_path: Path) -> None:
    """A frankenmerge stage (8 layers stacked from two 4-layer models) is the base of a later linear merge with
    another 8-layer model; the config's layer count follows the stage's output."""
    a = make_family(tmp_path / "a", "llama", layers=4, n_ft=1, seed=1)
    big = make_family(tmp_path / "big", "llama", layers=8, n_ft=0, seed=2)["base"]
    docs = [
        {"name": "stack", "merge_method": "passthrough", "dtype": "float32", "slices": [
            {"sources": [{"model": str(a["base"]), "layer_range": [0, 4]}]},
            {"sources": [{"model": str(a["ft1"]), "layer_range": [0, 4]}]}]},
        {"name": "mix", "merge_method": "ties", "base_model": "stack", "dtype": "float32",
         "models": [{"model": str(big), "parameters": {"weight": 0.5, "density": 0.5}}]},
    ]
    _lm().merge(docs, tmp_path / "multi", memory="96KiB")
    ref_out = sequential(docs, tmp_path, "seq")
    assert files_bytes(tmp_path / "multi") == files_bytes(ref_out)
    assert json.loads((tmp_path / "multi" / "config.json").read_text())["num_hidden_layers"] == 8


def test_bf16_stage_outputs_stay_float32_in_the_graph(models_bf16, tmp_path: Path) -> None:
    """An intermediate is not rounded to its stage's dtype (mergekit would round it when saving it)."""
    m = {k: str(v) for k, v in models_bf16.items()}
    docs = [{"name": "s1", "merge_method": "linear", "dtype": "bfloat16",
             "models": [{"model": m["ft1"], "parameters": {"weight": 0.3}},
                        {"model": m["ft2"], "parameters": {"weight": 0.7}}]},
            {"name": "s2", "merge_method": "linear", "out_dtype": "float32",
             "models": [{"model": "s1", "parameters": {"weight": 1.0}}]}]
    report = _lm().merge(docs, tmp_path / "o")
    assert report.tensors == len(llama_shapes())                # the whole model, only the output stage written
    got = read_all(tmp_path / "o")
    f1, f2 = read_all(m["ft1"]), read_all(m["ft2"])
    n = "model.layers.0.mlp.up_proj.weight"
    want = (f1[n].float() * 0.3 + f2[n].float() * 0.7) / 1.0
    assert got[n].dtype == torch.float32
    torch.testing.assert_close(got[n], want, rtol=0, atol=1e-6)
    assert not torch.equal(got[n], want.to(torch.bfloat16).float())


@pytest.mark.parametrize("case,match", [
    ("cycle", r"stages depend on each other in a cycle: b -> a -> b"),
    ("duplicate", r"name: 'a' names two stages"),
    ("two_unnamed", r"only one document may be unnamed"),
    ("unknown_stage", r"stage: no stage named 'zzz'; stages: a, b"),
    ("adapter_on_stage", r"'a\+/some/adapter': an adapter on a stage's output is not supported"),
    ("error_names_stage", r"stage 'b': models\[0\]\.parameters: unknown key 'wieght'"),
])
def test_stage_errors(m, case: str, match: str) -> None:
    lin = lambda name, model, **kw: {**({"name": name} if name else {}), "merge_method": "linear",   # noqa: E731
                                     "models": [{"model": model, "parameters": {"weight": 1.0, **kw}}]}
    docs = {
        "cycle": [lin("a", "b"), lin("b", "a")],
        "duplicate": [lin("a", m["ft1"]), lin("a", m["ft2"])],
        "two_unnamed": [lin(None, m["ft1"]), lin(None, m["ft2"])],
        "unknown_stage": [lin("a", m["ft1"]), lin("b", "a")],
        "adapter_on_stage": [lin("a", m["ft1"]), lin("b", "a+/some/adapter")],
        "error_names_stage": [lin("a", m["ft1"]), lin("b", "a", wieght=2)],
    }[case]
    kw = {"stage": "zzz"} if case == "unknown_stage" else {}
    with pytest.raises(_lm().RecipeError, match=match):
        _lm().plan(yaml.safe_dump_all(docs), **kw).close()
