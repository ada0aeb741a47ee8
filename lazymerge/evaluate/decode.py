"""Batched greedy decoding on the layer-streaming forward: each step, every live request through decoder layer 0,
then layer 1, ..., so the weights stream once per step for the whole batch.

Requests are sorted by prompt length (longest first) and cut into groups of similar length. A group is one
left-padded batch with its attention mask and its own KV cache (transformers' `DynamicCache`, filled by the
model's own attention code), exactly the inputs `generate` gives the model: position ids from the mask at the
prompt, then one more per step. Step 0 runs the prompts (prefill); each later step runs the last token of every
live request. The next token is the argmax over the head's row blocks (`logprobs.GreedyTokens`: the first of equal
maxima, as `argmax` picks it). A request stops at an EOS token, at its token limit, or when `stop(i, tokens)` says
so (lm-eval's stop strings); its rows leave the batch and its cache is freed. The caches live within a byte
budget, the rest on disk between steps (`kvcache.KVStore`).
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from .kvcache import KVStore
from .lm_requests import length_batches
from .logprobs import GreedyTokens
from .report import EvalProgress
from .stream import LayerStream

DEFAULT_GROUP_TOKENS = 4096          # padded prompt tokens per group


@dataclass(frozen=True)
class DecodeOptions:
    group_tokens: int = DEFAULT_GROUP_TOKENS
    group_size: int | None = None            # requests per group (None: by `group_tokens`)
    kv_budget: int | None = None             # bytes of KV cache held in memory (None: no limit)
    spill_dir: str | None = None             # where KV caches over the budget go (default: TMPDIR)


@dataclass
class _Group:
    rows: list[int]                          # request index of each batch row
    ids: torch.Tensor                        # [b, L] left-padded prompts, then [b, 1] the last tokens
    mask: torch.Tensor                       # [b, tokens so far] 1 = real token
    positions: torch.Tensor                  # [b, L] at the prompt, then [b, 1]
    cache: Any


def _left_padded(prompts: Sequence[Sequence[int]], rows: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """[b, L] ids padded on the left (with each prompt's first token: masked, so any id does) and the mask."""
    width = max(len(prompts[r]) for r in rows)
    ids = torch.tensor([[prompts[r][0]] * (width - len(prompts[r])) + list(prompts[r]) for r in rows])
    mask = torch.tensor([[0] * (width - len(prompts[r])) + [1] * len(prompts[r]) for r in rows])
    return ids, mask


def cache_keyword(base: Any) -> str:
    """The name the model's forward takes its KV cache under (transformers 5: `cache`; before: past_key_values)."""
    params = inspect.signature(base.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def greedy_decode(stream: LayerStream, prompts: Sequence[Sequence[int]], max_new: Sequence[int],
                  eos: set[int], stop: Callable[[int, list[int]], bool] | None = None,
                  opts: DecodeOptions = DecodeOptions(),
                  progress: Callable[[EvalProgress], None] | None = None) -> tuple[list[list[int]], KVStore]:
    """The greedy continuation (token ids, EOS included when reached) of each prompt, at most `max_new[i]`
    tokens. Returns the continuations and the KV store (closed; its peak and spilled bytes are for reports)."""
    from transformers import DynamicCache

    out: list[list[int]] = [[] for _ in prompts]
    live = [i for i in range(len(prompts)) if max_new[i] > 0]
    if not live:
        return out, KVStore([], opts.kv_budget)
    groups: list[_Group] = []
    for rows in length_batches([len(prompts[i]) for i in live], opts.group_size, opts.group_tokens):
        rows = [live[r] for r in rows]
        ids, mask = _left_padded(prompts, rows)
        positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
        groups.append(_Group(rows, ids, mask, positions, DynamicCache(config=stream.sk.config)))
    kv = KVStore([g.cache for g in groups], opts.kv_budget, opts.spill_dir)
    key = cache_keyword(stream.sk.base)
    n_layers, longest = stream.sk.num_layers, max(max_new[i] for i in live)
    active = list(range(len(groups)))
    try:
        for step in range(longest):
            if not active:
                break
            calls = [{key: groups[g].cache, "use_cache": True, "position_ids": groups[g].positions} for g in active]
            state = stream.embed([groups[g].ids for g in active], [groups[g].mask for g in active], calls)
            for i in range(n_layers):
                kv.before_layer(i)
                stream.run_layer(i, state)
                kv.after_layer(i)
            last = torch.cat([stream.finish([st])[0][:, -1] for st in state])
            del state
            pick = GreedyTokens(last.shape[0], last.device)
            stream.head_blocks(last, pick)
            tokens = pick.index.cpu().tolist()
            at = 0
            for g in list(active):
                group = groups[g]
                b = len(group.rows)
                keep = []
                for j, r in enumerate(group.rows):
                    t = tokens[at + j]
                    out[r].append(t)
                    if not (t in eos or len(out[r]) >= max_new[r] or (stop is not None and stop(r, out[r]))):
                        keep.append(j)
                at += b
                _advance(group, tokens[at - b:at], keep, kv, g)
                if not keep:
                    active.remove(g)
                    kv.drop_group(g)
            if progress is not None:
                progress(EvalProgress(step + 1, longest, f"token {step + 1}/{longest}"))
    finally:
        kv.close()
    return out, kv


def _advance(group: _Group, tokens: list[int], keep: list[int], kv: KVStore, g: int) -> None:
    """The group's inputs for the next step: its live rows' new tokens, the mask one longer, next positions."""
    b = len(group.rows)
    group.ids = torch.tensor(tokens, dtype=torch.long)[:, None]
    group.mask = torch.cat([group.mask, torch.ones((b, 1), dtype=group.mask.dtype)], dim=1)
    group.positions = group.positions[:, -1:] + 1
    if len(keep) < b and keep:
        idx = torch.tensor(keep, dtype=torch.long)
        group.rows = [group.rows[j] for j in keep]
        group.ids, group.mask, group.positions = group.ids[idx], group.mask[idx], group.positions[idx]
        kv.select(g, idx)
