"""A recipe's model references opened as checkpoints: local directories, hub ids, and `base+adapter` pairs.

Each part of a reference is looked up in mergekit's order: an existing local path, else a hub id (`org/name`,
`org/name@revision`, io/hub.py), else a missing directory (one line naming it). A `ModelOpener` lives for one
compile: every spelling of one repository and revision resolves once, so all of a merge's reads come from the
same commit, and `pins()` says which (the report and the saved recipe record it).
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping

from ..errors import CheckpointError
from .adapters import (CONFIG_NAME, PICKLE_NAME, WEIGHTS_NAME, Adapter, AdaptedCheckpoint, read_adapter_config,
                       is_adapter_dir, parse_model_ref)
from .checkpoint import (AUX_NAMES, PICKLE_INDEX, SAFETENSORS_INDEX, Checkpoint, member_name, weight_names,
                         load_pickle)
from .gguf import GGUFCheckpoint, is_gguf_model
from .hub import HubRef, HubRepo, HubSettings, parse_hub_ref, resolve
from .paths import user_path
from .remote import RemoteShardReader, schedule_window, start_read_ahead
from .shards import row_span


@dataclass(frozen=True)
class OpenOptions:
    """How inputs are opened, for every model of a run."""

    allow_pickle: bool = False       # read PyTorch .bin checkpoints (torch.load with weights_only=True)
    stream: bool = False             # hub files not in the cache are read with range requests, never stored


def hub_ref(text: str) -> HubRef | None:
    """One part of a reference as a hub id, None when it is not one or names an existing local path (which wins)."""
    ref = parse_hub_ref(text)
    return ref if ref is not None and not user_path(text).exists() else None


def part_key(text: str) -> str:
    """The planner's key for one part of a reference, without touching the network: an existing local path's
    resolved path, a hub id's `org/name@revision` (revision `main` when none is given), else the resolved path
    of the directory that does not exist (opening it then says so)."""
    ref = hub_ref(text)
    return ref.key if ref is not None else str(user_path(text).resolve())


def source_key(ref: str) -> str:
    """The key of a whole model reference (`base+adapter` keeps both parts)."""
    base, adapter = _split(ref)
    return part_key(base) + (f"+{part_key(adapter)}" if adapter is not None else "")


def _split(ref: str) -> tuple[str, str | None]:
    if "+" in ref and not user_path(ref).exists():
        base, adapter = parse_model_ref(ref)
        return str(base), (str(adapter) if adapter is not None else None)
    return ref, None


def pin_refs(data: Any, pins: Mapping[str, str]) -> Any:
    """`data` (a recipe document, or a list of them) with every hub reference that resolved (`pins`:
    `org/name@revision` -> commit) rewritten as `org/name@<commit>`, in `base+adapter` pairs too: the same
    recipe, naming exactly the inputs that were read."""
    if isinstance(data, Mapping):
        return {k: pin_refs(v, pins) for k, v in data.items()}
    if isinstance(data, list):
        return [pin_refs(v, pins) for v in data]
    if not isinstance(data, str) or not pins:
        return data
    out = []
    for part in data.split("+"):
        ref = hub_ref(part)
        out.append(f"{ref.repo_id}@{pins[ref.key]}" if ref is not None and ref.key in pins else part)
    return "+".join(out)


def resolve_refs(data: Any, opener: "ModelOpener | None" = None) -> dict[str, str]:
    """The commits of the hub references among `data`'s strings (see pin_refs), resolved now; a string that
    only looks like one (no such repository) is left for the planner to report where it is used."""
    opener = opener or ModelOpener()
    if isinstance(data, Mapping):
        for v in data.values():
            resolve_refs(v, opener)
    elif isinstance(data, list):
        for v in data:
            resolve_refs(v, opener)
    elif isinstance(data, str):
        for ref in filter(None, map(hub_ref, data.split("+"))):
            try:
                opener.repo(ref)
            except CheckpointError:
                pass
    return opener.pins()


class ModelOpener:
    """Opens model references for one compile, resolving each hub repository and revision once."""

    def __init__(self, options: OpenOptions | None = None, settings: HubSettings | None = None) -> None:
        self.options = options or OpenOptions()
        self._settings = settings
        self._repos: dict[str, HubRepo] = {}

    @property
    def settings(self) -> HubSettings:
        if self._settings is None:
            self._settings = HubSettings.from_env()
        return self._settings

    def pins(self) -> dict[str, str]:
        """Each hub input as written (`org/name@revision`) and the commit it resolved to."""
        return {key: repo.sha for key, repo in self._repos.items()}

    def repo(self, ref: HubRef, where: str | None = None) -> HubRepo:
        repo = self._repos.get(ref.key)
        if repo is None:
            try:
                repo = resolve(ref, self.settings, stream=self.options.stream)
            except CheckpointError as exc:
                raise CheckpointError(f"{exc} ({where})" if where else str(exc)) from None
            self._repos[ref.key] = repo
        return repo

    def locate(self, text: str, where: str | None = None) -> Path | HubRepo:
        """One part of a reference: an existing local path, else a hub repository pinned to a commit."""
        ref = hub_ref(text)
        if ref is not None:
            return self.repo(ref, where)
        p = user_path(text)
        if not p.exists():
            raise CheckpointError(f"{p}: model directory does not exist" + (f" ({where})" if where else ""))
        return p

    def open(self, ref: str, where: str | None = None) -> Checkpoint | AdaptedCheckpoint:
        """Open a model entry: a checkpoint, `base+adapter`, or an adapter whose `base_model_name_or_path`
        names its base (a local directory or a hub id)."""
        base_text, adapter_text = _split(str(ref))
        base = self.locate(base_text, where)
        if adapter_text is None:
            if not self._is_adapter(base):
                return self._checkpoint(base)
            adapter = self._adapter(base)
            base = self._adapter_base(adapter, base, where)
        else:
            adapter = self._adapter(self.locate(adapter_text, where))
        try:
            base_ckpt = self._checkpoint(base)
        except BaseException:
            adapter.close()
            raise
        try:
            return AdaptedCheckpoint(base_ckpt, adapter)
        except BaseException:
            adapter.close()
            base_ckpt.close()
            raise

    # -- one part ------------------------------------------------------------------------------------------
    @staticmethod
    def _is_adapter(loc: Path | HubRepo) -> bool:
        if isinstance(loc, Path):
            return is_adapter_dir(loc)
        return loc.has(CONFIG_NAME) and not loc.has("config.json")

    def _checkpoint(self, loc: Path | HubRepo) -> Checkpoint | GGUFCheckpoint:
        if isinstance(loc, Path):
            return open_local(loc, allow_pickle=self.options.allow_pickle)
        return open_hub_checkpoint(loc, allow_pickle=self.options.allow_pickle)

    def _adapter(self, loc: Path | HubRepo) -> Adapter:
        if isinstance(loc, Path):
            return Adapter.open(loc, allow_pickle=self.options.allow_pickle)
        if not loc.has(CONFIG_NAME):
            raise CheckpointError(f"{loc.label()}: not a PEFT adapter (no {CONFIG_NAME})")
        loc.ensure([CONFIG_NAME])
        config = read_adapter_config(loc.snapshot)
        if loc.has(WEIGHTS_NAME):
            weights = Checkpoint(loc.snapshot, loc.header(WEIGHTS_NAME)[0], None, hub=loc)
            return Adapter(loc.snapshot, config, weights, weights_file=loc.path(WEIGHTS_NAME))
        if not loc.has(PICKLE_NAME):
            raise CheckpointError(f"{loc.label()}: adapter has no {WEIGHTS_NAME}")
        if not self.options.allow_pickle:
            raise CheckpointError(f"{loc.label(PICKLE_NAME)}: pickled adapter weights are refused by default; "
                                  "pass --allow-pickle to load them with torch.load(weights_only=True)")
        (file,) = loc.ensure([PICKLE_NAME])
        state, tensors = load_pickle(file, allow_empty=True)
        return Adapter(loc.snapshot, config, Checkpoint(loc.snapshot, tensors, None, {file: state}),
                       weights_file=file)

    def _adapter_base(self, adapter: Adapter, loc: Path | HubRepo, where: str | None) -> Path | HubRepo:
        name = adapter.config.get("base_model_name_or_path")
        try:
            if isinstance(name, str) and name:
                candidates = [user_path(name)] + ([loc / name] if isinstance(loc, Path) else [])
                for candidate in candidates:
                    if candidate.is_dir() or is_gguf_model(candidate):
                        return candidate
                hub = parse_hub_ref(name)
                if hub is not None:
                    return self.repo(hub, where)
        except BaseException:
            adapter.close()
            raise
        adapter.close()
        raise CheckpointError(f"{adapter.path}: base_model_name_or_path {name!r} is neither a local directory nor "
                              "a hub id; name the base explicitly as 'base+adapter'")


def open_hub_checkpoint(repo: HubRepo, *, allow_pickle: bool = False) -> Checkpoint:
    """A hub repository as a Checkpoint, from its small files (config, index, tokenizer: downloaded) and its
    safetensors headers (from the cache, or by range requests): no shard is downloaded here."""
    repo.ensure([n for n in ("config.json", SAFETENSORS_INDEX, *AUX_NAMES) if repo.has(n)])
    root = repo.snapshot
    config = Checkpoint.read_config(root)
    if repo.has(SAFETENSORS_INDEX):
        index = repo.path(SAFETENSORS_INDEX)
        names = weight_names(index)
        for rel in set(names.values()):
            member_name(rel, index)
            if not repo.has(rel):
                raise CheckpointError(f"{repo.label(rel)}: shard named in {SAFETENSORS_INDEX} is not in the "
                                      "repository" + (" cache (HF_HUB_OFFLINE=1)" if repo.settings.offline else ""))
        found = _headers(repo, sorted(set(names.values())))
        tensors = {}
        for name, rel in names.items():
            info = found.get(name)
            if info is None or info.file != repo.path(rel):
                raise CheckpointError(f"{repo.label(rel)}: tensor {name!r} listed in {SAFETENSORS_INDEX} is not in "
                                      "this shard")
            tensors[name] = info
        return Checkpoint(root, tensors, config, hub=repo)
    top = sorted(n for n in repo.files if "/" not in n and n.endswith(".safetensors"))
    files = ["model.safetensors"] if "model.safetensors" in top else top
    if files:
        return Checkpoint(root, _headers(repo, files), config, hub=repo)
    pickles = sorted(n for n in repo.files if "/" not in n and (n.startswith("pytorch_model") and n.endswith(".bin")))
    if not pickles:
        raise CheckpointError(f"{repo.label()}: no *.safetensors (or pytorch_model*.bin) weights in the repository")
    if not allow_pickle:
        raise CheckpointError(f"{repo.label(pickles[0])}: only pickle weights; pickles are refused by default, pass "
                              "--allow-pickle to load them with torch.load(weights_only=True)")
    if repo.has(PICKLE_INDEX):
        repo.ensure([PICKLE_INDEX])
    repo.ensure(pickles)
    return Checkpoint.open(root, allow_pickle=True)


def _headers(repo: HubRepo, names: list[str]) -> dict[str, Any]:
    """Every shard's header, read concurrently (each is two range requests when not cached: a 30-shard repo
    costs two round trips, not sixty)."""
    with ThreadPoolExecutor(max_workers=max(1, min(8, len(names))), thread_name_prefix="lazymerge-headers") as pool:
        headers = list(pool.map(repo.header, names))
    tensors: dict[str, Any] = {}
    for rel, (found, _) in zip(names, headers):
        for name, info in found.items():
            if name in tensors:
                raise CheckpointError(f"{repo.label()}: tensor {name!r} appears in both "
                                      f"{repo.name_of(tensors[name].file)} and {rel}")
            tensors[name] = info
    return tensors


def open_local(path: Path, *, allow_pickle: bool = False) -> Checkpoint | GGUFCheckpoint:
    """A local model's weights: a Hugging Face checkpoint directory, or a GGUF model (a `.gguf` file, split
    files, or a directory holding one), both read through the same interface."""
    if is_gguf_model(path):
        return GGUFCheckpoint.open(path)
    return Checkpoint.open(path, allow_pickle=allow_pickle)


def open_model(ref: str | Path, *, allow_pickle: bool = False,
               stream: bool = False) -> Checkpoint | GGUFCheckpoint | AdaptedCheckpoint:
    """Open one model reference (see ModelOpener.open)."""
    return ModelOpener(OpenOptions(allow_pickle=allow_pickle, stream=stream)).open(str(ref))


def open_checkpoint(ref: str | Path, *, allow_pickle: bool = False) -> Checkpoint | GGUFCheckpoint:
    """A checkpoint (never an adapter) named by a local directory, a GGUF model or a hub id; a hub file is
    downloaded when it is first read."""
    loc = ModelOpener(OpenOptions(allow_pickle=allow_pickle)).locate(str(ref))
    if isinstance(loc, Path):
        return open_local(loc, allow_pickle=allow_pickle)
    return open_hub_checkpoint(loc, allow_pickle=allow_pickle)


def model_directory(ref: str | Path, *, allow_pickle: bool = False) -> tuple[Path, str | None]:
    """A directory holding the whole model, for tools that load it with transformers (fisher): a local
    directory as it is, a hub id as its cache snapshot with every weight file downloaded. Returns the directory
    and, for a hub id, its commit."""
    loc = ModelOpener(OpenOptions(allow_pickle=allow_pickle)).locate(str(ref))
    if isinstance(loc, Path):
        return loc, None
    with open_hub_checkpoint(loc, allow_pickle=allow_pickle) as ck:     # the small files, and the headers
        loc.ensure(sorted({loc.name_of(i.file) for i in ck.tensors.values()}))
    return loc.snapshot, loc.sha


Read = tuple[Any, str, "tuple[int, int] | None", bool]     # (source, tensor, rows or None: all, exact range)


def _hub_parts(reads: Iterable[Read]) -> Iterator[tuple[Checkpoint, HubRepo, str, Any, Any, bool]]:
    """(checkpoint, its repo, file name, tensor info, rows, exact) of each read of a hub file not in the cache."""
    cached: dict[tuple[int, str], bool] = {}
    for src, name, rows, exact in reads:
        parts = getattr(src, "parts", None)
        for ck, part, r in parts(name, rows) if parts is not None else ():
            hub, info = getattr(ck, "hub", None), ck.tensors.get(part)
            if hub is None or info is None:
                continue
            rel = hub.name_of(info.file)
            if (id(hub), rel) not in cached:
                cached[(id(hub), rel)] = hub.cached(rel) is not None
            if not cached[(id(hub), rel)]:
                yield ck, hub, rel, info, r, exact


def files_to_fetch(reads: Iterable[Read]) -> list[tuple[HubRepo, list[str]]]:
    """The hub files these reads need and the cache lacks, per repository, in first-read order."""
    fetch: dict[int, tuple[HubRepo, list[str]]] = {}
    for _, hub, rel, _, _, _ in _hub_parts(reads):
        names = fetch.setdefault(id(hub), (hub, []))[1]
        if rel not in names:
            names.append(rel)
    return list(fetch.values())


def prepare_reads(reads: Iterable[Read], budget: int | None) -> Callable[[], None]:
    """Make hub inputs ready for a run that will make `reads`, in that order: download the files they need and
    the cache lacks (only those: the plan chose them, so a slice of the first layers never fetches the last
    shard), or, for inputs opened to stream, start fetching their byte ranges ahead (`exact` reads only: a
    read whose ranges depend on the data, such as a vocabulary's rows, is fetched when it is made). Returns the
    function that ends the read-ahead. Local inputs have nothing to prepare."""
    reads = list(reads)
    for hub, names in files_to_fetch(reads):
        if not hub.stream:
            hub.ensure(names)
    ranges: list[tuple[RemoteShardReader, int, int]] = []
    for ck, hub, _, info, r, exact in _hub_parts(reads):
        if hub.stream and exact:
            reader = ck.reader(info.file)
            offset, nbytes, _ = row_span(info, r)
            if isinstance(reader, RemoteShardReader) and nbytes:
                ranges.append((reader, offset, nbytes))
    return start_read_ahead(ranges, schedule_window(budget))
