#!/usr/bin/env python
"""The I/O floor: the least any merge of these inputs can do.

    python benches/io_floor.py --out FILE --write-bytes N INPUT [INPUT ...]

Reads every input file once, sequentially, in 16 MiB buffers (like `cat FILE > /dev/null`; an INPUT directory means
its *.safetensors files), then writes N bytes (the output checkpoint's size) to FILE in 16 MiB buffers, fsyncs it
and removes it. Run it on a cold page cache (benches/run.py drops caches first). Prints one JSON line:
{"read_bytes", "read_s", "write_bytes", "write_s", "total_s"}; write_s includes the fsync.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

BUF = 16 << 20


def input_files(items: list[Path]) -> list[Path]:
    files: list[Path] = []
    for p in items:
        files.extend(sorted(p.glob("*.safetensors")) if p.is_dir() else [p])
    return files


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("inputs", nargs="+", type=Path)
    ap.add_argument("--out", type=Path, required=True, help="scratch file to write (removed afterwards)")
    ap.add_argument("--write-bytes", type=int, required=True)
    ap.add_argument("--keep", action="store_true", help="keep the written file")
    args = ap.parse_args(argv)

    buf = bytearray(BUF)
    view = memoryview(buf)
    t0 = time.perf_counter()
    nread = 0
    for f in input_files(args.inputs):
        with open(f, "rb", buffering=0) as fh:
            while True:
                n = fh.readinto(view)
                if not n:
                    break
                nread += n
    t1 = time.perf_counter()

    block = os.urandom(BUF)          # incompressible, in case the file system compresses
    left = args.write_bytes
    fd = os.open(args.out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        while left > 0:
            n = os.write(fd, block[: min(left, BUF)])
            left -= n
        os.fsync(fd)
    finally:
        os.close(fd)
    t2 = time.perf_counter()
    if not args.keep:
        args.out.unlink()
    print(json.dumps({"read_bytes": nread, "read_s": t1 - t0, "write_bytes": args.write_bytes,
                      "write_s": t2 - t1, "total_s": t2 - t0}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
