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


def _tie(path):
    """Make a make_model checkpoint tied: no lm_head tensor, tie_word_embeddings true (its head is its embedding)."""
    from safetensors.torch import load_file, save_file

    t = load_file(path / "model.safetensors")
    t.pop("lm_head.weight")
    save_file(t, str(path / "model.safetensors"))
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**cfg, "tie_word_embeddings": True}))
    return path


@pytest.mark.parametrize("with_base", [True, False])
def test_fill_rows_come_from_each_models_own_head(tmp_path, with_base):
    """Model A ties its head to its embedding (no lm_head tensor), model B has its own lm_head (= -embedding in
    these models). A token a model lacks is filled from the rows of the head of the model it is taken from: B's
    lm_head row (B the base, or the only model with the token), or A's embedding row (A the only model with it).
    The fills were read under the name the *loading* model uses (A's head is `embed_tokens`, B's `lm_head`), so
    B's embedding row went into the head, and A's missing `lm_head` failed the merge."""
    from test_vocab import ADDED_B, VOCAB_A, VOCAB_B, make_model

    a = _tie(make_model(tmp_path / "A", "A", VOCAB_A, seed=1))
    b = make_model(tmp_path / "B", "B", VOCAB_B, ADDED_B, seed=2)
    if with_base:     # B + (A - B): A's rows, A's missing ones from the base B
        recipe = {"merge_method": "task_arithmetic", "base_model": str(b), "tokenizer_source": "union",
                  "dtype": "float32", "models": [{"model": str(a), "parameters": {"weight": 1.0}}]}
    else:             # the mean of A's and B's rows, each one's missing rows from the other (B leads: a head)
        recipe = {"merge_method": "linear", "tokenizer_source": "union", "dtype": "float32",
                  "models": [{"model": str(b), "parameters": {"weight": 0.5}},
                             {"model": str(a), "parameters": {"weight": 0.5}}]}
    out = tmp_path / "out"
    merge(recipe, out, memory="unlimited")
    t = read_all_f32(out)
    vocab = json.loads((out / "tokenizer.json").read_text())
    ids = {**vocab["model"]["vocab"], **{e["content"]: e["id"] for e in vocab["added_tokens"]}}
    own = {"A": set(VOCAB_A), "B": set(VOCAB_B) | {"<|im_start|>"}}
    rows = {"lm_head.weight": {"A": lambda tok: row_value("A", tok), "B": lambda tok: -row_value("B", tok)},
            "model.embed_tokens.weight": {"A": lambda tok: row_value("A", tok), "B": lambda tok: row_value("B", tok)}}
    assert sorted(ids.values()) == list(range(t["lm_head.weight"].shape[0]))
    for name, of in rows.items():
        for tok, r in ids.items():
            if with_base:
                want = of["A" if tok in own["A"] else "B"](tok)
            else:
                want = sum(0.5 * of[m if tok in own[m] else "AB".replace(m, "")](tok) for m in "AB")
            torch.testing.assert_close(t[name][r], want, rtol=0, atol=1e-5, msg=f"{name} {tok}")
