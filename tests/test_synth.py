"""Synthetic checkpoints, checked with safetensors' reader and against published Llama parameter counts."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from lazymerge.errors import CheckpointError
from lazymerge.synth import PRESETS, make_checkpoint, make_demo


def load_dir(path: Path) -> dict[str, torch.Tensor]:
    index = path / "model.safetensors.index.json"
    files = set(json.loads(index.read_text())["weight_map"].values()) if index.exists() else {"model.safetensors"}
    out: dict[str, torch.Tensor] = {}
    for f in files:
        out.update(load_file(path / f))
    return out


def expected_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """The Llama layout as transformers' LlamaForCausalLM defines it, from config.json alone."""
    h, inter, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    kv = config["num_key_value_heads"] * h // config["num_attention_heads"]
    shapes = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,)}
    if not config["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (v, h)
    for i in range(config["num_hidden_layers"]):
        shapes.update({
            f"model.layers.{i}.self_attn.q_proj.weight": (h, h),
            f"model.layers.{i}.self_attn.k_proj.weight": (kv, h),
            f"model.layers.{i}.self_attn.v_proj.weight": (kv, h),
            f"model.layers.{i}.self_attn.o_proj.weight": (h, h),
            f"model.layers.{i}.mlp.gate_proj.weight": (inter, h),
            f"model.layers.{i}.mlp.up_proj.weight": (inter, h),
            f"model.layers.{i}.mlp.down_proj.weight": (h, inter),
            f"model.layers.{i}.input_layernorm.weight": (h,),
            f"model.layers.{i}.post_attention_layernorm.weight": (h,),
        })
    return shapes


def test_tiny_is_a_valid_llama_checkpoint(tmp_path: Path) -> None:
    path = make_checkpoint(tmp_path / "m", "tiny", seed=0)
    config = json.loads((path / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["model_type"] == "llama"
    assert (config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"],
            config["num_attention_heads"], config["num_key_value_heads"], config["vocab_size"]) == \
        (64, 176, 2, 4, 2, 512)
    assert config["torch_dtype"] == "bfloat16"
    tensors = load_dir(path)
    assert {n: tuple(t.shape) for n, t in tensors.items()} == expected_shapes(config)
    assert all(t.dtype == torch.bfloat16 for t in tensors.values())
    q = tensors["model.layers.0.self_attn.q_proj.weight"].float()
    assert abs(q.std().item() - 0.02) < 0.002 and abs(q.mean().item()) < 0.002
    assert abs(tensors["model.norm.weight"].float().mean().item() - 1.0) < 0.01
    for name in ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"]:
        assert isinstance(json.loads((path / name).read_text()), dict)


def test_deterministic_per_seed(tmp_path: Path) -> None:
    a = make_checkpoint(tmp_path / "a", "tiny", seed=5)
    b = make_checkpoint(tmp_path / "b", "tiny", seed=5)
    c = make_checkpoint(tmp_path / "c", "tiny", seed=6)
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    assert (a / "model.safetensors").read_bytes() != (c / "model.safetensors").read_bytes()


def test_sharded_small_matches_unsharded(tmp_path: Path) -> None:
    one = make_checkpoint(tmp_path / "one", "small", seed=1, dtype=torch.float32, shard_size="1GB")
    many = make_checkpoint(tmp_path / "many", "small", seed=1, dtype=torch.float32, shard_size="1MB")
    index = json.loads((many / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 3 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    for f in shards:
        with safe_open(many / f, "pt") as handle:
            assert set(handle.keys()) == {n for n, s in index["weight_map"].items() if s == f}
    a, b = load_dir(one), load_dir(many)
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    assert index["metadata"]["total_size"] == sum(t.numel() * 4 for t in b.values())


def test_fine_tune_is_base_plus_noise(tmp_path: Path) -> None:
    base, (ft1, ft2) = make_demo(tmp_path)
    b, f1, f2 = load_dir(base), load_dir(ft1), load_dir(ft2)
    assert b.keys() == f1.keys() == f2.keys()
    d1 = torch.cat([(f1[n].float() - b[n].float()).flatten() for n in b])
    d2 = torch.cat([(f2[n].float() - b[n].float()).flatten() for n in b])
    # bf16 rounding of (base + noise) adds error of the order of base's own ulp, so allow a loose band
    assert 0.0015 < d1.std().item() < 0.0035 and 0.0015 < d2.std().item() < 0.0035
    assert abs(torch.corrcoef(torch.stack([d1, d2]))[0, 1].item()) < 0.05


def test_tied_embeddings_have_no_lm_head(tmp_path: Path) -> None:
    path = make_checkpoint(tmp_path / "m", "tiny", seed=0, tie_word_embeddings=True)
    assert json.loads((path / "config.json").read_text())["tie_word_embeddings"] is True
    assert "lm_head.weight" not in load_dir(path)


def test_fine_tune_of_wrong_base_refused(tmp_path: Path) -> None:
    base = make_checkpoint(tmp_path / "base", "tiny", seed=0)
    with pytest.raises(CheckpointError, match="base"):
        make_checkpoint(tmp_path / "ft", "small", seed=1, base=base)
    assert not (tmp_path / "ft").exists()


# Parameter counts published for the real models (Hugging Face model cards / safetensors metadata).
PUBLISHED = {"1b": 1_100_048_384, "7b": 6_738_415_616, "70b": 68_976_648_192}


@pytest.mark.parametrize("preset", ["1b", "7b", "70b"])
def test_header_only_real_shapes_cost_no_disk(tmp_path: Path, preset: str) -> None:
    path = make_checkpoint(tmp_path / preset, preset, seed=0, header_only=True, dtype=torch.float16,
                           shard_size="1GB")
    index = json.loads((path / "model.safetensors.index.json").read_text())
    params = 0
    for f in sorted(set(index["weight_map"].values())):
        with safe_open(path / f, "pt") as handle:
            for name in handle.keys():
                s = handle.get_slice(name)
                assert s.get_dtype() == "F16"
                params += math.prod(s.get_shape())
    assert params == PUBLISHED[preset]
    assert index["metadata"]["total_size"] == 2 * PUBLISHED[preset]
    on_disk = sum(p.stat().st_blocks * 512 for p in path.iterdir())
    assert on_disk < 16 << 20
    assert set(os.listdir(path)) >= {"config.json", "tokenizer.json", "model.safetensors.index.json"}


def test_presets_cover_the_brief() -> None:
    assert set(PRESETS) == {"tiny", "small", "1b", "7b", "70b"}
