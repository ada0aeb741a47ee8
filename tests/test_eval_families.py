"""Real configs everywhere (issue 19 §2): for every causal-LM family we merge, a tiny random model built from a
config shaped like the one the family ships (tests/families.py: pad tokens, tied heads, rope scaling, sliding
windows, biases, soft-capping, logit scales, OPT's projections, GPT-2 and OPT tensors without the base prefix,
Mixtral's per-expert tensors, an attention implementation this machine cannot run). On each, compared with
transformers' own model in float32:

- `lazymerge eval` (layers over the budget, the head in blocks of a few rows) gives the same perplexity;
- greedy generation, streamed and whole-model, gives the same tokens;
- the hidden states the MoE `hidden` router pass reads (each layer's input for a left-padded, masked batch, as
  mergekit-moe batches prompts) are the same.

Nothing raises a traceback; `test_refusals` shows what is refused, in one line."""
from __future__ import annotations

import json
import math

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from evalkit import corpus, one_thread, write_texts  # noqa: E402,F401
from families import CONFIGS, make_family  # noqa: E402

import lazymerge  # noqa: E402
from lazymerge.evaluate.stream import open_stream  # noqa: E402

SEQ, MAX = 24, 200
FAMILIES = sorted(CONFIGS)
PROMPT = "the cat sat on the mat and"


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("families")


@pytest.fixture(scope="module")
def data(root):
    return write_texts(root / "data.jsonl", corpus(6))


def reference_model(model_dir):
    """transformers' own model from the directory, in float32, with the attention it would pick itself when the
    config asks for one this machine cannot run."""
    import transformers as T

    config = T.AutoConfig.from_pretrained(str(model_dir))
    if config._attn_implementation not in (None, "eager", "sdpa"):
        config._attn_implementation = None
    return T.AutoModelForCausalLM.from_pretrained(str(model_dir), config=config, dtype=torch.float32).eval()


def windows_of(model_dir, data) -> torch.Tensor:
    """The windows lazymerge scores, by the documented rule (evaluate.data) with transformers' own tokenizer."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    stream: list[int] = []
    for i, line in enumerate(data.read_text().splitlines()):
        if i:
            stream.append(tok.eos_token_id)
        stream += tok(json.loads(line)["text"])["input_ids"]
    n = min(len(stream), MAX) // SEQ
    return torch.tensor(stream[:n * SEQ]).reshape(n, SEQ)


@pytest.mark.parametrize("family", FAMILIES)
def test_family(root, data, family):
    from transformers import AutoTokenizer

    model_dir = make_family(root / family, family, seed=3)
    ref = reference_model(model_dir)

    # perplexity: 8 KiB, so every layer runs alone over the budget and the head comes in blocks of a few rows
    r = lazymerge.evaluate(model_dir, data, memory="8KiB", seq_len=SEQ, max_tokens=MAX, batch=3)
    windows = windows_of(model_dir, data)
    with torch.no_grad():
        logits = ref(input_ids=windows).logits[:, :-1].double()
    total = float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                    windows[:, 1:].reshape(-1), reduction="sum"))
    assert (r.windows, r.tokens) == (windows.shape[0], windows.shape[0] * (SEQ - 1))
    ppl = math.exp(total / r.tokens)
    print(f"\nMATRIX {family:12s} ppl {ppl:10.4f}  |rel diff| {abs(r.perplexity / ppl - 1):.1e}")
    assert r.total_nll == pytest.approx(total, rel=1e-4)
    assert r.perplexity == pytest.approx(ppl, rel=1e-4)

    # greedy generation: streamed (the head in row blocks) and whole-model (transformers' generate)
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    ids = tok(PROMPT, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = ref.generate(ids, max_new_tokens=3, do_sample=False, eos_token_id=tok.eos_token_id,
                           pad_token_id=tok.eos_token_id)
    expected = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    assert lazymerge.generate(model_dir, PROMPT, max_new_tokens=3, memory="8KiB") == expected
    assert lazymerge.generate(model_dir, PROMPT, max_new_tokens=3, memory="unlimited") == expected

    # the MoE hidden router pass's states: a left-padded batch with its attention mask
    batch = torch.tensor([[0, 0, 5, 9, 12, 7], [1, 30, 22, 3, 17, 11]])
    mask = (torch.arange(6) >= torch.tensor([[2], [0]])).long()
    with torch.no_grad():
        hidden = ref(input_ids=batch, attention_mask=mask, output_hidden_states=True).hidden_states
    stream = open_stream(model_dir, memory="8KiB")
    try:
        states = stream.embed([batch], [mask])
        for i in range(stream.sk.num_layers):
            torch.testing.assert_close(states[0].hidden[:, -1], hidden[i][:, -1], rtol=1e-5, atol=1e-5)
            stream.run_layer(i, states)
    finally:
        stream.close()


@pytest.mark.parametrize("family", ["smollm2", "phi"])
def test_search_on_real_configs(root, data, tmp_path, family):
    """A search over a recipe of two real-shaped models (pad token, tied head; a head bias) runs its trials and
    the best trial is the recipe's own evaluation."""
    pytest.importorskip("optuna")
    a = make_family(root / f"search-{family}-a", family, seed=11)
    b = make_family(root / f"search-{family}-b", family, seed=12)
    recipe = {"merge_method": "linear", "dtype": "float32",
              "models": [{"model": str(a), "parameters": {"weight": 0.5}},
                         {"model": str(b), "parameters": {"weight": 0.5}}]}
    report = lazymerge.search(recipe, data, ["models[0].parameters.weight=0..1"], trials=2, seed=0,
                              study=tmp_path / "s.db", best_file=tmp_path / "best.yaml", memory="64KiB",
                              seq_len=SEQ, max_tokens=MAX)
    assert [t.state for t in report.trials] == ["COMPLETE", "COMPLETE"]
    best = lazymerge.evaluate(report.best_recipe, data, memory="64KiB", seq_len=SEQ, max_tokens=MAX)
    assert best.perplexity == pytest.approx(report.best_perplexity, rel=1e-12)
