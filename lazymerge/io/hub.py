"""Models named by their Hugging Face hub id: `org/name`, `org/name@revision`, resolved to a pinned commit.

Resolution, in mergekit's order: an existing local path always wins (io/models.py checks that first); then the
Hugging Face cache (`HF_HOME` / `HF_HUB_CACHE`) at that revision; then the hub (`HF_ENDPOINT`, `HF_TOKEN`), of
which only what a plan needs is fetched. With `HF_HUB_OFFLINE=1` only the cache is used.

A `HubRepo` is one repository pinned at a commit sha (a branch or tag is resolved once, so every file of a
merge comes from the same commit, and the report records it). Its files live where huggingface_hub keeps them,
`<cache>/models--org--name/snapshots/<sha>/<file>`: a file there is read like any local file; one that is not
is, depending on the run, downloaded there (`hf_hub_download`, with its progress bar) or read with range
requests (`io/remote.py`) and never stored. Headers a plan read with range requests are kept beside the
snapshot (`lazymerge-headers/<sha>/<file>`: a few KB each), so that planning again, or offline, needs neither
the network nor the shard.

Every call to the hub goes through huggingface_hub; its exceptions become one-line errors naming the repository
and file (`hub_error`).
"""
from __future__ import annotations

import os
import re
import struct
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from huggingface_hub import constants       # light; the client (httpx) is imported when the hub is first used

from ..errors import CheckpointError
from .remote import TRANSFERRED, RemoteFile, RemoteShardReader, _Counter, hub_error, read_remote_header
from .shards import ShardReader, TensorInfo, header_length, parse_header, read_header

_REF = re.compile(r"^(?P<repo>[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*)(?:@(?P<rev>[^\s@+]+))?$")
_SHA = re.compile(r"^[0-9a-f]{40}$")
HEADERS_DIR = "lazymerge-headers"
DOWNLOADED = _Counter()          # bytes of the files this process downloaded into the cache


def bytes_transferred() -> int:
    """Bytes this process has received from the hub so far: downloaded files and range reads (headers and
    streamed tensor data). A run reports the difference between its start and its end."""
    return DOWNLOADED.value + TRANSFERRED.value


@dataclass(frozen=True)
class HubRef:
    """A hub model reference as written: repository id and optional revision (branch, tag or commit)."""

    repo_id: str
    revision: str | None = None

    @property
    def key(self) -> str:
        """`org/name@revision`, `main` when no revision is given: one spelling per repository and revision."""
        return f"{self.repo_id}@{self.revision or 'main'}"

    def __str__(self) -> str:
        return self.repo_id if self.revision is None else f"{self.repo_id}@{self.revision}"


def parse_hub_ref(text: str) -> HubRef | None:
    """`org/name` or `org/name@revision` as a HubRef; None for anything else (a path, a bare name). Whether the
    text is an existing local path is the caller's question (a local path always wins)."""
    m = _REF.match(text.strip())
    if m is None or ".." in m["repo"] or "--" in m["repo"] or m["repo"].endswith((".", "-")):
        return None
    return HubRef(m["repo"], m["rev"])


def pinned_name(path: Path) -> str | None:
    """`org/name@<sha>: file` for a path inside a hub cache snapshot (`models--org--name/snapshots/<sha>/file`),
    whose content its commit fixes whether or not it is downloaded yet; None for any other path."""
    parts = Path(path).parts
    for i in range(len(parts) - 3, 0, -1):
        if parts[i] == "snapshots" and _SHA.match(parts[i + 1]) and parts[i - 1].startswith("models--"):
            repo = parts[i - 1][len("models--"):].replace("--", "/")
            return f"{repo}@{parts[i + 1]}: {'/'.join(parts[i + 2:])}"
    return None


def _truthy(value: str | None) -> bool:
    return value is not None and value.strip().upper() in ("1", "ON", "YES", "TRUE")


