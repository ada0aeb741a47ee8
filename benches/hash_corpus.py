"""Hash every output of the test corpus: the check that a refactor kept outputs bit-identical.

Runs, on the tiny checkpoints the tests generate (tests/conftest.py, tests/test_vocab.py) written under a fixed
work directory (so that paths recorded in the outputs are the same from run to run):

- every recipe of tests/recipes/*.yaml, as tests/test_recipe_corpus.py runs it (seed 1, unlimited memory), and
  again in row blocks of 7 rows (`max_block_rows=7`), with a seed of 7;
- every case of ../shared/parity (seed 0, as tests/test_parity.py);
- extra configurations: dare/della with another seed under a small budget, a multi-stage recipe in blocks, a
  hand-made LoRA adapter merged through the engine, vocabulary alignment (union and base tokenizers, in blocks).

Writes one sha256 per output file (the run report, which holds timings, excluded) and a combined hash to a JSON
file, and prints the combined hash. Compare two runs with `--compare BEFORE.json`:

    PYTHONPATH=$PWD python3 benches/hash_corpus.py --out benches/results/corpus-hashes-after.json \
        --compare benches/results/corpus-hashes-before.json
"""
from __future__ import annotations

import argparse
import hashlib
import json
import re
import shutil
import sys
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import lazymerge  # noqa: E402
from conftest import build_model_set  # noqa: E402

PARITY = ROOT.parent / "shared" / "parity"         # --parity overrides (e.g. hashing another checkout of the code)
SKIP_FILES = {"lazymerge_report.json"}


def digest_dir(out: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.iterdir())
            if p.is_file() and p.name not in SKIP_FILES}


def corpus_cases(models: dict[str, Path]) -> list[tuple[str, str, dict]]:
    cases = []
    for f in sorted((ROOT / "tests" / "recipes").glob("*.yaml")):
        text = f.read_text()
        for key, path in models.items():
            text = text.replace("{" + key + "}", str(path))
        cases.append((f"corpus/{f.stem}", text, dict(memory="unlimited", seed=1)))
        cases.append((f"corpus-blocks7-seed7/{f.stem}", text, dict(memory="unlimited", seed=7, max_block_rows=7)))
    return cases


def parity_cases() -> list[tuple[str, str, dict]]:
    if not (PARITY / "models").is_dir():
        print(f"warning: no parity data at {PARITY}", file=sys.stderr)
        return []
    return [(f"parity/{p.name}", (p / "recipe.yaml").read_text().replace("{parity}", str(PARITY)), dict(seed=0))
            for p in sorted(PARITY.iterdir()) if (p / "recipe.yaml").is_file()]


