"""How long `lazymerge demo` (the README's first command) takes on this machine: its bound is under a minute.

    python benches/demo_time.py [--runs 3] [--out benches/results/demo-<timestamp>.json]

Each run is `python -m lazymerge.cli demo --dir <fresh temp dir>` in its own subprocess, measured by
benches/measure.py (wall and CPU seconds, peak RSS from the kernel). The claim is checked here, not in
tests/test_demo.py: a test must not depend on how fast the machine is (that test checks what the demo prints and
writes, with a timeout that only catches a hang). Run it quiet (`/work/notes/bin/cpu-quiet`) for numbers to report.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from measure import measure  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
BOUND_S = 60.0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--out", type=Path, default=REPO / "benches" / "results" / f"demo-{time.strftime('%Y%m%d-%H%M')}.json")
    args = ap.parse_args(argv)
    runs = []
    for i in range(args.runs):
        with tempfile.TemporaryDirectory() as tmp:
            res = measure([sys.executable, "-m", "lazymerge.cli", "demo", "--dir", tmp], cwd=REPO,
                          log_prefix=Path(tmp) / "demo", timeout=10 * BOUND_S)
        if res["exit_code"] != 0:
            print(f"run {i}: exit {res['exit_code']}\n{res['stderr_tail']}", file=sys.stderr)
            return 1
        runs.append({k: res[k] for k in ("wall_s", "cpu_s", "peak_rss_bytes")})
        print(f"run {i}: {res['wall_s']:.1f} s wall, {res['cpu_s']:.1f} s CPU, peak RSS {res['peak_rss_bytes'] >> 20} MiB")
    worst = max(r["wall_s"] for r in runs)
    summary = {"runs": runs, "median_wall_s": statistics.median(r["wall_s"] for r in runs), "worst_wall_s": worst,
               "bound_s": BOUND_S, "within_bound": worst < BOUND_S}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=1) + "\n")
    print(f"worst {worst:.1f} s: {'under' if worst < BOUND_S else 'OVER'} the {BOUND_S:.0f} s bound ({args.out})")
    return 0 if worst < BOUND_S else 1


if __name__ == "__main__":
    sys.exit(main())
