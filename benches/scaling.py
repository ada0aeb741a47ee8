"""Core scaling: the same lazymerge run pinned to 1 core, then to 2 (or any `taskset` CPU lists), side by side.

    python benches/scaling.py --preset 1b --method ties --memory 768MiB --cpus 0 0,1 --workdir /work/bench-data

Each run: cold page cache where permitted (root), `taskset -c CPUS lazymerge run ...`, measured like benches/run.py
(benches/measure.py: the command's own wait4 CPU seconds, /proc io read bytes, wall until the output is fsynced).
lazymerge sees the pinned set (`os.sched_getaffinity`) and picks its workers and kernel threads from it, so this
shows what the machine's cores buy. Writes `<out>/scaling.md` and `scaling.json`.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from measure import drop_caches, fmt_bytes, fsync_tree, measure  # noqa: E402
from recipes import recipe, write_recipe  # noqa: E402
from run import LAZYMERGE_SNIPPET, child_env, ensure_checkpoints  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--method", default="ties")
    ap.add_argument("--memory", default="768MiB")
    ap.add_argument("--cpus", nargs="+", default=["0", "0,1"], help="taskset CPU lists, one run each")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", type=Path, default=HERE / ".work")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    base, tunes, _ = ensure_checkpoints(args.preset, args.seed, args.workdir)
    out = args.out or HERE / "results" / f"scaling-{args.preset}-{time.strftime('%Y%m%d-%H%M')}"
    (out / "logs").mkdir(parents=True, exist_ok=True)
    recipe_path = out / f"{args.method}.yaml"
    write_recipe(recipe(args.method, base, tunes), recipe_path)
    merged = args.workdir / "scaling-out"
    rows = []
    for cpus in args.cpus:
        shutil.rmtree(merged, ignore_errors=True)
        cold = drop_caches()
        cmd = ["taskset", "-c", cpus, sys.executable, "-c", LAZYMERGE_SNIPPET, "run", str(recipe_path), str(merged),
               "--memory", args.memory, "--seed", str(args.seed), "--overwrite", "--quiet"]
        r = measure(cmd, log_prefix=out / "logs" / f"cpus-{cpus.replace(',', '_')}", env=child_env("lazymerge"))
        r["wall_s"] += fsync_tree(merged) if merged.exists() else 0.0
        r.pop("_trace", None)
        r.update(cpus=cpus, cold_cache=cold)
        rows.append(r)
        print(f"cpus {cpus}: exit {r['exit_code']}, wall {r['wall_s']:.1f} s, cpu {r['cpu_s']:.1f} s", flush=True)
    shutil.rmtree(merged, ignore_errors=True)
    base = rows[0]["wall_s"]
    lines = [f"# core scaling: `{args.method}` on `{args.preset}`, `--memory {args.memory}`", "",
             "| taskset -c | cold cache | status | wall s | speed-up | CPU s | read | peak RSS |",
             "|---|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        io = r["io"] or {}
        lines.append(f"| {r['cpus']} | {'yes' if r['cold_cache'] else 'no'} | "
                     f"{'ok' if r['exit_code'] == 0 else 'exit ' + str(r['exit_code'])} | {r['wall_s']:.1f} | "
                     f"{base / r['wall_s']:.2f} | {r['cpu_s']:.1f} | {fmt_bytes(io.get('read_bytes', 0))} | "
                     f"{fmt_bytes(r['peak_rss_bytes'])} |")
    (out / "scaling.md").write_text("\n".join(lines) + "\n")
    (out / "scaling.json").write_text(json.dumps(rows, indent=1, default=str))
    print("\n".join(lines))
    return 0 if all(r["exit_code"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
