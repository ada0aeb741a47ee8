"""Cutting a plan into independent partitions, and who writes which bytes of a shared shard file.

Pure functions of the output layout (like dask's order.py is of the graph): no cluster, no I/O, so the same plan
always gives the same partitions and the tests can check them directly.

A partition is a run of consecutive output tensors of one shard, so its bytes are one contiguous range of that
file. Normally a partition is a whole shard; when there are fewer shards than about two per worker, shards are
cut into tensor groups of near-equal cost so that every worker has work (and a slow one does not hold the end).

Writers on different machines must never write the same file page: network file systems (NFS, Lustre clients)
cache and write back whole pages, so two machines writing neighbouring bytes of one page can overwrite each
other's bytes. So a worker writes only the pages that lie entirely inside its partition's range, and hands the
bytes of the (at most two) pages its range shares with a neighbour, or with the header, back to the client,
which is the single writer of every such page. The layout itself (offsets, header) stays the one a local run
writes: that is what keeps the output bit-identical to a local run.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

from ..io.writer import ShardLayout

PAGE = 1 << 16     # 64 KiB: a multiple of every page size in use (4 KiB x86, 16/64 KiB arm64 and POWER)
PER_WORKER = 2     # partitions per worker below which shards are cut into tensor groups


@dataclass(frozen=True)
class Partition:
    """One Dask task's share of the merge: `tensors` of shard `filename`, whose data fill bytes [start, stop) of
    that file (absolute offsets, header included before `start`)."""

    index: int
    shard: int
    filename: str
    tensors: tuple[str, ...]
    start: int
    stop: int

    @property
    def nbytes(self) -> int:
        return self.stop - self.start


def partition_layout(layout: Sequence[ShardLayout], workers: int, *, skip: frozenset[str] | set[str] = frozenset(),
                     cost: Mapping[str, int] | None = None, per_worker: int = PER_WORKER) -> list[Partition]:
    """Partitions covering every tensor of the shards not in `skip` (shard file names already complete).

    One partition per shard when there are at least `per_worker * workers` shards to do; otherwise each shard
    is cut into consecutive tensor groups, about `per_worker * workers` in all, shared out in proportion to each
    shard's cost (`cost[name]`, e.g. bytes read and written; default: the tensor's output bytes) and balanced
    within the shard. Deterministic: the same arguments give the same partitions.
    """
    todo = [(i, s) for i, s in enumerate(layout) if s.filename not in skip and s.tensors]
    if not todo:
        return []

    def cost_of(t: object) -> int:
        name, nbytes = t.name, t.nbytes               # type: ignore[attr-defined]
        return max(1, cost[name] if cost is not None and name in cost else nbytes)

    target = max(1, per_worker * max(1, workers))
    shard_cost = [sum(cost_of(t) for t, _ in s.tensors) for _, s in todo]
    pieces = [1] * len(todo) if len(todo) >= target else _apportion(
        target, shard_cost, [len(s.tensors) for _, s in todo])
    parts: list[Partition] = []
    for (i, s), k in zip(todo, pieces):
        for group in _split(s.tensors, k, cost_of):
            first, last = group[0], group[-1]
            start = len(s.header) + first[1]
            stop = len(s.header) + last[1] + last[0].nbytes
            parts.append(Partition(len(parts), i, s.filename, tuple(t.name for t, _ in group), start, stop))
    return parts


def _apportion(target: int, costs: list[int], caps: list[int]) -> list[int]:
    """Pieces per shard: at least one each, about `target` in all, in proportion to cost (largest remainders
    get the leftover pieces), never more than a shard has tensors."""
    total = sum(costs)
    exact = [target * c / total for c in costs]
    pieces = [min(cap, max(1, int(e))) for e, cap in zip(exact, caps)]
    for k in sorted(range(len(costs)), key=lambda k: (-(exact[k] - int(exact[k])), k)) * 2:
        if sum(pieces) >= target:
            break
        if pieces[k] < caps[k]:
            pieces[k] += 1
    return pieces


def _split(tensors: Sequence[tuple], pieces: int, cost_of) -> list[list[tuple]]:
    """Cut `tensors` (in order) into `pieces` non-empty runs: a run ends where the running cost first reaches
    its even share, so runs are balanced without reordering anything."""
    if pieces <= 1:
        return [list(tensors)]
    costs = [cost_of(t) for t, _ in tensors]
    total = sum(costs)
    groups: list[list[tuple]] = [[]]
    acc = 0
    for k, (item, c) in enumerate(zip(tensors, costs)):
        groups[-1].append(item)
        acc += c
        left_items, left_groups = len(tensors) - k - 1, pieces - len(groups)
        if left_groups > 0 and left_items > 0 and (acc * pieces >= total * len(groups) or left_items == left_groups):
            groups.append([])
    return groups


def page_split(start: int, stop: int, page: int = PAGE) -> tuple[tuple[int, int], list[tuple[int, int]]]:
    """(direct, edges) for a partition's byte range [start, stop): `direct` is the range of whole pages inside it,
    which its worker writes itself (empty when there is none); `edges` are the rest, at most one page-part at
    each end, which the worker returns to the client."""
    a = -(-start // page) * page
    b = stop // page * page
    if a >= b:
        return (start, start), ([(start, stop)] if stop > start else [])
    edges = [(lo, hi) for lo, hi in ((start, a), (b, stop)) if hi > lo]
    return (a, b), edges
