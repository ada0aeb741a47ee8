"""The layout of a GGUF output, planned before any tensor exists, like the safetensors one (io/writer.py): each
file's header (magic, version, metadata, tensor table, padding to the alignment) as bytes, each output tensor's
offset in its file's data section, and the few tensors llama.cpp computes from the config (`fixed` bytes).
The writer then preallocates the files, writes the headers, and row blocks land at their offsets in any order.

The header is serialized by gguf's own `GGUFWriter` (the converter's writer: same key order, value types,
tensor table, offsets, padding, split files and split keys), pointed at memory instead of files.
"""
from __future__ import annotations

import io
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from lazymerge.errors import OutputError
from lazymerge.io.gguf.metadata import add_metadata, phi3_rope_factors
from lazymerge.io.gguf.names import (GGUF_TYPES, GGUFArch, GGUFPiece, converter_order, ggml_type, rope_freqs,
                                     weight_type)
from lazymerge.io.writer import OutTensor, ShardLayout
from lazymerge.units import parse_size


@dataclass(frozen=True)
class GGUFOptions:
    """GGUF output: the tensor type (`--gguf-type`), the file name stem (general.name defaults to it), the most
    tensor bytes in one file (llama.cpp's split files; None: one file), and whether OUT is the file itself (else
    a directory holding it, with the report)."""

    type: str = "auto"
    name: str = "model"
    split_bytes: int | None = None
    file: bool = True


def gguf_options(out: Path, gguf_type: str | None, fmt: str | None, shard_size: "int | str | None"
                 ) -> GGUFOptions | None:
    """The GGUF output asked for, or None for safetensors: OUT ending in .gguf is a GGUF file; --gguf-type or
    --format gguf with another OUT, a directory holding `<OUT name>.gguf`. A shard size splits a GGUF only when
    given (llama.cpp's split files); a safetensors merge defaults to 5GB shards."""
    is_file = out.suffix.lower() == ".gguf"
    if fmt not in (None, "gguf", "safetensors"):
        raise OutputError(f"format: {fmt!r} is not safetensors or gguf")
    if fmt == "safetensors" and (is_file or gguf_type is not None):
        raise OutputError(f"{out}: --format safetensors contradicts " + ("--gguf-type" if gguf_type else
                                                                          "an OUT ending in .gguf"))
    if not (is_file or gguf_type is not None or fmt == "gguf"):
        return None
    gguf_type = (gguf_type or "auto").lower()
    if gguf_type not in GGUF_TYPES:
        raise OutputError(f"gguf-type: {gguf_type!r} is not one of {', '.join(GGUF_TYPES)}")
    try:
        split = parse_size(shard_size) if shard_size is not None else None
    except ValueError as exc:
        raise OutputError(f"shard_size: {exc}") from None
    name = out.stem if is_file else out.name
    return GGUFOptions(gguf_type, name or "model", split, is_file)


def plan_gguf_layout(arch: GGUFArch, pieces: Sequence[GGUFPiece], config: dict, files: dict[str, bytes],
                     opts: GGUFOptions, out_codes: set[str], warnings: list[str]) -> list[ShardLayout]:
    """The output files, `opts.name`.gguf or its split files, for `pieces` (in output order), with metadata
    from the output's `config` and its tokenizer `files` (name -> bytes)."""
    import gguf

    _, file_type = weight_type(opts.type, out_codes)
    w = gguf.GGUFWriter(None, arch.gguf, split_max_size=opts.split_bytes or 0)
    fixed = _fixed_tensors(arch, config)
    by_gguf: dict[str, list[GGUFPiece]] = {}
    for p in pieces:
        by_gguf.setdefault(p.gguf, []).append(p)
    for gname, data in fixed.items():             # the converter's generate_extra_tensors come first
        w.add_tensor_info(gname, data.shape, np.dtype(np.float32), data.nbytes,
                          raw_dtype=gguf.GGMLQuantizationType.F32)
    for gname in converter_order(arch, pieces):
        p = by_gguf[gname][0]
        out = OutTensor(p.name, p.shape, p.code)
        w.add_tensor_info(gname, p.gguf_shape, np.dtype(np.float32), out.nbytes * p.experts,
                          raw_dtype=gguf.GGMLQuantizationType(ggml_type(p.code)))
    with tempfile.TemporaryDirectory(prefix="lazymerge-gguf-") as tmp:
        model_dir = Path(tmp) / opts.name      # the converter names a model after its directory
        model_dir.mkdir()
        for fname, data in files.items():
            (model_dir / fname).write_bytes(data)
        (model_dir / "config.json").write_text(json.dumps(config))
        add_metadata(w, arch.gguf, config, model_dir, opts.name, file_type, warnings)
    headers = _serialize(w)
    names = [f"{opts.name}.gguf"] if len(headers) == 1 else \
        [f"{opts.name}-{i + 1:05d}-of-{len(headers):05d}.gguf" for i in range(len(headers))]
    return [_shard(name, header, split, by_gguf, fixed, w.data_alignment)
            for name, header, split in zip(names, headers, w.tensors)]


def _fixed_tensors(arch: GGUFArch, config: dict) -> dict[str, np.ndarray]:
    """Tensors llama.cpp's converter computes from the config: llama 3's rope_freqs, Phi-3's rope factors."""
    out: dict[str, np.ndarray] = {}
    if arch.gguf == "llama" and (freqs := rope_freqs(config)) is not None:
        out["rope_freqs.weight"] = np.array(freqs, dtype=np.float32)
    if arch.gguf == "phi3" and (factors := phi3_rope_factors(config)) is not None:
        out["rope_factors_long.weight"] = np.array(factors[0], dtype=np.float32)
        out["rope_factors_short.weight"] = np.array(factors[1], dtype=np.float32)
    return out


def _serialize(w: Any) -> list[bytes]:
    """Each file's header bytes, padded to the data alignment, from gguf's writer aimed at memory."""
    from gguf.gguf_writer import WriterState

    w.fout = [io.BytesIO() for _ in w.tensors]
    w.state = WriterState.EMPTY
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    headers = []
    for f in w.fout:
        data = f.getvalue()
        headers.append(data + bytes(-len(data) % w.data_alignment))
    w.fout = None
    return headers


def _shard(filename: str, header: bytes, split: dict, by_gguf: dict[str, list[GGUFPiece]],
           fixed: dict[str, np.ndarray], alignment: int) -> ShardLayout:
    """One file: its tensors' places, as gguf's writer lays out its tensor table (each padded to the alignment)."""
    placed: list[tuple[OutTensor, int]] = []
    static: list[tuple[int, bytes]] = []
    offset = 0
    for gname, info in split.items():
        if gname in fixed:
            static.append((len(header) + offset, fixed[gname].tobytes()))
        else:
            for p in by_gguf[gname]:
                out = OutTensor(p.name, p.shape, p.code)
                placed.append((out, offset + p.expert * out.nbytes))
        offset += -(-info.nbytes // alignment) * alignment
    return ShardLayout(filename, tuple(placed), header, len(header) + offset, tuple(static))
