"""GGUF output: `lazymerge run RECIPE OUT.gguf --gguf-type T` writes the merge as llama.cpp's converter would have
written the merge's safetensors, in the same pass.

References, never the code under test: transformers' GGUF loader reads our files back (F32/F16/BF16 tensors equal
the safetensors merge cast the same way, the tokenizer encodes as the safetensors merge's); the quantized bytes
equal `gguf.quants.quantize` on the safetensors merge's rows (llama's q/k rows permuted as llama.cpp's converter
does, written out here); the layout is checked with gguf's own reader; metadata and tensors equal what llama.cpp's
converter writes (tests/test_gguf_converter.py).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from evalkit import corpus, one_thread  # noqa: E402,F401
from gguf_kit import _permute, cache_root, make_hf_model  # noqa: E402

import lazymerge  # noqa: E402
from lazymerge.engine.quantize import quantize  # noqa: E402
from lazymerge.errors import LazyMergeError  # noqa: E402
from lazymerge.io.gguf import GGUFCheckpoint  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
QUANTS = ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1")


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    yield from cache_root(tmp_path_factory.mktemp("gguf-out"))


_MODELS: dict[tuple, Path] = {}


def model(root: Path, family: str, seed: int = 0) -> Path:
    if (family, seed) not in _MODELS:
        _MODELS[(family, seed)] = make_hf_model(root / f"{family}-{seed}", family, seed=seed)
    return _MODELS[(family, seed)]


def linear(root: Path, family: str, dtype: str = "float32") -> dict:
    a, b = model(root, family, 0), model(root, family, 1)
    return {"merge_method": "linear", "dtype": dtype,
            "models": [{"model": str(a), "parameters": {"weight": 0.6}},
                       {"model": str(b), "parameters": {"weight": 0.4}}]}


def safetensors(out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    tensors: dict[str, torch.Tensor] = {}
    for f in sorted(out.glob("*.safetensors")):
        tensors.update(load_file(str(f)))
    return tensors


def stored(path: Path) -> dict[str, "gguf.ReaderTensor"]:
    return {t.name: t for t in gguf.GGUFReader(path).tensors}


def transformers_state(path: Path) -> dict[str, torch.Tensor]:
    import transformers as T

    m = T.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    return {k: v.detach() for k, v in m.state_dict().items()}


# -- the quantizers -----------------------------------------------------------------------------------------


def _cases() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    cases = [torch.randn(64, 256, generator=g), torch.randn(8, 64, generator=g) * 1e-30, torch.zeros(4, 64),
             torch.randn(16, 64, generator=g) * 6e4, torch.randint(-16, 17, (32, 64), generator=g).float() / 16,
             (torch.randint(-254, 255, (64, 64), generator=g).float() / 2)]
    tied = torch.randn(8, 64, generator=g)
    tied[:, 7], tied[:, 12] = -3.0, 3.0                      # two values of largest magnitude, opposite signs
    cases.append(tied)
    halves = torch.randn(16, 64, generator=g)
    halves = halves * 127 / halves.abs().amax(dim=1, keepdim=True)
    halves[:, ::2] = halves[:, ::2].round() + 0.5            # exact .5 after scaling: rounding ties
    cases.append(halves)
    return cases


@pytest.mark.parametrize("code", QUANTS)
def test_quantizers_are_ggufs_bit_for_bit(code):
    for x in _cases():
        want = gguf.quants.quantize(x.numpy(), gguf.GGMLQuantizationType[code])
        assert np.array_equal(quantize(x, code).numpy(), want), (code, x.abs().max())


# -- round trip through transformers ------------------------------------------------------------------------

ROUND_TRIP = [("llama", t) for t in ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1")] + [
    ("qwen2", "f16"), ("qwen2", "q8_0"), ("qwen2", "q5_1"), ("gemma3_text", "bf16")]


@pytest.mark.parametrize("family,gtype", ROUND_TRIP)
def test_round_trip_through_transformers(root, tmp_path, family, gtype):
    dtype = "bfloat16" if gtype == "q4_1" else "float32"      # a bf16 merge is quantized from its bf16 values
    recipe = linear(root, family, dtype)
    sf = safetensors(_run(recipe, tmp_path / "st"))
    out = tmp_path / f"merged.{gtype}.gguf"
    lazymerge.merge(recipe, out, gguf_type=gtype)
    cfg = json.loads((tmp_path / "st" / "config.json").read_text())
    heads, kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    files = stored(out)
    back = transformers_state(out)
    for name, x in sf.items():
        code = {"f32": "F32", "f16": "F16", "bf16": "BF16"}.get(gtype, gtype.upper())
        x32 = x.float()
        t = next(t for t in files.values() if _hf(name, t.name, family))
        if x.dim() == 1:
            assert t.tensor_type.name == "F32"
            want = x32 + (1 if family == "gemma3_text" and name.endswith("norm.weight") else 0)
            assert np.array_equal(np.asarray(t.data).reshape(-1), want.numpy()), name
            continue
        head = name == "lm_head.weight" or (name.endswith("embed_tokens.weight") and "lm_head.weight" not in sf)
        if head and code in QUANTS:
            code = "Q8_0"      # llama-quantize makes the output head Q6_K, which gguf cannot write: Q8_0
        assert t.tensor_type.name == code, name
        if code in QUANTS:
            rows = x32.numpy()
            if family == "llama" and name.endswith(("q_proj.weight", "k_proj.weight")):
                rows = _permute(rows, heads if "q_proj" in name else kv)
            want = gguf.quants.quantize(rows, gguf.GGMLQuantizationType[code])
            assert np.array_equal(np.asarray(t.data).reshape(want.shape), want), name
            assert torch.allclose(back[name], x32, atol=0.2, rtol=0.2), name
        else:
            want = x.to({"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}[code]).float()
            assert torch.equal(back[name], want), name
    _same_tokens(tmp_path / "st", out)


def _hf(name: str, gname: str, family: str) -> bool:
    """Whether GGUF tensor `gname` holds Hugging Face tensor `name` (the test's own small name table)."""
    table = {"embed_tokens": "token_embd", "lm_head": "output", "model.norm": "output_norm",
             "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
             "post_attention_layernorm": "post_attention_norm" if family.startswith("gemma") else "ffn_norm",
             "pre_feedforward_layernorm": "ffn_norm", "post_feedforward_layernorm": "post_ffw_norm",
             "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm"}
    parts = name.split(".")
    layer = parts[2] if len(parts) > 2 and parts[1] == "layers" else None
    key = ".".join(parts[3:-1]) if layer is not None else ".".join(parts[:-1]).removeprefix("model.") \
        if name != "model.norm.weight" else "model.norm"
    key = {"embed_tokens": "embed_tokens"}.get(key, key)
    want = table[key] + "." + parts[-1]
    return gname == (f"blk.{layer}.{want}" if layer is not None else want)


def _run(recipe: dict, out: Path, **kw) -> Path:
    lazymerge.merge(recipe, out, **kw)
    return out


def _same_tokens(st_dir: Path, gguf_path: Path) -> None:
    import transformers as T

    a = T.AutoTokenizer.from_pretrained(str(st_dir))
    b = T.AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    for text in corpus(3) + ["the cat</s> sat  on\\n the <s>mat"]:
        assert a(text)["input_ids"] == b(text)["input_ids"], text


# -- layout, budget, splits, errors ---------------------------------------------------------------------------


def test_bit_identical_whatever_the_budget(root, tmp_path):
    """Row blocks cut at heads (llama's permuted q/k) or anywhere else: the same file at any budget."""
    recipe = {**linear(root, "llama"), "merge_method": "ties", "base_model": str(model(root, "llama", 0)),
              "parameters": {"density": 0.5}}
    recipe["models"] = [{"model": str(model(root, "llama", 1)), "parameters": {"weight": 0.5}},
                        {"model": str(model(root, "llama", 2)), "parameters": {"weight": 0.7}}]
    files = []
    for m in ("unlimited", "40KiB", "10KiB"):
        out = tmp_path / m / "merged.gguf"          # one name: general.name comes from it
        report = lazymerge.merge(recipe, out, memory=m, gguf_type="q4_0")
        files.append(out.read_bytes())
        if m == "10KiB":
            assert report.blocked_tensors > 0
    assert files[0] == files[1] == files[2]


def test_split_files_carry_llamacpp_split_metadata(root, tmp_path):
    recipe = linear(root, "qwen2")
    whole = tmp_path / "whole.gguf"
    lazymerge.merge(recipe, whole, gguf_type="q8_0")
    lazymerge.merge(recipe, tmp_path / "split.gguf", gguf_type="q8_0", shard_size="60KB")
    parts = sorted(tmp_path.glob("split-*.gguf"))
    assert len(parts) >= 2 and not (tmp_path / "split.gguf").exists()
    n = len(parts)
    assert [p.name for p in parts] == [f"split-{i + 1:05d}-of-{n:05d}.gguf" for i in range(n)]
    count = 0
    for i, p in enumerate(parts):
        r = gguf.GGUFReader(p)
        assert r.fields["split.no"].contents() == i and r.fields["split.count"].contents() == n
        count += len(r.tensors)
    assert gguf.GGUFReader(parts[0]).fields["split.tensors.count"].contents() == count
    assert "tokenizer.ggml.tokens" in gguf.GGUFReader(parts[0]).fields
    with GGUFCheckpoint.open(parts[0]) as a, GGUFCheckpoint.open(whole) as b:
        assert set(a.tensors) == set(b.tensors)
        assert all(torch.equal(a.read(k), b.read(k)) for k in a.tensors)


def test_gguf_directory_output(root, tmp_path):
    out = tmp_path / "merged"
    lazymerge.merge(linear(root, "qwen2"), out, format="gguf")
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "lazymerge_recipe.yaml", "lazymerge_report.json",
                                                     "merged.gguf"]
    assert (out / "README.md").read_text().startswith("---\n")       # the model card, front matter first
    lazymerge.merge(linear(root, "qwen2"), out, format="gguf", write_model_card=False, overwrite=True)
    assert "README.md" not in {p.name for p in out.iterdir()}
    r = gguf.GGUFReader(out / "merged.gguf")
    assert r.fields["general.file_type"].contents() == 32           # auto: bf16 for a float32 merge
    assert {t.tensor_type.name for t in r.tensors} == {"BF16", "F32"}


