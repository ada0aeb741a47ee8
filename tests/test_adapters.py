"""LoRA adapters read lazily must equal PEFT's own `merge_and_unload` (the reference), tensor by tensor."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from lazymerge.errors import CheckpointError
from lazymerge.io.adapters import Adapter, AdaptedCheckpoint, parse_model_ref
from lazymerge.io.models import open_model
from lazymerge.io.checkpoint import Checkpoint

LLAMA_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _tiny_llama(seed: int = 0):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    return transformers.LlamaForCausalLM(cfg)


def _tiny_gpt2(seed: int = 0):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=32,
                                  bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(cfg)


def _peft_case(tmp_path: Path, model, lora_kwargs: dict, perturb_saved: bool = False) -> tuple[Path, Path, dict]:
    """Save base and a PEFT adapter with random (non-zero) factors; return PEFT's merged state dict."""
    peft = pytest.importorskip("peft")
    base_dir, adapter_dir = tmp_path / "base", tmp_path / "adapter"
    model.save_pretrained(base_dir)
    pm = peft.get_peft_model(model, peft.LoraConfig(**lora_kwargs))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            # PEFT saves a targeted embedding's own weight too, so a changed one must reach the merge
            saved = "modules_to_save" in name or "embed_tokens.base_layer" in name
            if "lora_" in name or (perturb_saved and saved):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    pm.save_pretrained(adapter_dir)
    merged = {k: v.detach().clone() for k, v in pm.merge_and_unload().state_dict().items()}
    return base_dir, adapter_dir, merged


def _assert_matches_peft(ckpt: AdaptedCheckpoint, merged: dict, changed: set[str]) -> None:
    assert set(ckpt.tensors) <= set(merged)
    for name in ckpt.tensors:
        got = ckpt.read(name)
        torch.testing.assert_close(got, merged[name].float(), atol=1e-5, rtol=0, msg=name)
    for name in changed:  # the comparison above must not pass because the adapter was a no-op
        assert not torch.allclose(ckpt.read(name), ckpt.base.read(name)), name


@pytest.mark.parametrize("lora_kwargs", [
    dict(r=4, lora_alpha=8, target_modules=LLAMA_LINEAR),
    dict(r=4, lora_alpha=8, target_modules=LLAMA_LINEAR, use_rslora=True),
    dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
         rank_pattern={"layers.1.self_attn.q_proj": 2, "down_proj": 6}, alpha_pattern={"v_proj": 3}),
    dict(r=4, lora_alpha=16, target_modules=r".*\.layers\.0\..*(q_proj|up_proj)"),
], ids=["plain", "rslora", "rank_alpha_pattern", "regex_targets"])
def test_llama_adapter_matches_peft_merge(tmp_path: Path, lora_kwargs: dict) -> None:
    base_dir, adapter_dir, merged = _peft_case(tmp_path, _tiny_llama(), lora_kwargs)
    with open_model(f"{base_dir}+{adapter_dir}") as ckpt:
        assert isinstance(ckpt, AdaptedCheckpoint)
        _assert_matches_peft(ckpt, merged, set(ckpt.adapter.lora))
        assert ckpt.adapter.lora


def test_rank_and_alpha_patterns_follow_peft_matching(tmp_path: Path) -> None:
    kwargs = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                  rank_pattern={"layers.1.self_attn.q_proj": 2}, alpha_pattern={"v_proj": 3})
    _, adapter_dir, _ = _peft_case(tmp_path, _tiny_llama(), kwargs)
    lora = Adapter.open(adapter_dir).lora
    assert lora["model.layers.1.self_attn.q_proj.weight"].rank == 2
    assert lora["model.layers.1.self_attn.q_proj.weight"].scale == 8 / 2
    assert lora["model.layers.0.self_attn.q_proj.weight"].scale == 8 / 4
    assert lora["model.layers.0.self_attn.v_proj.weight"].scale == 3 / 4


