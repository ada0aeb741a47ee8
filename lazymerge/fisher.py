"""Diagonal (empirical) Fisher information of a causal LM on a text file, saved as a checkpoint of its own.

Fisher merging weighs each model's parameters by how much the loss depends on them. The estimate here is the
empirical Fisher: the mean over sequences of the squared gradient of that sequence's mean token NLL, with one
sequence per backward pass (squaring a batch's summed gradient would estimate something else). The result has the
model's own tensor names, so a recipe can point at it like at any checkpoint. transformers is an optional extra:
only this module needs it, and only when called.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from lazymerge.errors import CheckpointError, LazyMergeError
from lazymerge.io.models import model_directory
from lazymerge.io.writer import CheckpointWriter, OutTensor, plan_layout

CHUNK_CHARS = 1 << 20          # text tokenized per call: bounded memory for any file size
DEFAULT_SHARD_SIZE = 5 * 10**9
INFO_FILE = "fisher.json"


@dataclass
class FisherReport:
    out: Path
    samples: int
    tokens: int
    wall_s: float


def _transformers():
    try:
        import transformers
    except ImportError:
        raise LazyMergeError("computing a Fisher matrix needs transformers: pip install lazymerge[fisher]") from None
    return transformers


def _samples(tokenizer, text_file: Path, seq_len: int, max_samples: int) -> Iterator[list[int]]:
    """Consecutive `seq_len`-token windows of the file (the tail as a shorter last one), tokenized a chunk of
    whole lines at a time so that words are never cut at a chunk boundary."""
    buffer: list[int] = []
    produced = 0

    def tokenize(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    try:
        with open(text_file, encoding="utf-8") as f:
            chunk: list[str] = []
            size = 0
            for line in f:
                chunk.append(line)
                size += len(line)
                if size < CHUNK_CHARS:
                    continue
                buffer.extend(tokenize("".join(chunk)))
                chunk, size = [], 0
                while len(buffer) >= seq_len and produced < max_samples:
                    yield buffer[:seq_len]
                    del buffer[:seq_len]
                    produced += 1
                if produced >= max_samples:
                    return
            buffer.extend(tokenize("".join(chunk)))
    except (OSError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{text_file}: cannot read as UTF-8 text ({exc})") from None
    while len(buffer) >= 2 and produced < max_samples:  # a 1-token window has nothing to predict
        yield buffer[:seq_len]
        del buffer[:seq_len]
        produced += 1


def _load(model_dir: Path, device: str):
    transformers = _transformers()
    if not (model_dir / "config.json").is_file():
        raise CheckpointError(f"{model_dir}: no config.json; a Fisher matrix needs a transformers model directory")
    dtype_kw = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
        model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, **{dtype_kw: torch.float32})
    except (OSError, ValueError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{model_dir}: cannot load model and tokenizer with transformers: {first}") from None
    return tokenizer, model.to(device)


def compute_fisher(model_dir: Path | str, text_file: Path | str, out: Path | str, *, max_samples: int = 256,
                   seq_len: int = 512, device: str = "cpu", overwrite: bool = False) -> FisherReport:
    """Write the diagonal Fisher of `model_dir` on `text_file` to `out` (float32, the model's tensor names)."""
    if max_samples < 1 or seq_len < 2:
        raise ValueError(f"need max_samples >= 1 and seq_len >= 2, got {max_samples} and {seq_len}")
    start = time.monotonic()
    text_file = Path(text_file)
    if not text_file.is_file():
        raise CheckpointError(f"{text_file}: data file does not exist")
    model_dir = model_directory(model_dir)[0]      # a hub id: its snapshot, every weight file downloaded
    tokenizer, model = _load(model_dir, device)
    model.eval()  # no dropout: the Fisher is of the deterministic model being merged
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    fisher = {name: torch.zeros_like(p, dtype=torch.float32) for name, p in params.items()}
    samples = tokens = 0
    for ids in _samples(tokenizer, text_file, seq_len, max_samples):
        model.zero_grad(set_to_none=True)
        x = torch.tensor([ids], device=device)
        model(input_ids=x, labels=x).loss.backward()
        for name, p in params.items():
            if p.grad is not None:
                fisher[name].addcmul_(p.grad, p.grad)
        samples += 1
        tokens += len(ids)
    model.zero_grad(set_to_none=True)
    if samples == 0:
        raise CheckpointError(f"{text_file}: fewer than 2 tokens of text; nothing to compute a Fisher from")

    # Tied parameters appear once in named_parameters but under every name in the state dict (and checkpoint).
    names = {id(p): name for name, p in params.items()}
    state = model.state_dict(keep_vars=True)
    entries = [(key, names[id(v)]) for key, v in state.items() if id(v) in names]
    layout = plan_layout([OutTensor(key, tuple(fisher[src].shape), "F32") for key, src in entries],
                         DEFAULT_SHARD_SIZE)
    info = {"samples": samples, "tokens": tokens, "seq_len": seq_len, "model": str(model_dir.resolve()),
            "data": str(text_file.resolve()), "estimator": "mean over sequences of squared gradient of mean NLL"}
    remaining = {src: sum(1 for _, s in entries if s == src) for _, src in entries}
    with CheckpointWriter(out, layout, overwrite=overwrite) as writer:
        for key, src in entries:
            writer.write_rows(key, 0, (fisher[src] / samples).cpu())
            remaining[src] -= 1
            if remaining[src] == 0:
                del fisher[src]  # written under all its names: free it before the next one
        writer.finalize(config=json.loads((model_dir / "config.json").read_text(encoding="utf-8")), aux_files=[],
                        extra_files={INFO_FILE: (json.dumps(info, indent=2) + "\n").encode()})
    return FisherReport(out=Path(out), samples=samples, tokens=tokens, wall_s=time.monotonic() - start)
