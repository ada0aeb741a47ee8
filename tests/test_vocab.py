"""Vocabulary alignment (lazymerge/planner/vocab.py) in isolation: tokenizer.json files built here, checkpoints
written with safetensors' own writer, `plan_vocab` called directly on opened checkpoints.

Three tiny models whose vocabularies overlap partially and order the shared tokens differently:
A (WordLevel, 7 tokens), B (WordLevel, 7 tokens + added special <|im_start|>), C (BPE, 5 tokens). Embedding row i of
a model holds a value derived from (model, token), so a test can tell whose row for which token lands where.
The end-to-end merge through the planner and engine is in test_vocab_e2e.py.
"""
from __future__ import annotations

import dataclasses
import json
import zlib
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lazymerge.errors import CheckpointError, RecipeError
from lazymerge.io.checkpoint import Checkpoint
from lazymerge.engine import vocab_rows as R
from lazymerge.planner import vocab as V

HIDDEN = 8
SPECIALS = ["<unk>", "<s>", "</s>"]


def token_value(tag: str, token: str) -> float:
    """A value per (model, token), exact in float32 (distinct for the tokens used here: checked below)."""
    h = zlib.crc32(f"{tag}/{token}".encode()) % 4093
    return float(h + 1) / 16.0


def tokenizer_json(vocab: list[str], added: list[tuple[str, int, bool]] = (), kind: str = "WordLevel") -> dict:
    """vocab: the model's tokens in id order (the first three are the special tokens); added: (content, id,
    special) entries beyond it."""
    entries = [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
                "normalized": False, "special": True} for i, t in enumerate(vocab) if t in SPECIALS]
    entries += [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
                 "normalized": not special, "special": special} for t, i, special in added]
    model: dict = {"type": kind, "vocab": {t: i for i, t in enumerate(vocab)}, "unk_token": "<unk>"}
    if kind == "BPE":
        model.update({"dropout": None, "continuing_subword_prefix": None, "end_of_word_suffix": None,
                      "fuse_unk": False, "byte_fallback": False, "ignore_merges": False, "merges": []})
    return {"version": "1.0", "truncation": None, "padding": None, "added_tokens": entries, "normalizer": None,
            "pre_tokenizer": {"type": "Whitespace"}, "post_processor": None, "decoder": None, "model": model}


def make_model(path: Path, tag: str, vocab: list[str], added: list[tuple[str, int, bool]] = (), *,
               rows: int | None = None, kind: str = "WordLevel", dtype: torch.dtype = torch.float32,
               tokenizer: bool = True, tokenizer_config: bool = True, seed: int = 0) -> Path:
    """A checkpoint directory whose embed_tokens / lm_head row for each token holds token_value(tag, token)
    (lm_head: its negative); rows beyond the tokens hold 1000 + row (padding)."""
    path.mkdir(parents=True, exist_ok=True)
    by_id = {i: t for i, t in enumerate(vocab)}
    by_id.update({i: t for t, i, _ in added})
    n = rows if rows is not None else max(by_id) + 1
    emb = torch.empty(n, HIDDEN)
    for r in range(n):
        t = by_id.get(r)
        emb[r] = token_value(tag, t) if t is not None else 1000.0 + r
    emb += torch.arange(HIDDEN) / 64.0            # columns differ, still exact in float32
    g = torch.Generator().manual_seed(seed)
    tensors = {
        "model.embed_tokens.weight": emb,
        "model.layers.0.self_attn.q_proj.weight": torch.randn(HIDDEN, HIDDEN, generator=g) * 0.02,
        "model.layers.0.input_layernorm.weight": torch.ones(HIDDEN),
        "model.norm.weight": torch.ones(HIDDEN),
        "lm_head.weight": -emb,
    }
    save_file({k: v.to(dtype).contiguous() for k, v in tensors.items()}, str(path / "model.safetensors"),
              metadata={"format": "pt"})
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": HIDDEN,
              "num_hidden_layers": 1, "vocab_size": n, "tie_word_embeddings": False,
              "torch_dtype": {torch.float32: "float32", torch.bfloat16: "bfloat16"}[dtype]}
    (path / "config.json").write_text(json.dumps(config, indent=2))
    if tokenizer:
        (path / "tokenizer.json").write_text(json.dumps(tokenizer_json(vocab, added, kind)))
    if tokenizer_config:
        dec = {str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
                        "special": True} for i, t in enumerate(vocab) if t in SPECIALS}
        for t, i, special in added:
            dec[str(i)] = {"content": t, "lstrip": False, "normalized": not special, "rstrip": False,
                           "single_word": False, "special": special}
        (path / "tokenizer_config.json").write_text(json.dumps({
            "added_tokens_decoder": dec, "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
            "tokenizer_class": "PreTrainedTokenizerFast", "name_or_path": tag}, indent=2))
    (path / "special_tokens_map.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>",
                                                              "unk_token": "<unk>"}))
    (path / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2,
                                                             "comment": f"from {tag}"}))
    return path


