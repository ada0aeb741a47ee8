"""A Hugging Face checkpoint directory seen as a table of lazily readable tensors.

Opening a checkpoint reads headers only, and checks everything a merge would otherwise trip over hours later: an
index naming a missing shard or a tensor its shard lacks, the same tensor in two shards, or a shard path that
leaves the model directory (an index is untrusted input and must not make us read arbitrary files).
"""
from __future__ import annotations

import json
import math
import warnings
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

import torch

from lazymerge.errors import CheckpointError
from lazymerge.dtypes import dtype_code, itemsize
from lazymerge.io.paths import user_path
from lazymerge.io.shards import ReaderPool, ShardReader, TensorInfo, read_header

SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLE_INDEX = "pytorch_model.bin.index.json"
AUX_NAMES = (
    "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json", "added_tokens.json",
    "vocab.json", "merges.txt", "vocab.txt", "generation_config.json", "chat_template.jinja",
)
FINITE_CHECK_BYTES = 64 << 20


def _allowed_roots(root: Path) -> list[Path]:
    """The directories a model's files may resolve into.

    The model directory itself, plus, for a Hugging Face hub cache snapshot (`<repo>/snapshots/<rev>`), the
    repo's `blobs` folder, since every file of a snapshot is a symlink into it.
    """
    roots = [root]
    if root.parent.name == "snapshots" and (root.parent.parent / "blobs").is_dir():
        roots.append((root.parent.parent / "blobs").resolve())
    return roots


def _inside(path: Path, roots: list[Path]) -> bool:
    resolved = path.resolve()
    return any(resolved.is_relative_to(r) for r in roots)


def member_name(rel: object, source: Path) -> str:
    """A shard name from an index, refused unless it is a plain relative path with no '..' (checks on the name
    alone: for a hub repository, where the file may not be on disk yet)."""
    if not isinstance(rel, str) or not rel:
        raise CheckpointError(f"{source}: shard name {rel!r} is not a non-empty string")
    if PurePosixPath(rel).is_absolute() or PureWindowsPath(rel).is_absolute() or PureWindowsPath(rel).drive:
        raise CheckpointError(f"{source}: shard path {rel!r} is absolute; only paths inside the model directory "
                              "are allowed")
    if ".." in PurePosixPath(rel.replace("\\", "/")).parts:
        raise CheckpointError(f"{source}: shard path {rel!r} contains '..'; only paths inside the model directory "
                              "are allowed")
    return rel


def _member(root: Path, rel: object, source: Path) -> Path:
    """A file named by an index, refused unless it is a plain relative path staying inside the model directory."""
    path = root / member_name(rel, source)
    if not _inside(path, _allowed_roots(root.resolve())):
        raise CheckpointError(f"{source}: shard {rel!r} resolves to {path.resolve()}, outside the model directory")
    if not path.exists():
        raise CheckpointError(f"{path}: shard named in {source.name} does not exist")
    if not path.is_file():
        raise CheckpointError(f"{path}: shard is not a regular file")
    return path


def _load_json(path: Path) -> object:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc})") from None
    except RecursionError:
        raise CheckpointError(f"{path}: not valid JSON (nested too deeply)") from None


def weight_names(index: Path) -> dict[str, str]:
    """An index's weight_map: tensor name -> shard name as written."""
    data = _load_json(index)
    wmap = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(wmap, dict):
        raise CheckpointError(f"{index}: missing 'weight_map' object")
    for name, rel in wmap.items():
        if not isinstance(rel, str):
            raise CheckpointError(f"{index}: weight_map entry {name!r}: shard name {rel!r} is not a string")
    return wmap


def _weight_map(index: Path, root: Path) -> dict[str, Path]:
    files: dict[str, Path] = {}
    out: dict[str, Path] = {}
    for name, rel in weight_names(index).items():
        if rel not in files:
            files[rel] = _member(root, rel, index)
        out[name] = files[rel]
    return out