def test_embedding_lora_and_modules_to_save_match_peft(tmp_path: Path) -> None:
    kwargs = dict(r=4, lora_alpha=8, target_modules=["q_proj", "embed_tokens"], modules_to_save=["lm_head"])
    base_dir, adapter_dir, merged = _peft_case(tmp_path, _tiny_llama(), kwargs, perturb_saved=True)
    with open_model(f"{base_dir}+{adapter_dir}") as ckpt:
        assert set(ckpt.adapter.replaced) == {"lm_head.weight", "model.embed_tokens.weight"}
        assert ckpt.adapter.lora["model.embed_tokens.weight"].fan_in_fan_out
        _assert_matches_peft(ckpt, merged, {"lm_head.weight", "model.embed_tokens.weight"})


def test_gpt2_conv1d_fan_in_fan_out_matches_peft(tmp_path: Path) -> None:
    kwargs = dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True)
    base_dir, adapter_dir, merged = _peft_case(tmp_path, _tiny_gpt2(), kwargs)
    with open_model(f"{base_dir}+{adapter_dir}") as ckpt:
        assert ckpt.tensors["transformer.h.0.attn.c_attn.weight"].shape == (32, 96)
        _assert_matches_peft(ckpt, merged, set(ckpt.adapter.lora))


# --- hand-made adapters: key spellings, blocks and errors, no PEFT needed -------------------------------------

def _write_adapter(path: Path, tensors: dict[str, torch.Tensor], **config) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", **config}))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path / "adapter_model.safetensors"))
    return path


def _write_base(path: Path, tensors: dict[str, torch.Tensor]) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps({"model_type": "toy"}))
    return path


@pytest.fixture
def toy(tmp_path: Path) -> dict:
    g = torch.Generator().manual_seed(0)
    base = {"m.fc.weight": torch.randn(12, 8, generator=g), "m.out.weight": torch.randn(5, 12, generator=g),
            "m.conv.weight": torch.randn(8, 6, generator=g), "m.norm.weight": torch.ones(8)}
    return {"base": base, "dir": _write_base(tmp_path / "base", base), "g": g}


def test_manual_keys_fan_in_fan_out_and_row_blocks(tmp_path: Path, toy: dict) -> None:
    g = toy["g"]
    a_fc, b_fc = torch.randn(3, 8, generator=g), torch.randn(12, 3, generator=g)
    a_cv, b_cv = torch.randn(3, 8, generator=g), torch.randn(6, 3, generator=g)   # conv W is [in=8, out=6]
    out_w = torch.randn(5, 12, generator=g)
    adapter = _write_adapter(tmp_path / "ad", {
        "base_model.model.m.fc.lora_A.default.weight": a_fc, "base_model.model.m.fc.lora_B.default.weight": b_fc,
        "base_model.model.m.out.modules_to_save.default.weight": out_w,
    }, r=3, lora_alpha=6, target_modules=["fc"], modules_to_save=["out"])
    fifo = _write_adapter(tmp_path / "fifo", {
        "base_model.model.m.conv.lora_A.weight": a_cv, "base_model.model.m.conv.lora_B.weight": b_cv,
    }, r=3, lora_alpha=3, use_rslora=True, target_modules="m\\.conv", fan_in_fan_out=True)

    with open_model(f"{toy['dir']}+{adapter}") as ckpt:
        want = toy["base"]["m.fc.weight"] + 2.0 * b_fc @ a_fc
        torch.testing.assert_close(ckpt.read("m.fc.weight"), want, atol=1e-6, rtol=0)
        torch.testing.assert_close(ckpt.read("m.out.weight"), out_w)
        torch.testing.assert_close(ckpt.read("m.norm.weight"), toy["base"]["m.norm.weight"])
        for a, b in [(0, 5), (5, 12), (3, 4)]:   # bit-identical whatever the block, as DESIGN.md requires
            assert torch.equal(ckpt.read("m.fc.weight", (a, b)), ckpt.read("m.fc.weight")[a:b])
        assert ckpt.read("m.fc.weight", dtype=None).dtype == torch.float32
        assert ckpt.read("m.fc.weight", dtype=torch.bfloat16).dtype == torch.bfloat16

    with open_model(f"{toy['dir']}+{fifo}") as ckpt:
        want = toy["base"]["m.conv.weight"] + (3 / math.sqrt(3)) * (b_cv @ a_cv).T
        torch.testing.assert_close(ckpt.read("m.conv.weight"), want, atol=1e-6, rtol=0)
        assert torch.equal(ckpt.read("m.conv.weight", (2, 7)), ckpt.read("m.conv.weight")[2:7])


