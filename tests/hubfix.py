"""Fixtures shared by the hub tests: the tiny checkpoints published on a loopback hub (tests/hubserver.py), and an
environment (HF_ENDPOINT, HF_HOME) pointing at it with an empty cache per test."""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from conftest import LAYERS, make_base_tensors, make_finetune, write_checkpoint
from hubserver import LoopbackHub
from lazymerge.io.hub import HEADERS_DIR

LORA_R, LORA_ALPHA = 4, 8


def write_adapter(path: Path, base: dict[str, torch.Tensor], base_name: str, seed: int = 7) -> Path:
    """A PEFT LoRA adapter on q_proj and v_proj of the tiny Llama (factors large enough to matter)."""
    path.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(LAYERS):
        for mod in ("q_proj", "v_proj"):
            w = base[f"model.layers.{layer}.self_attn.{mod}.weight"]
            key = f"base_model.model.model.layers.{layer}.self_attn.{mod}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(LORA_R, w.shape[1], generator=g) * 0.1
            tensors[f"{key}.lora_B.weight"] = torch.randn(w.shape[0], LORA_R, generator=g) * 0.1
    save_file(tensors, str(path / "adapter_model.safetensors"))
    (path / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": LORA_R, "lora_alpha": LORA_ALPHA, "target_modules": ["q_proj", "v_proj"],
        "base_model_name_or_path": base_name, "fan_in_fan_out": False}))
    return path


def write_deep(path: Path, seed: int = 99) -> Path:
    """A 4-layer tiny Llama in 4 shards: embeddings, norm and head in the first, then layer 0, layer 1, and
    layers 2-3 in the last (so a slice of the first two layers needs every shard but the last)."""
    base = make_base_tensors(seed)
    tensors = dict(base)
    for layer in (2, 3):
        for name, t in base.items():
            if name.startswith("model.layers.1."):
                tensors[name.replace("layers.1.", f"layers.{layer}.")] = t.flip(0).clone()
    write_checkpoint(path, tensors, dtype=torch.bfloat16, tag="deep")
    for f in path.glob("model-*.safetensors"):
        f.unlink()
    groups = [lambda n: not n.startswith("model.layers."), lambda n: n.startswith("model.layers.0."),
              lambda n: n.startswith("model.layers.1."), lambda n: n.startswith(("model.layers.2.", "model.layers.3."))]
    wmap = {}
    for i, keep in enumerate(groups, 1):
        shard = f"model-{i:05d}-of-00004.safetensors"
        part = {n: t.to(torch.bfloat16).contiguous() for n, t in tensors.items() if keep(n)}
        save_file(part, str(path / shard), metadata={"format": "pt"})
        wmap.update({n: shard for n in part})
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wmap}))
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 4}))
    return path


def write_pickled(path: Path, like: Path, *, keep_safetensors: bool, weights_from: Path | None = None) -> Path:
    """`like`'s checkpoint with its weights as a pytorch_model.bin (those of `weights_from`, else its own): alone
    (a pickle-only repository), or beside `like`'s safetensors shards (a repository holding both)."""
    from safetensors.torch import load_file

    shutil.copytree(like, path)
    if not keep_safetensors:
        for f in [*path.glob("*.safetensors"), path / "model.safetensors.index.json"]:
            f.unlink()
    state: dict[str, torch.Tensor] = {}
    for f in sorted(Path(weights_from or like).glob("*.safetensors")):
        state |= load_file(f)
    torch.save(state, path / "pytorch_model.bin")
    return path


class Published:
    """What the loopback hub serves, and where the same files are locally."""

    def __init__(self, hub: LoopbackHub, local: dict[str, Path], shas: dict[str, str]):
        self.hub, self.local, self.shas = hub, local, shas


