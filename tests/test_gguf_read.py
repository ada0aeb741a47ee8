"""GGUF inputs: a `.gguf` (split files, or a directory holding one) is a model wherever a model is named.

The reference is transformers' GGUF loader (`from_pretrained(..., gguf_file=)`): lazymerge's tensors, read one
row block at a time, equal its dequantized state dict bit for bit, for every family read and every quant type;
the config and tokenizer are transformers' own conversion; `eval` of a GGUF equals transformers' perplexity of the
model it loads from the file. The GGUFs are tiny models written by tests/gguf_kit.py with `gguf`'s writer.
"""
from __future__ import annotations

import json
import math
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("gguf")
pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from evalkit import corpus, one_thread, write_texts  # noqa: E402,F401
from gguf_kit import cache_root, make_hf_model, write_gguf  # noqa: E402

import lazymerge  # noqa: E402
from lazymerge.errors import CheckpointError  # noqa: E402
from lazymerge.io.models import open_model  # noqa: E402
from lazymerge.io.gguf import GGUFCheckpoint  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CASES = [("llama", q) for q in ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1")] + [
    ("mistral", "Q4_0"), ("qwen2", "Q8_0"), ("qwen2", "Q5_1"), ("qwen3", "Q4_1"), ("phi3", "Q8_0"),
    ("gemma2", "Q5_0"), ("gemma3_text", "F16")]