def test_untargeted_modules_are_ignored_like_peft(tmp_path: Path, toy: dict) -> None:
    g = toy["g"]
    adapter = _write_adapter(tmp_path / "ad", {
        "base_model.model.m.fc.lora_A.weight": torch.randn(2, 8, generator=g),
        "base_model.model.m.fc.lora_B.weight": torch.randn(12, 2, generator=g),
        "base_model.model.m.out.lora_A.weight": torch.randn(2, 12, generator=g),
        "base_model.model.m.out.lora_B.weight": torch.randn(5, 2, generator=g),
    }, r=2, lora_alpha=2, target_modules=["fc"])
    ad = Adapter.open(adapter)
    assert set(ad.lora) == {"m.fc.weight"}
    assert ad.ignored == ["base_model.model.m.out.lora_A.weight", "base_model.model.m.out.lora_B.weight"]
    # and the plan says so, naming them (issue 27): an adapter whose config lost a target must not merge
    # silently without it
    import lazymerge

    p = lazymerge.plan({"merge_method": "passthrough", "models": [{"model": f"{toy['dir']}+{adapter}"}]})
    try:
        notes = [w for w in p.warnings if "target_modules" in w]
    finally:
        p.close()
    assert len(notes) == 1 and "m.out" in notes[0] and "m.fc" not in notes[0], p.warnings
    assert str(adapter / "adapter_model.safetensors") in notes[0] and "\n" not in notes[0]


def test_adapter_dir_alone_uses_local_base(tmp_path: Path, toy: dict) -> None:
    adapter = _write_adapter(tmp_path / "ad", {
        "base_model.model.m.fc.lora_A.weight": torch.zeros(2, 8), "base_model.model.m.fc.lora_B.weight":
            torch.zeros(12, 2)}, r=2, lora_alpha=2, target_modules=["fc"], base_model_name_or_path=str(toy["dir"]))
    with open_model(adapter) as ckpt:
        assert isinstance(ckpt, AdaptedCheckpoint) and ckpt.path == toy["dir"]
    assert isinstance(open_model(toy["dir"]), Checkpoint)
    (adapter / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 2, "lora_alpha": 2, "base_model_name_or_path": "no-such-base"}))
    with pytest.raises(CheckpointError, match="neither a local directory nor a hub id"):
        open_model(adapter)     # a hub id is resolved on the hub: tests/test_hub.py


def test_parse_model_ref(tmp_path: Path) -> None:
    assert parse_model_ref("a/base+b/adapter") == (Path("a/base"), Path("b/adapter"))
    assert parse_model_ref("a/base") == (Path("a/base"), None)
    plus = tmp_path / "odd+name"
    plus.mkdir()
    assert parse_model_ref(str(plus)) == (plus, None)
    with pytest.raises(CheckpointError, match="base_dir\\+adapter_dir"):
        parse_model_ref("base+")


def test_shape_mismatch_names_adapter_and_module(tmp_path: Path, toy: dict) -> None:
    adapter = _write_adapter(tmp_path / "ad", {
        "base_model.model.m.fc.lora_A.weight": torch.zeros(2, 9), "base_model.model.m.fc.lora_B.weight":
            torch.zeros(12, 2)}, r=2, lora_alpha=2, target_modules=["fc"])
    with pytest.raises(CheckpointError, match=r"ad: module 'm\.fc' has A \[2, 9\] and B \[12, 2\].*\[12, 8\]"):
        open_model(f"{toy['dir']}+{adapter}")
    missing = _write_adapter(tmp_path / "ad2", {
        "base_model.model.m.nope.lora_A.weight": torch.zeros(2, 8), "base_model.model.m.nope.lora_B.weight":
            torch.zeros(12, 2)}, r=2, lora_alpha=2, target_modules=["nope"])
    with pytest.raises(CheckpointError, match="base model has no tensor 'm.nope.weight'"):
        open_model(f"{toy['dir']}+{missing}")