def extra_cases(models: dict[str, Path], work: Path) -> list[tuple[str, str, dict]]:
    m = {k: str(v) for k, v in models.items()}
    ft = [{"model": m["ft1"], "parameters": {"weight": 0.6, "density": 0.5}},
          {"model": m["ft2"], "parameters": {"weight": 0.4, "density": 0.7}}]
    cases = []
    for method, extra in (("dare_ties", {}), ("dare_linear", {}), ("della", {"epsilon": 0.1}),
                          ("della_linear", {"epsilon": 0.1}), ("ties", {"rescale_norm": "l2"}),
                          ("breadcrumbs_ties", {"gamma": 0.02}), ("dare_ties", {"rescale_norm": "l1"})):
        recipe = {"merge_method": method, "base_model": m["base"], "models": ft, "dtype": "float32",
                  "parameters": extra}
        tag = method + "".join(f"-{k}" for k in extra)
        cases.append((f"extra/{tag}-seed42-64KiB", yaml.safe_dump(recipe), dict(memory="64KiB", seed=42)))
        cases.append((f"extra/{tag}-seed42-rows5", yaml.safe_dump(recipe),
                      dict(memory="unlimited", seed=42, max_block_rows=5)))
    for method, params in (("nuslerp", {"nuslerp_flatten": False}), ("nuslerp", {"nuslerp_row_wise": True,
                                                                                  "nuslerp_flatten": False}),
                           ("multislerp", {}), ("karcher", {}), ("model_stock", {"filter_wise": True})):
        recipe = {"merge_method": method, "models": [{"model": m["ft1"], "parameters": {"weight": 0.3}},
                                                     {"model": m["ft2"], "parameters": {"weight": 0.7}}],
                  "dtype": "float32", "parameters": params}
        if method in ("model_stock", "karcher"):
            recipe["base_model"] = m["base"] if method == "model_stock" else None
            recipe = {k: v for k, v in recipe.items() if v is not None}
            for e in recipe["models"]:
                e.pop("parameters")
        tag = method + "".join(f"-{k}" for k in params)
        cases.append((f"extra/{tag}-rows3", yaml.safe_dump(recipe), dict(memory="unlimited", max_block_rows=3)))
    multi = (ROOT / "tests" / "recipes" / "multi_stage.yaml").read_text()
    for key, path in models.items():
        multi = multi.replace("{" + key + "}", str(path))
    cases.append(("extra/multi_stage-32KiB", multi, dict(memory="32KiB", seed=3)))
    cases.append(("extra/adapter-passthrough", yaml.safe_dump(
        {"merge_method": "passthrough", "dtype": "float32",
         "models": [{"model": f"{work / 'toy_base'}+{work / 'toy_adapter'}"}]}), dict(memory="unlimited",
                                                                                       max_block_rows=4)))
    cases.append(("extra/adapter-ties", yaml.safe_dump(
        {"merge_method": "ties", "base_model": str(work / "toy_base"), "dtype": "float32",
         "models": [{"model": f"{work / 'toy_base'}+{work / 'toy_adapter'}",
                     "parameters": {"weight": 0.5, "density": 0.6}},
                    {"model": str(work / "toy_ft"), "parameters": {"weight": 0.5, "density": 0.6}}]}),
        dict(memory="unlimited")))
    abc = {k: str(v) for k, v in _vocab_models(work).items()}
    cases.append(("extra/vocab-union-linear-rows3", yaml.safe_dump(
        {"merge_method": "linear", "tokenizer_source": "union",
         "models": [{"model": abc["A"], "parameters": {"weight": 0.5}},
                    {"model": abc["B"], "parameters": {"weight": 0.5}}]}), dict(memory="unlimited",
                                                                                max_block_rows=3)))
    cases.append(("extra/vocab-union-ties", yaml.safe_dump(
        {"merge_method": "ties", "tokenizer_source": "union", "base_model": abc["A"],
         "models": [{"model": abc["B"], "parameters": {"weight": 0.5, "density": 0.5}},
                    {"model": abc["C"], "parameters": {"weight": 0.5, "density": 0.5}}]}), dict(memory="unlimited")))
    cases.append(("extra/vocab-base-task_arithmetic", yaml.safe_dump(
        {"merge_method": "task_arithmetic", "tokenizer_source": "base", "base_model": abc["A"],
         "models": [{"model": abc["B"], "parameters": {"weight": 1.0}},
                    {"model": abc["C"], "parameters": {"weight": 1.0}}]}), dict(memory="unlimited")))
    for tok in ("union", None):                 # a 1-d vocab-indexed tensor (lm_head.bias), aligned or cut
        recipe = {"merge_method": "linear", "models": [{"model": abc["A1"], "parameters": {"weight": 0.4}},
                                                        {"model": abc["B1"], "parameters": {"weight": 0.6}}]}
        if tok:
            recipe["tokenizer_source"] = tok
        cases.append((f"extra/vocab-bias-{tok or 'cut'}", yaml.safe_dump(recipe), dict(memory="unlimited")))
    return cases


def _vocab_models(work: Path) -> dict[str, Path]:
    from safetensors.torch import load_file, save_file
    from test_vocab import ADDED_B, VOCAB_A, VOCAB_B, make_abc, make_model

    models = make_abc(work / "vocab")
    for tag, vocab, added in (("A1", VOCAB_A, ()), ("B1", VOCAB_B, ADDED_B)):
        path = make_model(work / "vocab" / tag, tag, vocab, added, seed=len(vocab))
        t = load_file(str(path / "model.safetensors"))
        t["lm_head.bias"] = torch.arange(t["lm_head.weight"].shape[0], dtype=torch.float32) / 8
        save_file(t, str(path / "model.safetensors"))
        models[tag] = path
    return models


