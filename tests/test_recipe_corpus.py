"""A corpus of recipes in the forms mergekit's documentation and model cards use (tests/recipes/*.yaml), each
planned and run on the tiny bf16 models of conftest.py.

Model paths in the recipes are the placeholders {base}, {ft1}, {ft2}, {ft3}. A recipe may state what its output
looks like when it differs from the base model's layout, in header comments:
`# expect-layers: N` (a frankenmerge) and `# expect-vocab: N` (a padded tokenizer). Every output is checked for:
exactly the expected tensors, with the expected shapes and dtype (out_dtype, else dtype, else the inputs'
bfloat16), finite values, config.json (layers, vocab size) and a tokenizer.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import yaml

from conftest import LAYERS, VOCAB, llama_shapes, read_all

RECIPES = sorted((Path(__file__).parent / "recipes").glob("*.yaml"))
TORCH_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
                "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
PLACEHOLDERS = ("base", "ft1", "ft2", "ft3")


def test_corpus_size():
    assert len(RECIPES) >= 20


def expectations(text: str) -> dict[str, int]:
    found = dict(re.findall(r"^# expect-(\w+): (\d+)\s*$", text, flags=re.M))
    return {"layers": int(found.get("layers", LAYERS)), "vocab": int(found.get("vocab", VOCAB))}


def expected_shapes(layers: int, vocab: int) -> dict[str, tuple[int, ...]]:
    """The tiny Llama's tensors with `layers` decoder layers and `vocab` rows of embeddings / lm_head."""
    base = llama_shapes()
    out = {}
    for name, shape in base.items():
        if name.startswith("model.layers."):
            if name.startswith("model.layers.0."):
                for i in range(layers):
                    out[name.replace("model.layers.0.", f"model.layers.{i}.", 1)] = shape
        elif name in ("model.embed_tokens.weight", "lm_head.weight"):
            out[name] = (vocab, *shape[1:])
        else:
            out[name] = shape
    return out


def substitute(text: str, models: dict[str, Path]) -> str:
    for key in PLACEHOLDERS:
        text = text.replace("{" + key + "}", str(models[key]))
    assert not re.search(r"\{(base|ft\d)\}", text)
    return text


@pytest.mark.parametrize("recipe_file", RECIPES, ids=[p.stem for p in RECIPES])
def test_recipe(recipe_file: Path, models_bf16, tmp_path):
    import lazymerge

    text = recipe_file.read_text()
    exp = expectations(text)
    recipe = tmp_path / recipe_file.name
    recipe.write_text(substitute(text, models_bf16))
    final = [d for d in yaml.safe_load_all(recipe.read_text()) if d][-1]       # the output stage
    want_dtype = TORCH_DTYPES[final.get("out_dtype") or final.get("dtype") or "bfloat16"]

    out = tmp_path / "out"
    lazymerge.merge(recipe, out, memory="unlimited", seed=1)

    tensors = read_all(out)
    want = expected_shapes(exp["layers"], exp["vocab"])
    assert set(tensors) == set(want), (f"missing: {sorted(set(want) - set(tensors))}, "
                                       f"unexpected: {sorted(set(tensors) - set(want))}")
    for name, t in tensors.items():
        assert tuple(t.shape) == want[name], f"{name}: shape {tuple(t.shape)}, expected {want[name]}"
        assert t.dtype == want_dtype, f"{name}: dtype {t.dtype}, expected {want_dtype}"
        assert bool(torch.isfinite(t.float()).all()), f"{name}: non-finite values"
    config = json.loads((out / "config.json").read_text())
    assert config["num_hidden_layers"] == exp["layers"]
    assert config["vocab_size"] == exp["vocab"]
    assert (out / "tokenizer.json").is_file()
    doc = json.loads((out / "tokenizer.json").read_text())
    n_tokens = len(doc["model"]["vocab"]) + sum(1 for e in doc.get("added_tokens", [])
                                                if e["content"] not in doc["model"]["vocab"])
    assert n_tokens <= exp["vocab"]
