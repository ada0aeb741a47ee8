"""Shared fixtures for the numerical test suite.

Tiny checkpoints with real Hugging Face layouts, written with safetensors' own writer
(`safetensors.torch.save_file`) so that the tests never depend on lazymerge's writer, plus helpers to write a
recipe and to read an output directory back (again with safetensors only).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import save_file

# make `import reference` / `from conftest import ...` work whether or not tests/ is a package
_HERE = Path(__file__).resolve().parent
if str(_HERE) not in sys.path:
    sys.path.insert(0, str(_HERE))

import holdkit  # noqa: E402  (tests/, on the path from here on)

# ----------------------------------------------------------------------------------------------------------------
# Llama-shaped tiny model
# ----------------------------------------------------------------------------------------------------------------
HIDDEN = 32
INTERMEDIATE = 88          # 88 rows: does not divide evenly into power-of-two row blocks
LAYERS = 2
VOCAB = 97
HEADS = 4
KV_HEADS = 2
HEAD_DIM = HIDDEN // HEADS
NOISE_STD = 0.01           # fine-tune = base + N(0, NOISE_STD)
MODEL_NAMES = ("base", "ft1", "ft2", "ft3")

SHARD_NAMES = ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")
AUX_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")


def llama_shapes() -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes of the tiny LlamaForCausalLM, in Hugging Face's order."""
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (VOCAB, HIDDEN)}
    for layer in range(LAYERS):
        p = f"model.layers.{layer}."
        shapes[p + "self_attn.q_proj.weight"] = (HEADS * HEAD_DIM, HIDDEN)
        shapes[p + "self_attn.k_proj.weight"] = (KV_HEADS * HEAD_DIM, HIDDEN)
        shapes[p + "self_attn.v_proj.weight"] = (KV_HEADS * HEAD_DIM, HIDDEN)
        shapes[p + "self_attn.o_proj.weight"] = (HIDDEN, HEADS * HEAD_DIM)
        shapes[p + "mlp.gate_proj.weight"] = (INTERMEDIATE, HIDDEN)
        shapes[p + "mlp.up_proj.weight"] = (INTERMEDIATE, HIDDEN)
        shapes[p + "mlp.down_proj.weight"] = (HIDDEN, INTERMEDIATE)
        shapes[p + "input_layernorm.weight"] = (HIDDEN,)
        shapes[p + "post_attention_layernorm.weight"] = (HIDDEN,)
    shapes["model.norm.weight"] = (HIDDEN,)
    shapes["lm_head.weight"] = (VOCAB, HIDDEN)
    return shapes


