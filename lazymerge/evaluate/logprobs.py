"""Log-probabilities of chosen tokens at chosen positions, and whether each is the greedy choice, from the output
head's row blocks: what lm-eval's loglikelihood requests ask of a model.

A whole-model evaluation computes `log_softmax` over the full `[batch, seq, vocab]` logits. Here only the positions
whose next token is scored (a request's continuation) reach the head, and the `[positions, vocab]` logits never
exist at once: each head row block updates, per position, a running maximum with its index (the greedy token, the
first of equal maxima as `argmax` picks it) and a running sum of exponentials (a streaming log-sum-exp), and the
logit of each scored (position, token) pair is picked from the block that holds the token. Work per block is
bounded by `HEAD_WORK_BYTES` whatever the budget, so a larger budget never means larger temporaries.
"""
from __future__ import annotations

import math
from typing import Any

import torch

HEAD_BLOCK_BYTES = 16 << 20        # float32 head rows held at once (at most; less under a smaller budget)
HEAD_WORK_BYTES = 48 << 20         # logits and their temporaries for one (head block, position chunk)


def head_block_rows(stream: Any, name: str) -> int:
    """Rows of the head read at a time: the budget's rule for row blocks (a quarter of it), capped so that the
    blocks stay cache-friendly and their size does not grow with a larger budget."""
    cols = math.prod(stream.source.shapes[name][1:])
    return max(1, min(stream.row_block(name), HEAD_BLOCK_BYTES // (4 * cols)))


class PairScores:
    """Accumulates, over head row blocks given in order, for hidden states `hidden` [P, H]: each position's
    log-sum-exp and greedy token, and the logit of each scored pair (`pair_pos[k]`, `pair_token[k]`)."""

    def __init__(self, hidden: torch.Tensor, pair_pos: torch.Tensor, pair_token: torch.Tensor,
                 softcap: float | None = None):
        self.hidden, self.softcap = hidden, softcap
        self.pair_pos, self.pair_token = pair_pos.to(hidden.device), pair_token.to(hidden.device)
        p = hidden.shape[0]
        self.max = torch.full((p,), -math.inf, dtype=torch.float32, device=hidden.device)
        self.argmax = torch.zeros(p, dtype=torch.long, device=hidden.device)
        self.sum = torch.zeros(p, dtype=torch.float64, device=hidden.device)
        self.pair_logit = torch.zeros(len(pair_pos), dtype=torch.float32, device=hidden.device)
        self.rows_seen = 0

    def __call__(self, start: int, rows: torch.Tensor) -> None:
        if start != self.rows_seen:
            raise RuntimeError(f"head blocks out of order: expected row {self.rows_seen}, got {start}")
        w = rows.to(device=self.hidden.device, dtype=self.hidden.dtype)
        n = w.shape[0]
        chunk = max(1, HEAD_WORK_BYTES // (12 * n))
        for a in range(0, self.hidden.shape[0], chunk):
            self._fold(a, min(a + chunk, self.hidden.shape[0]), start, w)
        inside = (self.pair_token >= start) & (self.pair_token < start + n)
        if inside.any():
            k = inside.nonzero().squeeze(1)
            pos, tok = self.pair_pos[k], self.pair_token[k] - start
            self.pair_logit[k] = self._logits(self.hidden[pos], w)[torch.arange(len(k)), tok]
        self.rows_seen += n

    def _logits(self, hidden: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        logits = hidden @ w.T
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    def _fold(self, a: int, b: int, start: int, w: torch.Tensor) -> None:
        logits = self._logits(self.hidden[a:b], w)                  # [chunk, block]
        value, index = logits.max(dim=1)
        old = self.max[a:b]
        better = value > old                                        # strict: an earlier block keeps a tie
        new_max = torch.maximum(old, value)
        self.argmax[a:b] = torch.where(better, index + start, self.argmax[a:b])
        logits.sub_(new_max[:, None]).exp_()
        self.sum[a:b] = self.sum[a:b] * torch.exp((old - new_max).double()) + logits.sum(dim=1, dtype=torch.float64)
        self.max[a:b] = new_max

    def logprobs(self) -> torch.Tensor:
        """log p(token | position) of each scored pair (float64)."""
        lse = self.max.double() + torch.log(self.sum)
        return self.pair_logit.double() - lse[self.pair_pos]

    def greedy(self) -> torch.Tensor:
        """Whether each scored pair's token is the greedy (argmax) token at its position."""
        return self.argmax[self.pair_pos] == self.pair_token


class GreedyTokens:
    """The argmax token of each row of `hidden` [B, H] over head row blocks given in order (first of equal
    maxima), as `argmax` over the full logits picks it: greedy decoding's next tokens."""

    def __init__(self, hidden: torch.Tensor, softcap: float | None = None):
        self.hidden, self.softcap = hidden, softcap
        self.max = torch.full((hidden.shape[0],), -math.inf, dtype=torch.float32, device=hidden.device)
        self.index = torch.zeros(hidden.shape[0], dtype=torch.long, device=hidden.device)

    def __call__(self, start: int, rows: torch.Tensor) -> None:
        logits = self.hidden @ rows.to(device=self.hidden.device, dtype=self.hidden.dtype).T
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        value, index = logits.max(dim=1)
        better = value > self.max
        self.index = torch.where(better, index + start, self.index)
        self.max = torch.maximum(self.max, value)