@pytest.mark.parametrize("config, tensors, message", [
    ({"r": 2, "lora_alpha": 2, "use_dora": True}, {}, "use_dora=True is not supported"),
    ({"r": 0, "lora_alpha": 2}, {}, "r must be a positive number"),
    ({"r": 2, "lora_alpha": 2, "peft_type": "IA3"}, {}, "peft_type 'IA3'"),
    ({"r": 2, "lora_alpha": 2}, {"base_model.model.m.fc.lora_A.weight": torch.zeros(3, 8),
                                 "base_model.model.m.fc.lora_B.weight": torch.zeros(12, 3)}, "not A \\[2, in\\]"),
    ({"r": 2, "lora_alpha": 2}, {"base_model.model.m.fc.lora_A.weight": torch.zeros(2, 8)}, "exactly one A and one B"),
    ({"r": 2, "lora_alpha": 2}, {"base_model.model.m.fc.lora_magnitude_vector": torch.zeros(12)}, "DoRA"),
])
def test_bad_adapters_are_refused_with_one_line(tmp_path: Path, config: dict, tensors: dict, message: str) -> None:
    adapter = _write_adapter(tmp_path / "ad", tensors or {"x": torch.zeros(1)}, **config)
    with pytest.raises(CheckpointError, match=message) as exc:
        Adapter.open(adapter)
    assert "\n" not in str(exc.value) and "ad" in str(exc.value)


def test_pickled_adapter_needs_opt_in(tmp_path: Path, toy: dict) -> None:
    adapter = tmp_path / "ad"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"r": 2, "lora_alpha": 4, "target_modules": ["fc"]}))
    a, b = torch.randn(2, 8, generator=toy["g"]), torch.randn(12, 2, generator=toy["g"])
    torch.save({"base_model.model.m.fc.lora_A.weight": a, "base_model.model.m.fc.lora_B.weight": b},
               adapter / "adapter_model.bin")
    with pytest.raises(CheckpointError, match="adapter_model.bin: pickled adapter weights are refused"):
        Adapter.open(adapter)
    with open_model(f"{toy['dir']}+{adapter}", allow_pickle=True) as ckpt:
        torch.testing.assert_close(ckpt.read("m.fc.weight"), toy["base"]["m.fc.weight"] + 2 * b @ a)


def _read_dir(d: Path) -> dict:
    from safetensors.torch import load_file

    out: dict = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def test_merge_and_unload_through_the_engine(tmp_path: Path) -> None:
    """`lazymerge run` on base+adapter (passthrough) writes PEFT's merge_and_unload, with the usual layout."""
    import lazymerge

    base_dir, adapter_dir, merged = _peft_case(tmp_path, _tiny_llama(), dict(r=4, lora_alpha=8,
                                                                            target_modules=LLAMA_LINEAR))
    recipe = {"merge_method": "passthrough", "models": [{"model": f"{base_dir}+{adapter_dir}"}],
              "dtype": "float32"}
    lazymerge.merge(recipe, tmp_path / "out", memory="64KiB")    # row blocks of the adapted weights
    got = _read_dir(tmp_path / "out")
    assert set(got) == {k for k in merged if k in _read_dir(base_dir)}
    for name, y in got.items():
        torch.testing.assert_close(y, merged[name].float(), atol=1e-5, rtol=0, msg=name)
    assert (tmp_path / "out" / "config.json").exists()


