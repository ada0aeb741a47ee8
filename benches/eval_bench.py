#!/usr/bin/env python
"""Out-of-core evaluation against transformers' whole-model evaluation, in one run.

    python benches/eval_bench.py --models /work/bench-data/1b-s0 --memory 512MiB --memcap 1G

MODELS holds base/, ft1/, ft2/ (bf16 synthetic Llama checkpoints from lazymerge.synth, as benches/run.py makes
them; never modified). The bench merges them with TIES into OUT/merged, then measures, each in its own process
started through benches/launch.py (its own peak RSS) and, where capped, inside `memcap`:

| run | command |
|---|---|
| lazymerge-checkpoint | `lazymerge eval OUT/merged --memory M` under memcap |
| lazymerge-recipe | `lazymerge eval RECIPE --memory M` under memcap (merged layer by layer, never written) |
| whole | `benches/eval_whole.py OUT/merged` (transformers `from_pretrained`, float32), uncapped |
| whole-capped | the same under memcap (expected: killed) |

Writes OUT/results.md and OUT/results.json.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MEMCAP = Path("/work/shared/tools/memcap")


def log(msg: str) -> None:
    print(f"[eval-bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def env() -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO)}


def run(name: str, cmd: list[str], out: Path, memcap: str | None) -> dict:
    rusage = out / f"{name}.rusage.json"
    full = [sys.executable, str(REPO / "benches" / "launch.py"), str(rusage), "--", *cmd]
    if memcap:
        full = [str(MEMCAP), memcap, *full]
    log(f"{name}: {' '.join(cmd)}" + (f" (memcap {memcap})" if memcap else ""))
    t0 = time.perf_counter()
    proc = subprocess.run(full, capture_output=True, text=True, env=env())
    wall = time.perf_counter() - t0
    rec = {"name": name, "cmd": cmd, "memcap": memcap, "exit_code": proc.returncode, "wall_s": wall,
           "stderr_tail": proc.stderr[-1500:]}
    if rusage.exists():
        ru = json.loads(rusage.read_text())
        rec["peak_rss"] = ru["ru_maxrss_kib"] * 1024
    m = re.search(r"memcap: limit=(\S+) peak=(\S+) oom=(\S+)", proc.stderr)
    if m:
        rec["memcap_peak"], rec["oom"] = m.group(2), m.group(3)
    rec["result"] = None
    for text in (proc.stdout, *proc.stdout.strip().splitlines()[-1:]):      # indented JSON, or a last JSON line
        try:
            rec["result"] = json.loads(text)
            break
        except json.JSONDecodeError:
            continue
    log(f"{name}: exit {proc.returncode}, {wall:.1f} s, peak RSS {rec.get('peak_rss', 0) / 2**20:.0f} MiB"
        + (f", memcap peak {rec.get('memcap_peak')} oom={rec.get('oom')}" if memcap else ""))
    return rec


def make_data(base: Path, path: Path, n_words: int) -> None:
    vocab = json.loads((base / "tokenizer.json").read_text())["model"]["vocab"]
    words = [w for w in vocab if not w.startswith("<")]
    rng = random.Random(0)
    path.write_text(" ".join(rng.choice(words) for _ in range(n_words)))


def markdown(res: dict) -> str:
    a = res["args"]
    lines = [f"# Evaluation bench: {a['models']}", "",
             f"`--memory {a['memory']}`, memcap {a['memcap']}, {res['tokens']} predicted tokens "
             f"(seq-len {a['seq_len']}, max-tokens {a['max_tokens']}, batch {a['batch']}), float32, "
             f"{res['machine']}", "",
             "| run | memcap | exit | wall (s) | peak RSS (MiB) | memcap peak | RSS at start, own peak (MiB) | perplexity |",
             "|---|---|---|---|---|---|---|---|"]
    for r in res["runs"]:
        ppl = r["result"]["perplexity"] if r.get("result") else None
        own = r.get("result") or {}
        own_rss = (f"{own['start_rss'] / 2**20:.0f}, {own['peak_rss'] / 2**20:.0f}" if "start_rss" in own else "-")
        lines.append(f"| {r['name']} | {r['memcap'] or '-'} | {r['exit_code']} | {r['wall_s']:.1f} | "
                     f"{r.get('peak_rss', 0) / 2**20:.0f} | {r.get('memcap_peak', '-')} | {own_rss} | "
                     f"{'%.6f' % ppl if ppl else '-'} |")
    lines += ["", "## Ratios (same run)", ""]
    for k, v in res["ratios"].items():
        lines.append(f"- {k}: {v}")
    lines += ["", f"merge of the recipe into OUT/merged (for the checkpoint runs): {res['merge_wall_s']:.1f} s", ""]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", type=Path, required=True, help="directory with base/, ft1/, ft2/")
    ap.add_argument("--memory", default="512MiB")
    ap.add_argument("--memcap", default="1G")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--max-tokens", type=int, default=512)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--work", type=Path, default=None, help="where the merged checkpoint goes (default: OUT/work)")
    args = ap.parse_args()
    base, ft1, ft2 = (args.models / n for n in ("base", "ft1", "ft2"))
    for d in (base, ft1, ft2):
        if not (d / "config.json").is_file():
            raise SystemExit(f"error: {d}: not a checkpoint (run benches/run.py --preset 1b once to generate it)")
    if not (base / "tokenizer.json").is_file():
        raise SystemExit(f"error: {base}: no tokenizer.json")
    out = args.out or REPO / "benches" / "results" / f"eval-{args.models.name}-{time.strftime('%Y%m%d-%H%M')}"
    out.mkdir(parents=True, exist_ok=True)
    work = args.work or out / "work"
    work.mkdir(parents=True, exist_ok=True)
    data = out / "data.txt"
    make_data(base, data, args.max_tokens * 2)
    recipe = out / "recipe.yaml"
    recipe.write_text(json.dumps({"merge_method": "ties", "base_model": str(base), "dtype": "bfloat16",
                                  "models": [{"model": str(ft1), "parameters": {"weight": 0.5, "density": 0.5}},
                                             {"model": str(ft2), "parameters": {"weight": 0.5, "density": 0.5}}]}))
    merged = work / "merged"
    log("merging the recipe (for the checkpoint runs)")
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "lazymerge.cli", "run", str(recipe), str(merged), "--memory", "2GiB",
                    "--overwrite", "-q"], check=True, env=env(), stdout=subprocess.DEVNULL)
    merge_wall = time.perf_counter() - t0
    common = ["--data", str(data), "--memory", args.memory, "--seq-len", str(args.seq_len), "--max-tokens",
              str(args.max_tokens), "--batch", str(args.batch), "--json", "-q"]
    lazy = [sys.executable, "-m", "lazymerge.cli", "eval"]
    whole = [sys.executable, str(REPO / "benches" / "eval_whole.py"), str(merged), str(data), str(args.seq_len),
             str(args.max_tokens), str(args.batch)]
    runs = [run("lazymerge-checkpoint", lazy + [str(merged)] + common, out, args.memcap),
            run("lazymerge-recipe", lazy + [str(recipe)] + common, out, args.memcap),
            run("whole", whole, out, None),
            run("whole-capped", whole, out, args.memcap)]
    by = {r["name"]: r for r in runs}
    ratios = {}
    w = by["whole"]
    for name in ("lazymerge-checkpoint", "lazymerge-recipe"):
        r = by[name]
        if r.get("result") and w.get("result"):
            ratios[f"wall {name} / whole"] = round(r["wall_s"] / w["wall_s"], 3)
            ratios[f"peak RSS {name} / whole"] = round(r["peak_rss"] / w["peak_rss"], 3)
            rel = abs(r["result"]["perplexity"] - w["result"]["perplexity"]) / w["result"]["perplexity"]
            ratios[f"perplexity {name} vs whole, relative difference"] = f"{rel:.2e}"
    c, rr = by["lazymerge-checkpoint"], by["lazymerge-recipe"]
    if c.get("result") and rr.get("result"):
        ratios["recipe perplexity == written merge perplexity"] = c["result"]["perplexity"] == rr["result"]["perplexity"]
    ratios["whole-capped killed"] = by["whole-capped"]["exit_code"] != 0
    res = {"args": {k: str(v) for k, v in vars(args).items()}, "runs": runs, "ratios": ratios,
           "merge_wall_s": merge_wall, "tokens": (c.get("result") or {}).get("tokens"),
           "machine": f"{os.cpu_count()} CPUs"}
    (out / "results.json").write_text(json.dumps(res, indent=2))
    (out / "results.md").write_text(markdown(res))
    print(markdown(res))
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
