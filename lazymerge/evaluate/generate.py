"""Greedy continuation of a prompt: a sanity check that a merge still speaks.

When the whole model fits the budget it is materialised once and transformers' own `generate` runs (fast). When
it does not, each new token costs one layer-streaming forward pass over the prompt so far (no KV cache: slow,
but within the budget), with the next token the argmax over the head's row blocks.
"""
from __future__ import annotations

from typing import Any, Callable

import torch

from ..moe.routers import prepare_routers
from .data import load_tokenizer
from .head import StreamingArgmax
from .report import EvalProgress
from .stream import LayerStream, open_stream


def _all_params(stream: LayerStream) -> list[str]:
    sk = stream.sk
    return [p for names in sk.layer_params for p in names] + sk.static_params + \
        [sk.embed_name, sk.head_name, *sk.head_extra]


def _fits(stream: LayerStream) -> bool:
    """Whether the whole model, in float32 and with what loading it holds besides, fits the weights' share of the
    budget (a tied head is the embedding's rows: counted once)."""
    if stream.budget is None:
        return True
    params = _all_params(stream)
    tied = stream.params.group_of(stream.sk.head_name) is stream.params.group_of(stream.sk.embed_name)
    if tied:
        params.remove(stream.sk.head_name)
    return stream.weight_bytes(params) <= stream.budget * stream.source.weight_share


def _whole(stream: LayerStream, ids: torch.Tensor, max_new_tokens: int, eos: int | None) -> list[int]:
    """transformers' own `generate` on the whole model, each parameter converted as it is read (never a stored
    and a converted copy of the model together)."""
    sk = stream.sk
    stream.load_static()
    stream.materialize_params([p for p in _all_params(stream) if p not in sk.static_params])
    with torch.no_grad():
        out = sk.model.generate(ids[None].to(stream.device), max_new_tokens=max_new_tokens, do_sample=False,
                                eos_token_id=eos, pad_token_id=eos if eos is not None else 0)
    return out[0, ids.shape[0]:].tolist()


def _streamed(stream: LayerStream, ids: torch.Tensor, max_new_tokens: int, eos: int | None,
              progress: Callable[[Any], None] | None) -> list[int]:
    new: list[int] = []
    for step in range(max_new_tokens):
        seq = torch.cat([ids, torch.tensor(new, dtype=torch.long)])[None]
        batches = stream.embed([seq])
        for i in range(stream.sk.num_layers):
            stream.run_layer(i, batches)
        last = stream.finish(batches)[0][0, -1:]
        pick = StreamingArgmax()
        stream.head_blocks(last, pick)
        new.append(pick.index)
        if progress is not None:
            progress(EvalProgress(step + 1, max_new_tokens, f"token {step + 1}/{max_new_tokens}"))
        if eos is not None and pick.index == eos:
            break
    return new


def generate(target: Any, prompt: str, *, max_new_tokens: int = 20, memory: Any = None,
             device: "str | torch.device" = "cpu", seed: int = 0,
             progress: Callable[[Any], None] | None = None, stream_inputs: bool = False) -> str:
    """The greedy continuation of `prompt` by `target` (checkpoint directory, hub id or recipe), as text."""
    stream = open_stream(target, memory=memory, device=device, seed=seed, stream_inputs=stream_inputs,
                         prepare=lambda plan: prepare_routers(plan, progress=progress))
    try:
        tok = load_tokenizer(stream.source.config_dir, stream.source.label)
        ids = torch.tensor(tok(prompt)["input_ids"], dtype=torch.long)
        eos = tok.eos_token_id
        new = (_whole(stream, ids, max_new_tokens, eos) if _fits(stream)
               else _streamed(stream, ids, max_new_tokens, eos, progress))
        return tok.decode(new, skip_special_tokens=True)
    finally:
        stream.close()
