#!/usr/bin/env python
"""Rewrite a checkpoint in the layout Hugging Face's `save_pretrained` gives it: N shards (default 2) cut in the
model's tensor order by bytes, each written by safetensors' own `save_file` (which sorts a shard's tensors by
dtype and name: `lm_head.weight` first, layers as 0, 1, 10, 11, ...), an index, the other files copied.

    python benches/relayout.py SRC DST [--shards 2]

Why: lazymerge.synth writes shards in the model's order with its own writer; real checkpoints (and the second 1b
set of issue 22, which read 1.08-1.11x its inputs) come from save_pretrained. benches/run.py --layout hf uses this
to merge the same tensors laid out the other way, so both layouts are measured side by side.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path


def relayout(src: Path, dst: Path, shards: int = 2) -> Path:
    from safetensors import safe_open
    from safetensors.torch import save_file

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from lazymerge.io.checkpoint import Checkpoint

    ckpt = Checkpoint.open(src)
    try:
        names = list(ckpt.tensors)                     # the checkpoint's own (model) order
        sizes = {n: ckpt.tensors[n].nbytes for n in names}
        total = sum(sizes.values())
        per = -(-total // shards)
        groups: list[list[str]] = [[]]
        acc = 0
        for n in names:                                # save_pretrained: a new shard once the next tensor would
            if groups[-1] and acc + sizes[n] > per and len(groups) < shards:   # not fit the shard size
                groups.append([])
                acc = 0
            groups[-1].append(n)
            acc += sizes[n]
        files = {n: ckpt.tensors[n].file for n in names}
    finally:
        ckpt.close()
    if dst.exists():
        shutil.rmtree(dst)
    dst.mkdir(parents=True)
    weight_map = {}
    for i, group in enumerate(groups, 1):
        fname = f"model-{i:05d}-of-{len(groups):05d}.safetensors"
        tensors = {}
        for n in group:
            with safe_open(str(files[n]), "pt") as f:
                tensors[n] = f.get_tensor(n)
        save_file(tensors, str(dst / fname), metadata={"format": "pt"})
        del tensors
        weight_map.update({n: fname for n in group})
    (dst / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
    for f in src.iterdir():
        if f.is_file() and not f.name.endswith(".safetensors") and f.name != "model.safetensors.index.json":
            shutil.copy2(f, dst / f.name)
    return dst


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("src", type=Path)
    ap.add_argument("dst", type=Path)
    ap.add_argument("--shards", type=int, default=2)
    a = ap.parse_args(argv)
    relayout(a.src, a.dst, a.shards)
    return 0


if __name__ == "__main__":
    sys.exit(main())
