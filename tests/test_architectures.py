"""Architectures whose tensor names differ: merging and slicing work from name patterns, not a model list.

Tiny checkpoints are generated here with `safetensors.torch.save_file` in each naming scheme (Llama, Mistral,
Qwen2 with q/k/v biases, Gemma with tied embeddings, Phi-3 with fused qkv_proj / gate_up_proj, GPT-2 with
`transformer.h.N.` and Conv1D (in, out) weights, BERT with `encoder.layer.N.` and an integer buffer), merged and
sliced through the public API, and compared with plain torch on the whole tensors.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import reference as ref
from conftest import read_all

H, I, V, P = 16, 24, 40, 12          # hidden, intermediate, vocab, positions (tiny)
ARCHS = ("llama", "mistral", "qwen2", "gemma", "phi3", "gpt2", "bert")


def _layer_shapes(arch: str) -> dict[str, tuple[int, ...]]:
    """Per-layer tensor names (relative to the layer prefix) and shapes."""
    if arch in ("llama", "mistral", "qwen2", "gemma"):
        s = {"self_attn.q_proj.weight": (H, H), "self_attn.k_proj.weight": (H // 2, H),
             "self_attn.v_proj.weight": (H // 2, H), "self_attn.o_proj.weight": (H, H),
             "mlp.gate_proj.weight": (I, H), "mlp.up_proj.weight": (I, H), "mlp.down_proj.weight": (H, I),
             "input_layernorm.weight": (H,), "post_attention_layernorm.weight": (H,)}
        if arch == "qwen2":
            s.update({"self_attn.q_proj.bias": (H,), "self_attn.k_proj.bias": (H // 2,),
                      "self_attn.v_proj.bias": (H // 2,)})
        return s
    if arch == "phi3":
        return {"self_attn.qkv_proj.weight": (3 * H, H), "self_attn.o_proj.weight": (H, H),
                "mlp.gate_up_proj.weight": (2 * I, H), "mlp.down_proj.weight": (H, I),
                "input_layernorm.weight": (H,), "post_attention_layernorm.weight": (H,)}
    if arch == "gpt2":   # Conv1D: weights stored (in, out)
        return {"ln_1.weight": (H,), "ln_1.bias": (H,), "attn.c_attn.weight": (H, 3 * H), "attn.c_attn.bias": (3 * H,),
                "attn.c_proj.weight": (H, H), "attn.c_proj.bias": (H,), "ln_2.weight": (H,), "ln_2.bias": (H,),
                "mlp.c_fc.weight": (H, 4 * H), "mlp.c_fc.bias": (4 * H,), "mlp.c_proj.weight": (4 * H, H),
                "mlp.c_proj.bias": (H,)}
    if arch == "bert":
        s = {}
        for n in ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense"):
            s[f"{n}.weight"], s[f"{n}.bias"] = (H, H), (H,)
        s.update({"attention.output.LayerNorm.weight": (H,), "attention.output.LayerNorm.bias": (H,),
                  "intermediate.dense.weight": (I, H), "intermediate.dense.bias": (I,),
                  "output.dense.weight": (H, I), "output.dense.bias": (H,),
                  "output.LayerNorm.weight": (H,), "output.LayerNorm.bias": (H,)})
        return s
    raise KeyError(arch)


LAYER_PREFIX = {"gpt2": "transformer.h.", "bert": "bert.encoder.layer."}


def layer_prefix(arch: str) -> str:
    return LAYER_PREFIX.get(arch, "model.layers.")


def arch_shapes(arch: str, layers: int, *, head: bool | None = None) -> dict[str, tuple[int, ...]]:
    """Every tensor of a tiny `arch` model with `layers` layers. `head`: whether it has its own lm_head (default:
    as the architecture ships: Gemma and GPT-2 tie it to the embedding, BERT has none)."""
    if head is None:
        head = arch in ("llama", "mistral", "qwen2", "phi3")
    shapes: dict[str, tuple[int, ...]] = {}
    if arch == "gpt2":
        shapes.update({"transformer.wte.weight": (V, H), "transformer.wpe.weight": (P, H)})
    elif arch == "bert":
        shapes.update({"bert.embeddings.word_embeddings.weight": (V, H),
                       "bert.embeddings.position_embeddings.weight": (P, H),
                       "bert.embeddings.token_type_embeddings.weight": (2, H),
                       "bert.embeddings.LayerNorm.weight": (H,), "bert.embeddings.LayerNorm.bias": (H,)})
    else:
        shapes["model.embed_tokens.weight"] = (V, H)
    for k in range(layers):
        for rest, shape in _layer_shapes(arch).items():
            shapes[f"{layer_prefix(arch)}{k}.{rest}"] = shape
    if arch == "gpt2":
        shapes.update({"transformer.ln_f.weight": (H,), "transformer.ln_f.bias": (H,)})
    elif arch == "bert":
        shapes.update({"bert.pooler.dense.weight": (H, H), "bert.pooler.dense.bias": (H,)})
    else:
        shapes["model.norm.weight"] = (H,)
    if head:
        shapes["lm_head.weight"] = (V, H)
    return shapes


def arch_config(arch: str, layers: int, tied: bool | None) -> dict:
    cfg: dict = {"model_type": arch, "vocab_size": V, "torch_dtype": "float32"}
    if arch == "gpt2":
        cfg.update({"architectures": ["GPT2LMHeadModel"], "n_layer": layers, "n_embd": H, "n_head": 2,
                    "n_positions": P, "n_inner": 4 * H})
    else:
        cfg.update({"num_hidden_layers": layers, "hidden_size": H, "intermediate_size": I,
                    "num_attention_heads": 2})
    if tied is not None:
        cfg["tie_word_embeddings"] = tied
    return cfg


def random_tensors(shapes: dict[str, tuple[int, ...]], seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(s, generator=g) * 0.02 + (1.0 if n.endswith("norm.weight") or "LayerNorm.weight" in n
                                                      or ".ln_" in n and n.endswith("weight") else 0.0)
            for n, s in shapes.items()}


def write_model(path: Path, tensors: dict[str, torch.Tensor], config: dict,
                extra: dict[str, torch.Tensor] | None = None) -> Path:
    """One `model.safetensors` + config.json, written with safetensors' own writer."""
    path.mkdir(parents=True, exist_ok=True)
    data = {n: t.contiguous() for n, t in {**tensors, **(extra or {})}.items()}
    save_file(data, str(path / "model.safetensors"), metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(config))
    return path


