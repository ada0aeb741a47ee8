"""Before any work: can every worker read the inputs and write the output, at the client's paths?

A cluster merge needs its inputs and its output on storage every worker sees at the same path. A worker that
does not (a node without the mount, a different version of the files) would otherwise fail in the middle of a
partition, or worse, write garbage. So the client asks every worker, once, to read each input file's header and
to open the temporary output for writing, and stops with one line naming the first worker and path that fail.
"""
from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any

from ..errors import CheckpointError, LazyMergeError, OutputError


def probe(inputs: list[str], tmp_dir: str | None, shard_files: list[str]) -> dict[str, Any]:
    """Runs on a worker: read every input's header, create and delete a file in the temporary output directory,
    open one of its shard files for writing (no output check when `tmp_dir` is None: a search writes nothing on
    the workers). Returns sizes and versions for the client to compare, or the first problem as
    {"error": message, "kind": "input"|"output"}."""
    from .._version import __version__
    from ..io.shards import read_header

    sizes = {}
    for f in inputs:
        path = Path(f)
        try:
            if path.suffix == ".safetensors":
                read_header(path)
            else:
                with open(path, "rb") as fh:
                    fh.read(8)
            sizes[f] = path.stat().st_size
        except LazyMergeError as exc:
            return {"kind": "input", "error": str(exc)}
        except OSError as exc:
            return {"kind": "input", "error": f"{path}: cannot read: {exc.strerror or exc}"}
    if tmp_dir is None:
        return {"sizes": sizes, "version": __version__}
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
    return {"sizes": sizes, "version": __version__}


def check_workers(client: Any, inputs: list[Path], tmp_dir: Path | None, shard_files: list[str]) -> list[str]:
    """Run `probe` on every worker; raise a one-line CheckpointError/OutputError naming the first worker that
    cannot see an input or write the output. Returns the workers' addresses."""
    from .._version import __version__

    expected = {str(f): f.stat().st_size for f in inputs}
    try:
        answers = client.run(probe, list(expected), None if tmp_dir is None else str(tmp_dir), shard_files)
    except Exception as exc:             # a worker that cannot even unpickle the probe: no lazymerge there
        first = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise OutputError(f"a worker cannot run lazymerge ({type(exc).__name__}: {first}); install the same "
                          f"lazymerge on every worker") from None
    if not answers:
        raise OutputError("the cluster has no workers")
    for worker, ans in sorted(answers.items()):
        if "error" in ans:
            cls = CheckpointError if ans["kind"] == "input" else OutputError
            hint = ("" if ans["kind"] == "input" else
                    " (the output must be on storage every worker sees at the same path)")
            raise cls(f"worker {worker}: {ans['error']}{hint}")
        if ans["version"] != __version__:
            raise OutputError(f"worker {worker}: runs lazymerge {ans['version']}, the client {__version__}; "
                              f"the output would depend on which worker ran what")
        for f, size in expected.items():
            if ans["sizes"].get(f) != size:
                raise CheckpointError(f"worker {worker}: {f} has {ans['sizes'].get(f)} bytes there, {size} "
                                      f"here: not the same file on every machine")
    return sorted(answers)
