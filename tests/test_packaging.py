"""pyproject.toml says what lazymerge needs, no more and no less.

The declared dependencies are the third-party packages the package imports (walked from its source; numpy is the
one exception, listed with its reason: `Tensor.numpy()` needs it); an import inside a function of an optional
feature belongs to an extra; torch has a lower bound only, so installing lazymerge never downgrades a newer torch.
"""
from __future__ import annotations

import ast
import re
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
IMPORT_TO_DIST = {"yaml": "pyyaml", "distributed": "dask"}      # distributed: through dask[distributed]
NOT_IMPORTED_BUT_NEEDED = {"numpy"}          # torch's Tensor.numpy() (io/writer.py)


def dist(requirement: str) -> str:
    return re.split(r"[<>=!~\[; ]", requirement, maxsplit=1)[0].lower()


def third_party_imports() -> tuple[set[str], set[str]]:
    """(imported at module level, imported only inside functions) third-party top-level names."""
    top, inner = set(), set()
    for path in (ROOT / "lazymerge").rglob("*.py"):
        tree = ast.parse(path.read_text())
        module_level = {id(n) for n in tree.body}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                names = [node.module]
            else:
                continue
            for n in names:
                root = n.split(".")[0]
                if root in sys.stdlib_module_names or root == "lazymerge":
                    continue
                (top if id(node) in module_level else inner).add(IMPORT_TO_DIST.get(root, root))
    return top, inner - top


def test_dependencies_are_the_imported_packages():
    top, _ = third_party_imports()
    declared = {dist(r) for r in PROJECT["dependencies"]}
    assert declared == top | NOT_IMPORTED_BUT_NEEDED, (
        f"declared but not imported: {sorted(declared - top - NOT_IMPORTED_BUT_NEEDED)}; "
        f"imported but not declared: {sorted(top - declared)}")


def test_function_level_imports_are_in_an_extra():
    _, inner = third_party_imports()
    extras = {dist(r) for reqs in PROJECT["optional-dependencies"].values() for r in reqs}
    declared = {dist(r) for r in PROJECT["dependencies"]}
    assert inner <= extras | declared, f"optional imports in no extra: {sorted(inner - extras - declared)}"
    test = {dist(r) for r in PROJECT["optional-dependencies"]["test"]}
    features = {dist(r) for name, reqs in PROJECT["optional-dependencies"].items() if name not in ("test", "bench")
                for r in reqs}
    assert features <= test, f"the test extra lacks {sorted(features - test)}: CI would not exercise them"


def test_torch_has_no_upper_pin():
    torch_req = next(r for r in PROJECT["dependencies"] if dist(r) == "torch")
    assert ">=" in torch_req and not re.search(r"<|==|~=", torch_req), torch_req


def test_requires_python_is_true():
    # hashlib.file_digest (io/writer.py) is 3.11+
    assert PROJECT["requires-python"].replace(" ", "") == ">=3.11"
    assert "file_digest" in (ROOT / "lazymerge" / "io" / "writer.py").read_text()
