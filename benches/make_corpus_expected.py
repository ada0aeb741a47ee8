"""Make the published-recipe corpus's inputs and mergekit's outputs: tests/published/.

Run once, by hand, where mergekit 0.1.5 is installed in its own venv (never a dependency of lazymerge):

    python3 benches/make_corpus_expected.py --mergekit /tmp/mk/bin

1. writes four tiny float32 Llama checkpoints (6 layers, hidden 16, vocabulary 64: about 60 KB each) to
   tests/published/models/{base,ft1,ft2,ft3} from a fixed seed; the fine-tunes are the base plus a delta with a
   component shared by all three (so that sign elections and model_stock's angle have something to do) and one
   of their own;
2. for every tests/published/<case>/recipe.yaml not marked `# random:`, substitutes the model paths, runs
   mergekit-yaml (one document) or mergekit-multi (several) on the CPU, and keeps its safetensors output in
   tests/published/<case>/expected/ (tokenizer warnings are expected: the checkpoints have none).

The files are committed; tests/test_published_recipes.py compares lazymerge's output with them and never needs
mergekit. Random recipes (dare_*, della*) are not compared with mergekit (no two tools share a random stream):
the test checks their determinism and statistics instead.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parent.parent / "tests" / "published"
HIDDEN, INTER, LAYERS, HEADS, KV_HEADS, VOCAB = 16, 32, 6, 4, 2, 64
HEAD_DIM = HIDDEN // HEADS


def shapes() -> dict[str, tuple[int, ...]]:
    out: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (VOCAB, HIDDEN)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        out.update({
            p + "self_attn.q_proj.weight": (HEADS * HEAD_DIM, HIDDEN),
            p + "self_attn.k_proj.weight": (KV_HEADS * HEAD_DIM, HIDDEN),
            p + "self_attn.v_proj.weight": (KV_HEADS * HEAD_DIM, HIDDEN),
            p + "self_attn.o_proj.weight": (HIDDEN, HEADS * HEAD_DIM),
            p + "mlp.gate_proj.weight": (INTER, HIDDEN),
            p + "mlp.up_proj.weight": (INTER, HIDDEN),
            p + "mlp.down_proj.weight": (HIDDEN, INTER),
            p + "input_layernorm.weight": (HIDDEN,),
            p + "post_attention_layernorm.weight": (HIDDEN,),
        })
    out["model.norm.weight"] = (HIDDEN,)
    out["lm_head.weight"] = (VOCAB, HIDDEN)
    return out


def config() -> dict:
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": HIDDEN,
            "intermediate_size": INTER, "num_hidden_layers": LAYERS, "num_attention_heads": HEADS,
            "num_key_value_heads": KV_HEADS, "vocab_size": VOCAB, "max_position_embeddings": 64,
            "rms_norm_eps": 1e-05, "hidden_act": "silu", "torch_dtype": "float32", "tie_word_embeddings": False}


def make_models() -> None:
    g = torch.Generator().manual_seed(20261130)
    base, shared = {}, {}
    for name, shape in shapes().items():
        if len(shape) == 1:
            base[name] = 1.0 + 0.05 * torch.randn(shape, generator=g)
        else:
            base[name] = 0.05 * torch.randn(shape, generator=g)
        shared[name] = torch.randn(shape, generator=g)
    models = {"base": base}
    for k in (1, 2, 3):
        models[f"ft{k}"] = {n: t + 0.006 * shared[n] + 0.008 * torch.randn(t.shape, generator=g)
                            for n, t in base.items()}
    for key, tensors in models.items():
        d = ROOT / "models" / key
        d.mkdir(parents=True, exist_ok=True)
        save_file({n: t.contiguous() for n, t in tensors.items()}, str(d / "model.safetensors"),
                  metadata={"format": "pt"})
        (d / "config.json").write_text(json.dumps(config(), indent=1) + "\n")


def substitute(text: str) -> str:
    for key in ("base", "ft1", "ft2", "ft3"):
        text = text.replace("{" + key + "}", str(ROOT / "models" / key))
    return text


def run_mergekit(case: Path, bindir: Path) -> None:
    text = (case / "recipe.yaml").read_text()
    with tempfile.TemporaryDirectory() as tmp:
        recipe = Path(tmp) / "recipe.yaml"
        recipe.write_text(substitute(text))
        out = Path(tmp) / "out"
        docs = [d for d in text.split("\n---\n") if d.strip()]
        if len(docs) > 1:
            cmd = [str(bindir / "mergekit-multi"), str(recipe), "--intermediate-dir", str(Path(tmp) / "inter"),
                   "--out-path", str(out)]
        else:
            cmd = [str(bindir / "mergekit-yaml"), str(recipe), str(out)]
        proc = subprocess.run(cmd + ["--no-cuda"], capture_output=True, text=True, timeout=600)
        if proc.returncode != 0:
            sys.exit(f"{case.name}: mergekit failed:\n{proc.stderr[-3000:]}")
        expected = case / "expected"
        shutil.rmtree(expected, ignore_errors=True)
        expected.mkdir()
        for f in sorted(out.iterdir()):
            if f.suffix == ".safetensors" or f.name in ("model.safetensors.index.json", "config.json"):
                shutil.copy(f, expected / f.name)
    print(f"{case.name}: {', '.join(sorted(p.name for p in expected.iterdir()))}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mergekit", type=Path, default=Path("/tmp/mk/bin"), help="the venv's bin directory")
    ap.add_argument("cases", nargs="*", help="only these cases (default: all deterministic ones)")
    args = ap.parse_args()
    make_models()
    for case in sorted(p.parent for p in ROOT.glob("*/recipe.yaml")):
        if args.cases and case.name not in args.cases:
            continue
        if "\n# random:" in "\n" + (case / "recipe.yaml").read_text():
            continue
        run_mergekit(case, args.mergekit)


if __name__ == "__main__":
    main()
