"""A GGUF model read like a Hugging Face checkpoint, one row block at a time.

`GGUFCheckpoint` has `io.checkpoint.Checkpoint`'s interface (tensors by Hugging Face name, config, read,
read_stored, aux_files, data_files, close), so a `.gguf` is a model wherever one is named. A quantized row is a
whole number of GGML blocks, so rows [a, b) of a tensor are one byte range: it is read with the shards' page-cache
policy and dequantized with the `gguf` package (`gguf.quants.dequantize`), inside the block's memory.

What a tensor "is stored as" is what it presents, whatever the budget: F32, F16 and BF16 tensors present their
own dtype; a quantized tensor presents float32, its dequantized values, which is also what a raw ("as stored")
read returns, so a merge reads the same numbers whether or not the planner shares its loads. llama.cpp's converter
reorders llama's q/k rows within each head for its rotary layout and stores Gemma's norm weights plus one; both
are undone here per block (`RowTransform`), exactly as transformers' GGUF loader undoes them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lazymerge import memory, shapes
from lazymerge.dtypes import DTYPES
from lazymerge.errors import CheckpointError
from lazymerge.io.checkpoint import AUX_NAMES
from lazymerge.io.gguf.files import gguf_files
from lazymerge.io.gguf.format import GGUFHeader, StoredTensor, block_of, read_gguf_header, type_name
from lazymerge.io.gguf.hf import HFView, hf_view
from lazymerge.io.gguf.rows import RowTransform, as_rows, unpermute_heads
from lazymerge.io.shards import ALIGNMENT, ReaderPool, TensorInfo

# ggml types stored as plain values: their safetensors code
PLAIN = {0: "F32", 1: "F16", 30: "BF16", 24: "I8", 25: "I16", 26: "I32", 27: "I64", 28: "F64"}
DEQUANT_CHUNK = 4 << 20           # bytes of float32 dequantized per call of gguf's dequantizer


@dataclass(frozen=True)
class GGUFTensorInfo(TensorInfo):
    """A tensor as presented (Hugging Face name, shape and the dtype reads return), and where its bytes lie."""

    stored: StoredTensor
    transform: RowTransform


def _transform(arch: str, gguf_name: str, config: dict) -> RowTransform:
    """transformers' TENSOR_PROCESSORS for the architectures read (modeling_gguf_pytorch_utils)."""
    if arch == "llama" and (".attn_q." in gguf_name or ".attn_k." in gguf_name):
        heads, kv = config.get("num_attention_heads"), config.get("num_key_value_heads")
        if heads is None or kv is None:
            return RowTransform()
        return RowTransform(permute=heads if ".attn_q." in gguf_name else kv)
    if arch in ("gemma2", "gemma3") and "norm.weight" in gguf_name:
        return RowTransform(offset=1.0)
    return RowTransform()


def _check_splits(headers: list[GGUFHeader]) -> None:
    n = len(headers)
    total = 0
    for i, hd in enumerate(headers):
        no, count = hd.metadata.get("split.no"), hd.metadata.get("split.count")
        if n > 1 and (no != i or count != n):
            raise CheckpointError(f"{hd.path}: split metadata says file {no} of {count}, its name says "
                                  f"{i + 1} of {n} (split.no counts from 0)")
        if i > 0 and hd.architecture and hd.architecture != headers[0].architecture:
            raise CheckpointError(f"{hd.path}: architecture {hd.architecture!r}, but {headers[0].path.name} is "
                                  f"{headers[0].architecture!r}")
        total += len(hd.tensors)
    declared = headers[0].metadata.get("split.tensors.count")
    if n > 1 and declared is not None and declared != total:
        raise CheckpointError(f"{headers[0].path}: split.tensors.count is {declared}, the {n} files hold {total}")


