#!/usr/bin/env python
"""lm-eval tasks on lazymerge's layer-streaming model against lm-eval's `hf` model and accelerate disk offload,
side by side in one run (issue "Judge a merge the way the leaderboards do").

    python benches/lmeval_bench.py --model /work/scratch/lmeval/smollm2 --name smollm2 [--mc 100] [--gen 32]

Tasks (benches/lmeval_tasks.py, local text): `text_mc` (multiple choice) and `text_ppl` (rolling loglikelihood)
for the loglikelihood runs, `text_gen` (32 prompts, greedy) for generation. Each run is its own process
(benches/lmeval_run.py through benches/launch.py: its own peak RSS):

| run | what |
|---|---|
| hf | lm-eval's `hf` model, float32, whole model in memory |
| lazymerge@F | `LazyMergeLM` with --memory F x the model's size on disk (a sweep: the plot) and the default budget |
| offload@F | `hf` on accelerate's `device_map="auto"`, `max_memory={"cpu": F x size}`, `offload_folder` |

and the same for `text_gen` at the full and the quarter budget. Every lazymerge run is checked against `hf`:
loglikelihoods (relative difference), is_greedy and generations. Writes OUT/results.json, OUT/results.md,
OUT/wall_vs_budget.png and OUT/commands.txt.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
LL_TASKS = "text_mc,text_ppl"


def log(msg: str) -> None:
    print(f"[lmeval-bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def model_size(model: Path) -> int:
    return sum(p.stat().st_size for p in model.glob("*.safetensors"))


def fmt(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def run(out: Path, name: str, kind: str, model: Path, task_dir: Path, tasks: str, memory: int | None,
        batch: int, commands: list[str]) -> dict:
    res_file = out / f"{name}.json"
    ru_file = out / f"{name}.rusage.json"
    cmd = [sys.executable, str(HERE / "lmeval_run.py"), kind, str(model), str(task_dir), tasks, str(res_file),
           "--batch-size", str(batch)] + (["--memory", str(memory)] if memory is not None else [])
    full = [sys.executable, str(HERE / "launch.py"), str(ru_file), "--", *cmd]
    commands.append(" ".join(cmd))
    log(f"{name}: {kind} memory={fmt(memory) if memory else 'default'} tasks={tasks}")
    t0 = time.perf_counter()
    proc = subprocess.run(full, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    rec = {"name": name, "kind": kind, "tasks": tasks, "memory": memory, "exit_code": proc.returncode,
           "process_wall_s": time.perf_counter() - t0}
    if proc.returncode != 0 or not res_file.exists():
        rec["stderr_tail"] = proc.stderr[-2000:]
        log(f"{name}: FAILED ({proc.returncode}): {proc.stderr[-400:]}")
        return rec
    data = json.loads(res_file.read_text())
    rec.update({k: data[k] for k in ("setup_s", "eval_s", "wall_s", "generated_tokens", "results", "lazymerge")})
    rec["samples"] = data["samples"]
    rec["peak_rss"] = json.loads(ru_file.read_text())["ru_maxrss_kib"] * 1024
    log(f"{name}: wall {rec['wall_s']:.1f} s, peak RSS {fmt(rec['peak_rss'])}")
    return rec


def agreement(ref: dict, rec: dict) -> dict:
    """Against hf: largest relative loglikelihood difference, is_greedy and generation mismatches."""
    worst, greedy, gens, n = 0.0, 0, 0, 0
    for task, ref_samples in ref.get("samples", {}).items():
        for a, b in zip(ref_samples, rec.get("samples", {}).get(task, [])):
            for x, y in zip(a, b):
                n += 1
                if isinstance(x, str):
                    gens += x != y
                elif isinstance(x, list):
                    worst = max(worst, abs(x[0] - y[0]) / max(abs(x[0]), 1e-30))
                    greedy += bool(x[1]) != bool(y[1])
                else:
                    worst = max(worst, abs(x - y) / max(abs(x), 1e-30))
    return {"compared": n, "max_rel_diff": worst, "greedy_mismatches": greedy, "generation_mismatches": gens}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--name", required=True)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--mc", type=int, default=100, help="text_mc documents (4 requests each)")
    ap.add_argument("--ppl", type=int, default=4, help="text_ppl documents")
    ap.add_argument("--gen", type=int, default=32, help="text_gen prompts")
    ap.add_argument("--max-gen-toks", type=int, default=32)
    ap.add_argument("--sweep", default="0.125,0.25,0.5,1,2,4", help="budgets, as fractions of the model's size")
    ap.add_argument("--batch-size", type=int, default=16, help="hf/offload batch size (lazymerge: its default)")
    ap.add_argument("--skip", default="", help="comma-separated run names to skip")
    a = ap.parse_args()

    sys.path.insert(0, str(HERE))
    from lmeval_tasks import write as write_tasks

    out = a.out or HERE / "results" / f"lmeval-{a.name}-{time.strftime('%Y%m%d-%H%M')}"
    out.mkdir(parents=True, exist_ok=True)
    task_dir = write_tasks(out / "tasks", mc=a.mc, ppl=a.ppl, gen=a.gen, max_gen_toks=a.max_gen_toks)
    size = model_size(a.model)
    quarter = size // 4
    full = 4 * size                      # float32 weights (2x a bf16 checkpoint) and room for KV caches
    skip = set(filter(None, a.skip.split(",")))
    commands: list[str] = []
    runs: list[dict] = []

    def go(name: str, kind: str, tasks: str, memory: int | None) -> None:
        if name not in skip:
            runs.append(run(out, name, kind, a.model, task_dir, tasks, memory, a.batch_size, commands))

    go("hf", "hf", LL_TASKS, None)
    for f in [float(x) for x in a.sweep.split(",")]:
        go(f"lazymerge@{f:g}", "lazymerge", LL_TASKS, int(size * f))
    go("lazymerge@default", "lazymerge", LL_TASKS, None)
    go("offload@0.25", "offload", LL_TASKS, quarter)
    go("gen-hf", "hf", "text_gen", None)
    go("gen-lazymerge@4", "lazymerge", "text_gen", full)
    go("gen-lazymerge@0.25", "lazymerge", "text_gen", quarter)
    go("gen-offload@0.25", "offload", "text_gen", quarter)

    by = {r["name"]: r for r in runs}
    for r in runs:
        ref = by.get("gen-hf" if r["tasks"] == "text_gen" else "hf")
        if r["kind"] != "hf" and ref is not None and "samples" in ref and "samples" in r:
            r["agreement"] = agreement(ref, r)
    results = {"model": str(a.model), "name": a.name, "model_bytes": size, "threads": os.cpu_count(),
               "date": time.strftime("%Y-%m-%d %H:%M"), "runs": [{k: v for k, v in r.items() if k != "samples"}
                                                                 for r in runs],
               "targets": targets(by, size)}
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str))
    (out / "commands.txt").write_text("\n".join(commands) + "\n")
    (out / "results.md").write_text(markdown(results))
    plot(results, out / "wall_vs_budget.png")
    print(markdown(results))


def targets(by: dict, size: int) -> list[dict]:
    out = []

    def ratio(a: str, b: str) -> float | None:
        if a in by and b in by and "wall_s" in by[a] and "wall_s" in by[b]:
            return by[a]["wall_s"] / by[b]["wall_s"]
        return None

    def add(target: str, value: float | None, ok: bool | None) -> None:
        out.append({"target": target, "value": value, "met": ok})

    full = [n for n in ("lazymerge@1", "lazymerge@2", "lazymerge@4", "lazymerge@default") if n in by]
    for n in full:
        r = ratio(n, "hf")
        add(f"{n} wall <= 1.1x hf", r, None if r is None else r <= 1.1)
    r = ratio("lazymerge@0.25", "hf")
    add("lazymerge@0.25 wall <= 1.5x hf", r, None if r is None else r <= 1.5)
    r = ratio("offload@0.25", "lazymerge@0.25")
    add("offload@0.25 wall >= 5x lazymerge@0.25", r, None if r is None else r >= 5)
    sweep = sorted((rr["memory"], rr["wall_s"]) for n, rr in by.items()
                   if n.startswith("lazymerge@") and rr.get("memory") and "wall_s" in rr)
    worst = max((w2 / w1 for (m1, w1), (m2, w2) in zip(sweep, sweep[1:])), default=None)
    add("a larger budget is never slower (largest wall ratio, next budget / previous; noise ~5%)", worst,
        None if worst is None else worst <= 1.05)
    for n, rr in by.items():
        rep = rr.get("lazymerge") or {}
        if rep.get("budget") and "peak_rss" in rr:
            over = rr["peak_rss"] - rep["start_rss"] - rep["budget"] - rep["activation_bytes"]
            add(f"{n}: peak RSS - RSS at start <= budget + activations (excess, bytes)", over, over <= 0)
    return out


def markdown(results: dict) -> str:
    L = [f"# lm-eval tasks on lazymerge: {results['name']}", "",
         f"Model `{results['model']}` ({fmt(results['model_bytes'])} on disk), {results['date']}, "
         f"{results['threads']} cores. Wall = model set-up + evaluation in the run's own process (imports "
         "excluded). Peak RSS: the process's own (wait4).", "",
         "| run | tasks | --memory | wall s | set-up s | peak RSS | tokens/s | max rel diff vs hf "
         "| greedy / gen mismatches |",
         "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results["runs"]:
        if "wall_s" not in r:
            L.append(f"| {r['name']} | {r['tasks']} | {fmt(r['memory']) if r['memory'] else '-'} | failed | | | | | |")
            continue
        ag = r.get("agreement") or {}
        tps = (f"{r['generated_tokens'] / r['wall_s']:.1f}" if r.get("generated_tokens") else "")
        mm = f"{ag['greedy_mismatches']} / {ag['generation_mismatches']}" if ag else ""
        L.append(f"| {r['name']} | {r['tasks']} | {fmt(r['memory']) if r['memory'] else 'default'} | "
                 f"{r['wall_s']:.1f} | {r['setup_s']:.1f} | {fmt(r['peak_rss'])} | {tps} | "
                 f"{ag.get('max_rel_diff', 0):.1e} | {mm} |")
    L += ["", "| target | value | met |", "|---|---:|---|"]
    for t in results["targets"]:
        v = t["value"]
        L.append(f"| {t['target']} | {'-' if v is None else f'{v:.3g}'} | "
                 f"{'-' if t['met'] is None else 'yes' if t['met'] else '**no**'} |")
    return "\n".join(L) + "\n"


def plot(results: dict, path: Path) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib missing: no plot")
        return
    runs = {r["name"]: r for r in results["runs"] if "wall_s" in r}
    pts = sorted((r["memory"], r["wall_s"]) for n, r in runs.items() if n.startswith("lazymerge@") and r["memory"])
    fig, ax = plt.subplots(figsize=(7, 4))
    if pts:
        ax.plot([p[0] / 2**20 for p in pts], [p[1] for p in pts], "o-", label="lazymerge --memory")
    for name, style in (("hf", "--"), ("lazymerge@default", ":")):
        if name in runs:
            ax.axhline(runs[name]["wall_s"], linestyle=style, color="gray" if name == "hf" else "green",
                       label=f"{name} ({runs[name]['wall_s']:.0f} s)")
    if "offload@0.25" in runs:
        r = runs["offload@0.25"]
        ax.plot([r["memory"] / 2**20], [r["wall_s"]], "rx", markersize=10, label="accelerate offload")
    ax.set_xscale("log")
    ax.set_xlabel("budget (MiB)")
    ax.set_ylabel("wall (s)")
    ax.set_title(f"{results['name']}: {LL_TASKS} wall time against budget")
    ax.axvline(results["model_bytes"] / 2**20, color="black", linewidth=0.5)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