K_CASES = [("llama", q) for q in ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")] + [("qwen2", "Q6_K")]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    yield from cache_root(tmp_path_factory.mktemp("gguf"))


_MODELS: dict[tuple, Path] = {}


def hf_model(root: Path, family: str, hidden: int = 64, seed: int = 0) -> Path:
    key = (family, hidden, seed)
    if key not in _MODELS:
        _MODELS[key] = make_hf_model(root / f"hf-{family}-{hidden}-{seed}", family, hidden=hidden, seed=seed)
    return _MODELS[key]


def gguf_of(root: Path, family: str, qtype: str, hidden: int = 64, seed: int = 0, **kw) -> Path:
    out = root / f"{family}-{hidden}-{seed}-{qtype}{'-split' if kw else ''}" / "model.gguf"
    if not out.parent.exists():
        out.parent.mkdir()
        write_gguf(hf_model(root, family, hidden, seed), out, qtype, **kw)
    return out


def reference(path: Path) -> dict[str, torch.Tensor]:
    import transformers as T

    model = T.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    return {k: v.detach() for k, v in model.state_dict().items()}


def check_equal(path: Path) -> GGUFCheckpoint:
    ref = reference(path)
    ck = GGUFCheckpoint.open(path)
    assert set(ref) - set(ck.tensors) <= {"lm_head.weight"} and set(ck.tensors) <= set(ref)
    if "lm_head.weight" not in ck.tensors:
        assert ck.config["tie_word_embeddings"]
    for name, info in ck.tensors.items():
        whole = ck.read(name)
        assert whole.dtype == torch.float32 and torch.equal(whole, ref[name]), name
        assert torch.equal(ck.read(name, dtype=None).float(), whole)
        rows = info.rows
        if rows > 2:           # any row blocks, including ones cutting through a permuted head
            cuts = [0, 1, rows // 3 + 1, rows - 1, rows]
            parts = [ck.read(name, (a, b)) for a, b in zip(cuts, cuts[1:])]
            assert torch.equal(torch.cat(parts), whole), name
    return ck


@pytest.mark.parametrize("family,qtype", CASES)
def test_tensors_equal_transformers(root, family, qtype):
    ck = check_equal(gguf_of(root, family, qtype))
    stored = {i.stored.ggml_type for i in ck.tensors.values()}
    import gguf

    assert gguf.GGMLQuantizationType[qtype] in stored
    ck.close()


@pytest.mark.parametrize("family,qtype", K_CASES)
def test_k_quants_equal_transformers(root, family, qtype):
    check_equal(gguf_of(root, family, qtype, hidden=256)).close()


def test_presented_dtypes(root):
    """Quantized tensors present float32 (their dequantized values, also what a raw read returns); F16/BF16
    present themselves; Gemma's offset norms present float32 (the offset is undone in float32)."""
    with GGUFCheckpoint.open(gguf_of(root, "llama", "Q4_0")) as ck:
        assert {i.dtype for i in ck.tensors.values()} == {"F32"}
        assert ck.read_stored("model.layers.0.mlp.up_proj.weight").dtype == torch.float32
    with GGUFCheckpoint.open(gguf_of(root, "llama", "BF16")) as ck:
        assert ck.tensors["model.layers.0.mlp.up_proj.weight"].dtype == "BF16"
        assert ck.read_stored("model.layers.0.mlp.up_proj.weight").dtype == torch.bfloat16
    with GGUFCheckpoint.open(gguf_of(root, "gemma3_text", "F16")) as ck:
        assert ck.tensors["model.norm.weight"].dtype == "F32"
        assert ck.tensors["model.layers.0.mlp.up_proj.weight"].dtype == "F16"


def test_config_and_tokenizer_are_transformers_conversion(root):
    import transformers as T

    path = gguf_of(root, "qwen2", "Q8_0")
    ck = open_model(path)
    ref_cfg = T.AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
    ours = T.AutoConfig.from_pretrained(str(ck.config_dir))
    drop = {"_name_or_path"}                     # where each was loaded from
    assert ({k: v for k, v in ours.to_dict().items() if k not in drop}
            == {k: v for k, v in ref_cfg.to_dict().items() if k not in drop} | {"tie_word_embeddings": True})
    assert json.loads((ck.config_dir / "config.json").read_text()) == ck.config
    ref_tok = T.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    tok = T.AutoTokenizer.from_pretrained(str(ck.config_dir))
    for text in corpus(4) + ["</s>the cat<pad> sat  \n\t on <s>mat"]:
        assert tok(text)["input_ids"] == ref_tok(text)["input_ids"]
    assert {p.name for p in ck.aux_files()} >= {"tokenizer.json", "tokenizer_config.json"}
    ck.close()


def test_split_files_and_directories(root):
    whole = gguf_of(root, "llama", "Q8_0")
    first = gguf_of(root, "llama", "Q8_0", split_max_tensors=8)
    files = sorted(first.parent.iterdir())
    assert [f.name for f in files] == [f"model-0000{i}-of-00003.gguf" for i in (1, 2, 3)]
    with GGUFCheckpoint.open(whole) as ref, GGUFCheckpoint.open(files[0]) as a, \
            GGUFCheckpoint.open(first.parent) as b:
        assert a.data_files() == b.data_files() == set(files)
        assert set(a.tensors) == set(b.tensors) == set(ref.tensors)
        for name in ref.tensors:
            assert torch.equal(a.read(name), ref.read(name)) and torch.equal(b.read(name), ref.read(name))
    with GGUFCheckpoint.open(whole.parent) as c:             # a directory holding one file
        assert c.data_files() == {whole}
    (files[2]).rename(root / "moved.gguf")
    try:
        with pytest.raises(CheckpointError, match="split GGUF is missing model-00003-of-00003.gguf"):
            GGUFCheckpoint.open(files[0])
    finally:
        (root / "moved.gguf").rename(files[2])


def test_directory_with_several_models_is_refused(root, tmp_path):
    for q in ("Q8_0", "Q4_0"):
        (tmp_path / f"m-{q}.gguf").write_bytes(gguf_of(root, "llama", q).read_bytes())
    with pytest.raises(CheckpointError, match=r"holds 2 GGUF models \(m-Q4_0.gguf, m-Q8_0.gguf\); name the file"):
        open_model(tmp_path)


def _merge(recipe: dict, out: Path, **kw) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    lazymerge.merge(recipe, out, **kw)
    tensors: dict[str, torch.Tensor] = {}
    for f in sorted(out.glob("*.safetensors")):
        tensors.update(load_file(str(f)))
    return tensors


def test_recipe_with_gguf_models_equals_formula_whatever_the_budget(root, tmp_path):
    """A TIES merge (several phases: shared loads when the budget allows) of a Q4_1 GGUF, a Q8_0 GGUF and a
    safetensors base: bit-identical at every budget, and equal to the formula on transformers' tensors."""
    import sys as _sys

    _sys.path.insert(0, str(Path(__file__).parent))
    from reference import ties

    base = hf_model(root, "llama")
    a, b = gguf_of(root, "llama", "Q4_1", seed=0), gguf_of(root, "llama", "Q8_0", seed=1)
    recipe = {"merge_method": "ties", "base_model": str(base), "dtype": "float32",
              "parameters": {"density": 0.6},
              "models": [{"model": str(a), "parameters": {"weight": 0.7}},
                         {"model": str(b.parent), "parameters": {"weight": 0.5}}]}
    outs = [_merge(recipe, tmp_path / f"out-{m}", memory=m) for m in ("unlimited", "24KiB")]
    for o in outs[1:]:
        assert set(o) == set(outs[0]) and all(torch.equal(o[k], outs[0][k]) for k in o)
    from safetensors.torch import load_file

    ref_a, ref_b, ref_base = reference(a), reference(b), load_file(str(base / "model.safetensors"))
    for name, got in outs[0].items():
        want = ties(ref_base[name], [ref_a[name], ref_b[name]], [0.7, 0.5], [0.6, 0.6])
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    cfg = json.loads((tmp_path / "out-unlimited" / "config.json").read_text())
    assert cfg["model_type"] == "llama"
    assert json.loads((tmp_path / "out-24KiB" / "lazymerge_report.json").read_text())["blocked_tensors"] > 0


def test_gguf_lead_gives_config_and_tokenizer(root, tmp_path):
    a = gguf_of(root, "qwen2", "Q8_0")
    _merge({"merge_method": "passthrough", "dtype": "bfloat16", "models": [{"model": str(a)}]}, tmp_path / "out")
    out = tmp_path / "out"
    assert {"config.json", "tokenizer.json", "tokenizer_config.json"} <= {p.name for p in out.iterdir()}
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "qwen2" and cfg["torch_dtype"] == "bfloat16" and cfg["tie_word_embeddings"]


def test_eval_of_gguf_equals_transformers(root, tmp_path):
    import transformers as T

    path = gguf_of(root, "llama", "Q5_1")
    docs = corpus(8)
    data = write_texts(tmp_path / "data.jsonl", docs)
    seq, max_tokens = 32, 300
    tok = T.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    stream: list[int] = []
    for i, d in enumerate(docs):
        stream += ([tok.eos_token_id] if i else []) + tok(d)["input_ids"]
    stream = stream[:max_tokens]
    windows = [stream[a:a + seq] for a in range(0, len(stream) - seq + 1, seq)]
    model = T.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    total = 0.0
    with torch.no_grad():
        for w in windows:
            ids = torch.tensor([w])
            logits = model(input_ids=ids).logits[0, :-1].double()
            total += float(torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum"))
    count = len(windows) * (seq - 1)
    r = lazymerge.evaluate(path, data, memory="16KiB", seq_len=seq, max_tokens=max_tokens, batch=3)
    assert (r.windows, r.tokens) == (len(windows), count)
    assert r.total_nll == pytest.approx(total, rel=1e-5)
    assert r.perplexity == pytest.approx(math.exp(total / count), rel=1e-5)


# -- corrupt and unsupported files: one line naming the file (and tensor), exit 2, no traceback -------------


def _tensor_field(path: Path, name: str) -> tuple[int, int]:
    """(offset of the tensor's ggml type field, offset of its data offset field) in the header, via gguf's
    own reader."""
    import gguf

    t = next(t for t in gguf.GGUFReader(path).tensors if t.name == name)
    pos = t.field.offset + 8 + len(name.encode()) + 4 + 8 * len(t.shape)
    return pos, pos + 4


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lazymerge.cli", *args], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)})


def _corrupt(kind: str, src: Path, dst: Path) -> str:
    data = bytearray(src.read_bytes())
    name = "blk.0.ffn_up.weight"
    if kind == "magic":
        data[:4] = b"GGML"
        expect = "not a GGUF file"
    elif kind == "truncated":
        data = data[:len(data) // 2]
        expect = "lies beyond the end of the"
    elif kind == "header":
        data = data[:200]
        expect = "truncated or corrupt GGUF header"
    elif kind == "quant":
        type_at, _ = _tensor_field(src, name)
        data[type_at:type_at + 4] = struct.pack("<I", 99)
        expect = f"tensor '{name}': unknown ggml type 99"
    elif kind == "offset":
        _, off_at = _tensor_field(src, name)
        data[off_at:off_at + 8] = struct.pack("<Q", 1 << 40)
        expect = f"tensor '{name}': data ["
    elif kind == "arch":
        i = bytes(data).index(b"llama")
        data[i:i + 5] = b"llamb"
        expect = "GGUF architecture 'llamb' cannot be read"
    else:
        raise ValueError(kind)
    dst.write_bytes(bytes(data))
    return expect


@pytest.mark.parametrize("kind", ["magic", "truncated", "header", "quant", "offset", "arch"])
def test_corrupt_or_unsupported_gguf_is_refused(root, tmp_path, kind):
    bad = tmp_path / "bad.gguf"
    expect = _corrupt(kind, gguf_of(root, "llama", "Q8_0"), bad)
    with pytest.raises(CheckpointError) as err:
        lazymerge.plan({"merge_method": "passthrough", "models": [{"model": str(bad)}]})
    assert str(err.value).startswith(f"{bad}: ") and expect in str(err.value), str(err.value)


def test_corrupt_gguf_on_the_command_line_is_one_line(root, tmp_path):
    bad = tmp_path / "bad.gguf"
    expect = _corrupt("quant", gguf_of(root, "llama", "Q8_0"), bad)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(json.dumps({"merge_method": "passthrough", "models": [{"model": str(bad)}]}))
    for args in (["run", str(recipe), str(tmp_path / "out")], ["eval", str(bad), "--data", str(recipe)]):
        p = _cli(*args)
        assert p.returncode == 2, p.stderr
        lines = p.stderr.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in p.stderr, p.stderr
        assert lines[0].startswith(f"error: {bad}: ") and expect in lines[0], lines[0]
    assert not (tmp_path / "out").exists()


def _twin(gguf_path: Path, out: Path) -> Path:
    """The GGUF's dequantized model written as a float32 safetensors checkpoint (config and tokenizer too)."""
    lazymerge.merge({"merge_method": "passthrough", "dtype": "float32", "models": [{"model": str(gguf_path)}]}, out)
    return out


def test_moe_of_gguf_models_equals_moe_of_their_safetensors_twins(root, tmp_path):
    """GGUF base and experts (the routers computed by a forward pass over the GGUF base): the same MoE, bit for bit,
    as one built from the same weights in safetensors."""
    ggufs = [gguf_of(root, "llama", q, seed=s) for q, s in (("Q8_0", 0), ("Q4_1", 1), ("Q5_0", 2))]
    twins = [_twin(g, tmp_path / f"twin-{i}") for i, g in enumerate(ggufs)]

    def moe(models: list[Path]) -> dict:
        return {"base_model": str(models[0]), "gate_mode": "hidden", "dtype": "float32", "experts_per_token": 1,
                "experts": [{"source_model": str(m), "positive_prompts": [p]}
                            for m, p in zip(models[1:], ("the cat sat on the mat", "river hill stone light"))]}

    a = _merge(moe(ggufs), tmp_path / "moe-gguf", memory="unlimited")
    b = _merge(moe(twins), tmp_path / "moe-twins", memory="unlimited")
    assert set(a) == set(b) and "model.layers.1.block_sparse_moe.gate.weight" in a
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_lora_adapter_on_a_gguf_base(root, tmp_path):
    """`base.gguf+adapter`: the same merge as the adapter on the base's safetensors twin."""
    from safetensors.torch import save_file

    base = gguf_of(root, "llama", "Q4_0")
    twin = _twin(base, tmp_path / "twin")
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj", "k_proj"]}))
    g = torch.Generator().manual_seed(3)
    pre = "base_model.model.model.layers.0.self_attn"
    save_file({f"{pre}.q_proj.lora_A.weight": torch.randn(2, 64, generator=g),
               f"{pre}.q_proj.lora_B.weight": torch.randn(64, 2, generator=g),
               f"{pre}.k_proj.lora_A.weight": torch.randn(2, 64, generator=g),
               f"{pre}.k_proj.lora_B.weight": torch.randn(32, 2, generator=g)},
              str(adapter / "adapter_model.safetensors"))
    a = _merge({"merge_method": "passthrough", "dtype": "float32", "models": [{"model": f"{base}+{adapter}"}]},
               tmp_path / "a", memory="8KiB")
    b = _merge({"merge_method": "passthrough", "dtype": "float32", "models": [{"model": f"{twin}+{adapter}"}]},
               tmp_path / "b", memory="8KiB")
    assert set(a) == set(b)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a[f"{pre[len('base_model.model.'):]}.q_proj.weight"],
                           _merge({"merge_method": "passthrough", "models": [{"model": str(twin)}]},
                                  tmp_path / "c")[f"{pre[len('base_model.model.'):]}.q_proj.weight"])


def test_search_over_gguf_models(root, tmp_path):
    """A search may name GGUF models: each trial's perplexity is `evaluate` of the same recipe over the
    safetensors models the F32 GGUFs were written from (F32 holds them exactly, q/k permuted and back)."""
    pytest.importorskip("optuna")
    data = write_texts(tmp_path / "data.jsonl", corpus(6))
    srcs = [hf_model(root, "llama", seed=s) for s in (0, 1)]
    ggufs = [gguf_of(root, "llama", "F32", seed=s) for s in (0, 1)]

    def recipe(models: list[Path], w: float) -> dict:
        return {"merge_method": "linear", "dtype": "float32",
                "models": [{"model": str(models[0]), "parameters": {"weight": w}},
                           {"model": str(models[1]), "parameters": {"weight": 0.5}}]}

    report = lazymerge.search(recipe(ggufs, 0.5), data, ["models[0].parameters.weight=0..1"], trials=2, seed=0,
                              study=tmp_path / "s.db", memory="32KiB", seq_len=32, max_tokens=200,
                              best_file=tmp_path / "best.yaml")
    done = [t for t in report.trials if t.state == "COMPLETE"]
    assert len(done) == 2
    for t in done:
        w = t.params["models[0].parameters.weight"]
        want = lazymerge.evaluate(recipe(srcs, w), data, seq_len=32, max_tokens=200)
        assert t.perplexity == pytest.approx(want.perplexity, rel=1e-6), w
