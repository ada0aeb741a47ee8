"""The output head over vocabulary blocks: the [tokens, vocab] logits never exist at once.

The head's rows (one per vocabulary entry) arrive in consecutive blocks. Each block's logits are made by the
model's own code: its `*ForCausalLM.forward` runs with the decoder stack answering at once with the final hidden
states already computed and the head module holding only that block's rows (and bias entries). Whatever the
forward does after the stack — a bias (Phi, GPT-J, CodeGen), Cohere's `logit_scale`, Granite's `logits_scaling`,
Gemma 2's final soft-capping — is applied as transformers applies it; nothing is re-implemented per family. That
is exact because those steps act on each logit alone; a forward that does not consult the stack once is refused.

Consumers fold the blocks in order: `StreamingNLL` keeps a running maximum and sum of exponentials per token (a
streaming log-sum-exp) and picks each target's logit from the block that holds it, so NLL = logsumexp - logit
with memory for one block of logits; `StreamingArgmax` keeps the best token (greedy generation).
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from ..errors import CheckpointError

# float32 temporaries per token and vocabulary row while a block is scored: the head's logits, the forward's
# scaling or soft-capping, and the log-sum-exp's shifted copy, exponentials and their float64 copy
HEAD_WORK_BYTES = 32


class OutputHead:
    """The model's head applied to `hidden` [N, H], one block of vocabulary rows at a time (a context manager:
    while open, the decoder stack's forward returns `hidden` and the head module holds a block)."""

    def __init__(self, sk: Any, hidden: torch.Tensor, extra: dict[str, torch.Tensor], output_cls: Any = None):
        self.sk, self.hidden, self.extra = sk, hidden, extra
        if output_cls is None:
            from transformers.modeling_outputs import BaseModelOutputWithPast as output_cls
        self.output = output_cls(last_hidden_state=hidden[None])
        self.calls = 0
        self._ids = torch.zeros((1, hidden.shape[0]), dtype=torch.long, device=hidden.device)
        self._patched: list[nn.Module] = []
        self._saved: dict[str, Any] = {}

    def __enter__(self) -> "OutputHead":
        head = self.sk.head
        self._saved = {n: getattr(head, n) for n in ["weight", *(e.rsplit(".", 1)[1] for e in self.extra)]}
        def stack(*args: Any, **kwargs: Any) -> Any:
            self.calls += 1
            return self.output

        # every module of the stack answers at once: the CausalLM calls the stack (OPT calls model.decoder)
        for m in self.sk.base.modules():
            m.forward = stack
            self._patched.append(m)
        return self

    def __exit__(self, *exc: Any) -> None:
        for m in self._patched:
            del m.forward
        self._patched.clear()
        for name, value in self._saved.items():       # the skeleton's own (meta) parameters again
            setattr(self.sk.head, name, value)

    def logits(self, start: int, rows: torch.Tensor) -> torch.Tensor:
        """[N, len(rows)] logits of vocabulary rows [start, start + len(rows)), in the hidden states' dtype and
        on their device."""
        head, h = self.sk.head, self.hidden
        head.weight = nn.Parameter(rows.to(device=h.device, dtype=h.dtype), requires_grad=False)
        for name, value in self.extra.items():
            part = value[start:start + rows.shape[0]].to(device=h.device, dtype=h.dtype)
            setattr(head, name.rsplit(".", 1)[1], nn.Parameter(part, requires_grad=False))
        before = self.calls
        with torch.no_grad():
            out = self.sk.model(input_ids=self._ids, use_cache=False)
        if self.calls != before + 1:
            raise CheckpointError(f"{type(self.sk.model).__name__}: its forward does not call its decoder stack "
                                  "once; evaluation cannot apply its output head block by block")
        logits = out.logits if hasattr(out, "logits") else out[0]
        return logits.reshape(h.shape[0], rows.shape[0])


class StreamingNLL:
    """Accumulates per-token NLL against `targets` [N] over blocks of logits [N, rows] given in vocabulary order."""

    def __init__(self, targets: torch.Tensor):
        self.targets = targets
        n, dev = targets.shape[0], targets.device
        self.max = torch.full((n,), -math.inf, dtype=torch.float32, device=dev)
        self.sum = torch.zeros(n, dtype=torch.float64, device=dev)
        self.target_logit = torch.zeros(n, dtype=torch.float32, device=dev)
        self.rows_seen = 0

    def __call__(self, start: int, logits: torch.Tensor) -> None:
        if start != self.rows_seen:
            raise RuntimeError(f"head blocks out of order: expected row {self.rows_seen}, got {start}")
        logits = logits.float()
        new_max = torch.maximum(self.max, logits.max(dim=1).values)
        self.sum = self.sum * torch.exp((self.max - new_max).double()) + \
            torch.exp(logits - new_max[:, None]).double().sum(dim=1)
        self.max = new_max
        inside = (self.targets >= start) & (self.targets < start + logits.shape[1])
        idx = inside.nonzero().squeeze(1)
        self.target_logit[idx] = logits[idx, self.targets[idx] - start]
        self.rows_seen += logits.shape[1]

    def nll(self) -> torch.Tensor:
        """Per-token NLL (float64)."""
        return self.max.double() + torch.log(self.sum) - self.target_logit.double()


class StreamingArgmax:
    """The index of the largest logit over blocks [1, rows] given in vocabulary order (the first of equal maxima
    wins, as torch.argmax over the whole row)."""

    def __init__(self) -> None:
        self.best, self.index = -math.inf, 0

    def __call__(self, start: int, logits: torch.Tensor) -> None:
        value, idx = logits.reshape(-1).max(dim=0)
        if float(value) > self.best:
            self.best, self.index = float(value), start + int(idx)
