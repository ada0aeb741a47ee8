"""Which files make one GGUF model: a `.gguf` file, llama.cpp's split files (`name-00001-of-00003.gguf`), or a
directory holding exactly one such model."""
from __future__ import annotations

import re
from pathlib import Path

from lazymerge.errors import CheckpointError

SPLIT_RE = re.compile(r"^(?P<prefix>.+)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$", re.IGNORECASE)
_HF_WEIGHTS = ("*.safetensors", "pytorch_model*.bin", "model.safetensors.index.json")


def split_name(prefix: str, no: int, count: int) -> str:
    """llama.cpp's name for split `no` (1-based) of `count` (`llama_split_path`)."""
    return f"{prefix}-{no:05d}-of-{count:05d}.gguf"


def _is_gguf_file(path: Path) -> bool:
    if path.suffix.lower() == ".gguf":
        return True
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return False


def _split_set(first: Path) -> list[Path]:
    m = SPLIT_RE.match(first.name)
    if m is None:
        return [first]
    count = int(m["count"])
    if count < 1:
        raise CheckpointError(f"{first}: split file name says it is one of {count} files")
    files = [first.with_name(split_name(m["prefix"], i, count)) for i in range(1, count + 1)]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise CheckpointError(f"{first}: split GGUF is missing {', '.join(missing[:3])}"
                              f"{' ...' if len(missing) > 3 else ''} (all {count} files must sit together)")
    return files


def gguf_files(path: Path | str) -> list[Path] | None:
    """The files of the GGUF model at `path` (split files in order), or None when `path` is not a GGUF model
    (a Hugging Face checkpoint directory, a recipe). A directory holding several GGUF models is an error naming
    them: which one was meant cannot be guessed (a hub repo often ships one file per quantization)."""
    p = Path(path).expanduser()
    if p.is_file():
        return _split_set(p) if _is_gguf_file(p) else None
    if not p.is_dir() or any(next(p.glob(g), None) is not None for g in _HF_WEIGHTS):
        return None
    found = sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() == ".gguf")
    if not found:
        return None
    models: dict[str, list[Path]] = {}
    for f in found:
        m = SPLIT_RE.match(f.name)
        key = f"{m['prefix']}-*-of-{m['count']}.gguf" if m else f.name
        models.setdefault(key, []).append(f)
    if len(models) > 1:
        names = sorted(models)
        raise CheckpointError(f"{p}: holds {len(names)} GGUF models ({', '.join(names[:4])}"
                              f"{' ...' if len(names) > 4 else ''}); name the file of the one to use")
    first = sorted(next(iter(models.values())))[0]
    return _split_set(first)


def is_gguf_model(path: Path | str) -> bool:
    """Whether `path` names a GGUF model (never raises: an ambiguous directory is still a GGUF model)."""
    try:
        return gguf_files(path) is not None
    except CheckpointError:
        return True
