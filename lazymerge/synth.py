"""Synthetic Llama-shaped Hugging Face checkpoints for the demo, the tests and the benchmarks.

Real checkpoints are gigabytes behind a network we may not have; these are deterministic (same seed, same bytes),
any size from a few kilobytes to a 70B-shaped header-only skeleton, and laid out exactly like the real thing
(config.json, sharded safetensors, index, tokenizer files). A "fine-tune" is its base plus small noise, computed
row block by row block from the base on disk, so making one never needs the whole model in memory.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from lazymerge.errors import CheckpointError, OutputError
from lazymerge.io.checkpoint import Checkpoint
from lazymerge import shapes
from lazymerge.dtypes import dtype_code
from lazymerge.io.writer import CheckpointWriter, OutTensor, ShardLayout, index_json, plan_layout
from lazymerge.units import parse_size

GROUP_ELEMENTS = 1 << 22  # elements per generated row group: bounds memory, and fixes the random stream


@dataclass(frozen=True)
class ModelShape:
    """The hyper-parameters that determine a Llama checkpoint's tensor names and shapes."""

    name: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


PRESETS: dict[str, ModelShape] = {
    "tiny": ModelShape("tiny", hidden=64, intermediate=176, layers=2, heads=4, kv_heads=2, vocab=512),
    "small": ModelShape("small", hidden=256, intermediate=688, layers=4, heads=8, kv_heads=4, vocab=2048),
    "1b": ModelShape("1b", hidden=2048, intermediate=5632, layers=22, heads=32, kv_heads=4, vocab=32000),
    "7b": ModelShape("7b", hidden=4096, intermediate=11008, layers=32, heads=32, kv_heads=32, vocab=32000),
    "70b": ModelShape("70b", hidden=8192, intermediate=28672, layers=80, heads=64, kv_heads=8, vocab=32000),
}


def tensor_shapes(shape: ModelShape, tie_word_embeddings: bool = False) -> list[tuple[str, tuple[int, ...]]]:
    """Llama tensor names and shapes in the order Hugging Face writes them."""
    h, kv = shape.hidden, shape.kv_heads * shape.head_dim
    out: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (shape.vocab, h))]
    for i in range(shape.layers):
        p = f"model.layers.{i}."
        out += [
            (p + "self_attn.q_proj.weight", (h, h)),
            (p + "self_attn.k_proj.weight", (kv, h)),
            (p + "self_attn.v_proj.weight", (kv, h)),
            (p + "self_attn.o_proj.weight", (h, h)),
            (p + "mlp.gate_proj.weight", (shape.intermediate, h)),
            (p + "mlp.up_proj.weight", (shape.intermediate, h)),
            (p + "mlp.down_proj.weight", (h, shape.intermediate)),
            (p + "input_layernorm.weight", (h,)),
            (p + "post_attention_layernorm.weight", (h,)),
        ]
    out.append(("model.norm.weight", (h,)))
    if not tie_word_embeddings:
        out.append(("lm_head.weight", (shape.vocab, h)))
    return out


def _generator(seed: int, name: str, group: int) -> torch.Generator:
    """A stream per (seed, tensor, row group): values do not depend on which other tensors exist or their order."""
    digest = hashlib.sha256(f"{seed}/{name}/{group}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


def _row_groups(shape: tuple[int, ...]) -> list[tuple[int, int]]:
    rows, row_numel = shapes.rows(shape), shapes.row_numel(shape)
    step = max(1, GROUP_ELEMENTS // max(1, row_numel))
    return [(a, min(a + step, rows)) for a in range(0, rows, step)]


def _block(name: str, shape: tuple[int, ...], rows: tuple[int, int], group: int, seed: int,
           base: Checkpoint | None, noise: float) -> torch.Tensor:
    block = shapes.block_shape(shape, *rows)
    randn = torch.randn(block, generator=_generator(seed, name, group))
    if base is not None:
        return base.read(name, rows, torch.float32) + noise * randn
    if name.endswith("norm.weight"):
        return 1.0 + 0.02 * randn
    return 0.02 * randn


def _config(shape: ModelShape, dtype: torch.dtype, tie: bool) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": shape.hidden,
        "intermediate_size": shape.intermediate,
        "num_hidden_layers": shape.layers,
        "num_attention_heads": shape.heads,
        "num_key_value_heads": shape.kv_heads,
        "vocab_size": shape.vocab,
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "hidden_act": "silu",
        "initializer_range": 0.02,
        "attention_bias": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "tie_word_embeddings": tie,
        "torch_dtype": str(dtype).removeprefix("torch."),
        "use_cache": True,
    }


def _tokenizer_files() -> dict[str, bytes]:
    """A tiny but loadable word-level tokenizer: merges copy these files, so they must exist and be valid."""
    special = ["<unk>", "<s>", "</s>"]
    vocab = {tok: i for i, tok in enumerate(special + ["hello", "world", "merge", "model"])}
    tokenizer = {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": False, "special": True} for i, t in enumerate(special)],
        "normalizer": None, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": None, "decoder": None,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"},
    }
    tokens = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    files = {
        "tokenizer.json": tokenizer,
        "tokenizer_config.json": {**tokens, "model_max_length": 2048, "tokenizer_class": "PreTrainedTokenizerFast"},
        "special_tokens_map.json": tokens,
        "generation_config.json": {"bos_token_id": 1, "eos_token_id": 2, "max_length": 2048},
    }
    return {name: (json.dumps(data, indent=2) + "\n").encode() for name, data in files.items()}


