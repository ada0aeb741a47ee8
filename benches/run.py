#!/usr/bin/env python
"""lazymerge benchmark harness: lazymerge vs the naive script vs mergekit vs the I/O floor, side by side.

    python benches/run.py --preset 1b --methods ties --memory 512MiB,2GiB --mergekit /tmp/mk/bin/mergekit-yaml
    python benches/run.py --preset 70b --plan-only

Synthetic Llama-shaped checkpoints (base + 2 fine-tunes, bf16, sharded) come from `lazymerge.synth` and are cached
under --workdir. Every measured run is its own subprocess, started on a cold page cache where permitted, optionally
under `memcap LIMIT` (a cgroup memory cap). See benches/README.md for what each column means.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import time
from dataclasses import asdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

import measure as M  # noqa: E402
from recipes import METHODS, input_models, recipe, write_recipe  # noqa: E402

MEMCAP_TOOL = "/work/shared/tools/memcap"
SHARD_SIZES = {"tiny": "100KB", "small": "4MB", "1b": "1GB", "7b": "5GB", "70b": "5GB"}
TOOLS = ("floor", "naive", "mergekit", "lazymerge")
RSS_SLACK = 300_000_000          # target: peak RSS <= budget + 300 MB

LAZYMERGE_SNIPPET = "import sys; from lazymerge.cli import main; sys.argv[0] = 'lazymerge'; sys.exit(main())"
PLAN_SNIPPET = r"""
import json, sys, time
t0 = time.perf_counter()
import lazymerge
t1 = time.perf_counter()
plan = lazymerge.plan(sys.argv[1], memory=sys.argv[2], shard_size=sys.argv[3])
t2 = time.perf_counter()
info = {"import_s": t1 - t0, "plan_s": t2 - t1}
g = getattr(plan, "graph", None)
if g is not None and hasattr(g, "number_of_nodes"):
    info["tasks"] = g.number_of_nodes()
try:
    plan.close()
except Exception:
    pass
print(json.dumps(info))
"""


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ------------------------------------------------------------------------------------------------ checkpoints
def ensure_checkpoints(preset: str, seed: int, workdir: Path, *, header_only: bool = False,
                       noise: float = 0.002) -> tuple[Path, list[Path], dict]:
    """base + 2 fine-tunes of `preset`, generated once and reused (a marker records preset, seed and layout)."""
    try:
        import torch
        from lazymerge.synth import PRESETS, make_checkpoint
    except ImportError as e:
        raise SystemExit(f"error: lazymerge.synth is not importable ({e}); it generates the benchmark checkpoints")
    if preset not in PRESETS:
        raise SystemExit(f"error: unknown preset {preset!r} (lazymerge.synth.PRESETS has {', '.join(PRESETS)})")
    shape = PRESETS[preset]
    shard = SHARD_SIZES.get(preset, "5GB")
    d = workdir / (f"{preset}-s{seed}" + ("-headers" if header_only else ""))
    want = {"preset": preset, "seed": seed, "shape": asdict(shape), "dtype": "bfloat16", "shard_size": shard,
            "noise": noise, "header_only": header_only}
    marker = d / "bench-marker.json"
    base, tunes = d / "base", [d / "ft1", d / "ft2"]
    if marker.exists() and json.loads(marker.read_text()) == want and all(p.exists() for p in [base, *tunes]):
        log(f"reusing checkpoints in {d}")
        return base, tunes, want
    if not header_only:
        from lazymerge.io.writer import OutTensor, plan_layout  # size estimate from the layout, before writing
        from lazymerge.synth import tensor_shapes
        from lazymerge.dtypes import dtype_code
        layout = plan_layout([OutTensor(n, s, dtype_code(torch.bfloat16)) for n, s in tensor_shapes(shape)],
                             M.parse_size(shard))
        need = 3 * sum(sh.size for sh in layout)
        d.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(d).free
        if need + 2 * need // 3 > free:            # inputs + room for one output
            raise SystemExit(f"error: {preset} needs ~{M.fmt_bytes(need)} for its checkpoints plus room for outputs; "
                             f"{M.fmt_bytes(free)} free under {d}")
    marker.unlink(missing_ok=True)
    t0 = time.perf_counter()
    log(f"generating {preset} checkpoints (seed {seed}{', header only' if header_only else ''}) in {d}")
    make_checkpoint(base, shape, seed=seed, dtype=torch.bfloat16, shard_size=shard, header_only=header_only,
                    overwrite=True)
    for i, t in enumerate(tunes, 1):
        make_checkpoint(t, shape, seed=seed + i, dtype=torch.bfloat16, shard_size=shard, base=None if header_only
                        else base, noise=noise, header_only=header_only, overwrite=True)
    marker.write_text(json.dumps(want, indent=2))
    log(f"generated in {time.perf_counter() - t0:.1f} s")
    return base, tunes, want


def ensure_layout(base: Path, tunes: list[Path], info: dict, layout: str) -> tuple[Path, list[Path], dict]:
    """The checkpoints in another layout, made once from the generated ones: `hf` = two shards per model written
    by safetensors' save_file in save_pretrained's way (benches/relayout.py); `lazymerge` = as generated."""
    if layout == "lazymerge":
        return base, tunes, info
    from relayout import relayout
    d = base.parent.with_name(base.parent.name + f"-{layout}")
    want = dict(info, layout=layout, shards=2)
    marker = d / "bench-marker.json"
    out = [d / p.name for p in [base, *tunes]]
    if marker.exists() and json.loads(marker.read_text()) == want and all(p.exists() for p in out):
        log(f"reusing {layout}-layout checkpoints in {d}")
        return out[0], out[1:], want
    t0 = time.perf_counter()
    log(f"writing the checkpoints in the {layout} layout (two shards each, save_file order) to {d}")
    d.mkdir(parents=True, exist_ok=True)
    marker.unlink(missing_ok=True)
    for src, dst in zip([base, *tunes], out):
        relayout(src, dst, shards=2)
    marker.write_text(json.dumps(want, indent=2))
    log(f"written in {time.perf_counter() - t0:.1f} s")
    return out[0], out[1:], want


def safetensors_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


# ------------------------------------------------------------------------------------------------ commands
def lazymerge_cmd(args) -> list[str]:
    if args.lazymerge_cmd:
        return args.lazymerge_cmd.split()
    return [sys.executable, "-c", LAZYMERGE_SNIPPET]     # this working tree's lazymerge (PYTHONPATH=repo)


def child_env(tool: str) -> dict:
    env = dict(os.environ)
    if tool == "mergekit":
        env.pop("PYTHONPATH", None)
        env.setdefault("HF_HUB_OFFLINE", "1")            # local paths only; never wait on the network
        env.setdefault("TRANSFORMERS_OFFLINE", "1")
    else:
        env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def lazymerge_usable(args) -> tuple[bool, str]:
    import subprocess
    try:
        r = subprocess.run([*lazymerge_cmd(args), "run", "--help"], capture_output=True, text=True, timeout=120,
                           env=child_env("lazymerge"), cwd=REPO)
    except (OSError, subprocess.TimeoutExpired) as e:
        return False, str(e)
    lines = (r.stderr or r.stdout).strip().splitlines()
    return r.returncode == 0, (lines[-1] if lines else f"exit {r.returncode}")


PREWARM = {"floor": "pass", "naive": "import torch, safetensors.torch, yaml",
           "lazymerge": "import torch, safetensors.torch, yaml\ntry:\n import lazymerge.cli\nexcept Exception:\n pass",
           "mergekit": "import mergekit.merge, mergekit.scripts.run_yaml"}


def prewarm(args, tool: str) -> float:
    """After dropping the page cache, import the tool's libraries once (its interpreter, torch, ...) so that the
    run measures cold *checkpoint data*, not re-reading torch's shared objects from disk. Reads no checkpoint."""
    import subprocess
    python = sys.executable
    if tool == "mergekit":
        first = Path(args.mergekit).read_bytes()[:512].split(b"\n")[0].decode(errors="replace")
        if first.startswith("#!") and "python" in first:
            python = first[2:].strip().split()[0]
    t0 = time.perf_counter()
    subprocess.run([python, "-c", PREWARM[tool]], env=child_env(tool), cwd=REPO, capture_output=True, timeout=300)
    return time.perf_counter() - t0


