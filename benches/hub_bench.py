#!/usr/bin/env python
"""Hub models: download-then-merge vs `--stream-inputs`, on the 1b preset served by a loopback hub.

    python benches/hub_bench.py --workdir /work/scratch/bench-work --memory 768MiB

The bench preset's base and two fine-tunes (benches/run.py generates them once) are published as `org/base`,
`org/ft1`, `org/ft2` by tests/hubserver.py, in a process of its own (as a hub is another machine, it does not
share this process's interpreter), and the same recipe runs three ways, each in its own subprocess with an empty
Hugging Face cache and (where permitted) a cold page cache:

- `local`: the recipe on the local directories (what a merge costs when the inputs are already on disk);
- `download`: `lazymerge run` on the hub ids: the shards the plan needs are downloaded into the cache, then merged;
- `stream`: `lazymerge run --stream-inputs`: tensor bytes read from the hub with range requests, never stored.

Measured: wall time (start to exit), CPU time (wait4), bytes the hub served (its own count), bytes the merge read
(its report), peak disk use (the cache, the output and its temporary directory, sampled every 0.2 s) and peak
RSS. The outputs are compared byte for byte. Results go to benches/results/hub-<preset>-<timestamp>/.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

import measure as M  # noqa: E402
from recipes import recipe, write_recipe  # noqa: E402
from run import LAZYMERGE_SNIPPET, ensure_checkpoints, log  # noqa: E402

MODES = ("local", "download", "stream")


def disk_bytes(paths: list[Path]) -> int:
    """Bytes allocated on disk under `paths` (st_blocks, symlinks not followed: a cache snapshot's pointers are
    links into its blobs)."""
    total = 0
    stack = [p for p in paths if p.exists()]
    while stack:
        p = stack.pop()
        try:
            with os.scandir(p) as it:
                for e in it:
                    try:
                        if e.is_dir(follow_symlinks=False):
                            stack.append(Path(e.path))
                        else:
                            total += e.stat(follow_symlinks=False).st_blocks * 512
                    except FileNotFoundError:
                        pass
        except (FileNotFoundError, NotADirectoryError):
            pass
    return total


class DiskSampler(threading.Thread):
    def __init__(self, paths: list[Path], interval: float = 0.2):
        super().__init__(daemon=True)
        self.paths, self.interval, self.peak = paths, interval, 0
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.is_set():
            self.peak = max(self.peak, disk_bytes(self.paths))
            self._done.wait(self.interval)

    def stop(self) -> int:
        self._done.set()
        self.join()
        self.peak = max(self.peak, disk_bytes(self.paths))
        return self.peak


def served(url: str) -> int:
    with urllib.request.urlopen(f"{url}/_stats") as r:
        return sum(json.loads(r.read()).values())


def sha256s(out: Path) -> dict[str, str]:
    hashes = {}
    for f in sorted(out.glob("*.safetensors")):
        with open(f, "rb") as fh:
            hashes[f.name] = hashlib.file_digest(fh, "sha256").hexdigest()
    return hashes


def run_mode(mode: str, args: argparse.Namespace, url: str, recipes: dict[str, Path], scratch: Path) -> dict:
    hf_home, out = scratch / f"hf-{mode}", scratch / f"out-{mode}"
    for p in (hf_home, out, out.parent / f".{out.name}.lazymerge-tmp"):
        shutil.rmtree(p, ignore_errors=True)
    cmd = [sys.executable, "-c", LAZYMERGE_SNIPPET, "run", str(recipes["local" if mode == "local" else "hub"]),
           str(out), "--memory", args.memory, "--shard-size", "1GB", "-q"] + (["--stream-inputs"] if mode == "stream"
                                                                              else [])
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_ENDPOINT": url, "HF_HOME": str(hf_home),
           "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    env.pop("HF_HUB_CACHE", None)
    env.pop("HF_HUB_OFFLINE", None)
    cold = M.drop_caches()
    # cold means cold checkpoint data: the libraries' files are read back in a throwaway process (as run.py does)
    subprocess.run([sys.executable, "-c", "import torch, numba, huggingface_hub.file_download, lazymerge.cli"],
                   env=env, capture_output=True)
    load1 = os.getloadavg()[0]
    rusage = scratch / f"rusage-{mode}.json"
    before = served(url)
    sampler = DiskSampler([hf_home, out, out.parent / f".{out.name}.lazymerge-tmp"])
    sampler.start()
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, str(HERE / "launch.py"), str(rusage), "--", *cmd], env=env,
                          capture_output=True, text=True)
    wall = time.perf_counter() - t0
    peak_disk = sampler.stop()
    if proc.returncode != 0:
        raise SystemExit(f"{mode}: exit {proc.returncode}\n{proc.stderr[-2000:]}")
    ru = json.loads(rusage.read_text())
    report = json.loads((out / "lazymerge_report.json").read_text())
    return {"mode": mode, "command": cmd, "cold_cache": cold, "load1_before": load1, "wall_s": wall, "cpu_s": ru["ru_utime"] + ru["ru_stime"],
            "peak_rss": ru["ru_maxrss_kib"] * 1024, "peak_disk": peak_disk, "hub_served": served(url) - before,
            "bytes_read": report["bytes_read"], "bytes_written": report["bytes_written"],
            "bytes_transferred": report.get("bytes_transferred", 0), "inputs": report.get("inputs", {}),
            "report": report, "out": str(out), "hf_home": str(hf_home)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="1b")
    ap.add_argument("--method", default="ties")
    ap.add_argument("--memory", default="768MiB")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", type=Path, default=HERE / ".work")
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--keep", action="store_true", help="keep the outputs and caches")
    args = ap.parse_args()
    modes = [m for m in args.modes.split(",") if m]
    base, tunes, info = ensure_checkpoints(args.preset, args.seed, args.workdir.resolve())
    scratch = args.workdir.resolve() / "scratch" / "hub-bench"
    scratch.mkdir(parents=True, exist_ok=True)
    out_dir = args.out or HERE / "results" / f"hub-{args.preset}-{time.strftime('%Y%m%d-%H%M')}"
    out_dir.mkdir(parents=True, exist_ok=True)
    recipes = {"local": write_recipe(recipe(args.method, base, tunes), out_dir / "recipes" / "local.yaml"),
               "hub": write_recipe(recipe(args.method, Path("org/base"), [Path("org/ft1"), Path("org/ft2")]),
                                   out_dir / "recipes" / "hub.yaml")}
    server = subprocess.Popen([sys.executable, str(REPO / "tests" / "hubserver.py"), f"org/base={base}",
                               f"org/ft1={tunes[0]}", f"org/ft2={tunes[1]}"], stdout=subprocess.PIPE, text=True)
    try:
        url = server.stdout.readline().strip()
        log(f"loopback hub at {url}")
        runs = []
        for mode in modes:
            log(f"{mode} ...")
            runs.append(run_mode(mode, args, url, recipes, scratch))
            r = runs[-1]
            log(f"{mode}: {r['wall_s']:.1f} s, hub served {M.fmt_bytes(r['hub_served'])}, "
                f"peak disk {M.fmt_bytes(r['peak_disk'])}")
        hashes = {r["mode"]: sha256s(Path(r["out"])) for r in runs}
        same = len({json.dumps(h, sort_keys=True) for h in hashes.values()}) == 1
    finally:
        server.terminate()
        server.wait()
        if not args.keep:
            for p in scratch.iterdir():
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink()
    inputs = sum(f.stat().st_size for d in (base, *tunes) for f in d.glob("*.safetensors"))
    meta = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": f"{os.cpu_count()} CPUs, {platform.platform()}",
            "preset": args.preset, "method": args.method, "memory": args.memory, "inputs_bytes": inputs,
            "outputs_identical": same,
            "commit": subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                                     text=True).stdout.strip()}
    (out_dir / "results.json").write_text(json.dumps({"meta": meta, "runs": runs, "hashes": hashes}, indent=1))
    (out_dir / "results.md").write_text(table(meta, runs))
    print(table(meta, runs))


def table(meta: dict, runs: list[dict]) -> str:
    by = {r["mode"]: r for r in runs}
    lines = [f"# Hub models: download-then-merge vs --stream-inputs ({meta['preset']}, {meta['method']}, "
             f"--memory {meta['memory']})", "",
             f"{meta['date']} · {meta['machine']} · commit `{meta['commit']}` · "
             f"inputs {M.fmt_bytes(meta['inputs_bytes'])} (3 repos, served by "
             f"tests/hubserver.py on 127.0.0.1 in its own process) · outputs byte-identical across modes: "
             f"**{'yes' if meta['outputs_identical'] else 'NO'}**", "",
             "| mode | wall s | × local | CPU s | hub served | ÷ bytes read | peak disk | peak RSS | cold cache | "
             "load before |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---|---:|"]
    for r in runs:
        ratio = f"{r['wall_s'] / by['local']['wall_s']:.2f}" if "local" in by else "–"
        per_read = f"{r['hub_served'] / r['bytes_read']:.3f}" if r["hub_served"] else "–"
        lines.append(f"| {r['mode']} | {r['wall_s']:.1f} | {ratio} | {r['cpu_s']:.1f} | {M.fmt_bytes(r['hub_served'])} "
                     f"| {per_read} | {M.fmt_bytes(r['peak_disk'])} | {M.fmt_bytes(r['peak_rss'])} | "
                     f"{'yes' if r['cold_cache'] else 'no'} | {r['load1_before']:.2f} |")
    lines += ["", "wall s: the `lazymerge run` subprocess from start to exit (for `download`, the downloads included); "
              "CPU s: its user + system time (the hub's own CPU is not included); hub served: body bytes the "
              "loopback hub sent (headers, small files and tensor data); ÷ bytes read: that over the bytes of "
              "tensor data the merge read (its report); peak disk: the Hugging Face cache + the output and its "
              "temporary directory, sampled every 0.2 s; peak RSS: wait4's ru_maxrss; cold cache: page cache dropped "
              "before the run (the libraries then read back by a throwaway import); load before: the 1-minute load "
              "average when it started.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
