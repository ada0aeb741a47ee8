"""Extract a PEFT LoRA adapter from the difference between a fine-tuned model and its base.

Memory stays at one weight difference at a time: D = W_ft - W_base is assembled in row blocks (never both whole
weights in float32 at once), factored by truncated SVD, and its two factors are written straight into the
preallocated adapter file, so nothing accumulates across tensors. The factor split is balanced,
B = U_r sqrt(S_r) and A = sqrt(S_r) V_r^T: both factors then have the same spectral norm, which keeps them well
scaled in half precision and gives equal footing to both if the adapter is trained further.
"""
from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from lazymerge.engine.report import Progress
from lazymerge.errors import CheckpointError
from lazymerge.io.adapters import PEFT_PREFIX, WEIGHTS_NAME
from lazymerge.io.checkpoint import Checkpoint
from lazymerge.io.models import open_checkpoint
from lazymerge.io.shards import TensorInfo
from lazymerge.io.writer import CheckpointWriter, OutTensor, plan_layout

FULL_SVD_MAX = 1024            # min(shape) up to which an exact SVD is cheap enough
OVERSAMPLE, POWER_ITERS = 10, 4
BLOCK_BYTES = 64 << 20         # float32 bytes per row block when reading weights and measuring the error
SVD_SEED = 0                   # svd_lowrank draws random probes: a fixed seed makes the adapter reproducible
INPUT_EMBEDDINGS = ("embed_tokens", "wte", "wpe", "word_embeddings", "embed_in", "tok_embeddings")
OUTPUT_EMBEDDINGS = ("lm_head", "embed_out")
CONV1D_MODELS = ("gpt2",)      # store linear weights [in, out]; PEFT needs fan_in_fan_out for them


@dataclass
class ExtractReport:
    """What the adapter captures: per tensor, ||D - B A||_F / ||D||_F (0 where the weights were identical)."""

    out: Path
    rank: int
    errors: dict[str, float] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)

    def summary(self) -> str:
        lines = [f"{name}  relative error {err:.3e}" for name, err in self.errors.items()]
        worst = max(self.errors.values(), default=0.0)
        lines.append(f"extracted     {len(self.errors)} tensors at rank {self.rank} into {self.out} "
                     f"(worst relative error {worst:.3e})")
        if self.skipped:
            lines.append(f"not in adapter {len(self.skipped)} tensors (" + ", ".join(
                f"{n}: {why}" for n, why in list(self.skipped.items())[:5]) + (", ..." if len(self.skipped) > 5
                                                                             else "") + ")")
        return "\n".join(lines)


@dataclass(frozen=True)
class _Target:
    """One weight to factor; `transposed` when PEFT's delta is (B A)^T (embeddings, Conv1D)."""

    name: str
    shape: tuple[int, int]
    embedding: bool
    transposed: bool

    @property
    def module(self) -> str:
        return self.name.removesuffix(".weight")

    @property
    def keys(self) -> tuple[str, str]:
        if self.embedding:
            return (f"{PEFT_PREFIX}{self.module}.lora_embedding_A", f"{PEFT_PREFIX}{self.module}.lora_embedding_B")
        return f"{PEFT_PREFIX}{self.module}.lora_A.weight", f"{PEFT_PREFIX}{self.module}.lora_B.weight"

    def factor_shapes(self, rank: int) -> tuple[tuple[int, int], tuple[int, int]]:
        out_f, in_f = self.shape[::-1] if self.transposed else self.shape
        return (rank, in_f), (out_f, rank)


def _select(ft: Checkpoint, base: Checkpoint, include_embeddings: bool, fan_in_fan_out: bool
            ) -> tuple[list[_Target], dict[str, str]]:
    """Which tensors become LoRA modules, decided from headers alone so the output can be laid out up front."""
    targets: list[_Target] = []
    skipped: dict[str, str] = {}
    for name, info in ft.tensors.items():
        other = base.tensors.get(name)
        leaf = name.removesuffix(".weight").rsplit(".", 1)[-1]
        embedding = leaf in INPUT_EMBEDDINGS
        if other is None:
            skipped[name] = "not in the base model"
        elif other.shape != info.shape:
            skipped[name] = f"shape {list(info.shape)} differs from the base's {list(other.shape)}"
        elif len(info.shape) != 2 or not name.endswith(".weight") or not info.torch_dtype.is_floating_point:
            skipped[name] = "not a 2-D weight (LoRA cannot represent it)"
        elif (embedding or leaf in OUTPUT_EMBEDDINGS) and not include_embeddings:
            skipped[name] = "embedding (pass include_embeddings to extract it)"
        else:
            targets.append(_Target(name, info.shape, embedding, embedding or fan_in_fan_out))
    return targets, skipped