# The three vocabularies the tests use: they overlap partially and order shared tokens differently.
VOCAB_A = SPECIALS + ["a", "b", "c", "d"]                              # 7 rows
VOCAB_B = SPECIALS + ["b", "a", "e", "f"]                              # + added <|im_start|> at 7: 8 rows
ADDED_B = [("<|im_start|>", 7, True)]
VOCAB_C = SPECIALS + ["a", "g"]                                        # BPE, 5 rows


def make_abc(root: Path, dtype: torch.dtype = torch.float32) -> dict[str, Path]:
    return {
        "A": make_model(root / "A", "A", VOCAB_A, dtype=dtype, seed=1),
        "B": make_model(root / "B", "B", VOCAB_B, ADDED_B, dtype=dtype, seed=2),
        "C": make_model(root / "C", "C", VOCAB_C, kind="BPE", dtype=dtype, seed=3),
    }


def row_value(tag: str, token: str) -> torch.Tensor:
    """The embed_tokens row make_model writes for `token` in model `tag`."""
    return token_value(tag, token) + torch.arange(HIDDEN) / 64.0


# ----------------------------------------------------------------------------------------------------------------
# helpers: open the models as the planner does and call plan_vocab
# ----------------------------------------------------------------------------------------------------------------
class Opened:
    """The inputs plan_vocab gets from the planner: sources by key, src_keys (models, then the base if it is not
    one of them), base key and lead key (the base, else the first model)."""

    def __init__(self, recipe: dict):
        self.recipe = recipe
        refs = [m["model"] if isinstance(m, dict) else m for m in recipe.get("models", [])]
        base = recipe.get("base_model")
        self.sources: dict[str, Checkpoint] = {}
        self.model_keys = []
        for ref in refs + ([base] if base else []):
            k = V.source_key(str(ref))
            if k not in self.sources:
                self.sources[k] = Checkpoint.open(ref)
            if ref in refs and k not in self.model_keys:
                self.model_keys.append(k)
        self.base_key = V.source_key(str(base)) if base else None
        self.src_keys = list(self.model_keys)
        if self.base_key and self.base_key not in self.src_keys:
            self.src_keys.append(self.base_key)
        self.lead_key = self.base_key or self.model_keys[0]

    def plan(self) -> V.VocabPlan | None:
        return V.plan_vocab(self.recipe, "recipe.yaml", self.sources, self.src_keys, self.base_key, self.lead_key)

    def key(self, path: Path) -> str:
        return V.source_key(str(path))

    def reader(self, name: str):
        return lambda key, rows: R.read_token_rows(self.sources[key], name, rows)

    def close(self):
        for c in self.sources.values():
            c.close()


@pytest.fixture
def abc(tmp_path) -> dict[str, Path]:
    return make_abc(tmp_path)


@pytest.fixture
def opened():
    made: list[Opened] = []

    def open_(recipe: dict) -> Opened:
        o = Opened(recipe)
        made.append(o)
        return o

    yield open_
    for o in made:
        o.close()


def ties_recipe(m: dict[str, Path], **top) -> dict:
    return {"merge_method": "ties", "base_model": str(m["A"]),
            "models": [{"model": str(m["B"]), "parameters": {"weight": 0.5, "density": 0.5}},
                       {"model": str(m["C"]), "parameters": {"weight": 0.5, "density": 0.5}}], **top}


def assemble(o: Opened, vp: V.VocabPlan, key: str, name: str, block: int | None = None) -> torch.Tensor:
    """The whole mapped tensor of source `key`, assembled block by block through block_attrs + load_block."""
    block = block or vp.out_vocab
    parts = []
    for a in range(0, vp.out_vocab, block):
        rows = (a, min(a + block, vp.out_vocab))
        vocab = vp.block_attrs(key, name, rows)
        if vocab is not None:
            parts.append(R.load_block(o.reader(name), key, vocab))
        else:                                            # an identity source: a plain row-block load
            parts.append(o.reader(name)(key, rows))
    return torch.cat(parts)


