"""A loopback stand-in for the Hugging Face hub: what huggingface_hub asks for, served on 127.0.0.1.

Tests (and benches/hub_bench.py) never touch the network: they point `HF_ENDPOINT` at this server and `HF_HOME`
at a temporary directory. It serves repositories made of local directories (the tests' tiny checkpoints),
through the endpoints huggingface_hub 2.x uses (checked against its source, file_download.py, hf_api.py and
utils/_http.py):

- `GET /api/models/{repo}` and `/api/models/{repo}/revision/{rev}` (`HfApi.model_info`; `?blobs=true` adds each
  file's size and LFS sha256): the commit `sha` and the `siblings`;
- `HEAD` / `GET /{repo}/resolve/{rev}/{file}` (`hf_hub_download`, range reads): `X-Repo-Commit`, `ETag`,
  `Content-Length`, `Accept-Ranges`, and `Range: bytes=a-b` / `bytes=a-` answered 206 with `Content-Range`;
- errors as the hub sends them, with `X-Error-Code` (which `hf_raise_for_status` turns into its exceptions):
  404 `RepoNotFound`, 404 `RevisionNotFound`, 404 `EntryNotFound` (with the commit), 401 `GatedRepo` without an
  `Authorization` header, 403 `GatedRepo` with a token it does not accept.

It counts the body bytes it serves per (repo, file) and every request, so that tests can assert what was
transferred; `hold(n, fn)` calls `fn` when the n-th tensor-data range request arrives (a run killed at a known
point), `fail_next(k)` answers the next k resolve requests 503 (a transient error to retry), and `cut_next(n)`
breaks the next tensor-data response off after n bytes (a dropped connection, to resume).

Run as a script it serves directories until killed (`python tests/hubserver.py org/name=DIR ...`), printing its
URL, with the counts at `GET /_stats` (the bench serves from another process than the merge it measures).
"""
from __future__ import annotations

import collections
import hashlib
import json
import os
import re
import sys
import threading
import urllib.parse
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Callable

CHUNK = 1 << 20


@dataclass
class Commit:
    sha: str
    files: dict[str, Path]                 # name in the repo -> file on disk
    etags: dict[str, str]


@dataclass
class Repo:
    commits: dict[str, Commit] = field(default_factory=dict)
    refs: dict[str, str] = field(default_factory=dict)          # branch / tag -> sha
    gated: bool = False


def _digest(path: Path, content: bool) -> str:
    h = hashlib.sha256()
    if content:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(CHUNK), b""):
                h.update(chunk)
    else:           # big bench files: their identity, cheaply
        st = path.stat()
        h.update(f"{path.resolve()}\0{st.st_size}\0{st.st_mtime_ns}".encode())
    return h.hexdigest()


class LoopbackHub:
    TOKEN = "hf_loopback_token"

    def __init__(self) -> None:
        self.repos: dict[str, Repo] = {}
        self.served: collections.Counter = collections.Counter()     # (repo, file) -> body bytes sent
        self.requests: list[tuple[str, str, str | None]] = []      # (method, path, Range header)
        self._lock = threading.Lock()
        self._fail = 0
        self._cut: int | None = None
        self.faults = 0                       # 503s sent and responses cut, so far
        self._hold: tuple[int, Callable[[], None]] | None = None
        self._data_gets = 0
        self._server: ThreadingHTTPServer | None = None

    # -- content -------------------------------------------------------------------------------------------
    def add(self, repo_id: str, directory: Path, *, branch: str = "main", gated: bool = False,
            content_hash: bool = True) -> str:
        """Commit `directory`'s files (recursively) to `repo_id` on `branch`; returns the new commit's sha."""
        directory = Path(directory)
        files = {p.relative_to(directory).as_posix(): p for p in sorted(directory.rglob("*")) if p.is_file()}
        etags = {n: _digest(p, content_hash) for n, p in files.items()}
        h = hashlib.sha1(repo_id.encode())
        for n in sorted(files):
            h.update(f"{n}\0{etags[n]}\0".encode())
        sha = h.hexdigest()
        repo = self.repos.setdefault(repo_id, Repo())
        repo.commits[sha] = Commit(sha, files, etags)
        repo.refs[branch] = sha
        repo.gated = repo.gated or gated
        return sha

    def tag(self, repo_id: str, name: str, sha: str) -> None:
        self.repos[repo_id].refs[name] = sha

    # -- counters ------------------------------------------------------------------------------------------
    def bytes_served(self, repo_id: str | None = None, suffix: str = "") -> int:
        with self._lock:
            return sum(n for (r, f), n in self.served.items()
                       if (repo_id is None or r == repo_id) and f.endswith(suffix))

    def reset(self) -> None:
        with self._lock:
            self.served.clear()
            self.requests.clear()
            self._data_gets = 0

    def fail_next(self, k: int) -> None:
        """Answer the next k `resolve` requests with 503 (huggingface_hub retries them)."""
        with self._lock:
            self._fail = k

    def cut_next(self, nbytes: int) -> None:
        """Break off the next tensor-data response after `nbytes` bytes of its body (a dropped connection)."""
        with self._lock:
            self._cut = nbytes

    def hold(self, n: int, fn: Callable[[], None]) -> None:
        """Call `fn` (once) when the n-th range request for tensor data arrives, before it is answered (a header
        is read at offsets 0 and 8; tensor data starts beyond)."""
        with self._lock:
            self._hold, self._data_gets = (n, fn), 0

    # -- server --------------------------------------------------------------------------------------------
    def start(self) -> "LoopbackHub":
        hub = self

        class Handler(_Handler):
            pass

        Handler.hub = hub
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True, name="loopback-hub").start()
        return self

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> "LoopbackHub":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


