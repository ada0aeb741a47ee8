#!/usr/bin/env python
"""The naive baseline: merge the way most one-off merge scripts do.

    python benches/naive_merge.py RECIPE.yaml OUT_DIR [--shard-size 2GB] [--seed 0]

Every shard of every model is loaded whole with `safetensors.torch.load_file` into full state dicts (kept alive for
the whole run, as such scripts do), each output tensor is computed with plain whole-tensor torch code in float32,
collected into an output state dict, and saved with `save_file`, sharded like Hugging Face does.

It understands the subset of mergekit's recipe format the benchmark writes (see benches/recipes.py): `merge_method`
in {linear, task_arithmetic, ties, dare_ties, slerp}, `base_model`, `models[].model`, scalar `parameters` (per model
and global) and `dtype`. It is the baseline, not a straw man: it computes one tensor at a time (so only one
tensor's float32 temporaries exist at once), uses `kthvalue` for the magnitude threshold like the TIES authors'
code (keeping exactly k entries, ties broken by flat index), and copies nothing it does not need.
It deliberately imports nothing from lazymerge.
"""
from __future__ import annotations

import argparse
import json
import math
import re
import shutil
import sys
import time
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file, save_file

DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16,
          "half": torch.float16, "float32": torch.float32, "fp32": torch.float32, "float": torch.float32}
METHODS = ("linear", "task_arithmetic", "ties", "dare_ties", "slerp")


def parse_size(text) -> int:
    if isinstance(text, (int, float)):
        return int(text)
    m = re.fullmatch(r"\s*([0-9.]+)\s*([KMGT]?)(i?)(B?)\s*", str(text), re.I)
    if not m:
        raise SystemExit(f"error: cannot parse size {text!r}")
    num, unit, binary, b = m.groups()
    power = " KMGT".index(unit.upper()) if unit else 0
    base = 1024 if (binary or (unit and not b)) else 1000
    return int(float(num) * base ** power)


# ----------------------------------------------------------------------------------------------------- loading
def checkpoint_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [path / f for f in sorted(set(weight_map.values()))]
    single = path / "model.safetensors"
    if single.exists():
        return [single]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise SystemExit(f"error: {path}: no safetensors files")
    return files


def load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    sd: dict[str, torch.Tensor] = {}
    for f in checkpoint_files(path):
        sd.update(load_file(str(f)))
    return sd


# ----------------------------------------------------------------------------------------------------- methods
def magnitude_trim(d: torch.Tensor, density: float) -> torch.Tensor:
    if density >= 1:
        return d
    n = d.numel()
    k = int(density * n)
    if k <= 0:
        raise SystemExit(f"error: density {density} keeps no entries of a tensor with {n} elements")
    a = d.abs().flatten()
    kth = a.kthvalue(n - k + 1).values          # the k-th largest magnitude
    keep = a > kth
    need = k - int(keep.sum())                  # entries equal to the threshold: the first ones in flat order
    if need > 0:
        keep[(a == kth).nonzero().flatten()[:need]] = True
    return d * keep.view_as(d)


def random_trim(d: torch.Tensor, density: float, gen: torch.Generator) -> torch.Tensor:
    if density >= 1:
        return d
    mask = torch.bernoulli(torch.full_like(d, density), generator=gen)
    return d * mask / density


def combine(base, deltas, weights, *, elect, normalize, lam):
    w = torch.tensor(weights, dtype=torch.float32).view(-1, *([1] * base.dim()))
    e = torch.stack(deltas) * w                                    # e_i = w_i * d_i'
    if elect:
        sign = torch.where(e.sum(0) >= 0, 1.0, -1.0)
        mask = torch.sign(e) == sign
        d = (e * mask).sum(0)
        if normalize:
            div = (w * mask).sum(0)
            div[div == 0] = 1.0
            d = d / div
    else:
        d = e.sum(0)
        if normalize:
            s = float(sum(weights))
            d = d / (s if abs(s) >= 1e-8 else 1.0)
    return base + lam * d


def slerp(t: float, v0: torch.Tensor, v1: torch.Tensor) -> torch.Tensor:
    def unit(v):
        n = v.norm()
        return v / n if n > 1e-8 else v
    dot = float((unit(v0.flatten()) * unit(v1.flatten())).sum().clamp(-1, 1))
    if abs(dot) > 0.9995:
        return (1 - t) * v0 + t * v1
    theta = math.acos(dot)
    s = math.sin(theta)
    return math.sin((1 - t) * theta) / s * v0 + math.sin(t * theta) / s * v1


