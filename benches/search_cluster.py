#!/usr/bin/env python
"""Search trials per hour with 1 vs 2 Dask workers (`lazymerge search --cluster local:1` vs `local:2`), one run.

    python benches/search_cluster.py                      # 8 trials each, the tests' tiny word-level llama

Models: the tests' generator (tests/evalkit.py: a tiny llama, two fine-tunes of it, eval text sampled from one),
with enough eval tokens that one trial takes seconds. Each configuration searches the same space into a fresh
study with the same seed; the clock runs from the search call to its return, on a LocalCluster that is already
started and whose workers have imported lazymerge (startup is a fixed cost, not a per-trial one). Each worker is a
process with one thread (torch intra-op threads 1). The completed trials' values are checked against each other
where the two searches tried the same values (the first proposal of a seeded sampler is the same in both).
Results go to benches/results/search-cluster-<timestamp>/results.{md,json}.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
sys.path.insert(0, str(HERE))

from run import git_head, log  # noqa: E402


def _warm() -> None:
    import torch

    torch.set_num_threads(1)
    import lazymerge.evaluate.runner  # noqa: F401


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trials", type=int, default=8)
    ap.add_argument("--docs", type=int, default=128, help="eval documents of 127 words sampled from ft1")
    ap.add_argument("--max-tokens", type=int, default=16000, help="eval tokens per trial (sets a trial's cost)")
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--memory", default="1MiB", help="--memory of each trial")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)

    import distributed
    import torch

    import lazymerge
    from evalkit import make_search_set

    torch.set_num_threads(1)
    out = args.out or HERE / "results" / f"search-cluster-{time.strftime('%Y%m%d-%H%M')}"
    out.mkdir(parents=True, exist_ok=True)
    runs: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        s = make_search_set(Path(tmp), n_docs=args.docs)
        recipe, data, root = s["recipe"], s["data"], s["root"]
        space = ["models[0].parameters.weight=0..1", "models[1].parameters.weight=0..1"]
        for n in (1, 2):
            with distributed.LocalCluster(n_workers=n, threads_per_worker=1, processes=True, dashboard_address=":0",
                                          silence_logs=40) as cluster, distributed.Client(cluster) as client:
                client.run(_warm)
                t0 = time.perf_counter()
                report = lazymerge.search(recipe, data, space, trials=args.trials, seed=0, study=root / f"s{n}.db",
                                          memory=args.memory, seq_len=args.seq_len, max_tokens=args.max_tokens,
                                          best_file=None, cluster=client)
                wall = time.perf_counter() - t0
            done = [t for t in report.trials if t.state == "COMPLETE"]
            runs[f"{n} worker{'s' if n > 1 else ''}"] = {
                "workers": n, "trials": len(done), "wall_s": wall, "trials_per_hour": len(done) / wall * 3600,
                "best_perplexity": report.best_perplexity,
                "trials_detail": [{"number": t.number, "params": t.params, "nll": t.nll} for t in done]}
            log(f"{n} worker(s): {len(done)} trials in {wall:.1f} s")
    one, two = runs["1 worker"], runs["2 workers"]
    first = [{tuple(sorted(t["params"].items())): t["nll"] for t in r["trials_detail"]} for r in (one, two)]
    shared = set(first[0]) & set(first[1])
    same_values = all(first[0][k] == first[1][k] for k in shared)
    ratio = two["trials_per_hour"] / one["trials_per_hour"]
    results = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform()}, "commit": git_head(),
               "settings": vars(args) | {"out": str(out)}, "runs": runs, "ratio_2_over_1": ratio,
               "candidates_tried_by_both": len(shared), "same_values_for_same_candidates": same_values}
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str))
    lines = ["# lazymerge search --cluster: trials per hour, 1 vs 2 workers (LocalCluster)", "",
             f"{time.strftime('%Y-%m-%d %H:%M')} · {os.cpu_count()} CPUs (shared with other work) · commit "
             f"`{results['commit']}` · tiny llama, up to {args.max_tokens} eval tokens/trial, seq-len {args.seq_len}", "",
             "| workers | completed trials | wall s | trials/hour |", "|---:|---:|---:|---:|"]
    for r in runs.values():
        lines.append(f"| {r['workers']} | {r['trials']} | {r['wall_s']:.1f} | {r['trials_per_hour']:.0f} |")
    lines += ["", f"**2 workers / 1 worker: {ratio:.2f}x trials per hour**; candidates both searches tried: "
              f"{len(shared)}, same values: **{same_values}**", ""]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0 if same_values and all(r["trials"] == args.trials for r in runs.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
