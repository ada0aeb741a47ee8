"""Mixture of experts from dense models: the output loads in transformers and computes what its parts compute,
bad configs fail in one line before any work, and the plan describes the MoE. (Parity with mergekit-moe's router
formulas and copies: test_moe_parity.py.)"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

pytest.importorskip("transformers")

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from conftest import read_all  # noqa: E402
from moe_models import make_model  # noqa: E402

import lazymerge  # noqa: E402
from lazymerge.errors import LazyMergeError  # noqa: E402

P = {"code": ["def return import class"], "story": ["once upon time the king"], "math": ["sum product integral"],
     "chat": ["hello world cat dog"]}


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("llama")
    base = make_model(root / "base", "llama", 1)
    return {"base": base, "ft1": make_model(root / "ft1", "llama", 2, like=base),
            "ft2": make_model(root / "ft2", "llama", 3, like=base)}


def _logits(path: Path, ids: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    with torch.no_grad():
        return model(input_ids=ids).logits


def _generates(path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(path))
    tok = AutoTokenizer.from_pretrained(str(path))
    ids = tok("<s>def return", return_tensors="pt", add_special_tokens=False)["input_ids"]
    out = model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=2)
    assert out.shape[1] == ids.shape[1] + 5


def _moe(base: Path, experts: list[Path], gate_mode: str = "random", **extra) -> dict:
    prompts = list(P.values())
    return {"base_model": str(base), "gate_mode": gate_mode, "dtype": "float32",
            "experts": [{"source_model": str(e), "positive_prompts": prompts[i % len(prompts)]}
                        for i, e in enumerate(experts)], **extra}


IDS = torch.tensor([[1, 5, 9, 12, 7, 30, 22, 3, 17, 11]])


@pytest.mark.parametrize("kind,arch", [("llama", "MixtralForCausalLM"), ("qwen2", "Qwen2MoeForCausalLM"),
                                       ("qwen3", "Qwen3MoeForCausalLM")])
def test_identical_experts_compute_the_base(tmp_path: Path, kind: str, arch: str) -> None:
    """Every routed expert is the base: whatever the router picks, the top-k weights sum to 1 and the MoE is the
    base (a Qwen2-MoE's shared expert is added on top, so it is a model whose MLP outputs zero: down_proj = 0)."""
    base = make_model(tmp_path / "base", kind, 5)
    extra = {}
    if kind == "qwen2":
        zero = make_model(tmp_path / "zero", kind, 6, like=base, zero_down=True)
        extra["shared_experts"] = [{"source_model": str(zero), "positive_prompts": P["chat"]}]
    recipe = _moe(base, [base] * 4, "cheap_embed", experts_per_token=2, **extra)
    report = lazymerge.merge(recipe, tmp_path / "moe", memory="unlimited")
    assert any("same model" in w for w in report.warnings)
    config = json.loads((tmp_path / "moe" / "config.json").read_text())
    assert config["architectures"] == [arch]
    diff = (_logits(tmp_path / "moe", IDS) - _logits(base, IDS)).abs().max().item()
    assert diff <= 1e-5, diff
    _generates(tmp_path / "moe")


def test_distinct_experts_route_and_generate(tmp_path: Path, llama: dict) -> None:
    """A real MoE (different experts, prompts routers): transformers loads it, its expert weights are the
    experts' MLPs, and its logits differ from the base's."""
    recipe = _moe(llama["base"], [llama["ft1"], llama["ft2"]], "cheap_embed", experts_per_token=1)
    lazymerge.merge(recipe, tmp_path / "moe", memory="unlimited")
    out = read_all(tmp_path / "moe")
    ft2 = read_all(llama["ft2"])
    assert torch.equal(out["model.layers.1.block_sparse_moe.experts.1.w2.weight"],
                       ft2["model.layers.1.mlp.down_proj.weight"])
    assert not torch.allclose(_logits(tmp_path / "moe", IDS), _logits(llama["base"], IDS), atol=1e-3)
    _generates(tmp_path / "moe")


def test_hidden_mode_and_bfloat16_output(tmp_path: Path, llama: dict) -> None:
    recipe = _moe(llama["base"], [llama["ft1"], llama["ft2"]], "hidden", experts_per_token=1)
    recipe["dtype"] = "bfloat16"
    lazymerge.merge(recipe, tmp_path / "moe", memory="unlimited")
    out = read_all(tmp_path / "moe")
    gate = out["model.layers.1.block_sparse_moe.gate.weight"]
    assert gate.dtype == torch.bfloat16 and gate.shape == (2, 32)
    assert torch.allclose(gate.float().norm(dim=-1), torch.ones(2), atol=1e-2)   # unit rows
    assert json.loads((tmp_path / "moe" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    _generates(tmp_path / "moe")


def test_random_gates_and_noise_are_deterministic_under_any_budget(tmp_path: Path, llama: dict) -> None:
    recipe = _moe(llama["base"], [llama["ft1"], llama["ft2"]], "uniform_random", experts_per_token=1)
    recipe["experts"][0]["noise_scale"] = 0.01
    recipe["experts"][1]["residual_scale"] = 0.5
    lazymerge.merge(recipe, tmp_path / "a", memory="unlimited", seed=7)
    lazymerge.merge(recipe, tmp_path / "b", memory="unlimited", seed=7, max_block_rows=3, workers=1)
    lazymerge.merge(recipe, tmp_path / "c", memory="unlimited", seed=8)
    a, b, c = (read_all(tmp_path / d) for d in "abc")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    gate = "model.layers.0.block_sparse_moe.gate.weight"
    assert not torch.equal(a[gate], c[gate])
    bound = (1 / 32) ** 0.5
    assert a[gate].abs().max() <= bound and a[gate].std() > bound / 3
    ft1, ft2 = read_all(llama["ft1"]), read_all(llama["ft2"])
    w1 = "model.layers.0.block_sparse_moe.experts.0.w1.weight"
    noise = a[w1] - ft1["model.layers.0.mlp.gate_proj.weight"]
    assert 0.008 < noise.std().item() < 0.012 and abs(noise.mean().item()) < 0.002
    assert torch.equal(a["model.layers.0.block_sparse_moe.experts.1.w2.weight"],
                       ft2["model.layers.0.mlp.down_proj.weight"] * 0.5)
    assert torch.equal(a["model.layers.0.block_sparse_moe.experts.1.w1.weight"],
                       ft2["model.layers.0.mlp.gate_proj.weight"])


def test_lora_expert_and_a_stage_expert(tmp_path: Path, llama: dict) -> None:
    """Experts may be `base+adapter` (PEFT LoRA, merged as PEFT merges it) and earlier stages of the recipe."""
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(llama["base"]))
    pm = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["gate_proj", "down_proj"]))
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    pm.save_pretrained(str(tmp_path / "adapter"))
    merged = {k: v.detach() for k, v in pm.merge_and_unload().state_dict().items()}

    stage = {"name": "avg", "merge_method": "linear", "models": [
        {"model": str(llama["ft1"]), "parameters": {"weight": 0.5}},
        {"model": str(llama["ft2"]), "parameters": {"weight": 0.5}}]}
    moe = _moe(llama["base"], [Path(f"{llama['base']}+{tmp_path / 'adapter'}"), Path("avg")], "cheap_embed",
               experts_per_token=1)
    moe["experts"][1]["source_model"] = "avg"
    moe["merge_method"] = "moe"                  # the recipe form (the other tests use mergekit-moe's bare config)
    text = yaml.safe_dump_all([stage, moe])
    lazymerge.merge(text, tmp_path / "moe", memory="unlimited")
    lazymerge.merge(yaml.safe_dump(stage), tmp_path / "avg", memory="unlimited")
    out, avg = read_all(tmp_path / "moe"), read_all(tmp_path / "avg")
    # a LoRA base in hidden mode: routers from the merged-and-unloaded model, streamed layer by layer
    lora_base = f"{llama['base']}+{tmp_path / 'adapter'}"
    unloaded = {"merge_method": "passthrough", "models": [{"model": lora_base}]}
    lazymerge.merge(unloaded, tmp_path / "unloaded", memory="unlimited")
    for name, base_ref in (("h_lora", lora_base), ("h_dir", str(tmp_path / "unloaded"))):
        rec = _moe(Path(base_ref), [llama["ft1"], llama["ft2"]], "hidden", experts_per_token=1)
        lazymerge.merge(rec, tmp_path / name, memory="unlimited")
    g_lora, g_dir = read_all(tmp_path / "h_lora"), read_all(tmp_path / "h_dir")
    gate = "model.layers.1.block_sparse_moe.gate.weight"
    assert torch.allclose(g_lora[gate], g_dir[gate], atol=1e-6) and not torch.equal(
        g_lora[gate], read_all(tmp_path / "moe")[gate])
    for i in range(2):
        for w, prm in (("w1", "gate_proj"), ("w2", "down_proj"), ("w3", "up_proj")):
            got = out[f"model.layers.{i}.block_sparse_moe.experts.0.{w}.weight"]
            assert torch.allclose(got, merged[f"model.layers.{i}.mlp.{prm}.weight"], atol=1e-5)
            assert torch.equal(out[f"model.layers.{i}.block_sparse_moe.experts.1.{w}.weight"],
                               avg[f"model.layers.{i}.mlp.{prm}.weight"])