# ------------------------------------------------------------------------------------------------ one run
def run_one(args, ctx, *, tool, method, rec_path, out_dir, memory=None, memcap=None, rep=0, floor_inputs=None,
            floor_bytes=None) -> dict:
    rid = "-".join(x for x in [method, tool, memory and f"m{memory}", memcap and f"cap{memcap}", f"r{rep}"] if x)
    if out_dir is not None and out_dir.exists():
        shutil.rmtree(out_dir)
    if tool == "lazymerge":
        cmd = [*lazymerge_cmd(args), "run", str(rec_path), str(out_dir), "--memory", memory,
               "--shard-size", args.shard_size, "--seed", str(args.seed), "--overwrite"]
    elif tool == "naive":
        cmd = [sys.executable, str(HERE / "naive_merge.py"), str(rec_path), str(out_dir),
               "--shard-size", args.shard_size, "--seed", str(args.seed)]
    elif tool == "mergekit":
        cmd = [args.mergekit, str(rec_path), str(out_dir)]          # its defaults: CPU, no lazy unpickle
    elif tool == "floor":
        cmd = [sys.executable, str(HERE / "io_floor.py"), "--out", str(ctx["scratch"] / "floor.bin"),
               "--write-bytes", str(floor_bytes), "--mode", memory, *map(str, floor_inputs)]
    else:
        raise ValueError(tool)

    cap = memcap
    cap_kind = "explicit" if memcap else None
    if memcap and not ctx["memcap_ok"]:
        cap, cap_kind = None, "n/a"
    elif not memcap and ctx["safety_cap"] and tool != "floor":
        cap, cap_kind = ctx["safety_cap"], "safety"

    cold = M.drop_caches() if not args.warm else False
    prewarm_s = prewarm(args, tool) if cold and not args.cold_libs else None
    load1 = os.getloadavg()[0]
    log(f"run {rid}{' (cold cache)' if cold else ''}{f' under memcap {cap}' if cap else ''} ...")
    res = M.measure(cmd, log_prefix=ctx["logs"] / rid, env=child_env(tool), cwd=REPO, memcap=cap,
                    memcap_tool=args.memcap_tool, timeout=args.timeout)
    res.update(id=rid, tool=tool, method=method, memory=memory, memcap=memcap, memcap_applied=cap,
               memcap_kind=cap_kind, repeat=rep, cold_cache=cold, prewarm_s=prewarm_s, load1_before=load1)
    res["flush_s"] = M.fsync_tree(out_dir) if (out_dir is not None and res["exit_code"] == 0) else 0.0
    res["wall_total_s"] = res["wall_s"] + res["flush_s"]
    mc = res.get("memcap_result") or {}
    if memcap and cap_kind == "n/a":
        res["memcap_result"] = {"status": "n/a", "line": ctx["memcap_msg"]}
    res["oom_killed"] = bool(mc.get("oom")) or res["exit_code"] in (-9, 137) and not res["timed_out"]
    res["completed"] = res["exit_code"] == 0 and not res["timed_out"]
    if tool == "floor" and res["completed"]:
        try:
            res["floor"] = json.loads(res["stdout_tail"].strip().splitlines()[-1])
        except (ValueError, IndexError):
            res["floor"] = None
    if out_dir is not None:
        if res["completed"] and not any(out_dir.glob("*.safetensors")):
            res["completed"] = False
            res["error"] = "exited 0 but wrote no safetensors output"
        res["output_bytes"] = M.tree_bytes(out_dir)
        rep_file = out_dir / "lazymerge_report.json"
        if rep_file.exists():
            try:
                res["lazymerge_report"] = json.loads(rep_file.read_text())
            except ValueError:
                pass
    status = "ok" if res["completed"] else ("OOM-killed" if res["oom_killed"] else
                                             "timeout" if res["timed_out"] else f"exit {res['exit_code']}")
    res["status"] = status
    log(f"  {status}: wall {res['wall_s']:.2f}s (+{res['flush_s']:.2f}s fsync), cpu {res['cpu_s']:.1f}s, "
        f"peak RSS {M.fmt_bytes(res['peak_rss_bytes'])}"
        + (f", cgroup peak {mc.get('peak')}" if mc.get("peak") else ""))
    if not res["completed"] and res["stderr_tail"]:
        lines = [ln for ln in res["stderr_tail"].strip().splitlines() if not ln.startswith("memcap: limit=")]
        if lines:
            res["error"] = res.get("error") or lines[-1][:500]
            log("  stderr: " + lines[-1][:300])
    return res