class GGUFCheckpoint(ReaderPool):
    """A GGUF model (one file, or llama.cpp's split files) as a lazily readable Hugging Face checkpoint."""

    def __init__(self, path: Path, headers: list[GGUFHeader], view: HFView) -> None:
        self.path = path
        self.headers = headers
        self.config: dict[str, Any] = dict(view.config)
        self.config_dir = view.files_dir
        self.tensors: dict[str, GGUFTensorInfo] = {}
        self.unmapped: list[str] = []        # GGUF tensors transformers does not load either (e.g. rope_freqs)
        self.warnings: tuple[str, ...] = ()
        arch = headers[0].architecture
        for hd in headers:
            for st in hd.tensors.values():
                name = view.names.get(st.name)
                if name is None:
                    self.unmapped.append(st.name)
                    continue
                if name in self.tensors:
                    raise CheckpointError(f"{st.file}: tensors {self.tensors[name].stored.name!r} and {st.name!r} "
                                          f"both map to {name!r}")
                self.tensors[name] = self._info(name, st, _transform(arch, st.name, self.config),
                                                view.shapes.get(name))
        if self.unmapped:
            self.warnings = (f"{path}: GGUF tensor(s) {', '.join(self.unmapped)} have no Hugging Face counterpart "
                             "(transformers does not load them either; llama.cpp computes them from the config)",)
        super().__init__()

    @classmethod
    def open(cls, path: Path | str) -> "GGUFCheckpoint":
        path = Path(path).expanduser()
        files = gguf_files(path)
        if files is None:
            raise CheckpointError(f"{path}: not a GGUF model")
        headers = [read_gguf_header(f) for f in files]
        _check_splits(headers)
        return cls(path, headers, hf_view(headers))

    @staticmethod
    def _info(name: str, st: StoredTensor, tr: RowTransform, want: list[int] | None) -> GGUFTensorInfo:
        shape = st.shape
        if want is not None and tuple(want) != shape:
            raise CheckpointError(f"{st.file}: tensor {st.name!r} ({name}) has shape {list(shape)}, the "
                                  f"architecture's is {list(want)}")
        plain = PLAIN.get(st.ggml_type)
        if plain is None:
            if block_of(st.ggml_type) is None or not _can_dequantize(st.ggml_type):
                raise CheckpointError(f"{st.file}: tensor {st.name!r}: ggml type {type_name(st.ggml_type)} "
                                      "cannot be dequantized")
        code = plain if plain is not None and not tr.offset else "F32"
        if code not in DTYPES:
            raise CheckpointError(f"{st.file}: tensor {st.name!r}: type {code} is not supported by this torch")
        if tr.permute and (len(shape) > 2 or shape[0] % (2 * tr.permute)):
            raise CheckpointError(f"{st.file}: tensor {st.name!r}: shape {list(shape)} cannot be split into "
                                  f"{tr.permute} heads of rotary pairs")
        nbytes = math.prod(shape) * DTYPES[code][1]
        return GGUFTensorInfo(name=name, dtype=code, shape=shape, file=st.file, start=st.start, nbytes=nbytes,
                              stored=st, transform=tr)

    # -- reading -----------------------------------------------------------------------------------------
    def parts(self, name: str,
              rows: tuple[int, int] | None) -> list[tuple["GGUFCheckpoint", str, tuple[int, int] | None]]:
        """The reads that reading these rows makes (io.models.prepare_reads): this local file's, none from the hub."""
        return [(self, name, rows)]


    def read(self, name: str, rows: tuple[int, int] | None = None, dtype: torch.dtype | None = torch.float32,
             device: str | torch.device = "cpu", evict: bool = True) -> torch.Tensor:
        """Rows [a, b) of a tensor as a new tensor in `dtype` (None: its presented dtype)."""
        x = self.read_stored(name, rows, evict)
        if torch.device(device).type != "cpu":
            return x.to(device=device, dtype=dtype or x.dtype)
        if dtype is None or dtype == x.dtype:
            return x
        return memory.empty(tuple(x.shape), dtype).copy_(x)

    def read_stored(self, name: str, rows: tuple[int, int] | None = None, evict: bool = True) -> torch.Tensor:
        """Rows of a tensor in its presented dtype (dequantized float32 for a quantized tensor), 64-byte aligned."""
        info = self.tensors.get(name)
        if info is None:
            raise CheckpointError(f"{self.path}: no tensor named {name!r}")
        a, b = (0, info.rows) if rows is None else rows
        if not 0 <= a <= b <= info.rows:
            raise ValueError(f"{name}: rows {rows} out of range for {info.rows} rows")
        shape = shapes.block_shape(info.shape, a, b)
        if a == b:
            return torch.empty(shape, dtype=info.torch_dtype)
        tr = info.transform
        head = tr.head_rows(info.shape[0])          # rows (a 1-d tensor: values) of one head
        lo, hi = (a - a % head, -(-b // head) * head) if head and len(info.shape) >= 2 else (a, b)
        x = self._rows(info, lo, hi, evict)
        if head:                 # a permuted block holds whole heads
            unpermute_heads(as_rows(x, len(info.shape)), head)
        if tr.offset:
            x.add_(-tr.offset)
        if (lo, hi) != (a, b):
            x = x[a - lo:b - lo]
            if x.data_ptr() % ALIGNMENT:
                x = memory.empty(tuple(x.shape), x.dtype).copy_(x)
        return x.reshape(shape)

    def _rows(self, info: GGUFTensorInfo, a: int, b: int, evict: bool) -> torch.Tensor:
        """Rows [a, b) (Hugging Face rows) in the presented dtype, [b - a, row numel], in aligned memory."""
        st = info.stored
        k = st.rows // info.rows                 # stored rows per Hugging Face row (1 but for 3-d tensors)
        per_row = st.row_nbytes
        raw = self.reader(st.file).read_bytes(st.start + a * k * per_row, (b - a) * k * per_row, evict=evict,
                                               what=f"{st.name} ({info.name})")
        plain = PLAIN.get(st.ggml_type)
        if plain is not None:
            x = raw.view(DTYPES[plain][0]).view(b - a, info.row_numel)
            return memory.empty(tuple(x.shape), torch.float32).copy_(x) if info.dtype != plain else x
        import gguf

        qtype = gguf.GGMLQuantizationType(st.ggml_type)
        blocks = raw.numpy().reshape((b - a) * k, per_row)
        out = memory.empty((b - a, info.row_numel), torch.float32)
        values = out.numpy().reshape((b - a) * k, -1)
        step = max(1, DEQUANT_CHUNK // (4 * st.dims[0]))    # gguf's temporaries stay a chunk, not a block
        for i in range(0, blocks.shape[0], step):
            values[i:i + step] = gguf.quants.dequantize(blocks[i:i + step], qtype)
        return out

    # -- the rest of the checkpoint interface --------------------------------------------------------------

    def aux_files(self) -> list[Path]:
        """The tokenizer files transformers builds from the GGUF metadata (tokenizer.json, tokenizer_config.json,
        chat_template.jinja), from the conversion cache."""
        return [p for p in (self.config_dir / n for n in AUX_NAMES) if p.is_file()]

    def data_files(self) -> set[Path]:
        return {hd.path for hd in self.headers}

    def meta_files(self) -> set[Path]:
        """The rebuilt config and tokenizer files (a resumed run compares their bytes; they follow the headers)."""
        return {self.config_dir / "config.json", *self.aux_files()}

    def has_stored_form(self, name: str) -> bool:
        """Whether its value is the file's bytes as a dtype: F32/F16/BF16 tensors (llama's q/k rows are only
        reordered). A quantized tensor, or a Gemma norm stored plus one, exists as read only: it presents float32,
        which is also what every read returns, so a merge never rounds it to another dtype."""
        info = self.tensors[name]
        return info.stored.ggml_type in PLAIN and not info.transform.offset


_DEQUANTIZABLE: dict[int, bool] = {}


def _can_dequantize(ggml_type: int) -> bool:
    """Whether the installed gguf package dequantizes this type (it knows more types than it implements)."""
    if ggml_type not in _DEQUANTIZABLE:
        import gguf

        qtype = gguf.GGMLQuantizationType(ggml_type)
        size = gguf.GGML_QUANT_SIZES[qtype][1]
        try:
            gguf.quants.dequantize(np.zeros((1, size), dtype=np.uint8), qtype)
            _DEQUANTIZABLE[ggml_type] = True
        except NotImplementedError:
            _DEQUANTIZABLE[ggml_type] = False
    return _DEQUANTIZABLE[ggml_type]