def test_two_adapters_merge_like_full_finetunes(tmp_path: Path) -> None:
    """ties over two adapters equals ties over the two adapted models written out in full."""
    import lazymerge

    model = _tiny_llama()
    base_dir, a1, m1 = _peft_case(tmp_path / "one", model, dict(r=4, lora_alpha=8, target_modules=LLAMA_LINEAR))
    _, a2, m2 = _peft_case(tmp_path / "two", _tiny_llama(), dict(r=2, lora_alpha=4, target_modules=["q_proj"]))
    full = {}
    base_t = _read_dir(base_dir)
    for tag, m in (("f1", m1), ("f2", m2)):
        full[tag] = tmp_path / tag
        full[tag].mkdir()
        save_file({k: m[k].contiguous() for k in base_t}, full[tag] / "model.safetensors")
        (full[tag] / "config.json").write_text((base_dir / "config.json").read_text())
    params = {"weight": 0.5, "density": 0.6}
    via_adapters = {"merge_method": "ties", "base_model": str(base_dir), "dtype": "float32",
                    "models": [{"model": f"{base_dir}+{a1}", "parameters": params},
                               {"model": f"{base_dir}+{a2}", "parameters": params}]}
    via_full = {**via_adapters, "models": [{"model": str(full["f1"]), "parameters": params},
                                           {"model": str(full["f2"]), "parameters": params}]}
    lazymerge.merge(via_adapters, tmp_path / "a")
    lazymerge.merge(via_full, tmp_path / "b")
    ya, yb = _read_dir(tmp_path / "a"), _read_dir(tmp_path / "b")
    assert ya.keys() == yb.keys()
    for name in ya:
        torch.testing.assert_close(ya[name], yb[name], atol=1e-5, rtol=0, msg=name)


def test_ignored_factors_of_many_layers_are_summarised() -> None:
    from lazymerge.io.adapters import module_summary

    names = [f"model.layers.{i}.mlp.gate_proj" for i in range(32)] + ["model.layers.3.self_attn.k_proj",
                                                                       "model.layers.7.self_attn.k_proj", "lm_head"]
    assert module_summary(names) == ("lm_head, model.layers.{0..31}.mlp.gate_proj, "
                                     "model.layers.{3,7}.self_attn.k_proj")


@pytest.mark.parametrize("keys", [
    ("m.fc.lora_A.one.weight", "m.fc.lora_B.two.weight"),                      # A of one adapter, B of another
    ("m.fc.lora_A.one.weight", "m.fc.lora_B.one.weight", "m.fc.lora_A.two.weight", "m.fc.lora_B.two.weight"),
    ("m.fc.lora_A.weight", "m.fc.lora_B.weight", "m.out.lora_A.two.weight", "m.out.lora_B.two.weight"),
], ids=["crossed", "two_pairs", "unnamed_and_named"])
def test_several_adapters_in_one_file_are_refused(tmp_path: Path, toy: dict, keys: tuple[str, ...]) -> None:
    """PEFT saves one adapter per directory, without its name in the keys; a file holding factors under several
    adapter names could pair one adapter's A with another's B. Refused, naming the file and the adapters."""
    g = toy["g"]
    shapes = {"m.fc.lora_A": (2, 8), "m.fc.lora_B": (12, 2), "m.out.lora_A": (2, 12), "m.out.lora_B": (5, 2)}
    tensors = {f"base_model.model.{k}": torch.randn(shapes[".".join(k.split(".")[:3])], generator=g) for k in keys}
    adapter = _write_adapter(tmp_path / "ad", tensors, r=2, lora_alpha=2, target_modules=["fc", "out"])
    with pytest.raises(CheckpointError, match="several adapters") as exc:
        Adapter.open(adapter)
    msg = str(exc.value)
    assert "\n" not in msg and str(adapter / "adapter_model.safetensors") in msg and "two" in msg


def test_one_named_adapter_is_read(tmp_path: Path, toy: dict) -> None:
    """A state dict saved with its adapter name in the keys (`lora_A.default.weight`) is one adapter: merged."""
    g = toy["g"]
    a, b = torch.randn(2, 8, generator=g), torch.randn(12, 2, generator=g)
    adapter = _write_adapter(tmp_path / "ad", {"base_model.model.m.fc.lora_A.default.weight": a,
                                               "base_model.model.m.fc.lora_B.default.weight": b},
                             r=2, lora_alpha=4, target_modules=["fc"])
    with open_model(f"{toy['dir']}+{adapter}") as ckpt:
        torch.testing.assert_close(ckpt.read("m.fc.weight"), toy["base"]["m.fc.weight"] + 2 * b @ a)
