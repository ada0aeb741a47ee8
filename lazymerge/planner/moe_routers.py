"""What a MoE plan asks of the router pass: typed, frozen descriptions of the router tensors, nothing computed.

The planner only describes the routers (which mode, prompts, seed, shapes, which base model); the pass that makes
them runs a model (`hidden` streams the base through `lazymerge.evaluate`), so it lives above the planner, in
`lazymerge.moe.routers`, and the API calls it before the graph runs. Keeping the description here, as plain data,
is what lets the planner stay below the code that runs models.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .moe_recipe import Prompts


@dataclass(frozen=True)
class RouterTensor:
    """One output router tensor: `[rows, hidden]`, from layer `layer`'s prompt vectors, columns `columns`
    (the experts' rows for a router, the shared experts' rows for a Qwen2-MoE shared-expert gate)."""

    name: str
    shape: tuple[int, int]
    layer: int
    columns: tuple[int, int]


@dataclass(frozen=True)
class RouterPass:
    """The router computation a plan needs: gate `mode`, the run `seed` (random modes), the base model (its
    source key, its directory for the tokenizer, and `target`, the form `lazymerge.evaluate.stream` takes), every
    expert's prompts (experts then shared experts), the number of layers, the memory budget of the pass, and the
    tensors it fills."""

    mode: str
    seed: int
    base_key: str
    base_dir: Path
    target: Any
    prompts: tuple[Prompts, ...]
    layers: int
    memory: int | str
    tensors: tuple[RouterTensor, ...]
