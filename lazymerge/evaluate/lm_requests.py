"""Loglikelihood requests on the layer-streaming forward: every request of a call through decoder layer 0, then
layer 1, ... (FlexGen's zig-zag order), one layer's weights in memory.

A request is a token context and a token continuation; the answer is log p(continuation | context) and whether
every continuation token is the greedy one. The token rules are lm-eval's `HFLM._loglikelihood_tokens`, so the
numbers equal a whole-model evaluation's:

- the model input is `(context + continuation)[-(max_length + 1):][:-1]`, truncated on the left;
- the continuation's tokens are scored at the input's last `len(continuation)` positions;
- requests with the same input share one forward pass (lm-eval's "logits cache" generalised to any length);
- sequences are sorted by length (longest first) and batched with right padding: the model is causal, so the
  padding never reaches a scored position.

Only the scored positions' hidden states reach the head (`logprobs.PairScores`): the full logits never exist.
When all sequences' hidden states would exceed `activations`, the sequences are split into passes, each one
streaming the weights again.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from .logprobs import PairScores
from .report import EvalProgress
from .stream import LayerStream

DEFAULT_BATCH_TOKENS = 2048          # padded tokens per forward call inside a layer
DEFAULT_ACTIVATIONS = 1 << 30        # hidden states of all sequences of one pass


@dataclass(frozen=True)
class ScoreOptions:
    """How requests are grouped: they change speed and memory, never the numbers beyond float rounding."""

    max_length: int                          # the model's context: longer inputs are cut on the left
    batch_size: int | None = None            # sequences per forward call; None: by `batch_tokens`
    batch_tokens: int = DEFAULT_BATCH_TOKENS
    activations: int = DEFAULT_ACTIVATIONS   # bytes of hidden states held at once (one pass)


@dataclass
class _Seq:
    tokens: list[int]                        # the model input
    positions: list[int]                     # positions (sorted) whose hidden states reach the head
    first_row: int = 0                       # row of positions[0] in the gathered hidden states


def plan_inputs(requests: Sequence[tuple[Sequence[int], Sequence[int]]], max_length: int
                ) -> tuple[list[_Seq], list[list[tuple[int, int]]]]:
    """Unique model inputs, and per request its scored (input index, position, token) pairs as (row, token)
    pairs into the gathered hidden states."""
    seqs: list[_Seq] = []
    index: dict[tuple[int, ...], int] = {}
    wanted: list[list[tuple[int, int, int]]] = []
    for context, continuation in requests:
        if not context or not continuation:
            raise ValueError("a loglikelihood request needs a non-empty context and continuation (in tokens)")
        whole = (list(context) + list(continuation))[-(max_length + 1):]
        key = tuple(whole[:-1])
        k = index.setdefault(key, len(seqs))
        if k == len(seqs):
            seqs.append(_Seq(list(key), []))
        n = len(key)
        c = min(len(continuation), n)
        wanted.append([(k, p, whole[p + 1]) for p in range(n - c, n)])
    positions: list[set[int]] = [set() for _ in seqs]
    for pairs in wanted:
        for k, p, _ in pairs:
            positions[k].add(p)
    row = 0
    for s, pos in zip(seqs, positions):
        s.positions, s.first_row = sorted(pos), row
        row += len(pos)
    where = [{p: s.first_row + j for j, p in enumerate(s.positions)} for s in seqs]
    return seqs, [[(where[k][p], t) for k, p, t in pairs] for pairs in wanted]


def length_batches(lengths: Sequence[int], size: int | None, tokens: int) -> list[list[int]]:
    """Indices sorted by length (longest first, then index) cut into batches of `size` sequences, or (None) of at
    most `tokens` padded tokens (a longer sequence alone)."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    for i in order:
        b = batches[-1] if batches else None
        if b is not None:
            width = lengths[b[0]]
            full = len(b) >= size if size else (len(b) + 1) * width > max(tokens, width)
            if not full:
                b.append(i)
                continue
        batches.append([i])
    return batches


def batches_of(lengths: list[int], opts: ScoreOptions, hidden_size: int) -> list[list[list[int]]]:
    """Sequence indices sorted by length (longest first) cut into batches, and the batches into passes whose
    padded hidden states fit `opts.activations`."""
    batches = length_batches(lengths, opts.batch_size, opts.batch_tokens)
    passes: list[list[list[int]]] = []
    held = 0
    for b in batches:
        size = len(b) * lengths[b[0]] * hidden_size * 4
        if not passes or held + size > opts.activations:
            passes.append([])
            held = 0
        passes[-1].append(b)
        held += size
    return passes