# ----------------------------------------------------------------------------------------------------- saving
def save_sharded(sd: dict[str, torch.Tensor], out: Path, shard_size: int) -> None:
    shards: list[list[str]] = [[]]
    size = 0
    for name, t in sd.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > shard_size:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    n = len(shards)
    weight_map = {}
    for i, names in enumerate(shards, 1):
        fname = "model.safetensors" if n == 1 else f"model-{i:05d}-of-{n:05d}.safetensors"
        save_file({k: sd[k] for k in names}, str(out / fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in names})
    if n > 1:
        total = sum(t.numel() * t.element_size() for t in sd.values())
        (out / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))


# ----------------------------------------------------------------------------------------------------- main
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("recipe", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--shard-size", default="2GB")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    t_start = time.perf_counter()

    cfg = yaml.safe_load(args.recipe.read_text())
    method = cfg["merge_method"]
    if method not in METHODS:
        raise SystemExit(f"error: naive_merge does not implement {method!r} (only {', '.join(METHODS)})")
    gparams = dict(cfg.get("parameters") or {})
    base_path = Path(cfg["base_model"]) if cfg.get("base_model") else None
    entries = [(Path(m["model"]), dict(m.get("parameters") or {})) for m in cfg["models"]]

    def param(local, key, default):
        v = local.get(key, gparams.get(key, default))
        if not isinstance(v, (int, float, bool)):
            raise SystemExit(f"error: naive_merge supports scalar parameters only ({key}={v!r})")
        return v

    # 1. load every state dict whole
    cache: dict[Path, dict[str, torch.Tensor]] = {}
    def load(p: Path):
        p = p.resolve()
        if p not in cache:
            cache[p] = load_state_dict(p)
        return cache[p]
    base_sd = load(base_path) if base_path else None
    model_sds = [load(p) for p, _ in entries]
    t_loaded = time.perf_counter()

    first = base_sd if base_sd is not None else model_sds[0]
    out_dtype = DTYPES[cfg["dtype"]] if cfg.get("dtype") else next(iter(first.values())).dtype
    gen = torch.Generator().manual_seed(args.seed)

    # 2. merge tensor by tensor in float32
    out: dict[str, torch.Tensor] = {}
    for name, ref in first.items():
        xs = [sd[name].float() for sd in model_sds]
        if method == "linear":
            ws = [float(param(p, "weight", 1.0)) for _, p in entries]
            y = sum(w * x for w, x in zip(ws, xs))
            if param({}, "normalize", True):
                y = y / sum(ws)
        elif method == "slerp":
            if len(entries) != 2 or base_path is None:
                raise SystemExit("error: slerp needs base_model and exactly two models")
            t = float(param({}, "t", 0.5))
            b = base_sd[name].float()
            other = next(x for (p, _), x in zip(entries, xs) if p.resolve() != base_path.resolve())
            y = slerp(t, b, other)
        else:  # task_arithmetic, ties, dare_ties: all relative to the base
            b = base_sd[name].float()
            pairs = [(p, x) for (path, p), x in zip(entries, xs) if path.resolve() != base_path.resolve()]
            ws = [float(param(p, "weight", 1.0)) for p, _ in pairs]
            deltas = []
            for p, x in pairs:
                d = x - b
                density = float(param(p, "density", 1.0))
                if method == "ties":
                    d = magnitude_trim(d, density)
                elif method == "dare_ties":
                    d = random_trim(d, density, gen)
                deltas.append(d)
            normalize = bool(param({}, "normalize", method == "ties"))
            y = combine(b, deltas, ws, elect=method != "task_arithmetic", normalize=normalize,
                        lam=float(param({}, "lambda", 1.0)))
        out[name] = y.to(out_dtype).contiguous()
    t_merged = time.perf_counter()

    # 3. save
    if args.out.exists():
        shutil.rmtree(args.out)
    args.out.mkdir(parents=True)
    save_sharded(out, args.out, parse_size(args.shard_size))
    src = base_path or entries[0][0]
    if (src / "config.json").exists():
        shutil.copy(src / "config.json", args.out / "config.json")
    t_end = time.perf_counter()
    print(json.dumps({"tool": "naive", "method": method, "tensors": len(out), "load_s": t_loaded - t_start,
                      "merge_s": t_merged - t_loaded, "save_s": t_end - t_merged, "total_s": t_end - t_start}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