def test_token_values_distinct():
    vals = {(tag, t): token_value(tag, t) for tag, vocab in (("A", VOCAB_A), ("B", VOCAB_B + ["<|im_start|>"]),
                                                             ("C", VOCAB_C)) for t in vocab}
    assert len(set(vals.values())) == len(vals)


# ----------------------------------------------------------------------------------------------------------------
# union
# ----------------------------------------------------------------------------------------------------------------
UNION = ["<unk>", "<s>", "</s>", "a", "b", "c", "d", "e", "f", "g", "<|im_start|>"]


def test_union_order_and_row_maps(abc, opened):
    o = opened(ties_recipe(abc, tokenizer_source="union"))
    vp = o.plan()
    A, B, C = (o.key(abc[x]) for x in "ABC")
    # base vocabulary first with its ids, then the other models' regular tokens (recipe order, id order), then
    # their added tokens
    assert vp.out_vocab == len(UNION) == 11
    assert vp.tensors == {"model.embed_tokens.weight", "lm_head.weight"}
    assert vp.fallback == "base"
    assert vp.row_maps[A] == (0, 1, 2, 3, 4, 5, 6, -1, -1, -1, -1)
    assert vp.row_maps[B] == (0, 1, 2, 4, 3, -1, -1, 5, 6, -1, 7)
    assert vp.row_maps[C] == (0, 1, 2, 3, -1, -1, -1, -1, -1, 4, -1)
    # missing rows: the base's row when the base has the token, else the only model that has it
    assert vp.fill[A] == {7: ((B, 5, 6),), 8: ((B, 6, 7),), 9: ((C, 4, 5),), 10: ((B, 7, 8),)}
    assert vp.fill[B] == {5: ((A, 5, 6),), 6: ((A, 6, 7),), 9: ((C, 4, 5),)}
    assert vp.fill[C] == {4: ((A, 4, 5),), 5: ((A, 5, 6),), 6: ((A, 6, 7),), 7: ((B, 5, 6),), 8: ((B, 6, 7),),
                          10: ((B, 7, 8),)}
    assert vp.warnings == []


def test_union_mapped_tensors(abc, opened):
    o = opened(ties_recipe(abc, tokenizer_source="union"))
    vp = o.plan()
    owner = {"A": VOCAB_A, "B": VOCAB_B + ["<|im_start|>"], "C": VOCAB_C}
    for tag in "ABC":
        key = o.key(abc[tag])
        for name, sign in (("model.embed_tokens.weight", 1.0), ("lm_head.weight", -1.0)):
            for block in (None, 1, 3, 4):
                got = assemble(o, vp, key, name, block)
                assert got.shape == (11, HIDDEN)
                for r, tok in enumerate(UNION):
                    if tok in owner[tag]:
                        want_tag = tag
                    elif tok in owner["A"]:
                        want_tag = "A"                       # the base has it
                    else:
                        want_tag = next(t for t in "BC" if tok in owner[t])
                    torch.testing.assert_close(got[r], sign * row_value(want_tag, tok), rtol=0, atol=0)


def test_union_without_base_takes_the_mean(abc, opened):
    recipe = {"merge_method": "linear", "models": [{"model": str(abc[x]), "parameters": {"weight": 1.0}}
                                                   for x in "ABC"], "tokenizer_source": "union"}
    o = opened(recipe)
    vp = o.plan()
    A, B, C = (o.key(abc[x]) for x in "ABC")
    assert vp.fallback == "mean"
    assert vp.row_maps[C][4] == -1 and vp.fill[C][4] == ((A, 4, 5), (B, 3, 4))    # "b": in A and B
    got = assemble(o, vp, C, "model.embed_tokens.weight")
    torch.testing.assert_close(got[4], (row_value("A", "b") + row_value("B", "b")) / 2, rtol=0, atol=1e-6)
    # a token only one model has: that model's row
    assert vp.fill[A][9] == ((C, 4, 5),)