def make_family(root: Path, arch: str, layers: int = 4, n_ft: int = 2, *, seed: int = 7,
                head: bool | None = None, tied: bool | None = None) -> dict[str, Path]:
    """{base, ft1, ...}: a base and fine-tunes (base + N(0, 0.01)), all of architecture `arch`."""
    shapes = arch_shapes(arch, layers, head=head)
    if tied is None and arch in ("llama", "mistral", "qwen2", "phi3"):
        tied = False
    base = random_tensors(shapes, seed)
    extra = {"bert.embeddings.position_ids": torch.arange(P, dtype=torch.int64)[None]} if arch == "bert" else None
    out = {"base": write_model(root / "base", base, arch_config(arch, layers, tied), extra)}
    for i in range(1, n_ft + 1):
        g = torch.Generator().manual_seed(seed + 100 * i)
        ft = {n: t + torch.randn(t.shape, generator=g) * 0.01 for n, t in base.items()}
        out[f"ft{i}"] = write_model(root / f"ft{i}", ft, arch_config(arch, layers, tied), extra)
    return out


def _lm():
    import lazymerge

    return lazymerge


def merge(recipe: dict, out: Path, **kw) -> dict[str, torch.Tensor]:
    _lm().merge(recipe, out, **kw)
    return read_all(out)


def _p(d: dict[str, Path]) -> dict[str, str]:
    return {k: str(v) for k, v in d.items()}


# ----------------------------------------------------------------------------------------------------------------
# tests
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHS)
def test_ties_merge_matches_reference(arch: str, tmp_path: Path) -> None:
    m = _p(make_family(tmp_path / "m", arch, layers=3))
    recipe = {"merge_method": "ties", "base_model": m["base"], "dtype": "float32",
              "models": [{"model": m["ft1"], "parameters": {"weight": 0.7, "density": 0.5}},
                         {"model": m["ft2"], "parameters": {"weight": 0.4, "density": 0.3}}]}
    out = merge(recipe, tmp_path / "out", max_block_rows=5)
    base, ft1, ft2 = (read_all(m[k]) for k in ("base", "ft1", "ft2"))
    assert set(out) == set(base)
    for name, b in base.items():
        if not b.is_floating_point():
            assert torch.equal(out[name], b), name          # integer buffers are copied
            continue
        want = ref.ties(b, [ft1[name], ft2[name]], [0.7, 0.4], [0.5, 0.3])
        torch.testing.assert_close(out[name], want, rtol=0, atol=1e-6, msg=name)


