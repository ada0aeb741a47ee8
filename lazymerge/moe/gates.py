"""Router weights for a MoE built from dense models, with mergekit-moe's formulas (mergekit/moe/router.py).

Every mode gives, per layer, one unit vector per expert (a row of the router matrix `[experts, hidden]`):

- `cheap_embed`: the sum of the base model's token embeddings over every token of the expert's positive prompts,
  L2-normalised; the same vector for every layer. Float32.
- `hidden`: the base model's hidden state at each layer's input for each prompt's last token, averaged over the
  prompts; run in bfloat16 like mergekit (so published configs give the same routers); one vector per layer.
  The base runs one decoder layer at a time (`lazymerge.evaluate.stream`), never whole, inside the run's budget (a
  layer larger than it runs alone and is a warning of the report); each expert's prompt set is one left-padded
  batch, as in mergekit (bfloat16 rounding depends on the batch shape).
- With `negative_prompts`, the negatives' vector is subtracted from the positives' before the final
  normalisation (cheap_embed normalises both first, as mergekit does).
- `random` (N(0, 1)) and `uniform_random` (U(-1/sqrt(hidden), 1/sqrt(hidden)), nn.Linear's init): drawn from a
  generator seeded by the run seed and the output tensor's name, so they are reproducible (mergekit's are not).

Prompts are tokenised as mergekit does: the tokenizer's BOS text prepended, no other special tokens.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from ..engine.kernels import derive_seed
from ..errors import CheckpointError
from ..planner.moe_recipe import GATE_MODES, PROMPT_MODES, Prompts  # noqa: F401  (the recipe's vocabulary)

def load_tokenizer(path: Path) -> Any:
    """The base model's tokenizer (local files only)."""
    try:
        from transformers import AutoTokenizer
    except ImportError as exc:   # pragma: no cover - optional dependency
        raise CheckpointError(f"gate_mode hidden/cheap_embed needs transformers ({exc}); "
                              "pip install 'lazymerge[moe]'") from None
    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise CheckpointError(f"{path}: cannot load the tokenizer: {str(exc).splitlines()[0]}") from None


def tokenize(tokenizer: Any, prompts: Sequence[str]) -> list[torch.Tensor]:
    """Token ids of each prompt, BOS text prepended and no other special tokens (mergekit's tokenize_prompts)."""
    bos = tokenizer.bos_token or ""
    return [torch.tensor(tokenizer(bos + p, add_special_tokens=False)["input_ids"], dtype=torch.long)
            for p in prompts]


def unit(h: torch.Tensor) -> torch.Tensor:
    """Rows scaled to unit L2 norm (mergekit's clamp at 1e-8 for a zero row), in h's dtype."""
    return h / h.norm(p=2, dim=-1, keepdim=True).clamp(min=1e-8)


def cheap_embed_vector(embed_rows: Any, ids: list[torch.Tensor]) -> torch.Tensor:
    """Unit sum of the float32 token embeddings of every token of every prompt; `embed_rows(ids)` -> [n, hidden]."""
    total = torch.stack([embed_rows(t).float().sum(dim=0) for t in ids]).sum(dim=0, keepdim=True)
    return unit(total)[0]


def last_token_mean(states: torch.Tensor) -> torch.Tensor:
    """[layers, prompts, hidden] -> [layers, hidden]: mergekit's average over prompts, in the states' dtype."""
    return states.sum(dim=1) / states.shape[1]


def random_router(mode: str, seed: int, name: str, shape: tuple[int, ...]) -> torch.Tensor:
    """A reproducible random router matrix: seeded by the run seed and the output tensor name."""
    gen = torch.Generator().manual_seed(derive_seed(seed, "moe-router", name))
    if mode == "random":
        return torch.randn(shape, generator=gen, dtype=torch.float32)
    scale = math.sqrt(1.0 / shape[-1])
    return torch.rand(shape, generator=gen, dtype=torch.float32) * 2 * scale - scale


def padded(tokenizer: Any, ids: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """One batch of prompts as mergekit-moe batches them: left-padded with BOS (EOS without one), with a mask."""
    pad = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    pad = 0 if pad is None else pad
    width = max(len(t) for t in ids)
    batch = torch.full((len(ids), width), pad, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for b, t in enumerate(ids):
        batch[b, width - len(t):] = t
        mask[b, width - len(t):] = 1
    return batch, mask


def prompt_gates(mode: str, base: Any, target: Any, tokenizer_dir: Path, experts: Sequence[Prompts],
                 num_layers: int, embed_name: str = "model.embed_tokens.weight", memory: Any = None,
                 progress: Callable[[Any], None] | None = None, warnings: list[str] | None = None) -> torch.Tensor:
    """[layers, experts, hidden] router rows from the experts' prompts (mode `hidden` or `cheap_embed`).

    `base` is the base model as an opened lazymerge source (cheap_embed reads embedding rows from it), `target`
    the same model as `lazymerge.evaluate.stream` takes it (a checkpoint directory, or a recipe for base+adapter),
    which `hidden` runs one decoder layer at a time. In `hidden` mode each expert's
    positive (and negative) prompts run as one left-padded batch, as in mergekit-moe, and the state of the last
    position is taken: the prompt's last token (padding is on the left)."""
    tok = load_tokenizer(tokenizer_dir)
    sets: list[tuple[int, list[torch.Tensor], int]] = []      # (expert, ids, +1 positive / -1 negative)
    for e, p in enumerate(experts):
        sets.append((e, tokenize(tok, p.positive), 1))
        if p.negative:
            sets.append((e, tokenize(tok, p.negative), -1))
    if mode == "cheap_embed":
        def rows(t: torch.Tensor) -> torch.Tensor:
            return torch.stack([base.read(embed_name, rows=(int(i), int(i) + 1))[0] for i in t.tolist()])

        vec = {(e, sign): cheap_embed_vector(rows, ids).expand(num_layers, -1) for e, ids, sign in sets}
    else:
        from ..evaluate.report import EvalProgress
        from ..evaluate.stream import open_stream

        stream = open_stream(target, memory=memory, dtype=torch.bfloat16)
        try:
            batches = [padded(tok, ids) for _, ids, _ in sets]
            states = stream.embed([b for b, _ in batches], [m for _, m in batches])
            per_layer: list[list[torch.Tensor]] = []
            for i in range(num_layers):
                per_layer.append([b.hidden[:, -1, :] for b in states])     # per set: [prompts, hidden]
                if i < num_layers - 1:
                    stream.run_layer(i, states)
                if progress is not None:
                    progress(EvalProgress(i + 1, num_layers, f"routers: layer {i + 1}/{num_layers}"))
            if warnings is not None and stream.stats.layers_over_budget:
                warnings.append(f"gate_mode hidden: {stream.stats.layers_over_budget} unit(s) of the base model "
                                f"(largest {stream.stats.largest_unit} bytes) exceed --memory; each ran alone")
        finally:
            stream.close()
        vec = {}
        for k, (e, _, sign) in enumerate(sets):
            vec[(e, sign)] = last_token_mean(torch.stack([layer[k] for layer in per_layer]))
    out = []
    for e in range(len(experts)):
        h = vec[(e, 1)]
        if (e, -1) in vec:
            h = h - vec[(e, -1)]
        out.append(unit(h))
    return torch.stack(out, dim=1)
