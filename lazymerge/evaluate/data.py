"""Evaluation data: documents from a file, tokens, and the windows perplexity is computed over.

The windowing rule is fixed (so that numbers compare across tools and runs): each document tokenized with the
tokenizer's defaults (a BOS per document where the tokenizer adds one), documents joined with the EOS token,
the stream cut to its first `max_tokens` tokens, then cut into non-overlapping windows of `seq_len` tokens, a
shorter last window dropped. Each window predicts its `seq_len - 1` last tokens.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

import torch

from ..errors import CheckpointError, LazyMergeError
from .skeleton import require_transformers
from .weights import has_tokenizer


class DataError(LazyMergeError):
    """The evaluation data cannot be read, or holds too few tokens."""


def iter_documents(path: "str | Path") -> Iterator[str]:
    """Documents of a data file: a text file is one document; a `.jsonl` file has one per line (its `text`
    field); a directory is a `datasets` dataset saved with `save_to_disk` (its `text` column)."""
    p = Path(path)
    if not p.exists():
        raise DataError(f"{p}: data file does not exist")
    if p.is_dir():
        yield from _dataset_documents(p)
        return
    try:
        if p.suffix.lower() == ".jsonl":
            with open(p, encoding="utf-8") as f:
                for n, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError as exc:
                        raise DataError(f"{p}:{n}: not JSON ({exc.msg})") from None
                    if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                        raise DataError(f"{p}:{n}: expected an object with a string 'text' field")
                    yield row["text"]
        else:
            yield p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise DataError(f"{p}: not UTF-8 text") from None


def _dataset_documents(p: Path) -> Iterator[str]:
    try:
        import datasets
    except ImportError:
        raise DataError(f"{p}: a directory is read as a saved `datasets` dataset; pip install datasets") from None
    try:
        ds = datasets.load_from_disk(str(p))
    except (FileNotFoundError, ValueError) as exc:
        raise DataError(f"{p}: not a dataset saved with save_to_disk ({str(exc).splitlines()[0]})") from None
    if isinstance(ds, datasets.DatasetDict):
        split = next((s for s in ("test", "validation", "train") if s in ds), next(iter(ds)))
        ds = ds[split]
    if "text" not in ds.column_names:
        raise DataError(f"{p}: the dataset has no 'text' column (columns: {', '.join(ds.column_names)})")
    for text in ds["text"]:
        yield text


def load_tokenizer(directory: Path, label: str) -> Any:
    transformers = require_transformers()
    if not has_tokenizer(directory):
        raise CheckpointError(f"{label}: no tokenizer (tokenizer.json, tokenizer.model, vocab.json); "
                              "evaluation tokenizes the data with the target's own tokenizer")
    try:
        return transformers.AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{label}: cannot load its tokenizer: "
                              f"{str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__}"
                              ) from None


def token_stream(tokenizer: Any, documents: "Iterator[str] | list[str]", max_tokens: int) -> list[int]:
    """The documents' tokens joined with EOS, cut to `max_tokens` (documents past the cut are not tokenized)."""
    eos = tokenizer.eos_token_id
    stream: list[int] = []
    for i, doc in enumerate(documents):
        if len(stream) >= max_tokens:
            break
        if i and eos is not None:
            stream.append(eos)
        stream += tokenizer(doc)["input_ids"]
    return stream[:max_tokens]


def windows(stream: list[int], seq_len: int, where: str) -> torch.Tensor:
    """Non-overlapping full windows, [W, seq_len]; too few tokens for one window is an error."""
    if seq_len < 2:
        raise DataError(f"seq-len: must be at least 2, got {seq_len}")
    n = len(stream) // seq_len
    if n == 0:
        raise DataError(f"{where}: {len(stream)} tokens, fewer than one window of --seq-len {seq_len}")
    return torch.tensor(stream[:n * seq_len], dtype=torch.long).reshape(n, seq_len)


def load_windows(data: "str | Path", tokenizer: Any, *, seq_len: int, max_tokens: int) -> torch.Tensor:
    return windows(token_stream(tokenizer, iter_documents(data), max_tokens), seq_len, str(data))
