"""A 4-expert MoE from the `1b` preset under a memory cap: lazymerge against mergekit-moe, the same config.

    python3 benches/moe_bench.py --models /work/bench-data/1b-s0 --memcap 2G --memory 1GiB \
        [--mergekit-moe /tmp/mk/bin/mergekit-moe] [--gate-mode hidden] [--uncapped-mergekit]

The models directory holds `base`, `ft1`, `ft2` (benches/run.py's checkpoints; never modified). The experts are
ft1, ft2, base, ft1 (4 experts, 2 per token; an expert may repeat), Mixtral output, bfloat16. Each tool runs in its
own subprocess under `memcap LIMIT` (cgroup cap: a tool that needs more is killed by the kernel, and that is
reported), measured by benches/measure.py (wall, CPU, peak RSS from wait4, the cgroup's own peak). Results go to
`benches/results/moe-<preset>-<timestamp>/results.{md,json}`; outputs are deleted after each run.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from measure import fmt_bytes, measure, memcap_available  # noqa: E402

PROMPTS = [["def fibonacci ( n ) : return"], ["once upon a time there was a king"],
           ["the integral of x squared"], ["hello how are you today my friend ?"]]


def config(models: Path, gate_mode: str) -> dict:
    experts = ["ft1", "ft2", "base", "ft1"]
    return {"base_model": str(models / "base"), "gate_mode": gate_mode, "dtype": "bfloat16",
            "experts_per_token": 2,
            "experts": [{"source_model": str(models / e), "positive_prompts": p} for e, p in zip(experts, PROMPTS)]}


def out_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.glob("*.safetensors")) if path.is_dir() else 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", type=Path, default=Path("/work/bench-data/1b-s0"))
    ap.add_argument("--memcap", default="2G")
    ap.add_argument("--memory", default="1GiB")
    ap.add_argument("--gate-mode", default="hidden")
    ap.add_argument("--mergekit-moe", default=None, help="mergekit-moe's console script (its own venv)")
    ap.add_argument("--uncapped-mergekit", action="store_true", help="also run mergekit-moe without a cap")
    ap.add_argument("--memcap-tool", default="/work/shared/tools/memcap")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--timeout", type=float, default=3600)
    args = ap.parse_args()

    stamp = time.strftime("%Y%m%d-%H%M")
    res_dir = args.out or HERE / "results" / f"moe-1b-{stamp}"
    res_dir.mkdir(parents=True, exist_ok=True)
    work = res_dir / "work"
    work.mkdir(exist_ok=True)
    cfg_path = res_dir / "moe.yaml"
    cfg_path.write_text(yaml.safe_dump(config(args.models, args.gate_mode), sort_keys=False))
    ok, why = memcap_available(args.memcap_tool)
    cap = args.memcap if ok else None
    env = dict(os.environ, PYTHONPATH=str(HERE.parent))

    runs = []
    plan = [("lazymerge", cap, [sys.executable, "-m", "lazymerge.cli", "run", str(cfg_path), None, "--memory",
                                args.memory, "-q"])]
    if args.mergekit_moe:
        plan.append(("mergekit-moe", cap, [args.mergekit_moe, str(cfg_path), None]))
        if args.uncapped_mergekit:
            plan.append(("mergekit-moe", None, [args.mergekit_moe, str(cfg_path), None]))
    for tool, memcap, cmd in plan:
        out = work / f"{tool}-{memcap or 'uncapped'}"
        shutil.rmtree(out, ignore_errors=True)
        cmd = [str(out) if c is None else c for c in cmd]
        print(f"[moe-bench] {tool} under {memcap or 'no cap'} ...", flush=True)
        r = measure(cmd, log_prefix=res_dir / f"{tool}-{memcap or 'uncapped'}", env=env, memcap=memcap,
                    memcap_tool=args.memcap_tool, timeout=args.timeout)
        r.pop("_trace", None)
        r.update(tool=tool, memcap=memcap, output_bytes=out_bytes(out),
                 completed=r["exit_code"] == 0 and out_bytes(out) > 0)
        if tool == "lazymerge" and (out / "lazymerge_report.json").is_file():
            r["lazymerge_report"] = json.loads((out / "lazymerge_report.json").read_text())
        runs.append(r)
        shutil.rmtree(out, ignore_errors=True)
        mc = r.get("memcap_result") or {}
        print(f"[moe-bench] {tool}: exit {r['exit_code']}, wall {r['wall_s']:.1f} s, peak RSS "
              f"{fmt_bytes(r['peak_rss_bytes'])}, cgroup peak {mc.get('peak', 'n/a')}, oom {mc.get('oom', 'n/a')}",
              flush=True)
    shutil.rmtree(work, ignore_errors=True)

    lines = [f"# 4-expert MoE from 1b ({args.gate_mode} gates), memcap {cap or 'n/a (' + why + ')'}, "
             f"lazymerge --memory {args.memory}", "",
             "| tool | cap | completed | exit | wall s | CPU s | peak RSS | cgroup peak | killed for memory | output |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        mc = r.get("memcap_result") or {}
        lines.append(f"| {r['tool']} | {r['memcap'] or 'none'} | {'yes' if r['completed'] else 'no'} | "
                     f"{r['exit_code']} | {r['wall_s']:.1f} | {r['cpu_s']:.1f} | {fmt_bytes(r['peak_rss_bytes'])} | "
                     f"{mc.get('peak', 'n/a')} | {mc.get('oom', 'n/a')} | {fmt_bytes(r['output_bytes'])} |")
    (res_dir / "results.md").write_text("\n".join(lines) + "\n")
    (res_dir / "results.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                                      "runs": runs}, indent=1, default=str))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