@dataclass(frozen=True)
class HubSettings:
    """Where the hub and its cache are, read from the environment when a run starts (not when huggingface_hub
    was imported), so that a process that changes HF_* between runs gets what it asked for."""

    endpoint: str
    cache_dir: Path
    offline: bool

    @classmethod
    def from_env(cls) -> "HubSettings":
        endpoint = (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")
        cache = os.environ.get("HF_HUB_CACHE")
        if not cache and os.environ.get("HF_HOME"):
            cache = os.path.join(os.environ["HF_HOME"], "hub")
        offline = os.environ.get("HF_HUB_OFFLINE", os.environ.get("TRANSFORMERS_OFFLINE"))
        return cls(endpoint=endpoint, cache_dir=Path(os.path.expanduser(cache or constants.HF_HUB_CACHE)),
                   offline=_truthy(offline) if offline is not None else bool(constants.HF_HUB_OFFLINE))


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


class HubRepo:
    """A model repository pinned at commit `sha`: what files it has, where they are or will be in the cache, and
    how to get at one (cached, downloaded, header by range reads, or streamed)."""

    def __init__(self, ref: HubRef, sha: str, files: dict[str, int | None], settings: HubSettings,
                 *, stream: bool = False) -> None:
        from huggingface_hub.file_download import repo_folder_name

        self.ref, self.sha, self.files, self.settings, self.stream = ref, sha, files, settings, stream
        self.repo_id = ref.repo_id
        self.storage = settings.cache_dir / repo_folder_name(repo_id=ref.repo_id, repo_type="model")
        self.snapshot = self.storage / "snapshots" / sha
        self._lock = threading.Lock()
        self._file_locks: dict[str, threading.Lock] = {}

    def label(self, name: str | None = None) -> str:
        at = f"{self.repo_id}@{self.ref.revision}" if self.ref.revision else self.repo_id
        return at if name is None else f"{at}: {name}"

    # -- files ---------------------------------------------------------------------------------------------
    def has(self, name: str) -> bool:
        return name in self.files

    def path(self, name: str) -> Path:
        """Where the file is, or will be once downloaded (the snapshot's pointer, as huggingface_hub lays it)."""
        return self.snapshot / name

    def name_of(self, path: Path) -> str:
        return Path(path).relative_to(self.snapshot).as_posix()

    def cached(self, name: str) -> Path | None:
        p = self.path(name)
        return p if p.is_file() else None

    def ensure(self, names: list[str]) -> list[Path]:
        """The files, downloaded into the cache where they are not there yet (huggingface_hub's progress bars)."""
        from huggingface_hub import hf_hub_download

        out = []
        for name in names:
            with self._file_lock(name):
                p = self.cached(name)
                if p is None:
                    try:
                        hf_hub_download(self.repo_id, name, revision=self.sha, cache_dir=self.settings.cache_dir,
                                        endpoint=self.settings.endpoint, local_files_only=self.settings.offline)
                    except Exception as exc:   # huggingface_hub raises many types; all mean "cannot get it"
                        raise hub_error(exc, self.label(name), self.settings) from None
                    p = self.cached(name)
                    if p is None:
                        raise CheckpointError(f"{self.label(name)}: downloaded, but not found at {self.path(name)}")
                    DOWNLOADED.add(p.stat().st_size)
            out.append(p)
        return out

    def _file_lock(self, name: str) -> threading.Lock:
        with self._lock:
            return self._file_locks.setdefault(name, threading.Lock())

    def remote(self, name: str) -> Any:
        """The file as a range-readable RemoteFile (online only)."""
        from huggingface_hub import hf_hub_url

        if self.settings.offline:
            raise CheckpointError(f"{self.label(name)}: not in the Hugging Face cache ({self.settings.cache_dir}), "
                                  "and HF_HUB_OFFLINE=1 forbids reading it from the hub")
        size = self.files.get(name)
        if size is None:
            raise CheckpointError(f"{self.label(name)}: the hub did not say how large this file is")
        url = hf_hub_url(self.repo_id, name, revision=self.sha, endpoint=self.settings.endpoint)
        return RemoteFile(url=url, size=size, label=f"{self.repo_id}@{self.sha[:12]}: {name}")

    # -- headers -------------------------------------------------------------------------------------------
    def _header_cache(self, name: str) -> Path:
        return self.storage / HEADERS_DIR / self.sha / name

    def header(self, name: str) -> tuple[dict[str, TensorInfo], dict[str, str]]:
        """A safetensors file's header: from the file if cached, else from the header cache, else by range
        requests (two, a few KB), kept in the header cache. No tensor data is transferred."""
        path = self.path(name)
        local = self.cached(name)
        if local is not None:
            return read_header(local)
        kept = self._header_cache(name)
        if kept.is_file():
            data = kept.read_bytes()
            if len(data) >= 16:
                (size,) = struct.unpack("<Q", data[:8])
                n = header_length(data[8:16], size, self.label(name))
                if len(data) == 16 + n:
                    return parse_header(data[16:], size, path, label=self.label(name))
        rf = self.remote(name)
        tensors, metadata, head = read_remote_header(rf, path)
        try:
            _write_atomic(kept, struct.pack("<Q", rf.size) + head)
        except OSError:
            pass                                  # a read-only cache: the header is simply read again next time
        return tensors, metadata

    # -- reading -------------------------------------------------------------------------------------------
    def reader(self, path: Path) -> Any:
        """A reader for one of its safetensors files: the cached file; else, streaming, its bytes on the hub;
        else the file downloaded first."""
        name = self.name_of(path)
        local = self.cached(name)
        if local is not None:
            return ShardReader(local)
        if self.stream:
            return RemoteShardReader(self.remote(name))
        return ShardReader(self.ensure([name])[0])


# -- resolution --------------------------------------------------------------------------------------------

def _cached_sha(storage: Path, revision: str | None) -> str | None:
    """The commit the cache has for `revision` (a sha is its own), None if the cache does not know it."""
    rev = revision or "main"
    if _SHA.match(rev):
        return rev if (storage / "snapshots" / rev).is_dir() else None
    ref = storage / "refs" / rev
    try:
        sha = ref.read_text().strip()
    except OSError:
        return None
    return sha if _SHA.match(sha) and (storage / "snapshots" / sha).is_dir() else None


def _cached_files(storage: Path, sha: str) -> dict[str, int | None]:
    """Offline, a repository's known files: those in its snapshot, and those whose header we kept."""
    files: dict[str, int | None] = {}
    for root in (storage / "snapshots" / sha, storage / HEADERS_DIR / sha):
        if root.is_dir():
            for p in root.rglob("*"):
                if p.is_file() and not p.name.startswith("."):
                    files.setdefault(p.relative_to(root).as_posix(), None)
    return files


def resolve(ref: HubRef, settings: HubSettings, *, stream: bool = False) -> HubRepo:
    """Pin `ref` to a commit: ask the hub (one model-info request: the commit and the file list), or, offline
    or when the hub cannot be reached, the cache."""
    from huggingface_hub.file_download import repo_folder_name

    storage = settings.cache_dir / repo_folder_name(repo_id=ref.repo_id, repo_type="model")
    if settings.offline:
        sha = _cached_sha(storage, ref.revision)
        if sha is None:
            raise CheckpointError(f"{ref}: not in the Hugging Face cache ({settings.cache_dir}) at revision "
                                  f"{ref.revision or 'main'}, and HF_HUB_OFFLINE=1 forbids asking the hub "
                                  "(nor is it a local directory)")
        return HubRepo(ref, sha, _cached_files(storage, sha), settings, stream=stream)
    from huggingface_hub import HfApi
    from huggingface_hub import errors as he

    try:
        info = HfApi(endpoint=settings.endpoint).model_info(ref.repo_id, revision=ref.revision, files_metadata=True,
                                                         timeout=constants.HF_HUB_ETAG_TIMEOUT)
    except (he.HfHubHTTPError, he.OfflineModeIsEnabled) as exc:
        raise hub_error(exc, str(ref), settings) from None
    except Exception as exc:                  # cannot connect: what the cache has at that revision, if anything
        sha = _cached_sha(storage, ref.revision)
        if sha is None:
            raise hub_error(exc, str(ref), settings) from None
        return HubRepo(ref, sha, _cached_files(storage, sha), settings, stream=stream)
    if not info.sha or not _SHA.match(info.sha):
        raise CheckpointError(f"{ref}: the hub did not say which commit this revision is")
    files = {s.rfilename: (s.lfs.size if s.lfs is not None else s.size) for s in info.siblings or ()}
    rev = ref.revision or "main"
    if rev != info.sha:                       # as hf_hub_download records it: offline runs find the commit
        try:
            _write_atomic(storage / "refs" / rev, info.sha.encode())
        except OSError:
            pass
    return HubRepo(ref, info.sha, files, settings, stream=stream)
