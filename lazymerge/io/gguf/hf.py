"""A GGUF seen as the Hugging Face checkpoint it came from: config.json, tokenizer files and tensor names.

transformers' GGUF loader is the reference, so its own conversions are used rather than rewritten: the config
(`AutoConfig.from_pretrained(..., gguf_file=)`), the tokenizer (`AutoTokenizer.from_pretrained(..., gguf_file=)`,
saved as tokenizer.json etc.) and the GGUF -> Hugging Face tensor names (`get_gguf_hf_weights_map` over the
architecture's model built on the meta device). Only the tensor *values* are ours, because transformers
dequantizes whole files and a merge reads row blocks (`io.gguf.read`).

Building these costs seconds for a large vocabulary (transformers walks every token of the metadata), so the
result is cached under `$LAZYMERGE_CACHE/gguf/<key>/` (default `~/.cache/lazymerge`), keyed by every header byte
of every split file (the metadata and tensor table they are computed from) and the versions of transformers, gguf
and this conversion.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

from lazymerge.errors import CheckpointError
from lazymerge.io.gguf.format import GGUFHeader

CONVERSION_VERSION = 1
# GGUF architectures read, with what llama.cpp's converter did to their tensors (undone in io.gguf.read):
# transformers' TENSOR_PROCESSORS for these are the llama q/k permutation and Gemma's norm offset; an
# architecture whose conversion moves data between rows otherwise (fused experts, GPT-2's transposes) is refused.
READ_ARCHS = ("llama", "mistral", "qwen2", "qwen3", "phi3", "gemma2", "gemma3")
NAMES_FILE = "lazymerge-gguf-names.json"


@dataclass(frozen=True)
class HFView:
    config: dict[str, Any]
    files_dir: Path                  # config.json and the tokenizer files
    names: dict[str, str]            # GGUF tensor name -> Hugging Face name
    shapes: dict[str, list[int]]     # Hugging Face name -> the architecture's shape for it


def _transformers() -> Any:
    try:
        import accelerate  # noqa: F401
        import transformers
    except ImportError:
        raise CheckpointError("reading GGUF files needs transformers and accelerate: "
                              "pip install 'lazymerge[gguf]'") from None
    transformers.logging.set_verbosity_error()
    return transformers


def cache_root() -> Path:
    env = os.environ.get("LAZYMERGE_CACHE")
    if env:
        return Path(env).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lazymerge"


def _version(dist: str) -> str:
    try:
        return importlib_metadata.version(dist)
    except importlib_metadata.PackageNotFoundError:
        return "none"


def _key(headers: list[GGUFHeader]) -> str:
    h = hashlib.sha256(f"{CONVERSION_VERSION}\0{_version('transformers')}\0{_version('gguf')}\0".encode())
    for hd in headers:
        h.update(hd.digest.encode() + b"\0")
    return h.hexdigest()[:40]


def hf_view(headers: list[GGUFHeader]) -> HFView:
    """The Hugging Face view of a GGUF model (`headers`: its files, split 1 first), from the cache or built."""
    first = headers[0]
    arch = first.architecture
    if arch not in READ_ARCHS:
        raise CheckpointError(f"{first.path}: GGUF architecture {arch!r} cannot be read as a Hugging Face "
                              f"checkpoint (supported: {', '.join(READ_ARCHS)})")
    if f"{arch}.expert_count" in first.metadata:
        raise CheckpointError(f"{first.path}: mixture-of-experts GGUF inputs ({arch} with "
                              f"{first.metadata[f'{arch}.expert_count']} experts) are not supported")
    target = cache_root() / "gguf" / _key(headers)
    if not (target / NAMES_FILE).is_file():
        _build(headers, target)
    try:
        config = json.loads((target / "config.json").read_text(encoding="utf-8"))
        saved = json.loads((target / NAMES_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{target}: unreadable GGUF conversion cache ({exc}); delete it") from None
    return HFView(config, target, saved["names"], saved["shapes"])


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _build(headers: list[GGUFHeader], target: Path) -> None:
    first = headers[0]
    transformers = _transformers()
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=_mkdir(target.parent)))
    try:
        where, name = str(first.path.parent), first.path.name
        try:
            config = transformers.AutoConfig.from_pretrained(where, gguf_file=name, local_files_only=True)
            tokenizer = transformers.AutoTokenizer.from_pretrained(where, gguf_file=name, local_files_only=True)
        except Exception as exc:    # transformers raises ValueError, KeyError, OSError ... for a file it cannot read
            raise CheckpointError(f"{first.path}: transformers cannot convert this GGUF: {_one_line(exc)}") from None
        # transformers reads one file: whether the head is tied follows from the tensors of every split
        names_all = {n for hd in headers for n in hd.tensors}
        config.tie_word_embeddings = "output.weight" not in names_all
        config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        names, shapes = _tensor_names(transformers, config, first)
        (tmp / NAMES_FILE).write_text(json.dumps({"names": names, "shapes": shapes}))
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / NAMES_FILE).is_file():     # not a concurrent run that finished first
                raise
    except OSError as exc:
        raise CheckpointError(f"{target}: cannot write the GGUF conversion cache: {exc.strerror or exc} "
                              "(set LAZYMERGE_CACHE to a writable directory)") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def _tensor_names(transformers: Any, config: Any, first: GGUFHeader) -> tuple[dict[str, str], dict[str, list]]:
    """transformers' GGUF -> Hugging Face name map, over the architecture's causal LM built on the meta device."""
    import torch
    from transformers import modeling_gguf_pytorch_utils as g

    try:
        with torch.device("meta"):
            model = transformers.AutoModelForCausalLM.from_config(config)
        processor = g.TENSOR_PROCESSORS.get(first.architecture, g.TensorProcessor)(config=config.to_dict())
        names = g.get_gguf_hf_weights_map(model, processor)
    except Exception as exc:
        raise CheckpointError(f"{first.path}: transformers cannot map this GGUF's tensors: {_one_line(exc)}") from None
    shapes = {n: list(p.shape) for n, p in model.state_dict(keep_vars=True).items()}
    return dict(names), shapes