def test_union_tokenizer_files(abc, opened):
    o = opened(ties_recipe(abc, tokenizer_source="union"))
    vp = o.plan()
    assert set(vp.files) == {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"}
    doc = json.loads(vp.files["tokenizer.json"])
    base_doc = json.loads((abc["A"] / "tokenizer.json").read_text())
    assert doc["model"] == base_doc["model"]                  # the base's model section is untouched
    added = {e["content"]: e for e in doc["added_tokens"]}
    assert {t: added[t]["id"] for t in ("e", "f", "g", "<|im_start|>")} == {"e": 7, "f": 8, "g": 9,
                                                                           "<|im_start|>": 10}
    assert added["e"]["special"] is False and added["e"]["normalized"] is True
    assert added["<|im_start|>"]["special"] is True          # an added token keeps its settings
    cfg = json.loads(vp.files["tokenizer_config.json"])
    assert cfg["added_tokens_decoder"]["10"]["content"] == "<|im_start|>"
    assert cfg["added_tokens_decoder"]["7"]["content"] == "e"
    assert cfg["name_or_path"] == "A"
    assert vp.files["special_tokens_map.json"] == (abc["A"] / "special_tokens_map.json").read_bytes()


def test_union_tokenizer_loads_with_tokenizers(abc, opened):
    tokenizers = pytest.importorskip("tokenizers")
    o = opened(ties_recipe(abc, tokenizer_source="union"))
    vp = o.plan()
    tok = tokenizers.Tokenizer.from_str(vp.files["tokenizer.json"].decode())
    vocab = tok.get_vocab(with_added_tokens=True)
    assert {t: vocab[t] for t in UNION} == {t: i for i, t in enumerate(UNION)}
    assert tok.encode("a g e").ids == [3, 9, 7]


def test_tokenizer_block_defaults_to_union(abc, opened):
    o = opened(ties_recipe(abc, tokenizer={}))
    vp = o.plan()
    assert vp.out_vocab == 11 and vp.source == "union"


# ----------------------------------------------------------------------------------------------------------------
# base / a model's tokenizer
# ----------------------------------------------------------------------------------------------------------------
def test_tokenizer_source_base(abc, opened):
    o = opened(ties_recipe(abc, tokenizer_source="base"))
    vp = o.plan()
    A, B, C = (o.key(abc[x]) for x in "ABC")
    assert vp.out_vocab == 7
    assert vp.row_maps[A] == tuple(range(7))
    assert vp.row_maps[B] == (0, 1, 2, 4, 3, -1, -1)          # B's extra tokens (e, f, <|im_start|>) dropped
    assert vp.row_maps[C] == (0, 1, 2, 3, -1, -1, -1)
    assert vp.fill[B] == {5: ((A, 5, 6),), 6: ((A, 6, 7),)}
    # the base's tokenizer files, byte for byte
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        assert vp.files[name] == (abc["A"] / name).read_bytes()


def test_tokenizer_source_model(abc, opened):
    o = opened(ties_recipe(abc, tokenizer_source=str(abc["B"])))
    vp = o.plan()
    A, B, C = (o.key(abc[x]) for x in "ABC")
    assert vp.out_vocab == 8 and vp.source == B
    assert vp.row_maps[B] == tuple(range(8))
    assert vp.row_maps[A] == (0, 1, 2, 4, 3, -1, -1, -1)      # output row 3 is B's "b", A's row 4
    assert vp.fill[A] == {5: ((B, 5, 6),), 6: ((B, 6, 7),), 7: ((B, 7, 8),)}
    assert vp.files["tokenizer.json"] == (abc["B"] / "tokenizer.json").read_bytes()
    # mergekit's older spelling
    o2 = opened(ties_recipe(abc, tokenizer_source=f"model:{abc['B']}"))
    assert o2.plan().row_maps[A] == vp.row_maps[A]


def test_same_vocab_with_source_changes_no_rows(tmp_path, opened):
    a = make_model(tmp_path / "a", "a", VOCAB_A)
    b = make_model(tmp_path / "b", "b", VOCAB_A)
    o = opened({"merge_method": "ties", "base_model": str(a), "models": [{"model": str(b)}],
                "tokenizer_source": "union"})
    vp = o.plan()
    assert vp is not None and vp.tensors == set() and vp.row_maps == {}
    assert vp.out_vocab == 7
    assert vp.files["tokenizer.json"] == (a / "tokenizer.json").read_bytes()


# ----------------------------------------------------------------------------------------------------------------
# tokens: / force / pad_to_multiple_of
# ----------------------------------------------------------------------------------------------------------------
def test_tokens_block(abc, opened):
    block = {"source": "union", "pad_to_multiple_of": 16, "tokens": {
        "c": {"source": str(abc["A"]), "force": True},                                        # everyone: A's c
        "e": {"source": {"kind": "model_token", "model": str(abc["B"]), "token": "f"}},       # missing: B's f
        "g": {"source": {"kind": "zero"}},
        "<new>": {"source": {"kind": "model_token", "model": str(abc["A"]), "token_id": 1}},  # added; A's <s>
        "<pad>": {},                                                                          # added; nobody
    }}
    o = opened(ties_recipe(abc, tokenizer=block))
    vp = o.plan()
    A, B, C = (o.key(abc[x]) for x in "ABC")
    # 11 union tokens + <new> + <pad> = 13, padded to 16
    assert vp.out_vocab == 16
    doc = json.loads(vp.files["tokenizer.json"])
    ids = {e["content"]: e["id"] for e in doc["added_tokens"]}
    assert ids["<new>"] == 11 and ids["<pad>"] == 12
    emb = "model.embed_tokens.weight"
    got = {t: assemble(o, vp, o.key(abc[t]), emb) for t in "ABC"}
    for t in "ABC":
        torch.testing.assert_close(got[t][5], row_value("A", "c"), rtol=0, atol=0)   # forced, A has it anyway
        assert torch.equal(got[t][11], row_value("A", "<s>"))
        assert torch.equal(got[t][12], torch.zeros(HIDDEN))
    assert vp.row_maps[B][5] == -1                       # force: B has no c, but A-row even where a model has one
    torch.testing.assert_close(got["A"][7], row_value("B", "f"), rtol=0, atol=0)     # e: B's f for A and C
    torch.testing.assert_close(got["C"][7], row_value("B", "f"), rtol=0, atol=0)
    torch.testing.assert_close(got["B"][7], row_value("B", "e"), rtol=0, atol=0)     # B has e: its own
    assert torch.equal(got["A"][9], torch.zeros(HIDDEN))                              # g: zero where missing
    torch.testing.assert_close(got["C"][9], row_value("C", "g"), rtol=0, atol=0)
    # padding rows 13..15: the model's mean row (B's rows 0..7, A's 0..6)
    for t, n in (("A", 7), ("B", 8), ("C", 5)):
        k = o.key(abc[t])
        full = o.sources[k].read(emb, dtype=torch.float32)
        for r in (13, 14, 15):
            assert vp.row_maps[k][r] == -1 and vp.fill[k][r] == ((k, 0, n),)
            torch.testing.assert_close(got[t][r], full.double().mean(0).float(), rtol=0, atol=1e-6)
    assert any("'<pad>'" in w and "zeros" in w for w in vp.warnings)


def test_force_without_source_takes_the_default_for_everyone(abc, opened):
    o = opened(ties_recipe(abc, tokenizer={"source": "base", "tokens": {"a": {"force": True}}}))
    vp = o.plan()
    A, B, C = (o.key(abc[x]) for x in "ABC")
    assert [vp.row_maps[k][3] for k in (A, B, C)] == [-1, -1, -1]
    assert vp.fill[B][3] == ((A, 3, 4),)                 # the base's "a"


def test_padding_keeps_own_unused_rows(tmp_path, opened):
    # both models have 10 rows for 7 tokens (as Qwen's padded embeddings): rows 7..9 belong to no token
    a = make_model(tmp_path / "a", "a", VOCAB_A, rows=10)
    b = make_model(tmp_path / "b", "b", VOCAB_B, rows=10)
    o = opened({"merge_method": "ties", "base_model": str(a), "models": [{"model": str(b)}],
                "tokenizer_source": "base"})
    vp = o.plan()
    # the output keeps the base's 10 rows (mergekit would cut to 7); a's unused rows stay its own
    assert vp.out_vocab == 10
    assert vp.row_maps[o.key(a)] == tuple(range(10))
    assert vp.row_maps[o.key(b)][7:] == (7, 8, 9)


# ----------------------------------------------------------------------------------------------------------------
# no tokenizer setting
# ----------------------------------------------------------------------------------------------------------------
def test_no_setting_same_size_is_none(tmp_path, opened):
    a = make_model(tmp_path / "a", "a", VOCAB_A)
    b = make_model(tmp_path / "b", "b", VOCAB_C + ["x", "y"])
    o = opened({"merge_method": "linear", "models": [{"model": str(a)}, {"model": str(b)}]})
    assert o.plan() is None


def test_no_setting_smallest_shared_vocab(abc, opened):
    o = opened(ties_recipe(abc))
    vp = o.plan()
    assert vp.out_vocab == 5 and vp.source is None
    assert vp.tensors == {"model.embed_tokens.weight", "lm_head.weight"}
    assert all(m == (0, 1, 2, 3, 4) for m in vp.row_maps.values())
    assert vp.fill == {} and vp.files == {}
    assert len(vp.warnings) == 1
    w = vp.warnings[0]
    assert "smallest shared vocabulary" in w and "5 rows" in w and "tokenizer_source" in w
    for x, n in (("A", 7), ("B", 8), ("C", 5)):
        assert f"{abc[x]}: {n}" in w
    k = o.key(abc["B"])
    assert vp.identity(k) and vp.block_attrs(k, "lm_head.weight", (0, 2)) is None   # plain loads of rows [a, b)
    got = assemble(o, vp, k, "lm_head.weight", 2)
    assert torch.equal(got, o.sources[k].read("lm_head.weight", rows=(0, 5)))


# ----------------------------------------------------------------------------------------------------------------
# odd tokenizers
# ----------------------------------------------------------------------------------------------------------------
def test_ids_beyond_rows_are_dropped_and_stripped(tmp_path, opened):
    # a tokenizer listing 2 tokens more than the embedding has rows
    a = make_model(tmp_path / "a", "a", VOCAB_A + ["x", "y"], rows=7)
    b = make_model(tmp_path / "b", "b", VOCAB_B)
    o = opened({"merge_method": "ties", "base_model": str(a), "models": [{"model": str(b)}],
                "tokenizer_source": "base"})
    vp = o.plan()
    assert vp.out_vocab == 7
    assert any("2 token(s)" in w for w in vp.warnings)
    doc = json.loads(vp.files["tokenizer.json"])
    assert "x" not in doc["model"]["vocab"] and len(doc["model"]["vocab"]) == 7


def test_unigram_vocab(tmp_path, opened):
    a = make_model(tmp_path / "a", "a", VOCAB_A)
    b = make_model(tmp_path / "b", "b", VOCAB_B)
    doc = json.loads((b / "tokenizer.json").read_text())
    doc["model"] = {"type": "Unigram", "unk_id": 0, "vocab": [[t, -1.0] for t in VOCAB_B]}
    (b / "tokenizer.json").write_text(json.dumps(doc))
    o = opened({"merge_method": "ties", "base_model": str(a), "models": [{"model": str(b)}],
                "tokenizer_source": "base"})
    assert o.plan().row_maps[o.key(b)] == (0, 1, 2, 4, 3, -1, -1)


def test_missing_tokenizer_of_a_model_is_assumed_the_lead(tmp_path, opened):
    a = make_model(tmp_path / "a", "a", VOCAB_A)
    b = make_model(tmp_path / "b", "b", VOCAB_B, rows=8, tokenizer=False)
    o = opened({"merge_method": "ties", "base_model": str(a), "models": [{"model": str(b)}],
                "tokenizer_source": "union"})
    vp = o.plan()
    assert any("assuming" in w and str(b) in w for w in vp.warnings)
    assert vp.out_vocab == 7
    assert vp.row_maps[o.key(b)] == tuple(range(7))          # B's 8th row (no token in A's vocab) dropped


def test_missing_lead_tokenizer_is_an_error(tmp_path, opened):
    a = make_model(tmp_path / "a", "a", VOCAB_A, tokenizer=False)
    b = make_model(tmp_path / "b", "b", VOCAB_B)
    o = opened({"merge_method": "ties", "base_model": str(a), "models": [{"model": str(b)}],
                "tokenizer_source": "union"})
    with pytest.raises(RecipeError, match=r"tokenizer_source: .*tokenizer.json does not exist"):
        o.plan()


# ----------------------------------------------------------------------------------------------------------------
# errors: one line naming the key
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("top, pattern", [
    ({"tokenizer_source": "union", "tokenizer": {"source": "union"}}, r"recipe.yaml: tokenizer: give either"),
    ({"tokenizer": {"sorce": "union"}}, r"tokenizer: unknown key 'sorce' \(did you mean 'source'\?\)"),
    ({"tokenizer": "union"}, r"tokenizer: must be a mapping"),
    ({"tokenizer": {"pad_to_multiple_of": 0}}, r"tokenizer.pad_to_multiple_of: must be a positive integer"),
    ({"tokenizer": {"tokens": {"x": {"source": "/nonexistent/model"}}}},
     r"tokenizer.tokens.x.source: model '/nonexistent/model' is not one of the merged models"),
    ({"tokenizer": {"tokens": {"x": {"source": {"kind": "zeros"}}}}},
     r"tokenizer.tokens.x.source.kind: must be 'model_token' or 'zero', not 'zeros' \(did you mean 'zero'\?\)"),
    ({"tokenizer": {"tokens": {"x": {"forse": True}}}}, r"tokenizer.tokens.x: unknown key 'forse'"),
    ({"tokenizer_source": "unoin"}, r"tokenizer_source: 'unoin' is not 'base', 'union', a model directory or a hub id "
                                    r"\(did you mean 'union'\?\)"),
])
def test_errors(abc, opened, top, pattern):
    o = opened(ties_recipe(abc, **top))
    with pytest.raises(RecipeError, match=pattern) as exc:
        o.plan()
    assert "\n" not in str(exc.value)


def test_model_token_errors(abc, opened):
    spec = {"kind": "model_token", "model": str(abc["C"]), "token": "zzz"}
    o = opened(ties_recipe(abc, tokenizer={"tokens": {"x": {"source": spec}}}))
    with pytest.raises(RecipeError, match=r"tokenizer.tokens.x.source.token: 'zzz' is not in the vocabulary"):
        o.plan()
    spec = {"kind": "model_token", "model": str(abc["C"]), "token_id": 5}
    o = opened(ties_recipe(abc, tokenizer={"tokens": {"x": {"source": spec}}}))
    with pytest.raises(RecipeError, match=r"token_id: 5 is not a row of .* \(0\.\.4\)"):
        o.plan()


def test_mismatched_hidden_size_is_a_checkpoint_error(tmp_path, opened):
    a = make_model(tmp_path / "a", "a", VOCAB_A)
    b = make_model(tmp_path / "b", "b", VOCAB_B)
    t = {"model.embed_tokens.weight": torch.zeros(8, HIDDEN + 1), "lm_head.weight": torch.zeros(8, HIDDEN),
         "model.norm.weight": torch.ones(HIDDEN)}
    save_file(t, str(b / "model.safetensors"))
    o = opened({"merge_method": "ties", "base_model": str(a), "models": [{"model": str(b)}],
                "tokenizer_source": "union"})
    with pytest.raises(CheckpointError, match=r"tensor 'model.embed_tokens.weight' has shape \[8, 9\]"):
        o.plan()


# ----------------------------------------------------------------------------------------------------------------
# the pure pieces
# ----------------------------------------------------------------------------------------------------------------
def test_map_rows():
    src = torch.arange(20, dtype=torch.float32).reshape(10, 2) + 100      # source rows 5..14 (offset 5)
    fb = torch.tensor([[-1.0, -1.0], [-2.0, -2.0]])
    out = R.map_rows(src, [5, -1, 14, 7, -1], fb, offset=5)
    assert out.tolist() == [[100, 101], [-1, -1], [118, 119], [104, 105], [-2, -2]]
    # no source rows at all
    out = R.map_rows(None, [-1, -1], fb, row_shape=(2,))
    assert out.tolist() == [[-1, -1], [-2, -2]]
    with pytest.raises(ValueError, match="2 rows are -1 but 1 fallback"):
        R.map_rows(src, [-1, 5, -1], fb[:1], offset=5)
    with pytest.raises(ValueError, match="not all in src"):
        R.map_rows(src, [3], None, offset=5)


def test_row_runs():
    assert R.row_runs([]) == []
    assert R.row_runs([-1, -1]) == []
    assert R.row_runs([3, 4, 5]) == [(3, 6)]
    assert R.row_runs([9, 3, -1, 4], gap=0) == [(3, 5), (9, 10)]
    assert R.row_runs([9, 3, 4], gap=4) == [(3, 10)]
    assert R.row_runs([100, 0, 1], gap=16) == [(0, 2), (100, 101)]


def test_load_block_reads_only_needed_rows():
    full = torch.arange(400, dtype=torch.float32).reshape(200, 2)
    reads = []

    def read(key, rows):
        reads.append((key, rows))
        return full[rows[0]:rows[1]].clone()

    row_map = (150, 3, -1, 4, 199)
    out = R.load_block(read, "k", R.VocabRows(row_map, (((("k", 0, 2),),)), (2,), read_rows=6))
    assert out[0].tolist() == full[150].tolist() and out[4].tolist() == full[199].tolist()
    assert out[2].tolist() == full[0:2].mean(0).tolist()
    assert sum(b - a for _, (a, b) in reads) < 60                        # never the whole 200-row tensor


def test_fill_mean_independent_of_block_size(abc, opened):
    # padding rows take the whole-tensor mean: the bits must not depend on how the output is blocked
    o = opened(ties_recipe(abc, tokenizer={"source": "union", "pad_to_multiple_of": 64}))
    vp = o.plan()
    key = o.key(abc["B"])
    whole = assemble(o, vp, key, "lm_head.weight")
    for block in (1, 5, 16, 63):
        assert torch.equal(assemble(o, vp, key, "lm_head.weight", block), whole)


def test_one_dim_vocab_tensor_is_cut_too(tmp_path, opened):
    # a 1-d vocab tensor (an lm_head bias) is loaded whole, so cutting it needs a map even for an identity source
    a = make_model(tmp_path / "a", "a", VOCAB_A)
    b = make_model(tmp_path / "b", "b", VOCAB_B, ADDED_B)
    for path, n in ((a, 7), (b, 8)):
        t = load_file(str(path / "model.safetensors"))
        t["lm_head.bias"] = torch.arange(n, dtype=torch.float32)
        save_file(t, str(path / "model.safetensors"))
    o = opened({"merge_method": "linear", "models": [{"model": str(a)}, {"model": str(b)}]})
    vp = o.plan()
    assert vp.tensors == {"model.embed_tokens.weight", "lm_head.weight", "lm_head.bias"}
    kb = o.key(b)
    assert vp.block_attrs(kb, "lm_head.weight", (0, 7)) is None
    vocab = vp.block_attrs(kb, "lm_head.bias", (0, 7))
    assert vocab.map == tuple(range(7)) and vocab.row_shape == ()
    assert R.load_block(o.reader("lm_head.bias"), kb, vocab).tolist() == list(range(7))
    assert vp.block_attrs(o.key(a), "lm_head.bias", (0, 7)) is None


def test_block_attrs_are_plain(abc, opened):
    o = opened(ties_recipe(abc, tokenizer_source="union"))
    vp = o.plan()
    vocab = vp.block_attrs(o.key(abc["C"]), "lm_head.weight", (3, 8))
    assert vocab.map == (3, -1, -1, -1, -1)
    assert len(vocab.fill) == 4
    assert vocab.row_shape == (HIDDEN,)
    assert vocab.read_rows == 1 + 4
    json.dumps(dataclasses.asdict(vocab))                                 # plain values only


def test_non_tokenizer_aux_files(tmp_path):
    files = [tmp_path / n for n in ("tokenizer.json", "generation_config.json", "vocab.json", "merges.txt")]
    assert V.non_tokenizer(files) == [tmp_path / "generation_config.json"]


def test_parameter_checkpoint_follows_its_model(abc, tmp_path, opened):
    # a checkpoint named by a model's parameters (a Fisher matrix) is mapped like that model, own mean elsewhere
    fb = make_model(tmp_path / "fisher_b", "FB", VOCAB_B, ADDED_B, tokenizer=False, tokenizer_config=False)
    recipe = {"merge_method": "fisher", "tokenizer_source": "union",
              "models": [{"model": str(abc["A"]), "parameters": {"weight": 1.0}},
                         {"model": str(abc["B"]), "parameters": {"weight": 1.0, "fisher": str(fb)}}]}
    o = opened(recipe)
    kf = o.key(fb)
    o.sources[kf] = Checkpoint.open(fb)
    o.src_keys.append(kf)
    vp = o.plan()
    kb = o.key(abc["B"])
    assert vp.row_maps[kf] == vp.row_maps[kb]
    assert set(vp.fill[kf]) == {r for r, x in enumerate(vp.row_maps[kb]) if x < 0}
    assert all(f == ((kf, 0, 8),) for f in vp.fill[kf].values())
    assert not any("assuming" in w for w in vp.warnings)        # not treated as a model without a tokenizer
    # follow() is also how the planner adds such a checkpoint opened after plan_vocab
    vp.follow("late", kb, 6)
    assert vp.row_maps["late"] == tuple(r if 0 <= r < 6 else -1 for r in vp.row_maps[kb])
