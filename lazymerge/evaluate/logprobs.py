"""Log-probabilities of chosen tokens at chosen positions, and whether each is the greedy choice, from the output
head's row blocks: what lm-eval's loglikelihood requests ask of a model.

A whole-model evaluation computes `log_softmax` over the full `[batch, seq, vocab]` logits. Here only the positions
whose next token is scored (a request's continuation) reach the head, and the `[positions, vocab]` logits never
exist at once: each head row block updates, per position, a running maximum with its index (the greedy token, the
first of equal maxima as `argmax` picks it) and a running sum of exponentials (a streaming log-sum-exp), and the
logit of each scored (position, token) pair is picked from the block that holds the token. The blocks come from
`LayerStream.head_blocks`, the one place that makes logits (the model's own head: bias, logit scaling,
soft-capping), with its block sizes (capped whatever the budget, so a larger budget never means larger
temporaries).
"""
from __future__ import annotations

import math
import torch


class PairScores:
    """Accumulates, over blocks of logits [P, rows] given in vocabulary order, each position's log-sum-exp and
    greedy token, and the logit of each scored pair (`pair_pos[k]`, `pair_token[k]`)."""

    def __init__(self, positions: int, pair_pos: torch.Tensor, pair_token: torch.Tensor,
                 device: "torch.device | str" = "cpu"):
        self.pair_pos, self.pair_token = pair_pos.to(device), pair_token.to(device)
        self.max = torch.full((positions,), -math.inf, dtype=torch.float32, device=device)
        self.argmax = torch.zeros(positions, dtype=torch.long, device=device)
        self.sum = torch.zeros(positions, dtype=torch.float64, device=device)
        self.pair_logit = torch.zeros(len(pair_pos), dtype=torch.float32, device=device)
        self.rows_seen = 0

    def __call__(self, start: int, logits: torch.Tensor) -> None:
        if start != self.rows_seen:
            raise RuntimeError(f"head blocks out of order: expected row {self.rows_seen}, got {start}")
        logits = logits.float()
        n = logits.shape[1]
        inside = (self.pair_token >= start) & (self.pair_token < start + n)
        if inside.any():
            k = inside.nonzero().squeeze(1)
            self.pair_logit[k] = logits[self.pair_pos[k], self.pair_token[k] - start]
        value, index = logits.max(dim=1)
        better = value > self.max                                   # strict: an earlier block keeps a tie
        new_max = torch.maximum(self.max, value)
        self.argmax = torch.where(better, index + start, self.argmax)
        logits = logits - new_max[:, None]
        self.sum = self.sum * torch.exp((self.max - new_max).double()) + logits.exp_().sum(dim=1,
                                                                                          dtype=torch.float64)
        self.max = new_max
        self.rows_seen += n

    def logprobs(self) -> torch.Tensor:
        """log p(token | position) of each scored pair (float64)."""
        lse = self.max.double() + torch.log(self.sum)
        return self.pair_logit.double() - lse[self.pair_pos]

    def greedy(self) -> torch.Tensor:
        """Whether each scored pair's token is the greedy (argmax) token at its position."""
        return self.argmax[self.pair_pos] == self.pair_token


class GreedyTokens:
    """The argmax token of each row over blocks of logits [B, rows] given in vocabulary order (the first of equal
    maxima), as `argmax` over the full logits picks it: greedy decoding's next tokens."""

    def __init__(self, rows: int, device: "torch.device | str" = "cpu"):
        self.max = torch.full((rows,), -math.inf, dtype=torch.float32, device=device)
        self.index = torch.zeros(rows, dtype=torch.long, device=device)

    def __call__(self, start: int, logits: torch.Tensor) -> None:
        value, index = logits.float().max(dim=1)
        better = value > self.max
        self.index = torch.where(better, index + start, self.index)
        self.max = torch.maximum(self.max, value)