# ------------------------------------------------------------------------------------------------ output check
def compare_outputs(a: Path, b: Path) -> dict:
    """Tensor-by-tensor comparison of two checkpoint directories (max |a-b| in float32, fraction of elements that
    differ). One tensor of each in memory at a time."""
    from safetensors import safe_open

    def where(d: Path) -> dict[str, Path]:
        idx = d / "model.safetensors.index.json"
        if idx.exists():
            return {k: d / v for k, v in json.loads(idx.read_text())["weight_map"].items()}
        out = {}
        for f in d.glob("*.safetensors"):
            with safe_open(str(f), "pt") as h:
                out.update({k: f for k in h.keys()})
        return out

    wa, wb = where(a), where(b)
    res = {"missing": sorted(set(wa) ^ set(wb)), "max_abs_diff": 0.0, "differing_elements": 0, "elements": 0,
           "worst_tensor": None}
    for name in sorted(set(wa) & set(wb)):
        with safe_open(str(wa[name]), "pt") as ha, safe_open(str(wb[name]), "pt") as hb:
            x, y = ha.get_tensor(name).float(), hb.get_tensor(name).float()
        if x.shape != y.shape:
            res["missing"].append(f"{name} (shape {tuple(x.shape)} vs {tuple(y.shape)})")
            continue
        both_nan = x.isnan() & y.isnan()
        diff = (x - y).abs().masked_fill(both_nan, 0).nan_to_num(nan=float("inf"))
        m = float(diff.max()) if diff.numel() else 0.0
        res["differing_elements"] += int((diff > 0).sum())
        res["elements"] += diff.numel()
        if m > res["max_abs_diff"]:
            res["max_abs_diff"], res["worst_tensor"] = m, name
    return res


