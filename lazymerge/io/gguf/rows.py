"""What llama.cpp's converter does to a tensor's rows, done (writing) and undone (reading), one block at a time.

llama's q and k projections are stored with each head's rows reordered for llama.cpp's rotary layout
(`LlamaModel.permute`: a head's two halves interleaved), and Gemma's norm weights are stored plus one. Both are
row-local: a block of whole heads is permuted in place, an offset is added element-wise. Pure tensor code, shared
by the GGUF reader (io.gguf.read) and the engine's write op.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class RowTransform:
    """`permute`: the number of heads whose rows llama.cpp interleaves (0: none); `offset`: the value it adds."""

    permute: int = 0
    offset: float = 0.0

    def head_rows(self, rows: int) -> int:
        """Rows of one head of a tensor of `rows` rows (a 1-d tensor: its values); 0 when not permuted."""
        return rows // self.permute if self.permute else 0


def _heads(flat: torch.Tensor, head: int) -> torch.Tensor:
    return flat.view(flat.shape[0] // head, head, -1)


def permute_heads(flat: torch.Tensor, head: int) -> None:
    """llama.cpp's `permute`, in place on rows that are whole heads of `head` rows: each head's halves (2, dim)
    become interleaved pairs (dim, 2). One head at a time: the only temporary is one head."""
    for h in _heads(flat, head):
        tmp = h.clone()
        h.view(head // 2, 2, -1).copy_(tmp.view(2, head // 2, -1).transpose(0, 1))


def unpermute_heads(flat: torch.Tensor, head: int) -> None:
    """The inverse (transformers' `reverse_permute_weights`), in place: interleaved pairs back to halves."""
    for h in _heads(flat, head):
        tmp = h.clone()
        h.view(2, head // 2, -1).copy_(tmp.view(head // 2, 2, -1).transpose(0, 1))


def as_rows(x: torch.Tensor, ndim: int) -> torch.Tensor:
    """A block as [rows, row values] for the permutation: a 1-d tensor's values are its rows."""
    return x.view(-1, 1) if ndim < 2 else x.view(x.shape[0], -1)


@dataclass(frozen=True)
class RowEncoding:
    """How a merged float32 block becomes a GGUF tensor's rows, as llama.cpp's converter makes them from the
    merge's checkpoint: rounded to the checkpoint's dtype `via` (a safetensors code; bfloat16 is then widened to
    float32 and float16 kept, as the converter reads them), transformed (`transform`, on a tensor of `rows` rows
    and `ndim` dimensions), then cast or quantized to the tensor's GGUF type by the write op."""

    via: str
    transform: RowTransform
    rows: int
    ndim: int


def encode(x: torch.Tensor, enc: RowEncoding) -> torch.Tensor:
    """A merged block (float32, whole heads) as the converter would have it before its cast: float32 or float16."""
    if enc.via in ("BF16", "F16"):
        x = x.to(torch.bfloat16 if enc.via == "BF16" else torch.float16)
        x = x.float() if enc.via == "BF16" else x
    elif enc.transform.permute or enc.transform.offset:
        x = x.clone()
    if enc.transform.offset:
        x.add_(enc.transform.offset)
    if enc.transform.permute:
        permute_heads(as_rows(x, enc.ndim), enc.transform.head_rows(enc.rows))
    return x
