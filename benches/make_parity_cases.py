"""Make mergekit reference outputs for the methods that ../shared/parity does not cover (sce, nearswap,
arcee_fusion, ram, ramplus_tl): tests/parity_extra/<case>/{recipe.yaml,expected/}.

    python benches/make_parity_cases.py [--mergekit /tmp/mk/bin/mergekit-yaml] [--parity ../shared/parity]

Each recipe runs through `mergekit-yaml` (mergekit 0.1.5, in its own venv; never a dependency of lazymerge) on the
float32 tiny models of ../shared/parity/models, whose path the stored recipe spells `{parity}` (same format as
../shared/parity, see its README). To keep the repository small only a few tensors of each output are stored
(`KEEP`: 2-d of three shapes and two 1-d norms); tests/test_parity_extra.py compares those within 1e-6.
Only deterministic mergekit merges belong here (arcee_fusion samples its quantiles only above 1e6 entries, which
these tensors are far below).
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "tests" / "parity_extra"
KEEP = ("model.layers.1.self_attn.q_proj.weight", "model.layers.1.self_attn.k_proj.weight",
        "model.layers.1.mlp.down_proj.weight", "model.layers.1.input_layernorm.weight", "model.norm.weight")


def _models(*names: str, params: list[dict] | None = None) -> list[dict]:
    return [{"model": f"{{parity}}/models/{n}", **({"parameters": p} if p else {})}
            for n, p in zip(names, params or [None] * len(names))]


def cases() -> dict[str, dict]:
    base = "{parity}/models/base"
    three = ("ft1", "ft2", "ft3")
    return {
        "sce": {"merge_method": "sce", "base_model": base, "models": _models(*three),
                "parameters": {"select_topk": 0.3}, "dtype": "float32"},
        "sce_full": {"merge_method": "sce", "base_model": base, "models": _models("ft1", "ft2"),
                     "dtype": "float32"},
        "nearswap": {"merge_method": "nearswap", "base_model": base, "models": _models("ft1"),
                     "parameters": {"t": 0.005}, "dtype": "float32"},
        "arcee_fusion": {"merge_method": "arcee_fusion", "base_model": base, "models": _models("ft2"),
                         "dtype": "float32"},
        "ram": {"merge_method": "ram", "base_model": base, "models": _models(*three),
                "parameters": {"epsilon": 0.006}, "dtype": "float32"},
        "ramplus_tl": {"merge_method": "ramplus_tl", "base_model": base, "models": _models(*three),
                       "parameters": {"epsilon": 0.008, "r": 0.5, "alpha": 0.3}, "dtype": "float32"},
        "ramplus_tl_defaults": {"merge_method": "ramplus_tl", "base_model": base, "models": _models("ft1", "ft2"),
                                "dtype": "float32"},
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mergekit", default="/tmp/mk/bin/mergekit-yaml")
    ap.add_argument("--parity", default=str(REPO.parent / "shared" / "parity"))
    ap.add_argument("--only", nargs="*", help="case names (default: all)")
    args = ap.parse_args(argv)
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    parity = Path(args.parity).resolve()
    for name, recipe in cases().items():
        if args.only and name not in args.only:
            continue
        text = yaml.safe_dump(recipe, sort_keys=False)
        with tempfile.TemporaryDirectory() as tmp:
            rec = Path(tmp) / "recipe.yaml"
            rec.write_text(text.replace("{parity}", str(parity)))
            out = Path(tmp) / "out"
            run = subprocess.run([args.mergekit, str(rec), str(out), "--quiet"], capture_output=True, text=True)
            if run.returncode != 0:
                print(f"{name}: mergekit failed:\n{run.stderr[-2000:]}", file=sys.stderr)
                return 1
            tensors: dict[str, torch.Tensor] = {}
            for f in sorted(out.glob("*.safetensors")):
                with safe_open(str(f), "pt") as s:
                    tensors.update({k: s.get_tensor(k) for k in s.keys() if k in KEEP})
            missing = set(KEEP) - set(tensors)
            if missing:
                print(f"{name}: mergekit output lacks {sorted(missing)}", file=sys.stderr)
                return 1
            case = OUT / name
            if case.exists():
                shutil.rmtree(case)
            (case / "expected").mkdir(parents=True)
            (case / "recipe.yaml").write_text(text)
            save_file({k: tensors[k].contiguous() for k in KEEP}, str(case / "expected" / "model.safetensors"),
                      metadata={"format": "pt", "made_by": "mergekit 0.1.5 (benches/make_parity_cases.py)"})
        print(f"{name}: ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