def activation_bytes(config: Any, seqs_tokens: int, batch_tokens: int, longest: int, itemsize: int = 4) -> int:
    """Memory for activations on top of the budget: the hidden states of one pass (twice for a batch being
    replaced), one batch's work inside a layer (q/k/v/o, the MLP's 3 intermediate rows per token, attention
    scores of the longest sequence) and the gathered hidden states of scored positions."""
    c = config.get_text_config()
    h = c.hidden_size
    inter = getattr(c, "intermediate_size", None) or getattr(c, "n_inner", None) or 4 * h
    heads = getattr(c, "num_attention_heads", None) or 1       # attention-free stacks (Mamba): no scores
    work = batch_tokens * (2 * h + 4 * h + 3 * inter) + heads * longest * min(longest, batch_tokens)
    return itemsize * (seqs_tokens * h + work)


@dataclass
class Prepared:
    """Requests turned into the model inputs to run: unique sequences, scored pairs, batches and passes."""

    seqs: list[_Seq]
    pairs: list[list[tuple[int, int]]]
    passes: list[list[list[int]]]

    def pass_tokens(self) -> int:
        """Padded tokens of the largest pass (its hidden states are what a pass holds)."""
        return max(sum(len(b) * len(self.seqs[b[0]].tokens) for b in p) for p in self.passes)

    @property
    def longest(self) -> int:
        return max(len(s.tokens) for s in self.seqs)


def prepare(requests: Sequence[tuple[Sequence[int], Sequence[int]]], opts: ScoreOptions,
            hidden_size: int) -> Prepared:
    seqs, pairs = plan_inputs(requests, opts.max_length)
    return Prepared(seqs, pairs, batches_of([len(s.tokens) for s in seqs], opts, hidden_size))


def score_requests(stream: LayerStream, prep: Prepared,
                   progress: Callable[[EvalProgress], None] | None = None) -> list[tuple[float, bool]]:
    """(log p(continuation | context), all continuation tokens greedy) per request of `prep`."""
    if not prep.seqs:
        return []
    seqs, pairs, passes = prep.seqs, prep.pairs, prep.passes
    hidden_size = stream.sk.config.get_text_config().hidden_size
    n_layers = stream.sk.num_layers
    total = sum(len(p) for p in passes) * n_layers + 1
    done = [0]

    def tick(stage: str) -> None:
        done[0] += 1
        if progress is not None:
            progress(EvalProgress(done[0], total, stage))

    rows = sum(len(s.positions) for s in seqs)
    gathered = torch.empty((rows, hidden_size), dtype=stream.dtype, device=stream.device)
    for n_pass, batches in enumerate(passes):
        label = f"pass {n_pass + 1}/{len(passes)}, " if len(passes) > 1 else ""
        ids = [_padded([seqs[i].tokens for i in b]) for b in batches]
        state = stream.embed(ids)
        for layer in range(n_layers):
            stream.run_layer(layer, state, on_batch=lambda layer=layer: tick(f"{label}layer {layer + 1}/{n_layers}"))
        for b, st in zip(batches, state):
            final = stream.finish([st])[0]
            for row, i in enumerate(b):
                s = seqs[i]
                gathered[s.first_row:s.first_row + len(s.positions)] = final[row, s.positions]
            del final
        del state
    flat_rows = torch.tensor([r for ps in pairs for r, _ in ps], dtype=torch.long)
    flat_tokens = torch.tensor([t for ps in pairs for _, t in ps], dtype=torch.long)
    scores = PairScores(rows, flat_rows, flat_tokens, gathered.device)
    stream.head_blocks(gathered, scores)
    tick("head")
    logp, greedy = scores.logprobs().cpu(), scores.greedy().cpu()
    out, at = [], 0
    for ps in pairs:
        n = len(ps)
        out.append((float(logp[at:at + n].sum()), bool(greedy[at:at + n].all())))
        at += n
    return out


def _padded(seqs: list[list[int]]) -> torch.Tensor:
    """[B, longest] token ids, right-padded by repeating each sequence's last token (ids the embedding already
    reads; a causal model never lets padding reach an earlier position)."""
    width = max(len(s) for s in seqs)
    return torch.tensor([s + [s[-1]] * (width - len(s)) for s in seqs], dtype=torch.long)