# ------------------------------------------------------------------------------------------------ summaries
def median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def summarize(runs: list[dict]) -> list[dict]:
    """One row per (method, tool, memory, memcap): medians over repeats, ratios against this run's baselines."""
    groups: dict[tuple, list[dict]] = {}
    for r in runs:
        groups.setdefault((r["method"], r["tool"], r["memory"], r["memcap"]), []).append(r)
    rows = []
    for (method, tool, memory, memcap), rs in groups.items():
        ok = [r for r in rs if r["completed"]]
        mc_peaks = [(r.get("memcap_result") or {}).get("peak_bytes") for r in rs]
        row = {
            "method": method, "tool": tool, "memory": memory, "memcap": memcap,
            "memcap_kind": rs[0]["memcap_kind"], "runs": len(rs), "completed": len(ok),
            "status": "ok" if len(ok) == len(rs) else ", ".join(sorted({r["status"] for r in rs})),
            "wall_s": median([r["wall_total_s"] for r in ok]),
            "wall_exit_s": median([r["wall_s"] for r in ok]),
            "cpu_s": median([r["cpu_s"] for r in ok]),
            "peak_rss_bytes": max((r["peak_rss_bytes"] for r in (ok or rs)), default=None),  # failed: how far it got
            "peak_anon_sampled_bytes": max((r["peak_anon_sampled_bytes"] or 0 for r in rs), default=None),
            "cgroup_peak_bytes": max((p for p in mc_peaks if p), default=None),
            "read_bytes": median([(r["io"] or {}).get("read_bytes") for r in ok]),
            "write_bytes": median([(r["io"] or {}).get("write_bytes") for r in ok]),
            "rchar": median([(r["io"] or {}).get("rchar") for r in ok]),
            "wchar": median([(r["io"] or {}).get("wchar") for r in ok]),
            "budget_bytes": M.parse_size(memory) if memory and tool != "floor" else None,   # floor: its mode
            "cold_cache": all(r["cold_cache"] for r in rs),
        }
        rows.append(row)

    def ref(method, tool):
        walls = [r["wall_s"] for r in rows
                 if r["method"] == method and r["tool"] == tool and not r["memcap"] and r["wall_s"]]
        # the floor is the fastest of its modes (io_floor.py): a slow way to move the bytes must not flatter us
        return (min(walls) if tool == "floor" else walls[0]) if walls else None

    for row in rows:
        for base in ("floor", "naive", "mergekit"):
            b = ref(row["method"], base)
            row[f"x_{base}"] = row["wall_s"] / b if (b and row["wall_s"]) else None
        row["rss_within_budget"] = (row["peak_rss_bytes"] <= row["budget_bytes"] + RSS_SLACK
                                    if row["budget_bytes"] and row["peak_rss_bytes"] and row["completed"] else None)
    order = {t: i for i, t in enumerate(TOOLS)}
    rows.sort(key=lambda r: (r["method"], order[r["tool"]], r["memcap"] or "", r["budget_bytes"] or 0))
    return rows


def targets(rows: list[dict], preset: str) -> list[dict]:
    """The issue's targets, evaluated on whatever this run measured (ties, base + 2 fine-tunes)."""
    out = []
    lz = [r for r in rows if r["tool"] == "lazymerge" and r["method"] == "ties"]
    for r in lz:
        tag = f"ties {preset} --memory {r['memory']}" + (f" under memcap {r['memcap']}" if r["memcap"] else "")
        if r["memcap"] and r["memcap_kind"] != "n/a":
            out.append({"target": f"{tag}: completes", "value": r["status"], "pass": r["completed"] == r["runs"]})
        if r["memcap"]:
            continue
        if r["x_floor"] is not None:
            out.append({"target": f"{tag}: wall <= 1.3x I/O floor" + ("" if r["cold_cache"] else " (WARM cache)"),
                        "value": f"{r['x_floor']:.2f}x", "pass": r["x_floor"] <= 1.3})
        if r["x_mergekit"] is not None:
            out.append({"target": f"{tag}: wall <= 0.5x mergekit", "value": f"{r['x_mergekit']:.2f}x",
                        "pass": r["x_mergekit"] <= 0.5})
        if r["rss_within_budget"] is not None:
            out.append({"target": f"{tag}: peak RSS <= budget + 300 MB",
                        "value": f"{M.fmt_bytes(r['peak_rss_bytes'])} vs {M.fmt_bytes(r['budget_bytes'] + RSS_SLACK)}",
                        "pass": r["rss_within_budget"]})
    return out


def _f(x, fmt="{:.2f}"):
    return "–" if x is None else fmt.format(x)


def _gb(n):
    return "–" if n is None else f"{n / 1e9:.2f}"


