"""What a path the user wrote means, and what identifies the files a merge reads.

A relative path in a recipe is relative to the directory the user's command ran in. On one machine that is the
process's working directory. A cluster worker compiles the client's recipe in a process whose working directory
is its own, and runs several partitions (or trials) at once in threads: it binds the client's directory with
`relative_to(cwd)` for the thread that compiles, never `os.chdir`, which is per process and would move every
other thread of the worker too. Inside `relative_to`, `user_path` returns absolute paths, so that what a plan
opens later (shards are opened on first read) does not depend on any working directory.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
from contextvars import ContextVar
from pathlib import Path
from typing import Iterable, Iterator

_BASE: ContextVar[str | None] = ContextVar("lazymerge_base_dir", default=None)


def user_path(path: "str | Path") -> Path:
    """`path` as the user meant it: `~` expanded; relative to the directory bound by `relative_to` (made
    absolute), else left relative to this process's working directory as written."""
    p = Path(path).expanduser()
    base = _BASE.get()
    if base is None or p.is_absolute():
        return p
    return Path(os.path.abspath(os.path.join(base, p)))


@contextlib.contextmanager
def relative_to(base: "str | Path") -> Iterator[None]:
    """Within the block, in this thread (and tasks it awaits) only, relative user paths are relative to `base`."""
    token = _BASE.set(os.path.abspath(base))
    try:
        yield
    finally:
        _BASE.reset(token)


def files_identity(files: Iterable["str | Path"], dirs: Iterable["str | Path"] = ()) -> str:
    """A digest of what identifies the contents of `files` and of every regular file directly inside `dirs`:
    path, size, modification and change times (nanoseconds) and inode, or 'missing'. Equal digests mean the
    files were not replaced or written since (a writer that keeps the size within one timestamp tick is not
    seen; reading every byte to be sure would cost what the merge costs). Cheap: one stat per file."""
    names = {os.path.abspath(f) for f in files}
    for d in dirs:
        try:
            with os.scandir(d) as it:
                names |= {os.path.abspath(e.path) for e in it if e.is_file()}
        except OSError:
            names.add(os.path.abspath(d))
    h = hashlib.sha256()
    for name in sorted(names):
        try:
            st = os.stat(name)
            h.update(f"{name}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ctime_ns}\0{st.st_ino}\0".encode())
        except OSError:
            h.update(f"{name}\0missing\0".encode())
    return h.hexdigest()
