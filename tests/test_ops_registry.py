"""The op registry (lazymerge/engine/ops/) is the one place the graph's vocabulary is declared.

Every op has typed, frozen attributes, a scratch estimate and a doc line; docs/DESIGN.md lists exactly the
registry; every task a plan holds carries attributes of its op's registered type.
"""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from lazymerge.engine import ops

DESIGN = Path(__file__).resolve().parents[1] / "docs" / "DESIGN.md"


@pytest.mark.parametrize("name", sorted(ops.OPS))
def test_op_is_declared_completely(name):
    spec = ops.OPS[name]
    assert dataclasses.is_dataclass(spec.attrs) and spec.attrs.__dataclass_params__.frozen, name
    assert issubclass(spec.attrs, ops.Attrs) and spec.attrs.op == name
    assert spec.doc and "\n" not in spec.doc
    assert callable(spec.scratch) or spec.scratch >= 0
    assert callable(spec.run)


def test_design_doc_lists_the_registry():
    text = DESIGN.read_text()
    m = re.search(r"<!-- ops:begin -->\n(.*?)\n<!-- ops:end -->", text, flags=re.S)
    assert m, "docs/DESIGN.md has no ops table between <!-- ops:begin --> and <!-- ops:end -->"
    assert m.group(1).strip() == ops.describe().strip(), (
        "docs/DESIGN.md's op table differs from the registry; paste lazymerge.engine.ops.describe() there")


def test_attributes_are_immutable():
    a = ops.Combine(weights=(0.5, 0.5), normalize=True, lam=1.0, elect=False)
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.lam = 2.0  # type: ignore[misc]
    assert a.op == "combine"


def test_a_name_cannot_be_registered_twice():
    @dataclasses.dataclass(frozen=True)
    class Again(ops.Attrs):
        """Twice."""

    with pytest.raises(AssertionError, match="registered twice"):
        ops.op("delta", Again, scratch=0.0)(lambda ctx, ins, a, own: None)


def test_every_task_of_a_plan_is_typed(models_fp32):
    import lazymerge

    recipe = {"merge_method": "breadcrumbs_ties", "base_model": str(models_fp32["base"]), "dtype": "float32",
              "parameters": {"rescale_norm": "l2"},
              "models": [{"model": str(models_fp32["ft1"]), "parameters": {"weight": 0.5, "density": 0.5}},
                         {"model": str(models_fp32["ft2"]), "parameters": {"weight": 0.5, "density": 0.5}}]}
    p = lazymerge.plan(recipe, memory=64 * 1024)
    try:
        seen = set()
        for t in p.tasks.tasks:
            assert isinstance(t.attrs, ops.OPS[t.op].attrs), (t.op, t.attrs)
            seen.add(t.op)
        assert {"topk_pass1", "topk_reduce1", "topk_pass2", "topk_reduce2", "trim_outliers", "norm",
                "norm_factor", "elect", "combine", "write"} <= seen
    finally:
        p.close()


def test_plan_graph_file_lists_typed_attributes(models_fp32, tmp_path):
    """`lazymerge plan --graph` writes each node's op and its attributes (the dataclass's fields) as JSON."""
    import json

    import yaml
    from click.testing import CliRunner

    from lazymerge.cli import main

    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({
        "merge_method": "dare_ties", "base_model": str(models_fp32["base"]),
        "models": [{"model": str(models_fp32["ft1"]), "parameters": {"weight": 0.5, "density": 0.5}}]}))
    res = CliRunner().invoke(main, ["plan", str(recipe), "--graph", str(tmp_path / "g.json")])
    assert res.exit_code == 0, res.output
    nodes = json.loads((tmp_path / "g.json").read_text())["nodes"]
    assert nodes
    for node in nodes:
        fields = set(ops.OPS[node["op"]].attrs.__dataclass_fields__) - {"seed_parts"}
        assert set(node["attrs"]) == fields, node
