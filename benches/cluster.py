#!/usr/bin/env python
"""The cost of the cluster path: the `1b` ties merge run locally and with `--cluster local:2`, in the same run.

    python benches/cluster.py --workdir /work/bench-data            # reuses /work/bench-data/1b-s0

Both runs are `lazymerge run` subprocesses (this working tree) on the same recipe and warm page cache (the input
files are read once before the first run, so neither pays for cold storage the other does not), with the same
total budget: `--memory M` locally, `--memory M/2` per worker on the cluster. The cluster run includes starting
the LocalCluster (2 worker processes, each importing torch) and every worker compiling the plan: the overhead a
user sees. The outputs are compared byte for byte (sha256 of every file but the report). Results go to
benches/results/cluster-<timestamp>/results.{md,json}.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import platform
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import measure as M  # noqa: E402
from recipes import recipe, write_recipe  # noqa: E402
from run import REPO, child_env, ensure_checkpoints, git_head, lazymerge_cmd, log  # noqa: E402


def digests(out: Path) -> dict[str, str]:
    res = {}
    for f in sorted(out.iterdir()):
        if f.name != "lazymerge_report.json":
            with open(f, "rb") as fh:
                res[f.name] = hashlib.file_digest(fh, "sha256").hexdigest()
    return res


def warm(paths: list[Path]) -> float:
    t0 = time.perf_counter()
    for d in paths:
        for f in sorted(d.glob("*.safetensors")):
            with open(f, "rb") as fh:
                while fh.read(1 << 24):
                    pass
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="1b")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", type=Path, default=HERE / ".work", help="cached checkpoints (<preset>-s<seed>)")
    ap.add_argument("--memory", default="2GiB", help="total budget: the local run's, split over the workers")
    ap.add_argument("--workers", type=int, default=2, help="LocalCluster worker processes")
    ap.add_argument("--shard-size", default="2GB")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--lazymerge-cmd", default=None)
    args = ap.parse_args(argv)

    base, tunes, info = ensure_checkpoints(args.preset, args.seed, args.workdir)
    out = args.out or HERE / "results" / f"cluster-{args.preset}-{time.strftime('%Y%m%d-%H%M')}"
    out.mkdir(parents=True, exist_ok=True)
    rec_path = write_recipe(recipe("ties", base, tunes), out / "ties.yaml")
    per_worker = M.parse_size(args.memory) // args.workers
    scratch = args.workdir / "cluster-bench-out"
    scratch.mkdir(exist_ok=True)
    log(f"warming the page cache: {warm([base, *tunes]):.1f} s")
    runs = {}
    for name, extra in (("local", ["--memory", args.memory]),
                        (f"cluster local:{args.workers}", ["--memory", str(per_worker), "--cluster",
                                                           f"local:{args.workers}"])):
        dest = scratch / name.replace(" ", "-").replace(":", "")
        cmd = [*lazymerge_cmd(args), "run", str(rec_path), str(dest), "--shard-size", args.shard_size, "--seed",
               str(args.seed), "--overwrite", "-q", *extra]
        log(f"{name}: {' '.join(cmd[3:])}")
        res = M.measure(cmd, log_prefix=out / name.replace(" ", "-").replace(":", ""), env=child_env("lazymerge"),
                        cwd=REPO, timeout=3600)
        res.pop("_trace", None)
        res["fsync_s"] = M.fsync_tree(dest) if dest.exists() else None
        res["report"] = json.loads((dest / "lazymerge_report.json").read_text()) if dest.exists() else None
        runs[name] = res
        log(f"{name}: exit {res['exit_code']}, {res['wall_s']:.1f} s")
    names = list(runs)
    a, b = (scratch / n.replace(" ", "-").replace(":", "") for n in names)
    identical = a.exists() and b.exists() and digests(a) == digests(b)
    ratio = runs[names[1]]["wall_s"] / runs[names[0]]["wall_s"]
    results = {"preset": args.preset, "inputs": info, "machine": {"cpus": __import__("os").cpu_count(),
               "platform": platform.platform()}, "commit": git_head(), "memory_total": args.memory,
               "memory_per_worker": per_worker, "runs": runs, "ratio_cluster_over_local": ratio,
               "bit_identical": identical}
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str))
    lines = [f"# lazymerge on a LocalCluster vs a local run: `{args.preset}` ties", "",
             f"{time.strftime('%Y-%m-%d %H:%M')} · {results['machine']['cpus']} CPUs · warm page cache · commit "
             f"`{results['commit']}`", "",
             "| run | --memory | wall s | CPU s (tree) | peak RSS (largest process) | exit |", "|---|---|---:|---:|---:|---|"]
    for n, r in runs.items():
        mem = args.memory if n == "local" else f"{M.fmt_bytes(per_worker)} per worker"
        lines.append(f"| {n} | {mem} | {r['wall_s']:.1f} | {r['cpu_s']:.1f} | {M.fmt_bytes(r['peak_rss_bytes'])} "
                     f"| {r['exit_code']} |")
    lines += ["", f"**cluster / local wall time: {ratio:.2f}x**; outputs bit-identical: **{identical}**", ""]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0 if identical and all(r["exit_code"] == 0 for r in runs.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
