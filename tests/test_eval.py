"""`lazymerge.evaluate`: out-of-core perplexity equals transformers' whole-model evaluation; a recipe evaluated
without writing equals its written merge evaluated."""
from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from evalkit import (corpus, make_finetune, make_model, one_thread, reference_eval,  # noqa: E402,F401
                     reference_windows, write_texts)

import lazymerge  # noqa: E402

SEQ, MAX = 32, 400


@pytest.fixture(scope="module")
def eval_root(tmp_path_factory):
    return tmp_path_factory.mktemp("eval")


@pytest.fixture(scope="module")
def data(eval_root):
    return write_texts(eval_root / "data.jsonl", corpus(10))


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma", "gpt2"])
def test_equals_transformers_whole_model(eval_root, data, arch):
    model_dir = make_model(eval_root / arch, arch)
    windows = reference_windows(model_dir, corpus(10), SEQ, MAX)
    total, ppl, count = reference_eval(model_dir, windows)
    # 8 KiB: smaller than one layer, so every layer runs alone over budget and the head comes in many blocks
    r = lazymerge.evaluate(model_dir, data, memory="8KiB", seq_len=SEQ, max_tokens=MAX, batch=5)
    assert (r.windows, r.tokens, r.seq_len) == (len(windows), count, SEQ)
    assert r.total_nll == pytest.approx(total, rel=1e-4)
    assert r.perplexity == pytest.approx(ppl, rel=1e-4)
    assert r.nll == pytest.approx(total / count, rel=1e-4)
    assert r.ppl_low <= r.perplexity <= r.ppl_high
    assert r.over_budget_units > 0 and r.largest_unit > 8 * 1024


@pytest.fixture(scope="module")
def llama_set(eval_root):
    base = make_model(eval_root / "m-base", "llama", seed=1)
    return {"base": base, "ft1": make_finetune(base, eval_root / "m-ft1", seed=11),
            "ft2": make_finetune(base, eval_root / "m-ft2", seed=12)}


RECIPES = {
    "ties_bf16": lambda m: {"merge_method": "ties", "base_model": str(m["base"]), "dtype": "bfloat16",
                            "models": [{"model": str(m["ft1"]), "parameters": {"weight": 0.6, "density": 0.5}},
                                       {"model": str(m["ft2"]), "parameters": {"weight": 0.4, "density": 0.7}}]},
    "slerp_f32": lambda m: {"merge_method": "slerp", "base_model": str(m["base"]), "dtype": "float32",
                            "models": [{"model": str(m["base"])}, {"model": str(m["ft1"])}],
                            "parameters": {"t": [0.1, 0.9]}},
}


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_recipe_equals_written_merge_exactly(eval_root, data, llama_set, name, tmp_path):
    recipe = RECIPES[name](llama_set)
    out = tmp_path / "merged"
    lazymerge.merge(recipe, out, memory="unlimited")          # whole tensors; eval merges in row blocks
    # 16 KiB: layers over budget, the merge in row blocks; 512 KiB: whole tensors, the head in 20-row blocks
    for memory in ("16KiB", "512KiB"):
        written = lazymerge.evaluate(out, data, memory=memory, seq_len=SEQ, max_tokens=MAX, batch=3)
        lazy = lazymerge.evaluate(recipe, data, memory=memory, seq_len=SEQ, max_tokens=MAX, batch=3)
        assert lazy.window_nll == written.window_nll           # bit for bit, window by window
        assert lazy.perplexity == written.perplexity
    # and the merge is not a no-op: it differs from its inputs
    base = lazymerge.evaluate(llama_set["base"], data, memory="16KiB", seq_len=SEQ, max_tokens=MAX, batch=3)
    assert base.total_nll != lazy.total_nll
    assert math.isfinite(lazy.perplexity)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu(eval_root, data, llama_set):
    cpu = lazymerge.evaluate(llama_set["base"], data, memory="16KiB", seq_len=SEQ, max_tokens=MAX)
    gpu = lazymerge.evaluate(llama_set["base"], data, memory="16KiB", seq_len=SEQ, max_tokens=MAX, device="cuda")
    assert gpu.device.startswith("cuda")
    assert gpu.total_nll == pytest.approx(cpu.total_nll, rel=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_streamed_generation_matches_cpu(llama_set):
    """Streamed generation on CUDA: the head's row blocks move to the device of the hidden states (they did not;
    tests/test_eval_correctness.py shows the device handling without a GPU)."""
    cpu = lazymerge.generate(llama_set["base"], "the cat sat on", max_new_tokens=4, memory="16KiB")
    gpu = lazymerge.generate(llama_set["base"], "the cat sat on", max_new_tokens=4, memory="16KiB", device="cuda")
    assert gpu == cpu
