#!/usr/bin/env python
"""One short full fine-tune for benches/real.py (its own process, so its memory goes when it ends).

    python benches/real_train.py BASE_DIR TRAIN.jsonl OUT_DIR --steps 120 --seq-len 256 --batch 8 --lr 5e-5

Plain transformers + torch on the CPU, float32: the tied token embedding (and so the output head) stays frozen,
every decoder weight and norm is trained with AdamW (linear warm-up over a fifth of the steps, at most 10, then cosine decay), on windows drawn in a
seeded order from the training text (documents joined with EOS, the same rule as `lazymerge eval`'s data).
Writes OUT_DIR as a safetensors checkpoint with the base's tokenizer, and OUT_DIR/train.json (losses, time).
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from pathlib import Path

import torch


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("base")
    ap.add_argument("train")
    ap.add_argument("out")
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.manual_seed(a.seed)
    torch.set_num_threads(a.threads)
    import transformers as T

    from lazymerge.evaluate.data import iter_documents, token_stream, windows

    t0 = time.perf_counter()
    tok = T.AutoTokenizer.from_pretrained(a.base)
    need = a.steps * a.batch * a.seq_len
    stream = token_stream(tok, iter_documents(a.train), 10 ** 9)
    data = windows(stream, a.seq_len, a.train)
    model = T.AutoModelForCausalLM.from_pretrained(a.base, dtype=torch.float32)
    model.train()
    model.get_input_embeddings().weight.requires_grad_(False)     # tied: the head stays the base's too
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=a.lr, weight_decay=0.0)
    warm = max(1, min(10, a.steps // 5))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warm if s < warm else 0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, a.steps - warm))))
    g = torch.Generator().manual_seed(a.seed)
    order = torch.cat([torch.randperm(data.shape[0], generator=g) for _ in range(-(-a.steps * a.batch // data.shape[0]))])
    losses = []
    for step in range(a.steps):
        ids = data[order[step * a.batch:(step + 1) * a.batch]]
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss))
        print(f"step {step + 1}/{a.steps} loss {losses[-1]:.4f} ({time.perf_counter() - t0:.0f} s)",
              file=sys.stderr, flush=True)
    out = Path(a.out)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    (tmp / "train.json").write_text(json.dumps({
        "steps": a.steps, "seq_len": a.seq_len, "batch": a.batch, "lr": a.lr, "seed": a.seed,
        "train_windows": int(data.shape[0]), "train_tokens_available": len(stream), "tokens_seen": need,
        "losses": losses, "wall_s": time.perf_counter() - t0, "trainable_params": sum(p.numel() for p in params),
    }, indent=1))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
