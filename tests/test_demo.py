"""`lazymerge demo`: the README's first command works on a fresh machine and prints the report. (How long it takes,
under a minute, is benches/demo_time.py's to measure: the timeout here only catches a hang.)"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def test_demo_merges_and_reports(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "lazymerge.cli", "demo", "--dir", str(tmp_path)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    for word in ("merged", "wall time", "peak RSS", "read", "written", "tasks"):
        assert word in proc.stdout, word
    out = tmp_path / "merged-ties"
    report = json.loads((out / "lazymerge_report.json").read_text())
    assert report["method"] == "ties" and report["tensors"] > 0 and report["bytes_written"] > 0
    assert report["blocked_tensors"] > 0           # the demo budget is small enough to exercise row blocks
    assert report["peak_live_bytes"] <= report["budget"] * 1.05
    assert (out / "config.json").exists() and (out / "lazymerge_recipe.yaml").exists()
