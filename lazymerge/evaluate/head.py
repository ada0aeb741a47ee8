"""The output head and the loss over vocabulary blocks: the [tokens, vocab] logits never exist at once.

The head's rows (one per vocabulary entry) arrive in consecutive blocks; each block's logits update a running
maximum and a running sum of exponentials per token (a streaming log-sum-exp), and the logit of each token's
target is picked from the block that holds it. NLL = logsumexp(logits) - logit[target], exactly the
cross-entropy, with memory for one block of logits.
"""
from __future__ import annotations

import math

import torch


class StreamingNLL:
    """Accumulates per-token NLL of `hidden` [N, H] against `targets` [N] over head row blocks given in order."""

    def __init__(self, hidden: torch.Tensor, targets: torch.Tensor, softcap: float | None = None):
        self.hidden, self.targets, self.softcap = hidden, targets, softcap
        n = hidden.shape[0]
        self.max = torch.full((n,), -math.inf, dtype=torch.float32, device=hidden.device)
        self.sum = torch.zeros(n, dtype=torch.float64, device=hidden.device)
        self.target_logit = torch.zeros(n, dtype=torch.float32, device=hidden.device)
        self.rows_seen = 0

    def __call__(self, start: int, rows: torch.Tensor) -> None:
        if start != self.rows_seen:
            raise RuntimeError(f"head blocks out of order: expected row {self.rows_seen}, got {start}")
        w = rows.to(device=self.hidden.device, dtype=self.hidden.dtype)
        logits = self.hidden @ w.T                                      # [N, block]
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        new_max = torch.maximum(self.max, logits.max(dim=1).values)
        self.sum = self.sum * torch.exp((self.max - new_max).double()) + \
            torch.exp(logits - new_max[:, None]).double().sum(dim=1)
        self.max = new_max
        inside = (self.targets >= start) & (self.targets < start + w.shape[0])
        idx = inside.nonzero().squeeze(1)
        self.target_logit[idx] = logits[idx, self.targets[idx] - start]
        self.rows_seen += w.shape[0]

    def nll(self) -> torch.Tensor:
        """Per-token NLL (float64)."""
        return self.max.double() + torch.log(self.sum) - self.target_logit.double()