@pytest.mark.parametrize("arch", ARCHS)
def test_frankenmerge_renumbers_layers(arch: str, tmp_path: Path) -> None:
    """Passthrough slices of two models: output layer k is source layer a + k; embeddings come from the first
    slice's model, and so do the final norm / head (the issue's rule; mergekit would take them from the last slice)."""
    a = _p(make_family(tmp_path / "a", arch, layers=4, n_ft=0, seed=1))["base"]
    b = _p(make_family(tmp_path / "b", arch, layers=4, n_ft=0, seed=2))["base"]
    recipe = {"merge_method": "passthrough", "dtype": "float32", "slices": [
        {"sources": [{"model": a, "layer_range": [0, 3]}]},
        {"sources": [{"model": b, "layer_range": [1, 4]}]},
        {"sources": [{"model": a, "layer_range": [3, 4]}]}]}
    out = merge(recipe, tmp_path / "out")
    ta, tb_ = read_all(a), read_all(b)
    prefix = layer_prefix(arch)
    stack = [(ta, k) for k in range(3)] + [(tb_, k) for k in range(1, 4)] + [(ta, 3)]
    rests = _layer_shapes(arch)
    for k, (src, s) in enumerate(stack):
        for rest in rests:
            assert torch.equal(out[f"{prefix}{k}.{rest}"], src[f"{prefix}{s}.{rest}"]), (k, rest)
    n_layer_names = sum(1 for nm in out if nm.startswith(prefix))
    assert n_layer_names == 7 * len(rests)
    for name in ta:
        if not name.startswith(prefix):        # first and last slices are both a: every non-layer tensor is a's
            assert torch.equal(out[name], ta[name]), name
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["n_layer" if arch == "gpt2" else "num_hidden_layers"] == 7


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert"])
def test_pre_weights_from_first_slice_post_weights_from_last(arch: str, tmp_path: Path) -> None:
    """mergekit's plan_module: embeddings over the first slice's sources, final norm / head / pooler over the
    last slice's."""
    a = _p(make_family(tmp_path / "a", arch, layers=2, n_ft=0, seed=1))["base"]
    b = _p(make_family(tmp_path / "b", arch, layers=2, n_ft=0, seed=2))["base"]
    recipe = {"merge_method": "passthrough", "slices": [
        {"sources": [{"model": a, "layer_range": [0, 2]}]},
        {"sources": [{"model": b, "layer_range": [0, 2]}]}]}
    out = merge(recipe, tmp_path / "out")
    ta, tb_ = read_all(a), read_all(b)
    post = {"llama": ["model.norm.weight", "lm_head.weight"], "gpt2": ["transformer.ln_f.weight"],
            "bert": ["bert.pooler.dense.weight"]}[arch]
    pre = {"llama": ["model.embed_tokens.weight"], "gpt2": ["transformer.wte.weight", "transformer.wpe.weight"],
           "bert": ["bert.embeddings.word_embeddings.weight"]}[arch]
    for n in post:
        assert torch.equal(out[n], tb_[n]), n
        assert not torch.equal(out[n], ta[n]), n
    for n in pre:
        assert torch.equal(out[n], ta[n]), n
        assert not torch.equal(out[n], tb_[n]), n


def test_tied_model_merged_with_untied(tmp_path: Path) -> None:
    """A model without lm_head whose config ties embeddings contributes its embed_tokens as its lm_head when
    the lead has an lm_head; with a tied lead, the output has no lm_head (it follows the lead's config)."""
    untied = _p(make_family(tmp_path / "u", "llama", layers=2, n_ft=0, seed=3))["base"]
    tied = _p(make_family(tmp_path / "t", "gemma", layers=2, n_ft=0, seed=4))["base"]
    tu, tt = read_all(untied), read_all(tied)
    assert "lm_head.weight" not in tt
    recipe = {"merge_method": "linear", "dtype": "float32",
              "models": [{"model": untied, "parameters": {"weight": 0.6}},
                         {"model": tied, "parameters": {"weight": 0.4}}]}
    out = merge(recipe, tmp_path / "o1")
    want = ref.linear([tu["lm_head.weight"], tt["model.embed_tokens.weight"]], [0.6, 0.4])
    torch.testing.assert_close(out["lm_head.weight"], want, rtol=0, atol=1e-7)
    recipe["models"].reverse()
    out = merge(recipe, tmp_path / "o2")
    assert "lm_head.weight" not in out and set(out) == set(tt)
    # an explicitly untied model without a head is an error naming the tensor
    bad = _p(make_family(tmp_path / "bad", "llama", layers=2, n_ft=0, seed=5, head=False, tied=False))["base"]
    recipe["models"] = [{"model": untied, "parameters": {"weight": 0.5}}, {"model": bad, "parameters": {"weight": 0.5}}]
    with pytest.raises(_lm().CheckpointError, match="lm_head.weight"):
        _lm().plan(recipe)


def test_gpt2_without_prefix_and_slerp_gradient(tmp_path: Path) -> None:
    """Original GPT-2 checkpoints name layers `h.N.` with no prefix; a slerp gradient spans the layers."""
    m = make_family(tmp_path / "m", "gpt2", layers=3, n_ft=1)
    for k in ("base", "ft1"):
        t = read_all(m[k])
        write_model(m[k], {n.removeprefix("transformer."): v for n, v in t.items()},
                    json.loads((m[k] / "config.json").read_text()))
    m = _p(m)
    grad = [0.0, 0.9, 0.3]
    recipe = {"merge_method": "slerp", "base_model": m["base"], "dtype": "float32",
              "models": [{"model": m["base"]}, {"model": m["ft1"]}], "parameters": {"t": grad}}
    out = merge(recipe, tmp_path / "out")
    base, ft1 = read_all(m["base"]), read_all(m["ft1"])
    for name in base:
        if name.startswith("h."):
            t = ref.gradient_value(grad, int(name.split(".")[1]), 3)
        else:                                  # every non-layer tensor (wte, ln_f) reads the gradient at 0
            t = grad[0]
        torch.testing.assert_close(out[name], ref.slerp(base[name], ft1[name], t), rtol=0, atol=1e-6, msg=name)