def make_base_tensors(seed: int = 1234) -> dict[str, torch.Tensor]:
    """float32 base weights: N(0, 0.02) matrices, layer norms = 1 (as a freshly initialised Llama)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in llama_shapes().items():
        if len(shape) == 1:
            out[name] = torch.ones(shape, dtype=torch.float32)
        else:
            out[name] = torch.randn(shape, generator=g, dtype=torch.float32) * 0.02
    return out


def make_finetune(base: dict[str, torch.Tensor], seed: int, std: float = NOISE_STD) -> dict[str, torch.Tensor]:
    """base + N(0, std) noise on every tensor (seeded)."""
    g = torch.Generator().manual_seed(seed)
    return {k: v + torch.randn(v.shape, generator=g, dtype=torch.float32) * std for k, v in base.items()}


def _tokenizer_json() -> dict:
    specials = ["<unk>", "<s>", "</s>"]
    vocab = {tok: i for i, tok in enumerate(specials)}
    for i in range(len(specials), VOCAB):
        vocab[f"tok{i}"] = i
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [
            {"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
             "normalized": False, "special": True}
            for i, t in enumerate(specials)
        ],
        "normalizer": None,
        "pre_tokenizer": {"type": "Whitespace"},
        "post_processor": None,
        "decoder": None,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"},
    }


def write_checkpoint(path: Path, tensors: dict[str, torch.Tensor], *, dtype: torch.dtype, tag: str) -> Path:
    """Write `tensors` (cast to `dtype`) as a 2-shard HF checkpoint directory at `path`.

    `tag` is written into the tokenizer/generation configs so that tests can tell whose aux files were copied
    (the vocabularies themselves are identical across models).
    """
    path.mkdir(parents=True, exist_ok=True)
    names = list(tensors)
    half = (len(names) + 1) // 2
    parts = [names[:half], names[half:]]
    weight_map: dict[str, str] = {}
    total = 0
    for shard, part in zip(SHARD_NAMES, parts):
        data = {n: tensors[n].to(dtype).contiguous() for n in part}
        save_file(data, str(path / shard), metadata={"format": "pt"})
        for n, t in data.items():
            weight_map[n] = shard
            total += t.numel() * t.element_size()
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    dtype_name = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}[dtype]
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": HIDDEN,
        "intermediate_size": INTERMEDIATE,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS,
        "vocab_size": VOCAB,
        "max_position_embeddings": 64,
        "rms_norm_eps": 1e-05,
        "hidden_act": "silu",
        "bos_token_id": 1,
        "eos_token_id": 2,
        "tie_word_embeddings": False,
        "torch_dtype": dtype_name,
    }
    (path / "config.json").write_text(json.dumps(config, indent=2))
    (path / "tokenizer.json").write_text(json.dumps(_tokenizer_json()))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "model_max_length": 64,
        "tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
        "name_or_path": f"tiny-llama-{tag}",
    }, indent=2))
    (path / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}, indent=2))
    (path / "generation_config.json").write_text(json.dumps(
        {"_from_model_config": True, "bos_token_id": 1, "eos_token_id": 2, "comment": f"from {tag}"}, indent=2))
    return path


def build_model_set(root: Path, dtype: torch.dtype, seed: int = 1234) -> dict[str, Path]:
    base = make_base_tensors(seed)
    sets = {"base": base}
    for i in (1, 2, 3):
        sets[f"ft{i}"] = make_finetune(base, seed=seed + 1000 * i)
    return {name: write_checkpoint(root / name, t, dtype=dtype, tag=name) for name, t in sets.items()}


@pytest.fixture(autouse=True)
def _reap_held_runs():
    """A test that fails while a run it started is held (tests/holdkit.py) leaves that run blocked on its release
    FIFO: kill it here so it never outlives the test."""
    yield
    holdkit.reap()


@pytest.fixture(scope="session")
def models_fp32(tmp_path_factory) -> dict[str, Path]:
    """{base, ft1, ft2, ft3} -> directory of a float32 2-shard tiny Llama (fine-tunes = base + N(0, 0.01))."""
    return build_model_set(tmp_path_factory.mktemp("models_fp32"), torch.float32)


@pytest.fixture(scope="session")
def models_bf16(tmp_path_factory) -> dict[str, Path]:
    """Same as models_fp32 but stored in bfloat16."""
    return build_model_set(tmp_path_factory.mktemp("models_bf16"), torch.bfloat16)


# ----------------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------------
def _plain(obj):
    """Turn Paths (and nested containers of them) into plain YAML-serialisable values."""
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


def write_recipe(tmp_path: Path, recipe: dict, name: str = "recipe.yaml") -> Path:
    """Write a recipe dict (Paths allowed) as YAML under tmp_path and return the file's path."""
    p = Path(tmp_path) / name
    p.write_text(yaml.safe_dump(_plain(recipe), sort_keys=False))
    return p


def plain_recipe(recipe: dict) -> dict:
    """The recipe with every Path replaced by its string (what a user would pass)."""
    return _plain(recipe)


def shard_files(directory: Path) -> list[str]:
    """Safetensors files of a checkpoint directory, in index order (or the single model.safetensors)."""
    directory = Path(directory)
    index = directory / "model.safetensors.index.json"
    if index.exists():
        wm = json.loads(index.read_text())["weight_map"]
        return sorted(set(wm.values()))
    return ["model.safetensors"]


def read_all(directory: Path) -> dict[str, torch.Tensor]:
    """Read every tensor of a checkpoint directory via its index (or its single model.safetensors)."""
    directory = Path(directory)
    index = directory / "model.safetensors.index.json"
    out: dict[str, torch.Tensor] = {}
    if index.exists():
        wm = json.loads(index.read_text())["weight_map"]
        by_file: dict[str, list[str]] = {}
        for name, f in wm.items():
            by_file.setdefault(f, []).append(name)
        for f, names in by_file.items():
            with safe_open(str(directory / f), framework="pt") as sf:
                keys = set(sf.keys())
                for n in names:
                    assert n in keys, f"{n} listed in the index under {f} but absent from that file"
                    out[n] = sf.get_tensor(n)
    else:
        with safe_open(str(directory / "model.safetensors"), framework="pt") as sf:
            for n in sf.keys():
                out[n] = sf.get_tensor(n)
    return out


def read_all_f32(directory: Path) -> dict[str, torch.Tensor]:
    return {k: v.to(torch.float32) for k, v in read_all(directory).items()}


def safetensors_header(path: Path) -> bytes:
    """The raw JSON header bytes of a safetensors file."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        return f.read(n)
