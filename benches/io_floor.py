#!/usr/bin/env python
"""The I/O floor: the least any merge of these inputs can do.

    python benches/io_floor.py --out FILE --write-bytes N [--mode direct|cached] INPUT [INPUT ...]

Reads every input file once, sequentially, in 16 MiB requests (an INPUT directory means its *.safetensors files),
then writes N bytes (the output checkpoint's size) to FILE in 16 MiB requests, fsyncs it and removes it. Run it on
a cold page cache (benches/run.py drops caches first). Prints one JSON line:
{"mode", "read_bytes", "read_s", "write_bytes", "write_s", "total_s"}; write_s includes the fsync.

Modes (the floor should be the fastest way this machine has to move the bytes, so that "x floor" is not flattered
by a slow reference):

* ``direct`` (default): reads with O_DIRECT into one aligned buffer (no page cache: what lazymerge does for
  inputs that are not cached), writes through the cache with each 16 MiB handed to writeback at once and dropped
  once on disk (lazymerge's writer). Falls back to ``cached`` reads where the file system refuses O_DIRECT.
* ``cached``: plain buffered reads and writes (``cat FILE > /dev/null``; the floor of the first sessions). On a VM
  whose page cache grows into fresh guest memory this costs several times the kernel time of ``direct``.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import mmap
import os
import sys
import time
from pathlib import Path

BUF = 16 << 20
ALIGN = 4096


def input_files(items: list[Path]) -> list[Path]:
    files: list[Path] = []
    for p in items:
        files.extend(sorted(p.glob("*.safetensors")) if p.is_dir() else [p])
    return files


def read_all(files: list[Path], direct: bool) -> int:
    buf = mmap.mmap(-1, BUF)                     # page-aligned, as O_DIRECT needs
    view = memoryview(buf)
    nread = 0
    for f in files:
        fd = -1
        if direct:
            try:
                fd = os.open(f, os.O_RDONLY | os.O_DIRECT)
            except OSError:
                fd = -1
        if fd < 0:
            fd = os.open(f, os.O_RDONLY)
        try:
            off = 0
            while True:
                n = os.preadv(fd, [view], off)
                if not n:
                    break
                nread += n
                off += n
                if n % ALIGN:
                    break
        finally:
            os.close(fd)
    view.release()
    buf.close()
    return nread


def write_all(path: Path, nbytes: int, behind: bool) -> None:
    block = os.urandom(BUF)          # incompressible, in case the file system compresses
    libc = ctypes.CDLL(None, use_errno=True)
    sfr = getattr(libc, "sync_file_range", None) if behind else None
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        off, pending = 0, []
        while off < nbytes:
            n = os.pwrite(fd, block[: min(nbytes - off, BUF)], off)
            if sfr is not None:
                sfr(fd, ctypes.c_longlong(off), ctypes.c_longlong(n), 2)          # start writeback
                pending.append((off, n))
                if len(pending) > 4:                                               # 64 MiB in flight
                    o, m = pending.pop(0)
                    sfr(fd, ctypes.c_longlong(o), ctypes.c_longlong(m), 1 | 2 | 4)
                    os.posix_fadvise(fd, o, m, os.POSIX_FADV_DONTNEED)
            off += n
        os.fsync(fd)
    finally:
        os.close(fd)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("inputs", nargs="+", type=Path)
    ap.add_argument("--out", type=Path, required=True, help="scratch file to write (removed afterwards)")
    ap.add_argument("--write-bytes", type=int, required=True)
    ap.add_argument("--mode", choices=("direct", "cached"), default="direct")
    ap.add_argument("--keep", action="store_true", help="keep the written file")
    args = ap.parse_args(argv)

    t0 = time.perf_counter()
    nread = read_all(input_files(args.inputs), args.mode == "direct")
    t1 = time.perf_counter()
    write_all(args.out, args.write_bytes, args.mode == "direct")
    t2 = time.perf_counter()
    if not args.keep:
        args.out.unlink()
    print(json.dumps({"mode": args.mode, "read_bytes": nread, "read_s": t1 - t0, "write_bytes": args.write_bytes,
                      "write_s": t2 - t1, "total_s": t2 - t0}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