_RESOLVE = re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<file>.+)$")
_INFO = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+?)(?:/revision/(?P<rev>[^/]+))?$")
_RANGE = re.compile(r"^bytes=(\d+)-(\d*)$")


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True    # no 40 ms delayed-ACK stalls between a response's pieces
    wbufsize = 1 << 16                # a small response (headers and body) leaves in one write
    hub: LoopbackHub

    def log_message(self, *args: object) -> None:       # quiet
        pass

    def _error(self, status: int, code: str, message: str, commit: str | None = None) -> None:
        body = json.dumps({"error": message}).encode()
        self.send_response(status)
        self.send_header("X-Error-Code", code)
        self.send_header("X-Error-Message", message)
        if commit:
            self.send_header("X-Repo-Commit", commit)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, data: object) -> None:
        body = json.dumps(data).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _commit(self, repo_id: str, rev: str | None) -> tuple[Repo, Commit] | None:
        repo = self.hub.repos.get(repo_id)
        if repo is None:
            self._error(404, "RepoNotFound", "Repository not found")
            return None
        rev = urllib.parse.unquote(rev) if rev else "main"
        sha = repo.refs.get(rev, rev if rev in repo.commits else None)
        if sha is None:
            self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
            return None
        return repo, repo.commits[sha]

    def do_HEAD(self) -> None:
        self._route()

    def do_GET(self) -> None:
        self._route()

    def _route(self) -> None:
        hub = self.hub
        url = urllib.parse.urlsplit(self.path)
        path = urllib.parse.unquote(url.path)
        with hub._lock:
            hub.requests.append((self.command, path, self.headers.get("Range")))
        if path == "/_stats":
            with hub._lock:
                return self._json({f"{r}/{f}": n for (r, f), n in hub.served.items()})
        m = _INFO.match(url.path)
        if m and self.command == "GET":
            return self._info(urllib.parse.unquote(m["repo"]), m["rev"], "blobs=true" in url.query)
        m = _RESOLVE.match(url.path)
        if m:
            return self._resolve(urllib.parse.unquote(m["repo"]), m["rev"], urllib.parse.unquote(m["file"]))
        self._error(404, "NotFound", f"no route for {path}")

    def _info(self, repo_id: str, rev: str | None, blobs: bool) -> None:
        found = self._commit(repo_id, rev)
        if found is None:
            return
        repo, commit = found
        siblings = []
        for name, p in commit.files.items():
            sib: dict = {"rfilename": name}
            if blobs:
                size = p.stat().st_size
                sib.update(size=size, blobId=commit.etags[name][:40])
                if name.endswith((".safetensors", ".bin")):
                    sib["lfs"] = {"size": size, "sha256": commit.etags[name], "pointerSize": 134}
            siblings.append(sib)
        self._json({"_id": repo_id, "id": repo_id, "modelId": repo_id, "sha": commit.sha, "private": False,
                    "gated": "manual" if repo.gated else False, "disabled": False, "siblings": siblings})

    def _resolve(self, repo_id: str, rev: str, name: str) -> None:
        hub = self.hub
        with hub._lock:
            fail = hub._fail > 0
            hub._fail -= fail
            hub.faults += fail
        if fail:
            return self._error(503, "ServiceUnavailable", "try again")
        found = self._commit(repo_id, rev)
        if found is None:
            return
        repo, commit = found
        if repo.gated:
            auth = self.headers.get("Authorization")
            if auth is None:
                return self._error(401, "GatedRepo", "Access to this model is restricted: log in")
            if auth != f"Bearer {LoopbackHub.TOKEN}":
                return self._error(403, "GatedRepo", "Your token has no access to this gated model")
        file = commit.files.get(name)
        if file is None:
            return self._error(404, "EntryNotFound", f"{name} does not exist", commit=commit.sha)
        size = file.stat().st_size
        start, end = 0, size - 1
        rng = self.headers.get("Range")
        m = _RANGE.match(rng.strip()) if rng else None
        if rng and not m:
            return self._error(416, "RangeNotSatisfiable", f"bad range {rng}")
        if m:
            start = int(m[1])
            end = min(int(m[2]), size - 1) if m[2] else size - 1
            if start > end:
                return self._error(416, "RangeNotSatisfiable", f"bad range {rng}")
            if self.command == "GET" and start > 8 and hub._hold is not None:      # 0 and 8: a header
                with hub._lock:
                    hub._data_gets += 1
                    hold = hub._hold if hub._data_gets == hub._hold[0] else None
                if hold is not None:
                    hub._hold = None
                    hold[1]()
        self.send_response(206 if m else 200)
        self.send_header("X-Repo-Commit", commit.sha)
        self.send_header("ETag", f'"{commit.etags[name]}"')
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(end - start + 1))
        if m:
            self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.end_headers()
        if self.command == "HEAD":
            return
        self.wfile.flush()
        count = end - start + 1
        with hub._lock:
            if hub._cut is not None and start > 8 and count > hub._cut:
                count, hub._cut = hub._cut, None
                hub.faults += 1
                self.close_connection = True
        with open(file, "rb") as f:        # sendfile: the stand-in must not be what a benchmark measures
            sent = self.connection.sendfile(f, offset=start, count=count)
        with hub._lock:
            hub.served[(repo_id, name)] += sent


def main(argv: list[str]) -> None:
    """Serve `org/name=DIR` repositories (file identity from names, sizes and times: no hashing of GBs)."""
    hub = LoopbackHub()
    for spec in argv:
        repo_id, _, directory = spec.partition("=")
        hub.add(repo_id, Path(directory), content_hash=False)
    hub.start()
    print(hub.url, flush=True)
    threading.Event().wait()


if __name__ == "__main__":
    main(sys.argv[1:])
