"""The package's imports keep its stated flow (docs/DESIGN.md): recipe -> planner -> engine -> io.

Walks every module's imports from its source (`ast`: module-level *and* function-level imports, relative ones
resolved) and fails on
- an upward edge: io importing the engine or the planner (or anything above them), the engine importing the
  planner;
- an import circle between modules, wherever the imports sit (a function-level import that only hides a circle
  is still a circle);
and on a function over 80 lines whose docstring does not say why.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "lazymerge"

# lower number = lower layer; a module may import its own layer and the ones below
LAYERS = {
    "lazymerge.errors": 0, "lazymerge.dtypes": 0, "lazymerge.units": 0, "lazymerge.shapes": 0, "lazymerge._version": 0,
    "lazymerge.memory": 0, "lazymerge.testhold": 0,
    "lazymerge.io": 1,
    "lazymerge.engine": 2,
    "lazymerge.planner": 3,
}
TOP = 4  # api, cli, convert, demo, extract, fisher, synth, the consumer packages (cluster, evaluate, moe)
CHECKED = 2  # layers whose imports must not go up: bottom modules, io, engine (the planner is a consumer too)

# Circles or long functions that came with other branches would be listed here, so that no new one can appear
# unnoticed; the test fails when a listed one disappears, so that it is then removed from the list. Both are empty:
# the MoE planner describes routers and `lazymerge.moe.routers` computes them; `search` merges through
# `lazymerge.merging`, below the API.
KNOWN_CIRCLES: set[frozenset[str]] = set()
KNOWN_LONG: set[str] = set()


def module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def layer(module: str) -> int:
    for prefix, n in LAYERS.items():
        if module == prefix or module.startswith(prefix + "."):
            return n
    return TOP


def imports(path: Path) -> set[str]:
    return imports_of(path.read_text(), module_name(path), path.name == "__init__.py")


def imports_of(source: str, me: str, is_package: bool = False) -> set[str]:
    """The lazymerge modules module `me` imports (`from x import y` counts as x.y when x.y is a module, else x)."""
    package = me if is_package else me.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            names = [f"{mod}.{a.name}" if _is_module(f"{mod}.{a.name}") else mod for a in node.names]
        else:
            continue
        out |= {n for n in names if n == "lazymerge" or n.startswith("lazymerge.")}
    out.discard(me)
    return out


def _is_module(name: str) -> bool:
    p = PKG.parent.joinpath(*name.split("."))
    return p.with_suffix(".py").is_file() or (p / "__init__.py").is_file()


def graph() -> dict[str, set[str]]:
    return {module_name(p): imports(p) for p in sorted(PKG.rglob("*.py"))}


def test_walk_finds_the_package():
    g = graph()
    assert {"lazymerge.io.shards", "lazymerge.engine.ops", "lazymerge.planner.plan"} <= set(g)
    assert "lazymerge.engine.kernels" in g["lazymerge.engine.ops"]          # relative imports are resolved


def test_no_upward_imports():
    bad = [f"{mod} (layer {layer(mod)}) imports {dep} (layer {layer(dep)})"
           for mod, deps in graph().items() for dep in sorted(deps)
           if layer(dep) > layer(mod) and layer(mod) <= CHECKED]
    assert not bad, "imports against the flow recipe -> planner -> engine -> io:\n  " + "\n  ".join(bad)


def test_no_import_circles():
    import networkx as nx

    g = graph()
    edges = nx.DiGraph([(m, d) for m, deps in g.items() for d in deps if d in g])
    cycles = {frozenset(c) for c in nx.simple_cycles(edges)}
    new = [" -> ".join(sorted(c)) for c in cycles - KNOWN_CIRCLES]
    assert not new, "import circles:\n  " + "\n  ".join(new)
    gone = [" -> ".join(sorted(c)) for c in KNOWN_CIRCLES - cycles]
    assert not gone, "known circles that no longer exist (remove them from KNOWN_CIRCLES):\n  " + "\n  ".join(gone)


@pytest.mark.parametrize("me, dep", [("lazymerge.io.x", "from ..engine import kernels"),
                                     ("lazymerge.engine.x", "from lazymerge.planner.vocab import plan_vocab"),
                                     ("lazymerge.engine.x", "import lazymerge.planner.plan")])
def test_the_walk_sees_a_function_level_upward_import(me, dep):
    """The check itself: an upward import hidden in a function is found."""
    found = imports_of(f"def g():\n    {dep}\n", me)
    assert any(layer(d) > layer(me) for d in found), found


MAX_FUNCTION_LINES = 80


def test_no_long_functions():
    """One job per function: none over 80 lines unless its docstring says why ("Long because ...")."""
    long, known = [], set()
    for path in sorted(PKG.rglob("*.py")):
        tree = ast.parse(path.read_text())
        owner = {id(f): c.name for c in ast.walk(tree) if isinstance(c, ast.ClassDef) for f in c.body}
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                name = f"{path.relative_to(PKG.parent)}:" + ".".join(filter(None, (owner.get(id(node)), node.name)))
                if n > MAX_FUNCTION_LINES and "Long because" not in (ast.get_docstring(node) or ""):
                    (known.add(name) if name in KNOWN_LONG else long.append(f"{name} ({n} lines)"))
    assert not long, "functions over 80 lines without a reason in their docstring:\n  " + "\n  ".join(long)
    assert known == KNOWN_LONG, f"no longer long (remove from KNOWN_LONG): {sorted(KNOWN_LONG - known)}"