class Checkpoint(ReaderPool):
    """A model directory: `model.safetensors`, or shards listed by `model.safetensors.index.json`.

    Pickled checkpoints (`pytorch_model*.bin`, `*.pt`) are refused unless `allow_pickle` is set, in which case
    they are loaded with `torch.load(weights_only=True)`, memory-mapped where the file format allows it. That
    path is *not* out-of-core in general (a legacy-format file is loaded whole and kept), which is acceptable
    for an opt-in compatibility route.
    """

    warnings: tuple[str, ...] = ()    # what a merge reading it should say (sources that adapt or compute do)

    def __init__(self, path: Path, tensors: dict[str, TensorInfo], config: dict | None,
                 pickled: dict[Path, dict[str, torch.Tensor]] | None = None, *, hub: Any = None) -> None:
        self.path = path
        self.hub = hub                     # io.hub.HubRepo: its files are cached, downloaded or streamed
        self.tensors = tensors
        self.config = config
        self._pickled = pickled or {}
        super().__init__()

    @classmethod
    def open(cls, path: Path | str, *, allow_pickle: bool = False) -> "Checkpoint":
        root = user_path(path)
        if not root.exists():
            raise CheckpointError(f"{root}: does not exist")
        if not root.is_dir():
            raise CheckpointError(f"{root}: not a directory")
        config = cls.read_config(root)
        index = root / SAFETENSORS_INDEX
        if index.exists():
            return cls(root, cls._indexed(root, index), config)
        files = [root / "model.safetensors"] if (root / "model.safetensors").is_file() else \
            sorted(root.glob("*.safetensors"))
        if files:
            roots = _allowed_roots(root.resolve())
            for f in files:
                if not _inside(f, roots):
                    raise CheckpointError(f"{f}: resolves to {f.resolve()}, outside the model directory")
            return cls(root, cls._merge_headers(files), config)
        pickles = cls._pickle_files(root)
        if not pickles:
            raise CheckpointError(f"{root}: no *.safetensors (or pytorch_model*.bin) weights found")
        if not allow_pickle:
            raise CheckpointError(f"{root}: only pickle weights ({pickles[0].name}); pickles are refused by "
                                  "default, pass --allow-pickle to load them with torch.load(weights_only=True)")
        tensors, loaded = cls._load_pickles(root, pickles)
        return cls(root, tensors, config, loaded)

    @staticmethod
    def read_config(root: Path) -> dict | None:
        cfg = root / "config.json"
        if not cfg.exists():
            return None
        data = _load_json(cfg)
        if not isinstance(data, dict):
            raise CheckpointError(f"{cfg}: not a JSON object")
        return data

    @staticmethod
    def _merge_headers(files: list[Path]) -> dict[str, TensorInfo]:
        tensors: dict[str, TensorInfo] = {}
        for f in files:
            for name, info in read_header(f)[0].items():
                if name in tensors:
                    raise CheckpointError(f"tensor {name!r} appears in both {tensors[name].file} and {f}")
                tensors[name] = info
        return tensors

    @classmethod
    def _indexed(cls, root: Path, index: Path) -> dict[str, TensorInfo]:
        wmap = _weight_map(index, root)
        found = cls._merge_headers(sorted(set(wmap.values())))
        tensors: dict[str, TensorInfo] = {}
        for name, shard in wmap.items():
            info = found.get(name)
            if info is None or info.file != shard:
                raise CheckpointError(f"{shard}: tensor {name!r} listed in {index.name} is not in this shard")
            tensors[name] = info
        return tensors

    @staticmethod
    def _pickle_files(root: Path) -> list[Path]:
        index = root / PICKLE_INDEX
        if index.exists():
            return sorted(set(_weight_map(index, root).values()))
        files = sorted(root.glob("pytorch_model*.bin")) + sorted(root.glob("*.pt"))
        roots = _allowed_roots(root.resolve())
        return [f for f in files if f.is_file() and _inside(f, roots)]

    @staticmethod
    def _load_pickles(root: Path, files: list[Path]) -> tuple[dict[str, TensorInfo], dict]:
        tensors: dict[str, TensorInfo] = {}
        loaded: dict[Path, dict[str, torch.Tensor]] = {}
        for f in files:
            state, infos = load_pickle(f)
            for name, info in infos.items():
                if name in tensors:
                    raise CheckpointError(f"tensor {name!r} appears in both {tensors[name].file} and {f}")
                tensors[name] = info
            loaded[f] = state
        return tensors, loaded

    def read(self, name: str, rows: tuple[int, int] | None = None, dtype: torch.dtype | None = torch.float32,
             device: str | torch.device = "cpu", evict: bool = True) -> torch.Tensor:
        """Rows [a, b) of a tensor as a new tensor (see ShardReader.read)."""
        info = self._info(name)
        if info.file in self._pickled:
            t = self._pickled[info.file][name]
            if rows is not None:
                if not 0 <= rows[0] <= rows[1] <= info.rows:
                    raise ValueError(f"{name}: rows {rows} out of range for {info.rows} rows")
                t = t[rows[0]:rows[1]] if t.dim() >= 2 else (t if rows[1] - rows[0] == 1 else t.reshape(-1)[:0])
            return t.to(device=device, dtype=dtype or t.dtype, copy=True)
        return self.reader(info.file).read(info, rows, dtype, device, evict)

    def read_stored(self, name: str, rows: tuple[int, int] | None = None, evict: bool = True) -> torch.Tensor:
        """Rows of a safetensors tensor in its stored dtype, possibly as an unaligned view of a read buffer: for a
        caller that converts it at once (the engine's fused load), which a copy to aligned memory would only slow."""
        info = self._info(name)
        if info.file in self._pickled:
            return self.read(name, rows, None, "cpu", evict)
        return self.reader(info.file).read(info, rows, None, "cpu", evict, aligned=False)

    def has_stored_form(self, name: str) -> bool:
        """Whether reading `name` in its stored dtype gives its value exactly: always, for a file's tensors (every
        source answers this; a source that computes a tensor, like an adapted weight, says no)."""
        return True

    def _info(self, name: str) -> TensorInfo:
        info = self.tensors.get(name)
        if info is None:
            raise CheckpointError(f"{self.path}: no tensor named {name!r}")
        return info

    def reader(self, file: Path) -> Any:
        """The pool's reader of `file`; a hub repository's file is cached, downloaded or streamed (io.hub)."""
        with self._lock:
            reader = self._readers.get(file)
        if reader is not None:
            return reader
        # made outside the lock: a hub file may be downloaded first, and other files' reads must not wait for it
        new = ShardReader(file) if self.hub is None else self.hub.reader(file)
        with self._lock:
            reader = self._readers.setdefault(file, new)
        if reader is not new:
            new.close()
        return reader

    _reader = reader

    def parts(self, name: str, rows: tuple[int, int] | None) -> list[tuple["Checkpoint", str, tuple[int, int] | None]]:
        """The reads of plain checkpoints that reading these rows makes: here, this one (io.models.prepare_reads)."""
        return [(self, name, rows)]

    def check_finite(self, name: str) -> bool:
        """Whether a tensor has no NaN/Inf, reading bounded row blocks so a huge tensor never sits in memory."""
        info = self.tensors[name]
        if not info.torch_dtype.is_floating_point:
            return True
        step = max(1, FINITE_CHECK_BYTES // max(1, info.row_numel * 4))
        for a in range(0, info.rows, step):
            if not torch.isfinite(self.read(name, (a, min(a + step, info.rows)))).all():
                return False
        return True

    @property
    def config_dir(self) -> Path:
        """The directory holding config.json and the tokenizer files (a GGUF source builds one)."""
        return self.path

    def aux_files(self) -> list[Path]:
        """Tokenizer and generation files a merged model should ship with (regular files inside the dir only)."""
        roots = _allowed_roots(self.path.resolve())
        return [p for p in (self.path / n for n in AUX_NAMES) if p.is_file() and _inside(p, roots)]

    def data_files(self) -> set[Path]:
        """The files its tensors are read from (what a resumed run checks for changes)."""
        return {Path(info.file) for info in self.tensors.values()}

    def meta_files(self) -> set[Path]:
        """The small files that decide what its tensors are and how a merge uses them: config.json (layer count,
        tied embeddings), the index (which file holds which tensor), the tokenizer files (vocabulary alignment,
        prompts) and the other files copied with it. A resumed run compares their bytes."""
        names = ("config.json", SAFETENSORS_INDEX, PICKLE_INDEX)
        return {p for p in (self.path / n for n in names) if p.is_file()} | set(self.aux_files())


_UNSAFE_ADVICE = ("weights only load failed", "weights_only` set to `false`", "weights_only=false",
                  "arbitrary code", "trusted source", "check the documentation of torch.load",
                  "please file an issue")


def pickle_refusal(path: Path, exc: BaseException) -> CheckpointError:
    """The one-line error for a pickle that torch's restricted unpickler refused: torch's own reason (the
    unsupported global, the bad opcode), without torch's advice to retry with `weights_only=False`, which would
    run whatever code the file carries. A checkpoint that needs that is to be converted by someone who trusts it."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    reasons = [ln for ln in lines if not any(a in ln.lower() for a in _UNSAFE_ADVICE)]
    reason = reasons[0] if reasons else type(exc).__name__
    return CheckpointError(f"{path}: refused by torch.load(weights_only=True), which reads only tensors: {reason}")


def load_pickle(path: Path, *, allow_empty: bool = False) -> tuple[dict[str, torch.Tensor], dict[str, TensorInfo]]:
    """A pickled state dict via the restricted unpickler (memory-mapped when the zip format allows it), and the
    TensorInfo of each of its tensors. The one place lazymerge unpickles; callers check the user opted in."""
    try:
        with warnings.catch_warnings():
            # torch warns (several lines) about protocols and formats of untrusted files; the error says it all
            warnings.simplefilter("ignore")
            try:
                state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as exc:
                if "mmap" not in str(exc):
                    raise
                state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # the unpickler raises many types; each means the same to the user
        raise pickle_refusal(path, exc) from None
    if not isinstance(state, dict) or not (state or allow_empty) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise CheckpointError(f"{path}: not a flat state dict of tensors")
    infos: dict[str, TensorInfo] = {}
    for name, t in state.items():
        try:
            code = dtype_code(t.dtype)
        except ValueError:
            raise CheckpointError(f"{path}: tensor {name!r} has unsupported dtype {t.dtype}") from None
        shape = tuple(t.shape)
        infos[name] = TensorInfo(name=name, dtype=code, shape=shape, file=path, start=0,
                                 nbytes=math.prod(shape) * itemsize(code))
    return state, infos
