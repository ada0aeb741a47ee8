"""Before any work: can every worker read the inputs and write the output, at the client's paths?

A cluster merge needs its inputs and its output on storage every worker sees at the same path. A worker that
does not (a node without the mount, a different version of the files) would otherwise fail in the middle of a
partition, or worse, write garbage. So the client asks every worker, once, to read each input file's header and
to open the temporary output for writing, and stops with one line naming the first worker and path that fail.
A worker that joins after this check is checked by its first task instead (`check_inputs`, which every
partition and trial runs before it computes), so no worker computes unchecked.
"""
from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any

from .._version import __version__
from ..errors import CheckpointError, LazyMergeError, OutputError
from ..io.shards import read_header


def expected_files(files: list[Path]) -> tuple[tuple[str, int], ...]:
    """(absolute path, size) of each file as the client sees it, in the order given (tensor data first, so that
    a worker missing a model is told about its weights): what every worker must see too."""
    out: dict[str, int] = {}
    for f in files:
        path = os.path.abspath(f)
        try:
            out[path] = os.stat(path).st_size
        except OSError as exc:
            raise CheckpointError(f"{path}: cannot read: {exc.strerror or exc}") from None
    return tuple(out.items())


def check_inputs(files: "tuple[tuple[str, int], ...]", version: str) -> None:
    """This machine runs the client's lazymerge and sees every input at the client's path with the client's
    size; else a one-line OutputError / CheckpointError. Cheap: one stat per file."""
    if version != __version__:
        raise OutputError(f"runs lazymerge {__version__}, the client {version}; the output would depend on which "
                          "worker ran what")
    for f, size in files:
        try:
            here = os.stat(f).st_size
        except OSError as exc:
            raise CheckpointError(f"{f}: cannot read: {exc.strerror or exc}") from None
        if here != size:
            raise CheckpointError(f"{f} has {here} bytes there, {size} here: not the same file on every machine")


def probe(files: "tuple[tuple[str, int], ...]", version: str, tmp_dir: str | None,
          shard_files: list[str]) -> dict[str, Any]:
    """Runs on a worker: `check_inputs`, read every safetensors input's header (the first bytes of the other
    files), create and delete a file in the temporary output directory, open one of its shard files for writing
    (no output check when `tmp_dir` is None: a search writes nothing on the workers). Returns {} or the first
    problem as {"error": message, "kind": "input"|"version"|"output"}."""
    try:
        check_inputs(files, version)
        for f, _ in files:
            if f.endswith(".safetensors"):
                read_header(Path(f))
            else:
                with open(f, "rb") as fh:
                    fh.read(8)
    except OutputError as exc:
        return {"kind": "version", "error": str(exc)}
    except LazyMergeError as exc:
        return {"kind": "input", "error": str(exc)}
    except OSError as exc:
        return {"kind": "input", "error": f"{exc.filename}: cannot read: {exc.strerror or exc}"}
    if tmp_dir is None:
        return {}
    probe_file = Path(tmp_dir) / f".probe-{socket.gethostname()}-{os.getpid()}"
    try:
        fd = os.open(probe_file, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        os.close(fd)
        os.unlink(probe_file)
        for name in shard_files[:1]:
            os.close(os.open(Path(tmp_dir) / name, os.O_WRONLY))
    except OSError as exc:
        where = exc.filename or tmp_dir
        return {"kind": "output", "error": f"{where}: cannot write the temporary output: {exc.strerror or exc}"}
    return {}


def check_workers(client: Any, files: "tuple[tuple[str, int], ...]", tmp_dir: Path | None,
                  shard_files: list[str]) -> list[str]:
    """Run `probe` on every worker; raise a one-line CheckpointError/OutputError naming the first worker that
    cannot see an input or write the output. Returns the workers' addresses."""
    try:
        answers = client.run(probe, files, __version__, None if tmp_dir is None else str(tmp_dir), shard_files)
    except Exception as exc:             # a worker that cannot even unpickle the probe: no lazymerge there
        first = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise OutputError(f"a worker cannot run lazymerge ({type(exc).__name__}: {first}); install the same "
                          f"lazymerge on every worker") from None
    if not answers:
        raise OutputError("the cluster has no workers")
    for worker, ans in sorted(answers.items()):
        if "error" in ans:
            cls = CheckpointError if ans["kind"] == "input" else OutputError
            hint = (" (the output must be on storage every worker sees at the same path)"
                    if ans["kind"] == "output" else "")
            raise cls(f"worker {worker}: {ans['error']}{hint}")
    return sorted(answers)