def markdown(results: dict) -> str:
    rows = results["summary"]
    L = [f"# lazymerge benchmark: preset `{results['preset']}`", "",
         f"{results['started']} · {results['machine']['cpus']} CPUs, {M.fmt_bytes(results['machine']['mem_total'])} RAM · "
         f"cold cache: {'yes' if results['drop_caches_permitted'] else 'NOT permitted (warm-cache numbers)'} · "
         f"memcap: {'available' if results['memcap_available'] else 'n/a'} · repeats: {results['args']['repeat']} "
         f"(medians)", "",
         f"Inputs: {', '.join(f'{k} {_gb(v)} GB' for k, v in results['checkpoints']['bytes'].items())}; "
         f"commit/tree: `{results.get('git_head') or 'n/a'}`", "",
         "| method | tool | --memory | memcap | status | wall s | ×floor | ×naive | ×mergekit | CPU s | peak RSS | "
         "≤ budget+300MB | cgroup peak | read GB | written GB |",
         "|---|---|---|---|---|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|"]
    for r in rows:
        cap = r["memcap"] or "–"
        if r["memcap_kind"] == "n/a":
            cap += " (n/a)"
        L.append("| " + " | ".join([
            r["method"], r["tool"], r["memory"] or "–", cap, r["status"], _f(r["wall_s"]),
            _f(r["x_floor"]), _f(r["x_naive"]), _f(r["x_mergekit"]), _f(r["cpu_s"], "{:.1f}"),
            M.fmt_bytes(r["peak_rss_bytes"]),
            {True: "yes", False: "**no**", None: "–"}[r["rss_within_budget"]],
            M.fmt_bytes(r["cgroup_peak_bytes"]), _gb(r["read_bytes"]), _gb(r["write_bytes"]),
        ]) + " |")
    L += per_method_table(results)
    sc = results.get("safety_cap")
    L += ["", "wall s = from start to exit plus fsync of the output files (the floor fsyncs itself); ratios are "
          "against the uncapped floor / naive / mergekit rows of the same method in this run. Peak RSS = the "
          "kernel's high-water mark (`ru_maxrss` from wait4) of the largest process; cgroup peak = memcap's "
          "memory.peak (includes page cache). read/written = /proc io read_bytes/write_bytes (storage level)."
          + (f" Runs without a memcap ran under a safety cap of {sc} so that a runaway baseline cannot take the "
             "shared machine down." if sc else "")]
    floors = [r for r in results["runs"] if r["tool"] == "floor" and r.get("floor")]
    if floors:
        L += ["", "I/O floor split (first repeat): " + "; ".join(
            f"{r['method']} ({r['floor'].get('mode', 'cached')}): read {r['floor']['read_bytes'] / 1e9:.2f} GB in "
            f"{r['floor']['read_s']:.2f} s, "
            f"write {r['floor']['write_bytes'] / 1e9:.2f} GB + fsync in {r['floor']['write_s']:.2f} s"
            for r in floors if r["repeat"] == 0)]
    if results.get("checks"):
        L += ["", "## Output check against the naive baseline", "",
              "| run | max abs diff | differing elements | missing tensors |", "|---|---:|---:|---|"]
        for c in results["checks"]:
            note = " (random masks: different streams by design)" if c["run"].startswith("dare") else \
                " (mergekit computes in the recipe's dtype, bf16)" if "-mergekit-" in c["run"] else ""
            L.append(f"| {c['run']} vs {c['against']}{note} | {c['max_abs_diff']:.3g} | "
                     f"{c['differing_elements']}/{c['elements']} | {len(c['missing'])} |")
    if results.get("targets"):
        L += ["", "## Targets", "", "| target | measured | pass |", "|---|---|---|"]
        for t in results["targets"]:
            L.append(f"| {t['target']} | {t['value']} | {'PASS' if t['pass'] else '**FAIL**'} |")
    if results.get("notes"):
        L += ["", "## Notes", ""] + [f"- {n}" for n in results["notes"]]
    return "\n".join(L) + "\n"


