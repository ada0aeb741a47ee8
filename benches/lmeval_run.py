#!/usr/bin/env python
"""One timed lm-eval run, for benches/lmeval_bench.py (started through benches/launch.py: its own peak RSS).

    python benches/lmeval_run.py KIND MODEL TASK_DIR TASKS OUT_JSON [--memory M] [--batch-size N] [--limit N]

KIND:
- `hf`: lm-eval's own `hf` model (HFLM), float32, the whole model in memory;
- `offload`: HFLM on a model loaded by accelerate with `device_map="auto"`, `max_memory={"cpu": M}` and an
  `offload_folder` (the weights beyond M are read from disk at every forward call): the usual way to run a model
  larger than memory;
- `lazymerge`: `lazymerge.lm_eval.LazyMergeLM` with `--memory M`.

Writes OUT_JSON: wall time (model set-up + evaluation, imports excluded: they are the same for all), the set-up
time alone, lm-eval's results, every sample's responses (to check that the runs agree) and, for lazymerge, its
own report (budget, activations, peak RSS it sampled).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("kind", choices=["hf", "offload", "lazymerge"])
    ap.add_argument("model")
    ap.add_argument("task_dir")
    ap.add_argument("tasks")
    ap.add_argument("out", type=Path)
    ap.add_argument("--memory", default=None)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--limit", type=int, default=None)
    a = ap.parse_args()

    import lm_eval
    import torch
    from lm_eval.tasks import TaskManager

    from lazymerge.units import parse_size

    tm = TaskManager(include_path=a.task_dir, include_defaults=False)
    tasks = a.tasks.split(",")
    lm_eval.simple_evaluate(model="dummy", tasks=tasks, task_manager=tm, limit=1, verbosity="ERROR")  # warm data
    report = None
    offload_dir = None
    t0 = time.perf_counter()
    if a.kind == "hf":
        from lm_eval.models.huggingface import HFLM

        lm = HFLM(pretrained=a.model, dtype="float32", device="cpu", batch_size=a.batch_size)
    elif a.kind == "offload":
        import transformers
        from lm_eval.models.huggingface import HFLM

        offload_dir = tempfile.mkdtemp(prefix="lmeval-offload-", dir=os.environ.get("OFFLOAD_DIR"))
        model = transformers.AutoModelForCausalLM.from_pretrained(
            a.model, dtype=torch.float32, device_map="auto", max_memory={"cpu": parse_size(a.memory)},
            offload_folder=offload_dir)
        tok = transformers.AutoTokenizer.from_pretrained(a.model)
        lm = HFLM(pretrained=model, tokenizer=tok, batch_size=a.batch_size)
        # HFLM takes the model's device, which is `meta` when its first weights are offloaded (torch.autocast
        # then fails): inputs go to the CPU, accelerate's hooks bring the offloaded weights there
        lm._device = torch.device("cpu")
    else:
        import lazymerge.lm_eval

        lm = lazymerge.lm_eval.LazyMergeLM(a.model, memory=a.memory)
    t1 = time.perf_counter()
    res = lm_eval.simple_evaluate(model=lm, tasks=tasks, task_manager=tm, log_samples=True, limit=a.limit,
                                  verbosity="ERROR")
    t2 = time.perf_counter()
    if a.kind == "lazymerge":
        report = lm.model.report()
        lm.close()
    if offload_dir:
        shutil.rmtree(offload_dir, ignore_errors=True)
    samples = {t: [[r[0] if not isinstance(r[0], tuple) else list(r[0]) for r in s["resps"]]
                   for s in res["samples"][t]] for t in tasks}
    generated = 0
    if "text_gen" in tasks:
        tok = lm.tokenizer
        generated = sum(len(tok(s[0], add_special_tokens=False)["input_ids"]) for s in samples["text_gen"])
    a.out.write_text(json.dumps({"kind": a.kind, "model": a.model, "memory": a.memory, "tasks": tasks,
                                 "setup_s": t1 - t0, "eval_s": t2 - t1, "wall_s": t2 - t0,
                                 "threads": torch.get_num_threads(), "generated_tokens": generated,
                                 "results": res["results"], "samples": samples, "lazymerge": report},
                                default=str))


if __name__ == "__main__":
    main()