@pytest.fixture(scope="session")
def published(models_bf16, tmp_path_factory):
    root = tmp_path_factory.mktemp("hub_repos")
    local = dict(models_bf16)
    base = make_base_tensors(1234)
    local["lora"] = write_adapter(root / "lora", base, "org/base")
    local["deep"] = write_deep(root / "deep")
    local["gated"] = write_checkpoint(root / "gated", make_finetune(base, seed=55), dtype=torch.bfloat16, tag="g")
    local["pickled"] = write_pickled(root / "pickled", models_bf16["ft3"], keep_safetensors=False)
    # both formats, the .bin holding other weights (ft2's): reading it instead of the shards would show
    local["both"] = write_pickled(root / "both", models_bf16["ft3"], keep_safetensors=True,
                                  weights_from=models_bf16["ft2"])
    hub = LoopbackHub().start()
    shas = {name: hub.add(f"org/{name}", path, gated=(name == "gated")) for name, path in local.items()}
    # a repository with history: ft1's files, then ft2's on main; the first commit also tagged v1
    shas["evolving@1"] = hub.add("org/evolving", models_bf16["ft1"])
    hub.tag("org/evolving", "v1", shas["evolving@1"])
    shas["evolving@2"] = hub.add("org/evolving", models_bf16["ft2"])
    yield Published(hub, local, shas)
    hub.stop()


@pytest.fixture
def hub_env(published, tmp_path, monkeypatch):
    """HF_ENDPOINT at the loopback hub, an empty HF_HOME, no token, online; the hub's counters reset."""
    from huggingface_hub import constants

    for var in ("HF_HUB_CACHE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN",
                "LAZYMERGE_READAHEAD"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", published.hub.url)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    published.hub.reset()
    return tmp_path / "hf" / "hub"


def go_offline(monkeypatch) -> None:
    """HF_HUB_OFFLINE=1, as a user sets it before starting the process (huggingface_hub reads it at import)."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


def header_bytes(path: Path) -> int:
    """8 + N: what reading a safetensors file's header transfers."""
    with open(path, "rb") as f:
        return 8 + int.from_bytes(f.read(8), "little")


def shard_hashes(out: Path) -> dict[str, str]:
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(Path(out).glob("*.safetensors"))}


def cached_shards(cache: Path) -> list[Path]:
    """Files in the Hugging Face cache holding tensor data (a safetensors header and more), wherever they are:
    snapshot pointers, blobs, partial downloads. Kept headers (lazymerge-headers/) are headers only."""
    out = []
    for p in (cache.rglob("*") if cache.exists() else ()):
        if HEADERS_DIR in p.parts or not p.is_file():
            continue
        with open(p, "rb") as f:
            head = f.read(9)
        if len(head) == 9 and head[8:9] == b"{" and p.stat().st_size > 8 + int.from_bytes(head[:8], "little"):
            out.append(p)
    return out


def rewrite(recipe: object, local: dict[str, Path]) -> object:
    """The recipe with `org/NAME` references replaced by the local directories holding the same files."""
    if isinstance(recipe, dict):
        return {k: rewrite(v, local) for k, v in recipe.items()}
    if isinstance(recipe, list):
        return [rewrite(v, local) for v in recipe]
    if isinstance(recipe, str):
        return "+".join(_local_part(p, local) for p in recipe.split("+"))
    return recipe


def _local_part(ref: str, local: dict[str, Path]) -> str:
    """`org/NAME` or `org/NAME@REV` as the local directory `local` holds for that name (`NAME@main` is NAME)."""
    if not ref.startswith("org/"):
        return ref
    name = ref[4:]
    name = name if name in local or not name.endswith("@main") else name[:-len("@main")]
    if name not in local:
        raise KeyError(f"{ref}: no local copy to compare with")
    return str(local[name])


def write_text_data(path: Path, words: int, seed: int) -> Path:
    """Evaluation text in the tiny models' vocabulary (`tok3` .. `tok96`)."""
    import random

    rng = random.Random(seed)
    path.write_text(" ".join(f"tok{rng.randint(3, 96)}" for _ in range(words)))
    return path


def copy_dir(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst
