"""Greedy continuation of a prompt: a sanity check that a merge still speaks.

When the whole model fits the budget it is materialised once and transformers' own `generate` runs (fast). When
it does not, each new token costs one layer-streaming forward pass over the prompt so far (no KV cache: slow,
but within the budget), with the next token the argmax over the head's row blocks.
"""
from __future__ import annotations

from typing import Any, Callable

import torch

from .data import load_tokenizer
from .skeleton import materialize
from .stream import LayerStream, open_stream


class _Argmax:
    """Running argmax of `hidden @ W.T` over head row blocks (the first of equal maxima wins)."""

    def __init__(self, hidden: torch.Tensor, softcap: float | None):
        self.hidden, self.softcap = hidden, softcap
        self.best, self.index = -float("inf"), 0

    def __call__(self, start: int, rows: torch.Tensor) -> None:
        logits = self.hidden @ rows.to(self.hidden.dtype).T
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        value, idx = logits.max(dim=0)
        if float(value) > self.best:
            self.best, self.index = float(value), start + int(idx)


def _fits(stream: LayerStream) -> bool:
    if stream.budget is None:
        return True
    params = [p for names in stream.sk.layer_params for p in names] + stream.sk.static_params + [stream.sk.embed_name]
    if stream.tensor_name(stream.sk.head_name) != stream.sk.embed_name:
        params.append(stream.sk.head_name)
    return stream.weight_bytes(params) <= stream.budget


def _whole(stream: LayerStream, ids: torch.Tensor, max_new_tokens: int, eos: int | None) -> list[int]:
    sk = stream.sk
    params = [p for names in sk.layer_params for p in names] + sk.static_params + [sk.embed_name, sk.head_name]
    names = {p: stream.tensor_name(p) for p in params}
    values = stream.source.load(sorted(set(names.values())))
    materialize(sk.model, {p: values[n] for p, n in names.items()}, stream.dtype, stream.device)
    del values
    with torch.no_grad():
        out = sk.model.generate(ids[None].to(stream.device), max_new_tokens=max_new_tokens, do_sample=False,
                                eos_token_id=eos, pad_token_id=eos if eos is not None else 0)
    return out[0, ids.shape[0]:].tolist()


def _streamed(stream: LayerStream, ids: torch.Tensor, max_new_tokens: int, eos: int | None,
              progress: Callable[[Any], None] | None) -> list[int]:
    from .runner import EvalProgress

    new: list[int] = []
    softcap = getattr(stream.sk.config.get_text_config(), "final_logit_softcapping", None)
    head = stream.tensor_name(stream.sk.head_name)
    for step in range(max_new_tokens):
        seq = torch.cat([ids, torch.tensor(new, dtype=torch.long)])[None]
        batches = stream.embed([seq])
        for i in range(stream.sk.num_layers):
            stream.run_layer(i, batches)
        last = stream.finish(batches)[0][0, -1]
        pick = _Argmax(last, softcap)
        stream.source.for_row_blocks(head, stream.row_block(head), pick)
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
    stream = open_stream(target, memory=memory, device=device, seed=seed, stream_inputs=stream_inputs)
    try:
        tok = load_tokenizer(stream.source.config_dir, stream.source.label)
        ids = torch.tensor(tok(prompt)["input_ids"], dtype=torch.long)
        eos = tok.eos_token_id
        new = (_whole(stream, ids, max_new_tokens, eos) if _fits(stream)
               else _streamed(stream, ids, max_new_tokens, eos, progress))
        return tok.decode(new, skip_special_tokens=True)
    finally:
        stream.close()
