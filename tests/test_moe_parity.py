"""MoE parity with mergekit-moe 0.1.5: router weights (cheap_embed within 1e-6, hidden within 1e-4) and every
copied tensor (bit for bit) against its outputs stored in tests/data/moe_parity (made by benches/moe_parity.py
from the same seeded tiny models, which the test regenerates)."""
from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "benches"))
sys.path.insert(0, str(HERE))

from conftest import read_all  # noqa: E402

import lazymerge  # noqa: E402

CASES = sorted(p.stem for p in (HERE / "data" / "moe_parity").glob("*.json"))
TOL = {"cheap_embed": 1e-6, "hidden": 1e-4}


@pytest.mark.parametrize("case", CASES)
def test_moe_matches_mergekit(case: str, tmp_path: Path) -> None:
    import moe_parity as mp

    expected = json.loads((HERE / "data" / "moe_parity" / f"{case}.json").read_text())
    paths = mp.make_inputs(tmp_path / "models", expected["kind"])
    got_inputs = mp.input_hashes(paths)
    assert got_inputs == expected["inputs"], "generated inputs changed: re-run benches/moe_parity.py"
    cfg = mp.recipe({"config": expected["config"]}, paths)
    report = lazymerge.merge(cfg, tmp_path / "out", memory="unlimited")
    assert report.tensors == len(expected["dtypes"])
    out = read_all(tmp_path / "out")
    assert set(out) == set(expected["dtypes"])
    tol = TOL[expected["config"]["gate_mode"]]
    for name, values in expected["routers"].items():
        want = torch.tensor(values)
        assert str(out[name].dtype).removeprefix("torch.") == expected["dtypes"][name]
        diff = (out[name].float() - want).abs().max().item()
        assert diff <= tol, f"{name}: max abs diff {diff} > {tol}"
    for name, digest in expected["sha256"].items():
        assert str(out[name].dtype).removeprefix("torch.") == expected["dtypes"][name], name
        assert hashlib.sha256(out[name].float().contiguous().numpy().tobytes()).hexdigest() == digest, name
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    for key, value in expected["mergekit_config"].items():
        assert config.get(key) == value, key
