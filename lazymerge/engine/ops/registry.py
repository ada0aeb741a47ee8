"""The registry itself: `@op` declares an op once (attributes, function, scratch, one line of doc); `run_task`
runs a task through it; `describe` renders it for docs/DESIGN.md."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import torch

from .. import lazy
from ..context import RunContext

Tensor = torch.Tensor


class Attrs:
    """Base of every op's attributes; `op` is the registered name (set by `@op`)."""

    op: ClassVar[str] = ""


OpFn = Callable[[RunContext, list[Any], Any, tuple[bool, ...]], Any]


@dataclass(frozen=True)
class OpSpec:
    name: str
    attrs: type                  # the frozen dataclass of the task's attributes
    run: OpFn
    scratch: float | Callable[[Any], float]   # temporaries, in float32 blocks of the task's row block (or a
                                              # function of the attributes whose docstring says how)
    doc: str                     # one line: what it computes
    lazy: bool = False           # takes the lazy values of engine/lazy.py itself (else they come materialized)

    def scratch_blocks(self, attrs: Any) -> float:
        return self.scratch(attrs) if callable(self.scratch) else self.scratch


OPS: dict[str, OpSpec] = {}


def op(name: str, attrs: type, scratch: float | Callable[[Any], float], lazy: bool = False
       ) -> Callable[[OpFn], OpFn]:
    """Register `fn` as op `name` with attributes `attrs`; `lazy`: it handles engine/lazy.py's values itself."""

    def deco(fn: OpFn) -> OpFn:
        if name in OPS:
            raise AssertionError(f"op {name!r} registered twice")
        attrs.op = name
        OPS[name] = OpSpec(name, attrs, fn, scratch, (attrs.__doc__ or "").strip().splitlines()[0], lazy)
        return fn

    return deco


def eager(ins: list[Any], own: tuple[bool, ...]) -> tuple[list[Any], tuple[bool, ...]]:
    """The inputs with every lazy value (engine/lazy.py) computed as a fresh float32 block, which is then ours."""
    if not any(lazy.is_lazy(x) for x in ins):
        return ins, own
    return [lazy.materialize(x) for x in ins], tuple(o or lazy.is_lazy(x) for x, o in zip(ins, own))


def run_task(ctx: RunContext, attrs: Attrs, ins: list[Any], own: tuple[bool, ...]) -> Any:
    spec = OPS[attrs.op]
    if not spec.lazy:
        ins, own = eager(ins, own)
    return spec.run(ctx, ins, attrs, own)


def describe() -> str:
    """The registry as a Markdown table (docs/DESIGN.md embeds it; a test keeps the two equal)."""
    lines = ["| op | attributes | scratch | what it computes |", "| --- | --- | --- | --- |"]
    for s in OPS.values():
        fields = ", ".join(f"`{f}`" for f in s.attrs.__dataclass_fields__) or "-"
        doc = s.doc.replace("|", "\\|")
        scratch = (s.scratch.__doc__ or "").strip() if callable(s.scratch) else f"{s.scratch:g}"
        lines.append(f"| `{s.name}` | {fields} | {scratch} | {doc} |")
    return "\n".join(lines)