def per_method_table(results: dict) -> list[str]:
    """One line per method for the uncapped lazymerge runs: the figures the issue's targets are stated in (wall,
    CPU, x the *direct* floor and x mergekit of the same method in this run, bytes read against the inputs' size,
    peak RSS)."""
    rows = results["summary"]
    lz = [r for r in rows if r["tool"] == "lazymerge" and not r["memcap"]]
    if not lz:
        return []
    sizes = results["checkpoints"]["bytes"]
    recipes = {m: input_models(recipe(m, Path("base"), [Path("ft1"), Path("ft2")])) for m in {r["method"] for r in lz}}

    def direct(method):
        w = [r["wall_s"] for r in rows if r["method"] == method and r["tool"] == "floor" and r["memory"] == "direct"
             and r["wall_s"]]
        return w[0] if w else None

    L = ["", "## Per method (uncapped lazymerge runs)", "",
         "| method | --memory | wall s | CPU s | × direct floor | × mergekit | read GB | × inputs | peak RSS |",
         "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in lz:
        inputs = sum(sizes.get(Path(m).name, 0) for m in recipes[r["method"]])
        d = direct(r["method"])
        L.append("| " + " | ".join([
            r["method"], r["memory"] or "–", _f(r["wall_s"]), _f(r["cpu_s"], "{:.1f}"),
            _f(r["wall_s"] / d if d and r["wall_s"] else None), _f(r["x_mergekit"]), _gb(r["read_bytes"]),
            _f(r["read_bytes"] / inputs if r["read_bytes"] and inputs else None, "{:.3f}"),
            M.fmt_bytes(r["peak_rss_bytes"])]) + " |")
    return L


def _plot_timeline(ax, results: dict, method: str) -> None:
    """lazymerge's own timeline (its report's `timeline`): how many threads were reading, computing and writing,
    over time; overlap shows as the three curves being up at the same time."""
    runs = [r for r in results["runs"] if r["method"] == method and r["tool"] == "lazymerge" and r["repeat"] == 0
            and not r["memcap"] and (r.get("lazymerge_report") or {}).get("timeline")]
    if not runs:
        ax.set_axis_off()
        return
    tl = runs[0]["lazymerge_report"]["timeline"]
    step = tl["bin_s"]
    for kind, color in (("read", "tab:blue"), ("compute", "tab:orange"), ("write", "tab:green")):
        ys = [v / step for v in tl.get(kind, [])]
        ax.plot([i * step for i in range(len(ys))], ys, label=kind, color=color, lw=1.0)
    ax.set_title(f"{method}: lazymerge --memory {runs[0]['memory']}, busy threads by kind of task")
    ax.set_xlabel("seconds since the merge started (after planning)")
    ax.set_ylabel("threads busy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def plot(results: dict, traces: dict, path: Path) -> str | None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: rss.png skipped"
    methods = sorted({r["method"] for r in results["runs"] if r["tool"] != "floor"})
    if not methods:
        return "nothing to plot"
    fig, axes = plt.subplots(len(methods), 2, figsize=(16, 3.6 * len(methods)), squeeze=False)
    for (ax, tax), method in zip(axes, methods):
        _plot_timeline(tax, results, method)
        for r in results["runs"]:
            if r["method"] != method or r["repeat"] != 0 or r["tool"] == "floor":
                continue
            tr = traces.get(r["id"]) or []
            if not tr:
                continue
            label = r["tool"] + (f" {r['memory']}" if r["memory"] else "") + \
                (f" (memcap {r['memcap']})" if r["memcap"] else "") + ("" if r["completed"] else f" [{r['status']}]")
            ax.plot([s[0] for s in tr], [s[1] / 2**30 for s in tr], label=label, lw=1.2)
        ax.set_title(f"{results['preset']} · {method}: RSS of the run's process tree (sampled every 50 ms)")
        ax.set_xlabel("seconds")
        ax.set_ylabel("RSS GiB")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


# ------------------------------------------------------------------------------------------------ modes
def machine_info() -> dict:
    import psutil
    info = {"cpus": os.cpu_count(), "mem_total": psutil.virtual_memory().total, "platform": platform.platform(),
            "python": platform.python_version()}
    try:
        import torch
        info["torch"] = torch.__version__
    except ImportError:
        pass
    return info


def git_head() -> str | None:
    import subprocess
    try:
        r = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
        return r.stdout.strip() or None
    except OSError:
        return None


def plan_bench(args, ctx, results) -> None:
    base, tunes, info = ensure_checkpoints(args.preset, args.seed, ctx["workdir"], header_only=True)
    results["checkpoints"] = {"dir": str(base.parent), "header_only": True,
                              "bytes": {p.name: safetensors_bytes(p) for p in [base, *tunes]}}
    memory = args.memory[0]
    for method in args.methods:
        rec = recipe(method, base, tunes)
        rec_path = write_recipe(rec, ctx["out"] / "recipes" / f"{method}.yaml")
        for rep in range(max(3, args.repeat)):
            cold = M.drop_caches() if not args.warm else False
            if cold and not args.cold_libs:
                prewarm(args, "lazymerge")
            rid = f"{method}-plan-r{rep}"
            log(f"plan {rid}{' (cold cache)' if cold else ''} ...")
            res = M.measure([sys.executable, "-c", PLAN_SNIPPET, str(rec_path), memory, args.shard_size],
                            log_prefix=ctx["logs"] / rid, env=child_env("lazymerge"), cwd=REPO,
                            timeout=args.timeout)
            res.update(id=rid, tool="plan", method=method, memory=memory, repeat=rep, cold_cache=cold)
            res["completed"] = res["exit_code"] == 0
            try:
                res["plan"] = json.loads(res["stdout_tail"].strip().splitlines()[-1])
            except (ValueError, IndexError):
                res["plan"] = None
                res["completed"] = False
            p = res["plan"] or {}
            log(f"  {'ok' if res['completed'] else 'FAILED'}: plan() {_f(p.get('plan_s'))} s, "
                f"process {res['wall_s']:.2f} s, tasks {p.get('tasks', '?')}, peak RSS {M.fmt_bytes(res['peak_rss_bytes'])}")
            if not res["completed"]:
                log("  stderr: " + (res["stderr_tail"].strip().splitlines() or [""])[-1][:300])
            results["runs"].append(res)
    for method in args.methods:
        rs = [r for r in results["runs"] if r["method"] == method and r["completed"]]
        plan_s = median([r["plan"]["plan_s"] for r in rs])
        results["summary"].append({"method": method, "tool": "plan", "runs": len(rs), "plan_s": plan_s,
                                   "import_s": median([r["plan"]["import_s"] for r in rs]),
                                   "process_wall_s": median([r["wall_s"] for r in rs]),
                                   "tasks": rs[0]["plan"].get("tasks") if rs else None,
                                   "peak_rss_bytes": max((r["peak_rss_bytes"] for r in rs), default=None)})
        if plan_s is not None:
            results["targets"].append({"target": f"plan {args.preset} {method} (3 models, headers only) < 2 s",
                                       "value": f"{plan_s:.3f} s (median of {len(rs)})", "pass": plan_s < 2.0})


def plan_markdown(results: dict) -> str:
    L = [f"# lazymerge planning benchmark: preset `{results['preset']}` (header-only checkpoints)", "",
         f"{results['started']} · commit/tree `{results.get('git_head') or 'n/a'}`", "",
         "| method | runs | plan() s (median) | import s | process wall s | tasks | peak RSS |",
         "|---|---:|---:|---:|---:|---:|---:|"]
    for s in results["summary"]:
        L.append(f"| {s['method']} | {s['runs']} | {_f(s['plan_s'], '{:.3f}')} | {_f(s['import_s'])} | "
                 f"{_f(s['process_wall_s'])} | {s['tasks'] or '–'} | {M.fmt_bytes(s['peak_rss_bytes'])} |")
    L += ["", "plan() s = `lazymerge.plan(recipe)` inside a fresh subprocess (page cache dropped, then the libraries "
          "re-imported once elsewhere, so the checkpoint headers are cold), excluding the interpreter start and "
          "`import lazymerge`, which are shown separately.", ""]
    for t in results["targets"]:
        L.append(f"- {t['target']}: {t['value']} — {'PASS' if t['pass'] else '**FAIL**'}")
    return "\n".join(L) + "\n"


def merge_bench(args, ctx, results) -> None:
    base, tunes, info = ensure_layout(*ensure_checkpoints(args.preset, args.seed, ctx["workdir"]), args.layout)
    results["checkpoints"] = {"dir": str(base.parent), "marker": info,
                              "bytes": {p.name: safetensors_bytes(p) for p in [base, *tunes]}}
    tools = list(args.only)
    if "mergekit" in tools and not args.mergekit:
        tools.remove("mergekit")
        results["notes"].append("mergekit not measured: pass --mergekit PATH/TO/mergekit-yaml")
    if "lazymerge" in tools:
        ok, msg = lazymerge_usable(args)
        if not ok:
            tools.remove("lazymerge")
            results["notes"].append(f"lazymerge not measured: its CLI does not start ({msg})")
            log(f"WARNING: lazymerge CLI unusable, skipping it: {msg}")
    scratch = ctx["scratch"]
    out_bytes = safetensors_bytes(base)
    floors: dict[tuple, dict] = {}
    for rep in range(args.repeat):
        for method in args.methods:
            rec = recipe(method, base, tunes)
            rec_path = write_recipe(rec, ctx["out"] / "recipes" / f"{method}.yaml")
            naive_out = None
            if "floor" in tools:
                inputs = [Path(m) for m in input_models(rec)]
                for mode in args.floor_modes:
                    # methods that read the same inputs share one floor run (most methods read base + 2 fine-tunes)
                    key = (rep, mode, tuple(map(str, inputs)))
                    if key in floors:
                        shared = dict(floors[key], method=method, id=f"{method}-floor-{mode}-r{rep}",
                                      shared_from=floors[key]["id"])
                        results["runs"].append(shared)
                        continue
                    r = run_one(args, ctx, tool="floor", method=method, rec_path=rec_path, out_dir=None,
                                memory=mode, rep=rep, floor_inputs=inputs, floor_bytes=out_bytes)
                    floors[key] = r
                    results["runs"].append(r)
            for cap in args.memcap:
                for tool in ("naive", "mergekit"):
                    if tool not in tools:
                        continue
                    if tool == "mergekit" and args.mergekit_methods and method not in args.mergekit_methods:
                        continue
                    out_dir = scratch / f"{method}-{tool}"
                    r = run_one(args, ctx, tool=tool, method=method, rec_path=rec_path, out_dir=out_dir,
                                memcap=cap, rep=rep)
                    results["runs"].append(r)
                    if tool == "naive" and args.check and r["completed"] and naive_out is None:
                        naive_out = out_dir.rename(scratch / f"{method}-naive-keep")
                        continue
                    if tool == "mergekit" and naive_out is not None and r["completed"] and rep == 0:
                        check(results, r, out_dir, naive_out)
                    if not args.keep_outputs:
                        shutil.rmtree(out_dir, ignore_errors=True)
                if "lazymerge" in tools:
                    for mem in args.memory:
                        if cap and M.parse_size(mem) >= M.parse_size(cap):
                            note = f"lazymerge --memory {mem} under memcap {cap} skipped: budget >= cap"
                            if note not in results["notes"]:
                                results["notes"].append(note)
                            continue
                        out_dir = scratch / f"{method}-lazymerge"
                        r = run_one(args, ctx, tool="lazymerge", method=method, rec_path=rec_path,
                                    out_dir=out_dir, memory=mem, memcap=cap, rep=rep)
                        results["runs"].append(r)
                        if naive_out is not None and r["completed"] and rep == 0:
                            check(results, r, out_dir, naive_out)
                        if not args.keep_outputs:
                            shutil.rmtree(out_dir, ignore_errors=True)
            if naive_out is not None:
                shutil.rmtree(naive_out, ignore_errors=True)
            save(results, ctx)   # partial results survive an interrupted run


def check(results: dict, run: dict, out_dir: Path, naive_out: Path) -> None:
    log(f"  comparing {run['id']} with the naive output ...")
    c = compare_outputs(out_dir, naive_out)
    c.update(run=run["id"], against="naive")
    results["checks"].append(c)
    log(f"  max |{run['tool']} - naive| = {c['max_abs_diff']:.3g}, "
        f"{c['differing_elements']}/{c['elements']} elements differ")


def save(results: dict, ctx) -> None:
    traces = {r["id"]: r.pop("_trace") for r in results["runs"] if "_trace" in r}
    ctx["traces"].update(traces)
    out: Path = ctx["out"]
    if results["mode"] == "merge":
        results["summary"] = summarize(results["runs"])
        results["targets"] = targets(results["summary"], results["preset"])
        md = markdown(results)
    else:
        md = plan_markdown(results)
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    (out / "rss_traces.json").write_text(json.dumps(
        {k: [[round(t, 3), rss, sh] for t, rss, sh in v] for k, v in ctx["traces"].items()}) + "\n")
    (out / "results.md").write_text(md)
    if results["mode"] == "merge":
        warn = plot(results, ctx["traces"], out / "rss.png")
        if warn and warn != "nothing to plot" and warn not in results["notes"]:
            log(f"WARNING: {warn}")
            results["notes"].append(warn)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--preset", default="tiny", help="lazymerge.synth preset: tiny, small, 1b, 7b, 70b")
    ap.add_argument("--methods", default="ties", help=f"comma list of {', '.join(METHODS)}")
    ap.add_argument("--memory", default="2GiB", help="comma list of lazymerge --memory budgets")
    ap.add_argument("--memcap", default="none",
                    help="comma list of cgroup caps (memcap LIMIT), 'none' = uncapped; e.g. none,3G")
    ap.add_argument("--only", default=",".join(TOOLS), help="comma list of tools: " + ", ".join(TOOLS))
    ap.add_argument("--mergekit", help="path to mergekit-yaml in mergekit's own venv")
    ap.add_argument("--mergekit-methods", default="",
                    help="comma list: run mergekit for these methods only (it takes minutes per method); "
                         "default: every method")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0, help="checkpoint and merge seed")
    ap.add_argument("--shard-size", default="2GB", help="output shard size (lazymerge and naive)")
    ap.add_argument("--workdir", type=Path, default=HERE / ".work", help="cached checkpoints and scratch outputs")
    ap.add_argument("--out", type=Path, help="results directory (default benches/results/<preset>-<timestamp>)")
    ap.add_argument("--layout", default="lazymerge", choices=("lazymerge", "hf"),
                    help="input layout: as lazymerge.synth writes it (1 GB shards in model order), or 'hf': two "
                         "shards per model written by safetensors' save_file as save_pretrained does "
                         "(benches/relayout.py)")
    ap.add_argument("--plan-only", action="store_true", help="time lazymerge.plan() on header-only checkpoints")
    ap.add_argument("--warm", action="store_true", help="do not drop the page cache before each run")
    ap.add_argument("--floor-modes", default="direct,cached",
                    help="I/O floor techniques to run (benches/io_floor.py); the fastest is the floor")
    ap.add_argument("--cold-libs", action="store_true",
                    help="after dropping the cache, do not pre-import each tool's libraries (torch etc.): "
                         "runs then also pay for reading those from disk")
    ap.add_argument("--check", action="store_true", help="compare lazymerge's output with naive's, tensor by tensor")
    ap.add_argument("--keep-outputs", action="store_true")
    ap.add_argument("--timeout", type=float, default=7200, help="seconds before a run is killed")
    ap.add_argument("--safety-cap", default="auto",
                    help="memcap for runs without --memcap so a baseline cannot exhaust the shared machine: "
                         "'auto' = total RAM - 4 GiB, 'none', or a size")
    ap.add_argument("--memcap-tool", default=MEMCAP_TOOL)
    ap.add_argument("--lazymerge-cmd", help="command to run lazymerge (default: this tree's lazymerge.cli)")
    args = ap.parse_args(argv)

    split = lambda s: [x.strip() for x in s.split(",") if x.strip()]  # noqa: E731
    args.methods = split(args.methods)
    args.floor_modes = split(args.floor_modes)
    args.mergekit_methods = split(args.mergekit_methods)
    for m in args.floor_modes:
        if m not in ("direct", "cached"):
            ap.error(f"--floor-modes: unknown mode {m!r}: choose from direct, cached")
    for m in args.methods:
        if m not in METHODS:
            ap.error(f"unknown method {m!r}: choose from {', '.join(METHODS)}")
    args.memory = split(args.memory)
    args.memcap = [None if c.lower() in ("none", "off", "0") else c for c in split(args.memcap)]
    args.only = split(args.only)
    for t in args.only:
        if t not in TOOLS:
            ap.error(f"unknown tool {t!r}: choose from {', '.join(TOOLS)}")
    if args.mergekit and not (Path(args.mergekit).exists() or shutil.which(args.mergekit)):
        ap.error(f"--mergekit {args.mergekit}: not found")

    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = args.out or HERE / "results" / f"{args.preset}{'-plan' if args.plan_only else ''}-{stamp}"
    out.mkdir(parents=True, exist_ok=True)
    (out / "logs").mkdir(exist_ok=True)
    workdir = args.workdir.resolve()
    scratch = workdir / "scratch"
    scratch.mkdir(parents=True, exist_ok=True)

    memcap_ok, memcap_msg = M.memcap_available(args.memcap_tool)
    if not memcap_ok:
        log(f"memcap unavailable ({memcap_msg}): capped runs are recorded as n/a and run uncapped")
    safety = None
    if memcap_ok and args.safety_cap.lower() != "none":
        if args.safety_cap.lower() == "auto":
            import psutil
            safety = f"{max(1, (psutil.virtual_memory().total - (4 << 30)) >> 20)}M"
        else:
            safety = args.safety_cap
    cold_ok = M.drop_caches() if not args.warm else False
    if not args.warm and not cold_ok:
        log("WARNING: cannot drop the page cache (need root): numbers are warm-cache")

    results = {
        "mode": "plan" if args.plan_only else "merge", "preset": args.preset, "seed": args.seed,
        "started": time.strftime("%Y-%m-%d %H:%M:%S"), "git_head": git_head(), "machine": machine_info(),
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "drop_caches_permitted": cold_ok, "memcap_available": memcap_ok, "safety_cap": safety,
        "runs": [], "summary": [], "targets": [], "checks": [], "notes": [],
    }
    ctx = {"out": out, "logs": out / "logs", "workdir": workdir, "scratch": scratch, "memcap_ok": memcap_ok,
           "memcap_msg": memcap_msg, "safety_cap": safety, "traces": {}}
    try:
        (plan_bench if args.plan_only else merge_bench)(args, ctx, results)
    finally:
        save(results, ctx)
        log(f"results in {out}/results.md, results.json" + ("" if args.plan_only else ", rss.png"))
    print((out / "results.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