def test_overwrite_and_refusals(root, tmp_path):
    out = tmp_path / "m.gguf"
    lazymerge.merge(linear(root, "qwen2"), out, gguf_type="f16")
    first = out.read_bytes()
    with pytest.raises(LazyMergeError, match="already exists; pass --overwrite"):
        lazymerge.merge(linear(root, "qwen2"), out, gguf_type="q8_0")
    lazymerge.merge(linear(root, "qwen2"), out, gguf_type="q8_0", overwrite=True)
    assert out.read_bytes() != first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]       # no temp, no lock left behind
    with pytest.raises(LazyMergeError, match="gguf-type: 'q6_k' is not one of"):
        lazymerge.merge(linear(root, "qwen2"), tmp_path / "x.gguf", gguf_type="q6_k")
    with pytest.raises(LazyMergeError, match="--format safetensors contradicts"):
        lazymerge.merge(linear(root, "qwen2"), tmp_path / "x.gguf", format="safetensors")


def test_unmappable_architecture_is_one_line_before_any_work(root, tmp_path):
    from evalkit import make_model

    gpt2 = make_model(tmp_path / "gpt2", "gpt2")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(json.dumps({"merge_method": "passthrough", "models": [{"model": str(gpt2)}]}))
    p = subprocess.run([sys.executable, "-m", "lazymerge.cli", "run", str(recipe), str(tmp_path / "o.gguf")],
                       cwd=REPO, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "architecture 'GPT2LMHeadModel' cannot be written as GGUF" in lines[0], lines
    assert sorted(x.name for x in tmp_path.iterdir()) == ["gpt2", "r.yaml"]


# -- mixture of experts: the converter's stacked expert tensors ------------------------------------------------


@pytest.mark.parametrize("kind,gtype", [("llama", "q8_0"), ("qwen2", "f16")])
def test_moe_experts_are_stacked_as_llamacpp_does(tmp_path, kind, gtype):
    """Mixtral (llama) and Qwen2-MoE: each layer's experts are rows of one `ffn_{gate,up,down}_exps` tensor, in
    expert order, their bytes the safetensors MoE's experts stacked then cast or quantized; routers stay F32."""
    from moe_models import make_model as moe_member

    base = moe_member(tmp_path / "base", kind, 1)
    experts = [moe_member(tmp_path / f"e{i}", kind, 2 + i, like=base) for i in range(3)]
    recipe = {"base_model": str(base), "gate_mode": "random", "dtype": "float32", "experts_per_token": 2,
              "experts": [{"source_model": str(e), "positive_prompts": ["hello"]} for e in experts]}
    if kind == "qwen2":
        recipe["shared_experts"] = [{"source_model": str(base), "positive_prompts": ["hello"]}]
    sf = safetensors(_run(recipe, tmp_path / "st"))
    out = tmp_path / "moe.gguf"
    lazymerge.merge(recipe, out, gguf_type=gtype)
    files = stored(out)
    arch = gguf.GGUFReader(out).fields["general.architecture"].contents()
    assert arch == {"llama": "llama", "qwen2": "qwen2moe"}[kind]
    assert gguf.GGUFReader(out).fields[f"{arch}.expert_count"].contents() == 3
    proj = {"llama": {"gate": "w1", "up": "w3", "down": "w2"},
            "qwen2": {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}}[kind]
    pre = "block_sparse_moe" if kind == "llama" else "mlp"
    for layer in range(2):
        for g, w in proj.items():
            t = files[f"blk.{layer}.ffn_{g}_exps.weight"]
            stack = torch.stack([sf[f"model.layers.{layer}.{pre}.experts.{e}.{w}.weight"] for e in range(3)])
            assert tuple(int(d) for d in reversed(t.shape)) == tuple(stack.shape)
            rows = stack.reshape(-1, stack.shape[-1]).numpy()
            want = gguf.quants.quantize(rows, gguf.GGMLQuantizationType[gtype.upper()])
            assert np.array_equal(np.asarray(t.data).reshape(want.shape), want), (layer, g)
        router = files[f"blk.{layer}.ffn_gate_inp.weight"]
        assert router.tensor_type.name == "F32"
        assert np.array_equal(np.asarray(router.data).reshape(3, -1),
                              sf[f"model.layers.{layer}.{pre}.gate.weight"].numpy())
    if kind == "qwen2":
        assert files["blk.0.ffn_gate_inp_shexp.weight"].tensor_type.name == "F32"
        assert files["blk.0.ffn_up_shexp.weight"].tensor_type.name == "F16"


def test_resume_keeps_finished_split_files(root, tmp_path):
    """An interrupted --resume run of split GGUF files keeps the finished files (checksummed in the journal) and
    the resumed output is the clean run's, byte for byte."""
    import threading

    from lazymerge import testhold

    recipe = linear(root, "qwen2")
    opts = dict(gguf_type="q8_0", shard_size="20KB", memory="16KiB", workers=2)
    lazymerge.merge(recipe, tmp_path / "ref" / "m.gguf", **opts)
    ref = sorted((tmp_path / "ref").glob("m-*.gguf"))
    assert len(ref) >= 3
    stop = threading.Event()
    out = tmp_path / "run" / "m.gguf"
    testhold.arm("shard", 1, action=lambda info: stop.set())      # cancelled once the first file is journaled
    try:
        with pytest.raises(LazyMergeError, match="interrupted"):
            lazymerge.merge(recipe, out, resume=True, cancel=stop, **opts)
    finally:
        testhold.arm(None)
    assert not list((tmp_path / "run").glob("m*.gguf"))                  # nothing half-written is visible
    report = lazymerge.merge(recipe, out, resume=True, **opts)
    assert report.resumed_tensors > 0
    got = sorted((tmp_path / "run").glob("m-*.gguf"))
    assert [p.name for p in got] == [p.name for p in ref]
    assert all(a.read_bytes() == b.read_bytes() for a, b in zip(got, ref))
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [p.name for p in ref]
