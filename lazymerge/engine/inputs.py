"""What a run will read, announced to its inputs before it starts (io.models.prepare_reads): hub inputs then
download the files those reads need, or start streaming their byte ranges ahead of the tasks that read them."""
from __future__ import annotations

import contextlib
from typing import Any, Iterator

from ..io.models import Read, prepare_reads
from .ops import Load


def planned_reads(sources: dict[str, Any], tasks: list[Any]) -> list[Read]:
    """The `load` tasks' reads in task order (the scheduler's priority order). A vocabulary-mapped load reads
    rows that depend on its row map, from several inputs: announced as whole tensors, not as exact ranges."""
    reads: list[Read] = []
    for t in tasks:
        a = t.attrs
        if not isinstance(a, Load):
            continue
        if a.vocab is None:
            reads.append((sources[a.model], a.name, a.rows, True))
        else:
            keys = {a.model} | {entry[0] for fill in a.vocab.fill for entry in fill}
            reads += [(sources[k], a.name, None, False) for k in sorted(keys)]
    return reads


@contextlib.contextmanager
def reading(sources: dict[str, Any], tasks: list[Any], budget: int | None) -> Iterator[None]:
    """Prepare the inputs for `tasks`, run the body, then end the read-ahead (also on failure or cancel)."""
    stop = prepare_reads(planned_reads(sources, tasks), budget)
    try:
        yield
    finally:
        stop()
