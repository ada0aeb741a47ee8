"""Vocabulary alignment through the whole pipeline: recipe -> planner -> engine -> output directory.

Needs the planner/engine integration of lazymerge/planner/vocab.py (plan.py calls `plan_vocab`, the `load` op calls
`vocab.load_block` for vocab-indexed tensors); until then these tests fail (tokenizer_source: union is refused and
vocab sizes that differ are a shape error).
"""
from __future__ import annotations

import json

import pytest
import torch

from conftest import read_all_f32
from test_vocab import HIDDEN, VOCAB_A, VOCAB_B, make_abc, row_value

UNION_AB = ["<unk>", "<s>", "</s>", "a", "b", "c", "d", "e", "f", "<|im_start|>"]
OWN = {"A": set(VOCAB_A), "B": set(VOCAB_B) | {"<|im_start|>"}, "C": {"<unk>", "<s>", "</s>", "a", "g"}}


def merge(recipe, out, **kw):
    import lazymerge

    return lazymerge.merge(recipe, out, **kw)


@pytest.fixture(scope="module")
def abc(tmp_path_factory):
    return make_abc(tmp_path_factory.mktemp("vocab_models"))


def test_union_linear(abc, tmp_path):
    recipe = {"merge_method": "linear", "tokenizer_source": "union",
              "models": [{"model": str(abc["A"]), "parameters": {"weight": 0.5}},
                         {"model": str(abc["B"]), "parameters": {"weight": 0.5}}]}
    out = tmp_path / "out"
    merge(recipe, out, memory="unlimited")
    t = read_all_f32(out)
    assert t["model.embed_tokens.weight"].shape == (len(UNION_AB), HIDDEN)
    assert t["lm_head.weight"].shape == (len(UNION_AB), HIDDEN)
    for r, tok in enumerate(UNION_AB):
        rows = [row_value(m if tok in OWN[m] else next(x for x in "AB" if tok in OWN[x]), tok) for m in "AB"]
        want = (rows[0] + rows[1]) / 2            # a model lacking the token takes the only row there is
        torch.testing.assert_close(t["model.embed_tokens.weight"][r], want, rtol=0, atol=1e-5)
        torch.testing.assert_close(t["lm_head.weight"][r], -want, rtol=0, atol=1e-5)
    doc = json.loads((out / "tokenizer.json").read_text())
    ids = {e["content"]: e["id"] for e in doc["added_tokens"]}
    assert ids["e"] == 7 and ids["f"] == 8 and ids["<|im_start|>"] == 9
    assert json.loads((out / "config.json").read_text())["vocab_size"] == len(UNION_AB)
    # not a tokenizer file: still the lead model's
    assert json.loads((out / "generation_config.json").read_text())["comment"] == "from A"


def test_tokenizer_source_base_task_arithmetic(abc, tmp_path):
    recipe = {"merge_method": "task_arithmetic", "base_model": str(abc["A"]), "tokenizer_source": "base",
              "models": [{"model": str(abc["B"]), "parameters": {"weight": 1.0}},
                         {"model": str(abc["C"]), "parameters": {"weight": 1.0}}]}
    out = tmp_path / "out"
    merge(recipe, out, memory="unlimited")
    emb = read_all_f32(out)["model.embed_tokens.weight"]
    assert emb.shape == (len(VOCAB_A), HIDDEN)
    for r, tok in enumerate(VOCAB_A):
        x = {m: row_value(m if tok in OWN[m] else "A", tok) for m in "ABC"}   # missing: the base's row
        torch.testing.assert_close(emb[r], x["A"] + (x["B"] - x["A"]) + (x["C"] - x["A"]), rtol=0, atol=1e-4)
    assert (out / "tokenizer.json").read_bytes() == (abc["A"] / "tokenizer.json").read_bytes()


def test_smallest_shared_vocab(abc, tmp_path):
    recipe = {"merge_method": "linear",
              "models": [{"model": str(abc[m]), "parameters": {"weight": 1.0}} for m in "ABC"]}
    out = tmp_path / "out"
    report = merge(recipe, out, memory="unlimited")
    t = read_all_f32(out)
    assert t["model.embed_tokens.weight"].shape == (5, HIDDEN)
    assert t["lm_head.weight"].shape == (5, HIDDEN)
    assert any("smallest shared vocabulary" in w for w in report.warnings), report.warnings
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 5
    assert (out / "tokenizer.json").read_bytes() == (abc["A"] / "tokenizer.json").read_bytes()


def test_union_ties_blocks_bit_identical(abc, tmp_path):
    recipe = {"merge_method": "ties", "base_model": str(abc["A"]),
              "tokenizer": {"source": "union", "pad_to_multiple_of": 8},
              "models": [{"model": str(abc["B"]), "parameters": {"weight": 0.5, "density": 0.5}},
                         {"model": str(abc["C"]), "parameters": {"weight": 0.5, "density": 0.5}}]}
    merge(recipe, tmp_path / "whole", memory="unlimited")
    merge(recipe, tmp_path / "blocked", memory="unlimited", max_block_rows=3)
    a, b = read_all_f32(tmp_path / "whole"), read_all_f32(tmp_path / "blocked")
    assert a["model.embed_tokens.weight"].shape == (16, HIDDEN)           # 11 tokens padded to 16
    for name in a:
        assert torch.equal(a[name], b[name]), name
        assert torch.isfinite(a[name]).all(), name


def test_resume_recomputes_shards_after_a_tokenizer_edit(abc, tmp_path):
    """A resumed run keeps finished shards only when nothing they depend on changed: the alignment reads the
    tokenizers, so an input's tokenizer edited between the interrupted run and --resume recomputes them."""
    import shutil
    import threading

    from lazymerge.errors import MergeAborted

    b = tmp_path / "B"
    shutil.copytree(abc["B"], b)
    recipe = {"merge_method": "linear", "tokenizer_source": "union",
              "models": [{"model": str(abc["A"]), "parameters": {"weight": 0.5}},
                         {"model": str(b), "parameters": {"weight": 0.5}}]}
    out = tmp_path / "out"
    journal = tmp_path / ".out.lazymerge-tmp" / "journal.json"
    cancel = threading.Event()

    def stop_once_a_shard_is_journaled(_progress):
        if journal.exists() and json.loads(journal.read_text())["shards"]:
            cancel.set()

    with pytest.raises(MergeAborted):      # one tensor per shard (100 bytes): the embeddings' shard is finished first
        merge(recipe, out, memory="unlimited", shard_size=100, resume=True, cancel=cancel,
              progress=stop_once_a_shard_is_journaled, workers=1)
    assert "model-00001-of-00005.safetensors" in json.loads(journal.read_text())["shards"]
    tok = json.loads((b / "tokenizer.json").read_text())      # B's ids of "a" and "b" swapped: same sizes
    vocab = tok["model"]["vocab"]
    vocab["a"], vocab["b"] = vocab["b"], vocab["a"]
    (b / "tokenizer.json").write_text(json.dumps(tok))
    report = merge(recipe, out, memory="unlimited", shard_size=100, resume=True)
    fresh = tmp_path / "fresh"
    merge(recipe, fresh, memory="unlimited", shard_size=100)
    assert read_all_f32(out)["model.embed_tokens.weight"].equal(read_all_f32(fresh)["model.embed_tokens.weight"])
    assert report.resumed_tensors == 0
