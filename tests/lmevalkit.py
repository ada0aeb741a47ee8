"""lm-eval tasks written here, with local JSON data (`dataset_path: json`, `data_files`), for the lm-eval tests:
multiple choice, loglikelihood (with `acc`: is_greedy), rolling loglikelihood (documents longer than the tiny
models' 128 positions, so several windows) and generation (stop strings, max_gen_toks). And the comparison of two
lm-eval runs sample by sample."""
from __future__ import annotations

import json
import math
import random
from pathlib import Path

from evalkit import WORDS, corpus

TASKS = ("tiny_mc", "tiny_ll", "tiny_ppl", "tiny_gen")
METRIC_AGG = "    aggregation: mean\n    higher_is_better: true\n"


def _words(rng: random.Random, lo: int, hi: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))


def _task(d: Path, name: str, rows: list[dict], body: str) -> None:
    (d / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (d / f"{name}.yaml").write_text(f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
                                    f"    test: {d / (name + '.jsonl')}\ntest_split: test\n" + body)


def greedy_words(model_dir: Path, contexts: list[str], n: int = 2) -> list[str]:
    """`model_dir`'s greedy continuation (n tokens, transformers' generate) of each context, as text: targets
    whose is_greedy is True (a random model's is_greedy is otherwise almost always False)."""
    import torch
    import transformers as T

    tok = T.AutoTokenizer.from_pretrained(str(model_dir))
    model = T.AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    out = []
    with torch.no_grad():
        for c in contexts:
            ids = tok(c, return_tensors="pt")["input_ids"]
            new = model.generate(ids, max_new_tokens=n, do_sample=False, pad_token_id=0)[0, ids.shape[1]:]
            out.append(tok.decode(new))
    return out


def write_tasks(d: Path, seed: int = 0, greedy_model: Path | None = None) -> Path:
    """The four tasks in `d`; with `greedy_model`, half of tiny_ll's targets are that model's greedy words."""
    d.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    _task(d, "tiny_mc", [{"question": _words(rng, 4, 12), "choices": [_words(rng, 1, 4) for _ in range(4)],
                          "label": rng.randrange(4)} for _ in range(12)],
          'output_type: multiple_choice\ndoc_to_text: "Question: {{question}}\\nAnswer:"\n'
          'doc_to_choice: "{{choices}}"\ndoc_to_target: label\nmetric_list:\n'
          f"  - metric: acc\n{METRIC_AGG}  - metric: acc_norm\n{METRIC_AGG}")
    ll = [{"context": _words(rng, 3, 15), "target": " " + rng.choice(WORDS)} for _ in range(10)]
    if greedy_model is not None:
        for row, words in zip(ll[::2], greedy_words(greedy_model, [r["context"] for r in ll[::2]])):
            row["target"] = words
    _task(d, "tiny_ll", ll,
          'output_type: loglikelihood\ndoc_to_text: "{{context}}"\ndoc_to_target: "{{target}}"\nmetric_list:\n'
          "  - metric: perplexity\n    aggregation: perplexity\n    higher_is_better: false\n"
          f"  - metric: acc\n{METRIC_AGG}")
    _task(d, "tiny_ppl", [{"text": " ".join([doc] * 3)} for doc in corpus(5, seed=3)],
          'output_type: loglikelihood_rolling\ndoc_to_text: ""\ndoc_to_target: "{{text}}"\nmetric_list:\n'
          + "".join(f"  - metric: {m}\n    aggregation: {agg}\n    higher_is_better: false\n" for m, agg in (
              ("word_perplexity", "weighted_perplexity"), ("byte_perplexity", "weighted_perplexity"),
              ("bits_per_byte", "bits_per_byte"))))
    _task(d, "tiny_gen", [{"prompt": _words(rng, 3, 15), "answer": rng.choice(WORDS)} for _ in range(10)],
          'output_type: generate_until\ndoc_to_text: "{{prompt}}"\ndoc_to_target: "{{answer}}"\n'
          'generation_kwargs:\n  until: [".", " sun"]\n  max_gen_toks: 12\n  do_sample: false\nmetric_list:\n'
          f"  - metric: exact_match\n{METRIC_AGG}")
    return d


def assert_same_results(ref: dict, ours: dict, tasks=TASKS, rel: float = 1e-4) -> dict:
    """Sample by sample: loglikelihoods within `rel` (relative), is_greedy and generations identical; discrete
    metrics identical, continuous ones (perplexities) within `rel`. Returns counts of what was compared."""
    seen = {"loglikelihoods": 0, "greedy": 0, "generations": 0, "stopped_early": 0}
    for task in tasks:
        a_samples, b_samples = ref["samples"][task], ours["samples"][task]
        assert [s["doc_id"] for s in a_samples] == [s["doc_id"] for s in b_samples]
        for a, b in zip(a_samples, b_samples):
            for x, y in zip(a["resps"], b["resps"], strict=True):
                x, y = x[0], y[0]
                if isinstance(x, str):
                    assert x == y, f"{task} doc {a['doc_id']}: generated {y!r}, hf {x!r}"
                    seen["generations"] += 1
                    seen["stopped_early"] += "." not in x and " sun" not in x and len(x.split()) < 6
                elif isinstance(x, (tuple, list)):
                    assert math.isclose(y[0], x[0], rel_tol=rel), (task, a["doc_id"], x, y)
                    assert bool(y[1]) == bool(x[1]), (task, a["doc_id"], x, y)
                    seen["loglikelihoods"] += 1
                    seen["greedy"] += bool(x[1])
                else:
                    assert math.isclose(y, x, rel_tol=rel), (task, a["doc_id"], x, y)
                    seen["loglikelihoods"] += 1
        for key, value in ref["results"][task].items():
            if not isinstance(value, (int, float)) or isinstance(value, bool) or "stderr" in key:
                continue
            if any(m in key for m in ("perplexity", "bits_per_byte")):
                assert math.isclose(ours["results"][task][key], value, rel_tol=rel), (task, key)
            else:
                assert ours["results"][task][key] == value, (task, key, ours["results"][task][key], value)
    return seen