def _row_step(info: TensorInfo) -> int:
    return max(1, BLOCK_BYTES // max(1, info.row_numel * 4))


def _difference(ft: Checkpoint, base: Checkpoint, name: str, device: str) -> torch.Tensor:
    info = ft.tensors[name]
    d = torch.empty(info.shape, dtype=torch.float32, device=device)
    step = _row_step(info)
    for a in range(0, info.rows, step):
        b = min(a + step, info.rows)
        d[a:b] = ft.read(name, (a, b), device=device) - base.read(name, (a, b), device=device)
    return d


def _factor(m: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-`rank` factors of m [out, in] (A [rank, in], B [out, rank]), zero-padded when m has lower rank so
    every module shares the config's r."""
    k = min(rank, *m.shape)
    if min(m.shape) <= FULL_SVD_MAX:
        u, s, vh = torch.linalg.svd(m, full_matrices=False)
        u, s, vh = u[:, :k], s[:k], vh[:k]
    else:
        with torch.random.fork_rng(devices=[m.device] if m.device.type == "cuda" else []):
            torch.manual_seed(SVD_SEED)
            u, s, v = torch.svd_lowrank(m, q=min(rank + OVERSAMPLE, *m.shape), niter=POWER_ITERS)
        u, s, vh = u[:, :k], s[:k], v[:, :k].T
    root = s.sqrt()
    a = torch.zeros(rank, m.shape[1], dtype=torch.float32)
    b = torch.zeros(m.shape[0], rank, dtype=torch.float32)
    a[:k] = (root[:, None] * vh).cpu()
    b[:, :k] = (u * root).cpu()
    return a, b


def _relative_error(d: torch.Tensor, a: torch.Tensor, b: torch.Tensor, transposed: bool) -> float:
    """||D - B A||_F / ||D||_F, formed a row block at a time so no second full-size tensor is needed."""
    a, b = a.to(d.device), b.to(d.device)
    step = max(1, BLOCK_BYTES // max(1, d.shape[1] * 4))
    resid = total = 0.0
    for r0 in range(0, d.shape[0], step):
        rows = (r0, min(r0 + step, d.shape[0]))
        block = d[rows[0]:rows[1]]
        approx = (b @ a[:, rows[0]:rows[1]]).T if transposed else b[rows[0]:rows[1]] @ a
        resid += float((block - approx).double().square().sum())
        total += float(block.double().square().sum())
    return math.sqrt(resid / total) if total > 0 else 0.0


def _config(targets: list[_Target], rank: int, base: Path, fan_in_fan_out: bool) -> dict:
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": str(base),
        "r": rank, "lora_alpha": rank, "use_rslora": False, "lora_dropout": 0.0, "bias": "none",
        "fan_in_fan_out": fan_in_fan_out, "target_modules": [t.module for t in targets],
        "modules_to_save": None, "rank_pattern": {}, "alpha_pattern": {}, "init_lora_weights": True,
        "inference_mode": True,
    }


def extract_lora(finetuned: Path | str, base: Path | str, out: Path | str, rank: int, *,
                 include_embeddings: bool = False, device: str = "cpu",
                 progress: Callable[[Progress], None] | None = None, overwrite: bool = False,
                 allow_pickle: bool = False) -> ExtractReport:
    """Write a PEFT LoRA adapter (scale 1: lora_alpha = r) approximating `finetuned - base` at `rank`."""
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank must be a positive integer, got {rank!r}")
    start = time.monotonic()
    with open_checkpoint(finetuned, allow_pickle=allow_pickle) as ft, \
            open_checkpoint(base, allow_pickle=allow_pickle) as bs:
        fan_in_fan_out = (bs.config or {}).get("model_type") in CONV1D_MODELS
        targets, skipped = _select(ft, bs, include_embeddings, fan_in_fan_out)
        if not targets:
            raise CheckpointError(f"{finetuned}: no 2-D weight shared with {base} to extract a LoRA from")
        outs = [OutTensor(key, shape, "F32") for t in targets
                for key, shape in zip(t.keys, t.factor_shapes(rank))]
        layout = [dataclasses.replace(plan_layout(outs, sum(o.nbytes for o in outs) + 1)[0], filename=WEIGHTS_NAME)]
        report = ExtractReport(out=Path(out), rank=rank, skipped=skipped)
        total_bytes = sum(ft.tensors[t.name].nbytes for t in targets)
        done_bytes = 0
        with CheckpointWriter(out, layout, overwrite=overwrite) as writer:
            for i, t in enumerate(targets):
                d = _difference(ft, bs, t.name, device)
                a, b = _factor(d.T if t.transposed else d, rank)
                report.errors[t.name] = _relative_error(d, a, b, t.transposed)
                del d
                for key, tensor in zip(t.keys, (a, b)):
                    writer.write_rows(key, 0, tensor)
                done_bytes += ft.tensors[t.name].nbytes
                if progress is not None:
                    progress(Progress(i + 1, len(targets), done_bytes, total_bytes, time.monotonic() - start))
            config = _config(targets, rank, Path(base).resolve(), fan_in_fan_out)
            if bs.hub is not None:    # PEFT loads the base by hub id, at the commit this adapter was made from
                config.update(base_model_name_or_path=bs.hub.repo_id, revision=bs.hub.sha)
            writer.finalize(config=None, aux_files=[],
                            extra_files={"adapter_config.json": (json.dumps(config, indent=2) + "\n").encode()})
    return report
