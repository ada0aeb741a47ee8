"""lm-eval on the layer-streaming forward (`lazymerge.lm_eval.LazyMergeLM`) equals lm-eval's own `hf` model in
float32 on the same tasks: loglikelihoods within 1e-4 relative, is_greedy, generations and metrics identical, for
a checkpoint and for a recipe (never written) against its written merge, also under a budget smaller than one
decoder layer (KV caches and merged weights spilled to disk, requests in several passes)."""
from __future__ import annotations

import pytest

pytest.importorskip("lm_eval")
pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from evalkit import make_finetune, make_model, one_thread  # noqa: E402,F401
from lmevalkit import TASKS, assert_same_results, write_tasks  # noqa: E402

import lazymerge.lm_eval  # noqa: E402  (registers lm-eval's model name `lazymerge`, as a user's import does)

SMALL = "16KiB"           # a tiny model's decoder layer holds ~37 KiB of float32 weights


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("lmeval")


@pytest.fixture(scope="module")
def taskdir(root, llama):
    return write_tasks(root / "tasks", greedy_model=llama)


@pytest.fixture(scope="module")
def manager(taskdir):
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(taskdir), include_defaults=False)


def evaluate(model, manager, tasks=TASKS, **kwargs):
    import lm_eval

    # no stderr (bootstrap_iters=0): the comparison leaves it out, and lm-eval's bootstrap is most of a run's time
    return lm_eval.simple_evaluate(model=model, tasks=list(tasks), task_manager=manager, log_samples=True,
                                   verbosity="ERROR", bootstrap_iters=0, **kwargs)


def ours(target, manager, tasks=TASKS, **kwargs):
    """lm-eval's results for LazyMergeLM(target, **kwargs), and lazymerge's report of the run."""
    import lazymerge.lm_eval

    lm = lazymerge.lm_eval.LazyMergeLM(target, **kwargs)
    try:
        return evaluate(lm, manager, tasks), lm.model.report()
    finally:
        lm.close()


def hf(model_dir, manager, tasks=TASKS):
    return evaluate("hf", manager, tasks, model_args={"pretrained": str(model_dir), "dtype": "float32",
                                                      "device": "cpu"})


@pytest.fixture(scope="module")
def llama(root):
    return make_model(root / "llama", "llama")


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_checkpoint_equals_hf(root, manager, llama, arch):
    model_dir = llama if arch == "llama" else make_model(root / arch, arch)
    ref = hf(model_dir, manager)
    # by name, as `lm_eval --model lazymerge` does, within the default budget (weights kept, one pass)
    by_name = evaluate("lazymerge", manager, model_args={"pretrained": str(model_dir)})
    seen = assert_same_results(ref, by_name)
    assert (seen["loglikelihoods"], seen["generations"]) == (12 * 4 + 10 + 5, 10)
    assert seen["greedy"] >= (2 if arch == "llama" else 0)           # tiny_ll holds llama's greedy words
    # under a budget smaller than one layer, hidden states of 4 KiB per pass (many passes): the same answers
    small, report = ours(str(model_dir), manager, memory=SMALL, activations="4KiB")
    assert_same_results(ref, small)
    assert report["over_budget_units"] > 0 and report["kept_weight_bytes"] == 0
    assert report["passes"] > 2 and report["kv_spilled_bytes"] > 0
    assert report["peak_rss"] >= report["start_rss"] > 0


def test_recipe_equals_its_written_merge(root, manager, tmp_path):
    """A TIES recipe in bfloat16 evaluated layer by layer (never written) against lm-eval's `hf` on the written
    merge, within the default budget and under one smaller than a layer (the merge in row blocks, merged weights
    spilled for the decoding steps)."""
    import lazymerge

    base = make_model(root / "r-base", "llama", seed=1)
    ft1, ft2 = make_finetune(base, root / "r-ft1", seed=11), make_finetune(base, root / "r-ft2", seed=12)
    recipe = {"merge_method": "ties", "base_model": str(base), "dtype": "bfloat16",
              "models": [{"model": str(ft1), "parameters": {"weight": 0.6, "density": 0.5}},
                         {"model": str(ft2), "parameters": {"weight": 0.4, "density": 0.7}}]}
    out = tmp_path / "merged"
    lazymerge.merge(recipe, out, memory="unlimited")
    ref = hf(out, manager)
    for memory in (None, SMALL):
        # under SMALL, several passes from the first call on: the merged weights are spilled once, and the other
        # request types and every decoding step read them back instead of merging again
        result, report = ours(recipe, manager, memory=memory, activations=None if memory is None else "4KiB")
        assert_same_results(ref, result)
    assert report["weights_spilled_bytes"] > 0 and report["passes"] > 2


def test_moe_recipe_equals_its_written_merge(root, manager, llama, tmp_path):
    """A MoE recipe (gate_mode hidden: its routers come from a pass of the base model over the prompts) scored
    layer by layer equals lm-eval's `hf` on the written MoE (a Mixtral). The routers are computed on the lm-eval
    path by the merge's own prepare_routers; without them the stream has no `...mlp.gate.weight`."""
    import lazymerge

    ft = make_finetune(llama, root / "moe-ft", seed=31, std=0.1)
    recipe = {"base_model": str(llama), "gate_mode": "hidden", "dtype": "float32", "experts_per_token": 1,
              "experts": [{"source_model": str(llama), "positive_prompts": ["the cat sat on the mat"]},
                          {"source_model": str(ft), "positive_prompts": ["one two three four five"]}]}
    lazymerge.merge(recipe, tmp_path / "moe", memory="unlimited")
    tasks = ("tiny_mc", "tiny_ll")
    ref = hf(tmp_path / "moe", manager, tasks)
    result, _ = ours(recipe, manager, tasks, memory=SMALL)
    seen = assert_same_results(ref, result, tasks)
    assert seen["loglikelihoods"] == 12 * 4 + 10


def test_the_name_is_registered_beside_lm_evals_own():
    import lm_eval.api.registry as reg

    import lazymerge.lm_eval

    assert reg.get_model("lazymerge") is lazymerge.lm_eval.LazyMergeLM
    assert reg.get_model("hf").__name__ == "HFLM"
    from lm_eval.api.model import LM

    assert issubclass(lazymerge.lm_eval.LazyMergeLM, LM)


def test_sampling_and_unknown_arguments_are_refused(llama):
    import lazymerge.lm_eval
    from lazymerge.errors import LazyMergeError

    model_dir = llama
    with pytest.raises(LazyMergeError, match="unknown argument.*temperature"):
        lazymerge.lm_eval.LazyMergeLM(str(model_dir), temperature=0.5)
    lm = lazymerge.lm_eval.LazyMergeLM(str(model_dir))
    try:
        from lm_eval.api.instance import Instance

        req = Instance("generate_until", {}, ("the cat", {"until": ["."], "do_sample": True, "temperature": 1.0}),
                       0)
        with pytest.raises(LazyMergeError, match="greedily"):
            lm.generate_until([req])
    finally:
        lm.close()
