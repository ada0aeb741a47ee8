"""Make the mergekit-moe parity cases that tests/test_moe_parity.py checks: tiny Llama/Qwen2/Qwen3 models
(tests/moe_models.py, seeded), mergekit-moe 0.1.5 run on each case in its own venv, and its output stored small
in tests/data/moe_parity/CASE.json: the router weights as values, every other tensor as the SHA-256 of its float32
bytes (under lazymerge's per-expert names: mergekit's fused expert tensors are split per expert), the MoE fields
of its config.json, and hashes of the generated inputs (so a test notices when generation changes).

    python3 benches/moe_parity.py [--mergekit-moe /tmp/mk/bin/mergekit-moe]
"""
from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from moe_models import make_model  # noqa: E402

OUT = ROOT / "tests" / "data" / "moe_parity"
CONFIG_FIELDS = ("model_type", "architectures", "num_local_experts", "num_experts", "num_experts_per_tok",
                 "moe_intermediate_size", "shared_expert_intermediate_size", "norm_topk_prob",
                 "decoder_sparse_step")

P_CODE = ["def return import class", "for while print lambda"]          # 4 words each: same length
P_STORY = ["once upon time the", "the king and queen"]
P_MATH = ["sum product integral matrix"]
P_NEG = ["hello world cat dog"]

CASES = {
    "mixtral_cheap_embed": dict(kind="llama", config=dict(
        gate_mode="cheap_embed", dtype="float32", experts_per_token=2, experts=[
            dict(source_model="ft1", positive_prompts=P_CODE + ["import the"], negative_prompts=P_NEG),
            dict(source_model="ft2", positive_prompts=P_STORY),
            dict(source_model="ft3", positive_prompts=P_MATH)])),
    "mixtral_hidden": dict(kind="llama", config=dict(
        gate_mode="hidden", dtype="float32", experts_per_token=2, experts=[
            dict(source_model="ft1", positive_prompts=P_CODE, negative_prompts=P_NEG),
            dict(source_model="ft2", positive_prompts=P_STORY),
            dict(source_model="ft3", positive_prompts=P_MATH)])),
    "mixtral_hidden_padded": dict(kind="llama", config=dict(   # prompts of different lengths: left padding
        gate_mode="hidden", dtype="bfloat16", experts_per_token=2, experts=[
            dict(source_model="ft1", positive_prompts=["def return", "for while print lambda list dict"],
                 negative_prompts=["hello", "cat dog run jump"]),
            dict(source_model="ft2", positive_prompts=["once upon time the king and queen", "story"])])),
    "qwen2_moe_hidden": dict(kind="qwen2", config=dict(
        gate_mode="hidden", dtype="bfloat16", experts_per_token=1, experts=[
            dict(source_model="ft1", positive_prompts=P_CODE),
            dict(source_model="ft2", positive_prompts=P_STORY)],
        # mergekit-moe 0.1.5 opens only the base and the routed experts: a shared expert must be one of them
        shared_experts=[dict(source_model="base", positive_prompts=P_MATH)])),
    "qwen3_moe_hidden": dict(kind="qwen3", config=dict(
        gate_mode="hidden", dtype="float32", experts_per_token=2, experts=[
            dict(source_model="ft1", positive_prompts=P_CODE),
            dict(source_model="ft2", positive_prompts=P_STORY, negative_prompts=P_NEG)])),
    "qwen3_moe_cheap_embed": dict(kind="qwen3", config=dict(
        gate_mode="cheap_embed", dtype="float32", experts_per_token=1, experts=[
            dict(source_model="ft1", positive_prompts=P_CODE),
            dict(source_model="ft2", positive_prompts=P_STORY)])),
}
SEEDS = {"base": 11, "ft1": 12, "ft2": 13, "ft3": 14}


def make_inputs(root: Path, kind: str) -> dict[str, Path]:
    base = make_model(root / "base", kind, SEEDS["base"])
    out = {"base": base}
    for name in ("ft1", "ft2", "ft3"):
        out[name] = make_model(root / name, kind, SEEDS[name], like=base, scale=0.05)
    return out


def recipe(case: dict, paths: dict[str, Path]) -> dict:
    cfg = json.loads(json.dumps(case["config"]))
    cfg["base_model"] = str(paths["base"])
    for e in cfg["experts"] + cfg.get("shared_experts", []):
        e["source_model"] = str(paths[e["source_model"]])
    return cfg


def sha(t: torch.Tensor) -> str:
    return hashlib.sha256(t.float().contiguous().numpy().tobytes()).hexdigest()


def input_hashes(paths: dict[str, Path]) -> dict[str, str]:
    return {k: hashlib.sha256((p / "model.safetensors").read_bytes()).hexdigest() for k, p in paths.items()}


def unfuse(tensors: dict[str, torch.Tensor], kind: str) -> dict[str, torch.Tensor]:
    """mergekit-moe's output under lazymerge's per-expert names."""
    out = {}
    for name, t in tensors.items():
        if name.endswith("mlp.experts.gate_up_proj") or name.endswith("mlp.experts.down_proj"):
            prefix = name.rsplit(".experts.", 1)[0].replace(".mlp", ".block_sparse_moe" if kind == "llama" else ".mlp")
            for e in range(t.shape[0]):
                if name.endswith("gate_up_proj"):
                    g, u = t[e].chunk(2, dim=0)
                    pair = (("w1", g), ("w3", u)) if kind == "llama" else (("gate_proj", g), ("up_proj", u))
                    for nm, v in pair:
                        out[f"{prefix}.experts.{e}.{nm}.weight"] = v
                else:
                    nm = "w2" if kind == "llama" else "down_proj"
                    out[f"{prefix}.experts.{e}.{nm}.weight"] = t[e]
        elif kind == "llama" and name.endswith("mlp.gate.weight"):
            out[name.replace(".mlp.", ".block_sparse_moe.")] = t
        else:
            out[name] = t
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mergekit-moe", default="/tmp/mk/bin/mergekit-moe")
    OUT.mkdir(parents=True, exist_ok=True)
    ap.add_argument("cases", nargs="*", help="only these cases (default: all)")
    args = ap.parse_args()
    for name, case in CASES.items():
        if args.cases and name not in args.cases:
            continue
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            paths = make_inputs(root / "models", case["kind"])
            cfg = recipe(case, paths)
            (root / "moe.yaml").write_text(yaml.safe_dump(cfg))
            subprocess.run([args.mergekit_moe, str(root / "moe.yaml"), str(root / "out")], check=True,
                           capture_output=True)
            tensors = {}
            for f in sorted((root / "out").glob("*.safetensors")):
                tensors.update(load_file(str(f)))
            ours = unfuse(tensors, case["kind"])
            mk_config = json.loads((root / "out" / "config.json").read_text())
            routers = {k: v.float().tolist() for k, v in ours.items() if k.endswith("gate.weight")}
            expected = {
                "kind": case["kind"], "config": case["config"],
                "inputs": input_hashes(paths),
                "routers": routers,
                "dtypes": {k: str(v.dtype).removeprefix("torch.") for k, v in ours.items()},
                "sha256": {k: sha(v) for k, v in ours.items() if k not in routers},
                "mergekit_config": {k: mk_config.get(k) for k in CONFIG_FIELDS if k in mk_config},
            }
            (OUT / f"{name}.json").write_text(json.dumps(expected, indent=1) + "\n")
            print(f"{name}: {len(ours)} tensors, {len(routers)} routers")


if __name__ == "__main__":
    main()