def test_plan_describes_the_moe(tmp_path: Path, llama: dict) -> None:
    path = tmp_path / "moe.yaml"
    path.write_text(yaml.safe_dump(_moe(llama["base"], [llama["ft1"], llama["ft2"]], "hidden")))
    res = subprocess.run([sys.executable, "-m", "lazymerge.cli", "plan", str(path), "--memory", "1GiB"],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    text = res.stdout
    for needle in ("Mixtral (MixtralForCausalLM) from llama", "experts       2, 2 per token", str(llama["ft2"]),
                   "gate_mode     hidden (2 prompts; router pass peak", "write", "est. peak", "budget        1.00 GiB"):
        assert needle in text, (needle, text)


def _bad(tmp_path: Path, recipe: dict) -> str:
    """The CLI's one-line failure (in process: click's runner; test_cli_errors.py runs the real entry point)."""
    from click.testing import CliRunner

    from lazymerge.cli import main

    path = tmp_path / "moe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    res = CliRunner().invoke(main, ["run", str(path), str(tmp_path / "out")])
    assert res.exit_code == 2, res.output
    assert res.exception is None or isinstance(res.exception, SystemExit)
    err = res.stderr if hasattr(res, "stderr") else res.output
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: "), err
    assert not (tmp_path / "out").exists()
    return err


def test_bad_moe_configs_fail_in_one_line_before_any_work(tmp_path: Path, llama: dict) -> None:
    ok = _moe(llama["base"], [llama["ft1"], llama["ft2"]], "cheap_embed")
    assert "experts_per_token is 3" in _bad(tmp_path, {**ok, "experts_per_token": 3})
    empty = json.loads(json.dumps(ok))
    empty["experts"][1]["positive_prompts"] = []
    assert "experts[1].positive_prompts: empty list" in _bad(tmp_path, empty)
    missing = json.loads(json.dumps(ok))
    del missing["experts"][0]["positive_prompts"]
    assert "experts[0].positive_prompts: missing" in _bad(tmp_path, missing)
    assert "gate_mode: unknown mode 'hiden' (did you mean 'hidden'?)" in _bad(tmp_path, {**ok, "gate_mode": "hiden"})
    # another architecture
    qwen = make_model(tmp_path / "qwen3", "qwen3", 4)
    other = json.loads(json.dumps(ok))
    other["experts"][1]["source_model"] = str(qwen)
    assert "is a qwen3 model" in _bad(tmp_path, other)
    # another shape
    wide = make_model(tmp_path / "wide", "llama", 4, intermediate_size=48)
    shape = json.loads(json.dumps(ok))
    shape["experts"][0]["source_model"] = str(wide)
    assert "mlp.gate_proj.weight' has shape [48, 32]" in _bad(tmp_path, shape)
    # no tokenizer for a prompts mode (random needs none)
    bare = tmp_path / "bare"
    bare.mkdir()
    for f in ("config.json", "model.safetensors"):
        (bare / f).write_bytes((llama["base"] / f).read_bytes())
    assert "no tokenizer files" in _bad(tmp_path, {**ok, "base_model": str(bare), "gate_mode": "hidden"})
    assert "Qwen3 MoE takes qwen3 models" in _bad(tmp_path, {**ok, "architecture": "qwen3"})
    q2 = make_model(tmp_path / "qwen2", "qwen2", 4)
    no_shared = _moe(q2, [q2, q2], "random")
    assert "Qwen MoE takes llama/mistral/qwen2 models and exactly one shared expert" in _bad(tmp_path, no_shared)
    assert "unknown key 'expert'" in _bad(tmp_path, {**ok, "expert": []})
    lazymerge.plan({**ok, "base_model": str(bare), "gate_mode": "random"}).close()


def test_the_api_raises_lazymerge_errors(llama: dict) -> None:
    moe = {"name": "m", "base_model": str(llama["base"]), "gate_mode": "random",
           "experts": [{"source_model": str(llama["ft1"])}, {"source_model": str(llama["ft2"])}]}
    later = {"merge_method": "linear", "models": [{"model": "m"}, {"model": str(llama["ft1"])}]}
    with pytest.raises(LazyMergeError, match="a MoE can only be the output stage"):
        lazymerge.plan(yaml.safe_dump_all([moe, later]))
    with pytest.raises(LazyMergeError, match="experts: must be a non-empty list"):
        lazymerge.plan({"base_model": str(llama["base"]), "experts": []})
    with pytest.raises(LazyMergeError, match="same prompts"):
        lazymerge.plan({"base_model": str(llama["base"]), "gate_mode": "cheap_embed", "experts": [
            {"source_model": str(llama["ft1"]), "positive_prompts": ["a"]},
            {"source_model": str(llama["ft2"]), "positive_prompts": ["a"]}]})


@pytest.mark.parametrize("gate_mode", ["hidden", "cheap_embed"])
def test_eval_of_a_moe_recipe_equals_its_written_merge(tmp_path: Path, gate_mode: str) -> None:
    """`lazymerge eval` of a MoE recipe failed with `no tensor ...mlp.gate.weight`: its routers were never
    computed on the evaluation path. They are now, by the merge's own `prepare_routers`; and the written MoE
    (per-expert tensors under block_sparse_moe, as mergekit-moe writes them) is read through transformers'
    conversion rules. The base is shaped like SmolLM2 (pad token 2, tied embeddings, bfloat16)."""
    from evalkit import corpus, write_texts
    from families import make_family

    base = make_family(tmp_path / "base", "smollm2", seed=1)
    ft = make_family(tmp_path / "ft", "smollm2", seed=2)
    data = write_texts(tmp_path / "data.jsonl", corpus(6))
    recipe = _moe(base, [base, ft], gate_mode, experts_per_token=1)
    lazymerge.merge(recipe, tmp_path / "moe", memory="unlimited")
    args = dict(memory="64KiB", seq_len=24, max_tokens=200)
    stages: list[str] = []
    lazy = lazymerge.evaluate(recipe, data, progress=lambda p: stages.append(p.stage), **args)
    written = lazymerge.evaluate(tmp_path / "moe", data, **args)
    assert lazy.window_nll == written.window_nll
    assert (any(s.startswith("routers: layer") for s in stages)) == (gate_mode == "hidden")
    # and the written MoE is the model transformers loads from it
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "moe"), dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "moe"))
    ids = tok(corpus(1)[0], return_tensors="pt")["input_ids"][:, :24]
    with torch.no_grad():
        nll = torch.nn.functional.cross_entropy(model(input_ids=ids).logits[0, :-1].double(), ids[0, 1:],
                                                reduction="sum")
    first = lazymerge.evaluate(tmp_path / "moe", data, **{**args, "max_tokens": 24})
    assert first.total_nll == pytest.approx(float(nll), rel=1e-4)


def test_hidden_router_pass_over_budget_is_reported(tmp_path: Path, llama: dict) -> None:
    """The hidden router pass streams the base inside the run's --memory; a base layer larger than it runs alone
    and says so in the merge's report (it used to be silent)."""
    recipe = _moe(llama["base"], [llama["ft1"], llama["ft2"]], "hidden", experts_per_token=1)
    report = lazymerge.merge(recipe, tmp_path / "moe", memory="8KiB")
    assert any(w.startswith("gate_mode hidden:") and "exceed --memory" in w for w in report.warnings), \
        report.warnings
    roomy = lazymerge.merge(recipe, tmp_path / "roomy", memory="unlimited")
    assert not any(w.startswith("gate_mode hidden:") for w in roomy.warnings)
    assert read_all(tmp_path / "moe").keys() == read_all(tmp_path / "roomy").keys()