def _adapter_models(work: Path) -> None:
    """A toy base, a full fine-tune of it, and a LoRA adapter with fan_in_fan_out and a modules_to_save."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    base = {"m.fc.weight": torch.randn(12, 8, generator=g), "m.out.weight": torch.randn(5, 12, generator=g),
            "m.norm.weight": torch.ones(8)}
    for tag, tensors in (("toy_base", base), ("toy_ft", {k: v + 0.01 * torch.randn(v.shape, generator=g)
                                                          for k, v in base.items()})):
        d = work / tag
        d.mkdir(parents=True)
        save_file(tensors, str(d / "model.safetensors"))
        (d / "config.json").write_text(json.dumps({"model_type": "toy"}))
    ad = work / "toy_adapter"
    ad.mkdir()
    (ad / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 3, "lora_alpha": 6,
                                                        "target_modules": ["fc", "out"]}))
    save_file({"base_model.model.m.fc.lora_A.weight": torch.randn(3, 8, generator=g),
               "base_model.model.m.fc.lora_B.weight": torch.randn(12, 3, generator=g),
               "base_model.model.m.out.lora_A.weight": torch.randn(3, 12, generator=g),
               "base_model.model.m.out.lora_B.weight": torch.randn(5, 3, generator=g)},
              str(ad / "adapter_model.safetensors"))


def main() -> int:
    global PARITY
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="JSON file to write")
    ap.add_argument("--work", type=Path, default=Path("/tmp/lazymerge-hash-corpus"),
                    help="work directory (models and outputs; emptied first)")
    ap.add_argument("--compare", type=Path, help="a previous JSON: report every case whose hashes differ")
    ap.add_argument("-k", default=None, help="only cases whose name matches this regular expression")
    ap.add_argument("--parity", type=Path, default=None, help=f"the parity cases (default: {PARITY})")
    args = ap.parse_args()
    if args.parity is not None:
        PARITY = args.parity

    work = args.work
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    models = build_model_set(work / "models_bf16", torch.bfloat16)
    _adapter_models(work)
    cases = corpus_cases(models) + parity_cases() + extra_cases(models, work)
    if args.k:
        cases = [c for c in cases if re.search(args.k, c[0])]
    results: dict[str, dict[str, str]] = {}
    t0 = time.time()
    for i, (name, text, kw) in enumerate(cases):
        out = work / "out" / name.replace("/", "__")
        try:
            lazymerge.merge(text, out, **kw)
            results[name] = digest_dir(out)
        except lazymerge.LazyMergeError as exc:        # a refused recipe is an outcome too: keep its message
            results[name] = {"error": str(exc).replace(str(work), "<work>")}
        shutil.rmtree(out, ignore_errors=True)
        print(f"[{i + 1}/{len(cases)}] {name}", file=sys.stderr)
    lines = [f"{case}/{f}:{h}" for case in sorted(results) for f, h in sorted(results[case].items())]
    combined = hashlib.sha256("\n".join(lines).encode()).hexdigest()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"combined": combined, "cases": results,
                                    "torch": torch.__version__, "seconds": round(time.time() - t0, 1)},
                                   indent=1, sort_keys=True) + "\n")
    print(f"combined sha256 {combined} ({len(results)} cases) -> {args.out}")
    if args.compare:
        before = json.loads(args.compare.read_text())["cases"]
        # a case differs when a file both runs wrote differs, or one it wrote before is missing; a file that only
        # this run writes (an output added since, e.g. the model card README.md) is listed, not counted as a change
        diff = sorted(c for c in results if c in before
                      and any(results[c].get(f) != h for f, h in before[c].items()))
        added = sorted({f for c in results if c in before for f in results[c] if f not in before[c]})
        new = sorted(c for c in results if c not in before)
        gone = sorted(c for c in before if c not in results)
        for c in diff:
            print(f"DIFFERS {c}")
        print(f"{len(results) - len(diff) - len(new)} equal, {len(diff)} differ, {len(new)} new, "
              f"{len(gone)} not run" + (f"; files written now and not before: {', '.join(added)}" if added else ""))
        return 1 if diff else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
