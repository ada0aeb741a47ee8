#!/usr/bin/env python
"""The baseline for benches/eval_bench.py: transformers' whole-model evaluation (what lm-eval and most scripts do).

    python benches/eval_whole.py MODEL_DIR DATA SEQ_LEN MAX_TOKENS BATCH

MODEL_DIR may be a `.gguf` file: transformers' GGUF loader (`from_pretrained(dir, gguf_file=name)`) reads it.

`from_pretrained` in float32 (the whole model in memory), the same windows as `lazymerge eval` (the rule in
lazymerge/evaluate/data.py), the loss from the full logits. Prints one JSON line.
"""
import json
import math
import sys
import time

import torch


def main() -> int:
    model_dir, data, seq_len, max_tokens, batch = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:6])
    t0 = time.perf_counter()
    import transformers as T

    from lazymerge.evaluate.data import load_windows

    kw = {}
    if model_dir.endswith(".gguf"):
        model_dir, kw["gguf_file"] = model_dir.rsplit("/", 1) if "/" in model_dir else (".", model_dir)
    tok = T.AutoTokenizer.from_pretrained(model_dir, **kw)
    windows = load_windows(data, tok, seq_len=seq_len, max_tokens=max_tokens)
    model = T.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, **kw).eval()
    total = 0.0
    with torch.no_grad():
        for ids in torch.split(windows, batch):
            logits = model(input_ids=ids).logits[:, :-1].double()
            total += float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                             ids[:, 1:].reshape(-1), reduction="sum"))
    tokens = windows.shape[0] * (seq_len - 1)
    print(json.dumps({"perplexity": math.exp(total / tokens), "nll": total / tokens, "tokens": tokens,
                      "windows": windows.shape[0], "wall_s": time.perf_counter() - t0}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
