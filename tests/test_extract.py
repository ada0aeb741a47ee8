"""extract-lora must recover a known low-rank difference, and PEFT itself must load what it writes."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from lazymerge.errors import CheckpointError, OutputError
from lazymerge.extract import FULL_SVD_MAX, extract_lora
from lazymerge.io.adapters import Adapter, AdaptedCheckpoint
from lazymerge.io.checkpoint import Checkpoint


def _save(path: Path, tensors: dict[str, torch.Tensor], config: dict | None = None) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps(config or {"model_type": "toy"}))
    return path


def _low_rank(shape: tuple[int, int], rank: int, g: torch.Generator) -> torch.Tensor:
    return torch.randn(shape[0], rank, generator=g) @ torch.randn(rank, shape[1], generator=g) / rank ** 0.5


@pytest.fixture
def pair(tmp_path: Path) -> dict:
    """A base and a fine-tune differing by known rank-3 deltas, on both SVD paths (small and > FULL_SVD_MAX)."""
    g = torch.Generator().manual_seed(0)
    big = (FULL_SVD_MAX + 40, FULL_SVD_MAX + 8)
    base = {"m.small.weight": torch.randn(48, 40, generator=g), "m.big.weight": torch.randn(*big, generator=g),
            "m.same.weight": torch.randn(16, 40, generator=g), "m.norm.weight": torch.ones(40),
            "m.embed_tokens.weight": torch.randn(64, 40, generator=g), "m.only_base.weight": torch.zeros(4, 4)}
    deltas = {"m.small.weight": _low_rank((48, 40), 3, g), "m.big.weight": _low_rank(big, 3, g)}
    ft = {k: v + deltas.get(k, 0) for k, v in base.items() if k != "m.only_base.weight"}
    ft["m.norm.weight"] = ft["m.norm.weight"] * 1.5
    ft["m.embed_tokens.weight"] = ft["m.embed_tokens.weight"] + _low_rank((64, 40), 2, g)
    return {"base": _save(tmp_path / "base", base), "ft": _save(tmp_path / "ft", ft), "ft_t": ft}


def test_known_rank_delta_is_recovered_on_both_svd_paths(tmp_path: Path, pair: dict) -> None:
    seen = []
    report = extract_lora(pair["ft"], pair["base"], tmp_path / "out", 3, progress=seen.append)
    assert set(report.errors) == {"m.small.weight", "m.big.weight", "m.same.weight"}
    assert report.errors["m.small.weight"] < 1e-4 and report.errors["m.big.weight"] < 1e-4
    assert report.errors["m.same.weight"] == 0.0
    assert "embedding" in report.skipped["m.embed_tokens.weight"]
    assert "not a 2-D weight" in report.skipped["m.norm.weight"]
    assert seen[-1].tensors_done == seen[-1].tensors_total == 3 and seen[-1].bytes_done == seen[-1].bytes_total

    adapter = Adapter.open(tmp_path / "out")
    assert adapter.config["r"] == adapter.config["lora_alpha"] == 3
    assert sorted(adapter.config["target_modules"]) == ["m.big", "m.same", "m.small"]
    with AdaptedCheckpoint(Checkpoint.open(pair["base"]), adapter) as ckpt:
        for name in ("m.small.weight", "m.big.weight", "m.same.weight"):
            want = pair["ft_t"][name]
            assert (ckpt.read(name) - want).norm() / want.norm() < 1e-5, name


def test_truncation_error_is_reported_and_rank_is_padded(tmp_path: Path, pair: dict) -> None:
    low = extract_lora(pair["ft"], pair["base"], tmp_path / "r1", 1)
    assert 0.1 < low.errors["m.small.weight"] < 1.0
    padded = extract_lora(pair["ft"], pair["base"], tmp_path / "r50", 50, include_embeddings=True)
    assert padded.errors["m.small.weight"] < 1e-4 and padded.errors["m.embed_tokens.weight"] < 1e-4
    adapter = Adapter.open(tmp_path / "r50")
    mod = adapter.lora["m.small.weight"]
    assert mod.a.shape == (50, 40) and mod.rank == 50          # min(shape) is 40: rows 40.. of A are zero
    assert not adapter.read(mod.a)[40:].any()
    emb = adapter.lora["m.embed_tokens.weight"]
    assert emb.fan_in_fan_out and emb.a.shape == (50, 64) and emb.b.shape == (40, 50)


def test_existing_output_and_no_common_weights(tmp_path: Path, pair: dict) -> None:
    (tmp_path / "out").mkdir()
    with pytest.raises(OutputError, match="already exists"):
        extract_lora(pair["ft"], pair["base"], tmp_path / "out", 2)
    extract_lora(pair["ft"], pair["base"], tmp_path / "out", 2, overwrite=True)
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()
    other = _save(tmp_path / "other", {"x.weight": torch.zeros(3, 3)})
    with pytest.raises(CheckpointError, match="no 2-D weight shared"):
        extract_lora(pair["ft"], other, tmp_path / "none", 2)


def _peft_roundtrip(tmp_path: Path, model, targets: list[str], rank: int, include_embeddings: bool) -> None:
    """Fine-tune = base + rank-`rank` deltas; PEFT's own loader and merge must give the fine-tune back."""
    peft = pytest.importorskip("peft")
    g = torch.Generator().manual_seed(5)
    base_dir, ft_dir, out = tmp_path / "base", tmp_path / "ft", tmp_path / "lora"
    model.save_pretrained(base_dir)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and any(f".{t}." in f".{name}" for t in targets):
                p.add_(_low_rank(tuple(p.shape), rank, g))
    model.save_pretrained(ft_dir)
    want = {k: v.clone() for k, v in model.state_dict().items()}

    report = extract_lora(ft_dir, base_dir, out, rank, include_embeddings=include_embeddings)
    assert report.errors and max(report.errors.values()) < 1e-4
    fresh = type(model).from_pretrained(base_dir)
    merged = peft.PeftModel.from_pretrained(fresh, out).merge_and_unload().state_dict()
    for name, tensor in want.items():
        torch.testing.assert_close(merged[name], tensor, atol=1e-4, rtol=0, msg=name)


def test_llama_adapter_loads_in_peft(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    _peft_roundtrip(tmp_path, transformers.LlamaForCausalLM(cfg), ["q_proj", "down_proj", "embed_tokens"], 3,
                    include_embeddings=True)


def test_gpt2_conv1d_adapter_loads_in_peft(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=32,
                                  bos_token_id=0, eos_token_id=0)
    _peft_roundtrip(tmp_path, transformers.GPT2LMHeadModel(cfg), ["c_attn", "c_fc"], 2, include_embeddings=False)