def _write_header_only(out_dir: Path, layout: list[ShardLayout], files: dict[str, bytes], overwrite: bool) -> None:
    """Valid shards whose data are all zeros, as sparse files: a 70B-shaped checkpoint costs no disk or time."""
    if out_dir.exists() and not overwrite:
        raise OutputError(f"{out_dir}: already exists; pass --overwrite to replace it")
    out_dir.mkdir(parents=True, exist_ok=True)
    for shard in layout:
        with open(out_dir / shard.filename, "wb") as f:
            f.write(shard.header)
            os.ftruncate(f.fileno(), shard.size)
    if len(layout) > 1:
        files = {"model.safetensors.index.json": index_json(layout), **files}
    for name, data in files.items():
        (out_dir / name).write_bytes(data)


def make_checkpoint(out_dir: Path | str, shape: ModelShape | str, *, seed: int, dtype: torch.dtype = torch.bfloat16,
                    shard_size: int | str = "5GB", base: Path | str | None = None, noise: float = 0.002,
                    tie_word_embeddings: bool = False, header_only: bool = False,
                    overwrite: bool = False) -> Path:
    """Write a Llama-shaped checkpoint: random (normal, std 0.02; norms near 1) or, with `base`, a fine-tune
    `base + N(0, noise)`. Returns `out_dir`."""
    out_dir = Path(out_dir)
    shape = PRESETS[shape] if isinstance(shape, str) else shape
    names = tensor_shapes(shape, tie_word_embeddings)
    code = dtype_code(dtype)
    layout = plan_layout([OutTensor(n, s, code) for n, s in names], parse_size(shard_size))
    files = {"config.json": (json.dumps(_config(shape, dtype, tie_word_embeddings), indent=2) + "\n").encode(),
             **_tokenizer_files()}
    if header_only:
        _write_header_only(out_dir, layout, files, overwrite)
        return out_dir

    base_ckpt = Checkpoint.open(base) if base is not None else None
    try:
        if base_ckpt is not None:
            for name, s in names:
                info = base_ckpt.tensors.get(name)
                if info is None or info.shape != s:
                    raise CheckpointError(f"{base}: tensor {name!r} missing or not of shape {s} "
                                          f"(is the base a {shape.name} checkpoint?)")
        with CheckpointWriter(out_dir, layout, overwrite=overwrite) as writer:
            for name, s in names:
                for group, rows in enumerate(_row_groups(s)):
                    block = _block(name, s, rows, group, seed, base_ckpt, noise).to(dtype)
                    writer.write_rows(name, rows[0], block)
            writer.finalize(config=json.loads(files.pop("config.json")), aux_files=[], extra_files=files)
    finally:
        if base_ckpt is not None:
            base_ckpt.close()
    return out_dir


def make_demo(directory: Path | str, preset: str = "tiny") -> tuple[Path, list[Path]]:
    """A base and two fine-tunes of it under `directory` (its `base`, `ft1`, `ft2` are replaced if present)."""
    directory = Path(directory)
    base = make_checkpoint(directory / "base", preset, seed=0, overwrite=True)
    tunes = [make_checkpoint(directory / f"ft{i}", preset, seed=i, base=base, overwrite=True)
             for i in (1, 2)]
    return base, tunes
