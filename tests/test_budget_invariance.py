"""The output bytes never depend on the budget, the row blocks or the workers, for every kind of input: plain
checkpoints, LoRA-adapted models (whose weights exist only as float32 values computed from the files),
vocabulary-mapped rows and earlier stages (issue 27).

The property test draws small recipes (method x adapter x vocab alignment x dtype x stages) and merges each under
several budget / block / worker settings: one hash per recipe."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from conftest import llama_shapes
from lazymerge.io.models import open_model
from test_vocab import ADDED_B, VOCAB_A, VOCAB_B, tokenizer_json

LORA_TARGETS = ("q_proj", "v_proj", "up_proj", "down_proj")
# the five settings of issue 27's reproduction: (memory, max_block_rows)
SETTINGS = [("unlimited", None), ("unlimited", 4), ("64MiB", 4), ("8MiB", 8), ("1MiB", 1)]


def write_lora(path: Path, seed: int, r: int = 4, targets: tuple[str, ...] = LORA_TARGETS,
               alpha: float = 8.0) -> Path:
    """A PEFT-layout LoRA adapter for the tiny Llama (conftest) with random non-zero factors."""
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, shape in llama_shapes().items():
        mod = name.removesuffix(".weight")
        if mod.rsplit(".", 1)[-1] in targets:
            tensors[f"base_model.model.{mod}.lora_A.weight"] = torch.randn(r, shape[1], generator=g) * 0.1
            tensors[f"base_model.model.{mod}.lora_B.weight"] = torch.randn(shape[0], r, generator=g) * 0.1
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / "adapter_model.safetensors"))
    (path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": r, "lora_alpha": alpha,
                                                          "target_modules": list(targets)}))
    return path


def output_hash(out: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(Path(out).glob("*.safetensors")):
        h.update(f.name.encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def hashes_over(recipe: dict, root: Path, cases: list[tuple], **kwargs) -> dict[tuple, str]:
    import lazymerge

    out = {}
    for i, (memory, rows, *rest) in enumerate(cases):
        workers = rest[0] if rest else None
        d = root / f"out{i}"
        lazymerge.merge(recipe, d, memory=memory, max_block_rows=rows, workers=workers, **kwargs)
        out[(memory, rows, workers)] = output_hash(d)
    return out


# -- the property: random small recipes, one output whatever the budget, blocks and workers ----------------------

H, FF = 8, 12                   # hidden and MLP sizes of the property test's models (one layer)
PROPERTY_SETTINGS = [("unlimited", None, 1), ("unlimited", 3, 2), ("96KiB", 5, 3), ("8KiB", 2, 2)]
METHODS = {   # name -> (models besides the base: how many, per-model parameters, global parameters)
    "linear": (2, {"weight": 0.6}, {}),
    "task_arithmetic": (2, {"weight": 0.7}, {}),
    "ties": (2, {"weight": 0.5, "density": 0.5}, {}),
    "dare_ties": (2, {"weight": 0.5, "density": 0.6}, {}),
    "breadcrumbs_ties": (2, {"weight": 0.5, "density": 0.7, "gamma": 0.1}, {}),
    "della": (2, {"weight": 0.5, "density": 0.6, "epsilon": 0.1}, {}),
    "sce": (2, {}, {"select_topk": 0.5}),
    "model_stock": (2, {}, {}),
    "slerp": (1, {}, {"t": 0.3}),
    "multislerp": (2, {"weight": 0.5}, {}),
    "nearswap": (1, {}, {"t": 0.01}),
    "arcee_fusion": (1, {}, {}),
    "ramplus_tl": (2, {}, {}),
}


def _write_model(path: Path, vocab: list[str], added: list, dtype: torch.dtype, seed: int,
                 base: dict | None = None) -> dict:
    """A one-layer Llama-named checkpoint with a tokenizer: random weights (base), or base + small noise, rows
    of shared tokens following their token (so fine-tunes of another vocabulary stay close to the base)."""
    g = torch.Generator().manual_seed(seed)
    rows = max(len(vocab), max((i for _, i, _ in added), default=-1) + 1)
    shapes = {"model.embed_tokens.weight": (rows, H), "model.layers.0.self_attn.q_proj.weight": (H, H),
              "model.layers.0.self_attn.v_proj.weight": (H // 2, H), "model.layers.0.mlp.up_proj.weight": (FF, H),
              "model.layers.0.mlp.down_proj.weight": (H, FF), "model.layers.0.input_layernorm.weight": (H,),
              "model.norm.weight": (H,), "lm_head.weight": (rows, H)}
    tokens = vocab + [t for t, _, _ in added]
    t = {}
    for name, shape in shapes.items():
        if base is None:
            t[name] = torch.ones(shape) if len(shape) == 1 else torch.randn(shape, generator=g) * 0.05
            continue
        noise = torch.randn(shape, generator=g) * 0.01
        if name in ("model.embed_tokens.weight", "lm_head.weight"):
            ref = {tok: base["t"][name][i] for i, tok in enumerate(base["tokens"])}
            t[name] = torch.stack([ref.get(tok, torch.zeros(H)) for tok in tokens]) + noise
        else:
            t[name] = base["t"][name] + noise
    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.to(dtype).contiguous() for k, v in t.items()}, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": H, "intermediate_size": FF,
        "num_hidden_layers": 1, "vocab_size": rows, "tie_word_embeddings": False}))
    (path / "tokenizer.json").write_text(json.dumps(tokenizer_json(vocab, added)))
    return {"t": t, "tokens": tokens, "path": path}


@pytest.fixture(scope="module")
def family(tmp_path_factory) -> dict:
    """Per input dtype: base, ft1, ft2 (vocabulary A), ftB (vocabulary B), and two LoRA adapters."""
    root = tmp_path_factory.mktemp("family")
    out = {}
    for tag, dtype in (("bf16", torch.bfloat16), ("f32", torch.float32)):
        base = _write_model(root / tag / "base", VOCAB_A, [], dtype, 1)
        m = {"base": base["path"]}
        for i, (name, vocab, added) in enumerate([("ft1", VOCAB_A, []), ("ft2", VOCAB_A, []),
                                                 ("ftB", VOCAB_B, ADDED_B)]):
            m[name] = _write_model(root / tag / name, vocab, added, dtype, 10 + i, base)["path"]
        out[tag] = m
    g = torch.Generator().manual_seed(3)
    shapes = {"self_attn.q_proj": (H, H), "self_attn.v_proj": (H // 2, H), "mlp.up_proj": (FF, H),
              "mlp.down_proj": (H, FF)}
    for k, (r, targets) in enumerate([(4, ["q_proj", "v_proj", "up_proj", "down_proj"]), (2, ["up_proj", "v_proj"])]):
        d = root / f"lora{k}"
        d.mkdir()
        tensors = {}
        for mod, (o, i) in shapes.items():
            if mod.rsplit(".", 1)[-1] in targets:
                tensors[f"base_model.model.model.layers.0.{mod}.lora_A.weight"] = torch.randn(r, i, generator=g) * 0.2
                tensors[f"base_model.model.model.layers.0.{mod}.lora_B.weight"] = torch.randn(o, r, generator=g) * 0.2
        save_file(tensors, str(d / "adapter_model.safetensors"))
        (d / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": r, "lora_alpha": 2 * r,
                                                           "target_modules": targets}))
        out[f"lora{k}"] = d
    return out


def test_lora_ties_merge_does_not_depend_on_budget_or_blocks(family: dict, tmp_path: Path) -> None:
    """Issue 27's reproduction: TIES over base+LoRA (r 4 on q/v/up/down, bf16 base) and a full fine-tune, bf16
    out, under five budget / block settings. It gave three different outputs (a multi-block tensor read its
    adapted input "as stored", i.e. W + scale*B@A rounded to bf16, a one-block tensor kept float32)."""
    import lazymerge

    m = family["bf16"]
    lora = family["lora0"]
    recipe = {"merge_method": "ties", "base_model": str(m["base"]), "dtype": "bfloat16",
              "parameters": {"density": 0.5, "weight": 0.5},
              "models": [{"model": f"{m['base']}+{lora}"}, {"model": str(m["ft1"])}]}
    # the settings do block the adapted tensors, and share their loads between phases (the case that went wrong)
    p = lazymerge.plan(recipe, memory="64MiB", max_block_rows=4)
    try:
        assert p.blocks["model.layers.0.mlp.up_proj.weight"] > 1
        assert any(t.op == "cast" and t.tensor == "model.layers.0.mlp.up_proj.weight" for t in p.tasks.tasks)
    finally:
        p.close()
    hashes = hashes_over(recipe, tmp_path, SETTINGS)
    assert len(set(hashes.values())) == 1, hashes
    # and the merge is the adapted model's: the same recipe over the adapter merged into a float32 copy of the
    # base (a plain checkpoint) gives the same bytes
    merged = tmp_path / "merged32"
    merged.mkdir()
    with open_model(f"{m['base']}+{lora}") as ck:
        save_file({n: ck.read(n) for n in ck.tensors}, str(merged / "model.safetensors"))
    plain = {**recipe, "models": [{"model": str(merged)}, {"model": str(m["ft1"])}]}
    lazymerge.merge(plain, tmp_path / "plain")
    assert output_hash(tmp_path / "plain") == next(iter(hashes.values()))


@st.composite
def small_recipes(draw: st.DrawFn) -> tuple[str, dict]:
    """(a description, the recipe: one document, or two stages whose second takes the first as a model)."""
    method = draw(st.sampled_from(sorted(METHODS)))
    n, per_model, glob = METHODS[method]
    tag = draw(st.sampled_from(["bf16", "f32"]))
    vocab = draw(st.booleans())
    adapter = draw(st.sampled_from([None, "lora0", "lora1"]))
    adapted = draw(st.integers(0, n - 1))
    staged = draw(st.booleans())
    out_dtype = draw(st.sampled_from(["bfloat16", "float32", "float16"]))
    return tag, {"method": method, "vocab": vocab, "adapter": adapter, "adapted": adapted, "staged": staged,
                 "dtype": out_dtype}


def build_recipe(family: dict, tag: str, c: dict) -> list[dict]:
    m = {k: str(v) for k, v in family[tag].items()}
    n, per_model, glob = METHODS[c["method"]]
    names = ["ftB" if c["vocab"] else "ft1", "ft2"][:n]
    refs = [m[x] for x in names]
    if c["adapter"]:
        refs[c["adapted"]] += f"+{family[c['adapter']]}"
    docs = []
    if c["staged"]:       # an earlier stage (a virtual source) in place of the first model
        docs.append({"name": "first", "merge_method": "linear", "dtype": "float32",
                     "models": [{"model": refs[0], "parameters": {"weight": 0.5}},
                                {"model": m["ft1"], "parameters": {"weight": 0.5}}]}
                    | ({"tokenizer_source": "union"} if c["vocab"] else {}))
        refs[0] = "first"
    doc = {"merge_method": c["method"], "base_model": m["base"], "dtype": c["dtype"],
           "models": [{"model": r, **({"parameters": dict(per_model)} if per_model else {})} for r in refs]}
    if glob:
        doc["parameters"] = dict(glob)
    if c["vocab"]:
        doc["tokenizer_source"] = "union"
    return docs + [doc]


@settings(max_examples=int(os.environ.get("LAZYMERGE_PROPERTY_EXAMPLES", "6")), derandomize=True, deadline=None,
          database=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(small_recipes())
def test_output_does_not_depend_on_memory_blocks_or_workers(family: dict, tmp_path_factory, case) -> None:
    tag, c = case
    docs = build_recipe(family, tag, c)
    text = yaml.safe_dump_all(docs, sort_keys=False)
    root = tmp_path_factory.mktemp("prop")
    hashes = hashes_over(text, root, PROPERTY_SETTINGS)
    assert len(set(hashes.values())) == 1, (c, tag, hashes)
