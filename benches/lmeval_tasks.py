#!/usr/bin/env python
"""lm-eval tasks with local data for the benchmarks, built from English text present on every Debian/Ubuntu
machine (/usr/share/common-licenses), so nothing is downloaded:

- `text_mc` (multiple choice, like HellaSwag): a context of CONTEXT words, four endings of ENDING words, the
  true continuation and three endings taken from elsewhere in the text;
- `text_ppl` (rolling loglikelihood, like wikitext): documents of DOC words;
- `text_gen` (generate_until): prompts of PROMPT words, `until: ["\\n\\n"]`, `max_gen_toks` tokens.

    python benches/lmeval_tasks.py OUT_DIR [--mc 200] [--ppl 8] [--gen 32] [--max-gen-toks 32]
"""
from __future__ import annotations

import argparse
import json
import random
import re
from pathlib import Path

SOURCES = sorted(Path("/usr/share/common-licenses").glob("*"))
CONTEXT, ENDING, DOC, PROMPT = 40, 10, 300, 40


def words() -> list[str]:
    text = " ".join(p.read_text(errors="replace") for p in SOURCES if p.is_file())
    return re.sub(r"\s+", " ", text).split(" ")


def _task(d: Path, name: str, rows: list[dict], body: str) -> None:
    (d / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (d / f"{name}.yaml").write_text(f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
                                    f"    test: {(d / (name + '.jsonl')).resolve()}\ntest_split: test\n" + body)


def write(out: Path, *, mc: int = 200, ppl: int = 8, gen: int = 32, max_gen_toks: int = 32, seed: int = 0) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    w = words()
    rng = random.Random(seed)

    def span(n: int) -> tuple[int, str]:
        a = rng.randrange(0, len(w) - n)
        return a, " ".join(w[a:a + n])

    rows = []
    for _ in range(mc):
        a, ctx = span(CONTEXT + ENDING)
        true = " ".join(w[a + CONTEXT:a + CONTEXT + ENDING])
        ctx = " ".join(w[a:a + CONTEXT])
        endings = [true] + [span(ENDING)[1] for _ in range(3)]
        rng.shuffle(endings)
        rows.append({"ctx": ctx, "endings": endings, "label": endings.index(true)})
    _task(out, "text_mc", rows, 'output_type: multiple_choice\ndoc_to_text: "{{ctx}}"\n'
          'doc_to_choice: "{{endings}}"\ndoc_to_target: label\nmetric_list:\n'
          "  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
          "  - metric: acc_norm\n    aggregation: mean\n    higher_is_better: true\n")
    _task(out, "text_ppl", [{"text": span(DOC)[1]} for _ in range(ppl)],
          'output_type: loglikelihood_rolling\ndoc_to_text: ""\ndoc_to_target: "{{text}}"\nmetric_list:\n'
          "  - metric: word_perplexity\n    aggregation: weighted_perplexity\n    higher_is_better: false\n"
          "  - metric: bits_per_byte\n    aggregation: bits_per_byte\n    higher_is_better: false\n")
    _task(out, "text_gen", [{"prompt": span(PROMPT)[1], "answer": ""} for _ in range(gen)],
          'output_type: generate_until\ndoc_to_text: "{{prompt}}"\ndoc_to_target: "{{answer}}"\n'
          f'generation_kwargs:\n  until: ["\\n\\n"]\n  max_gen_toks: {max_gen_toks}\n  do_sample: false\n'
          "metric_list:\n  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\n")
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--mc", type=int, default=200)
    ap.add_argument("--ppl", type=int, default=8)
    ap.add_argument("--gen", type=int, default=32)
    ap.add_argument("--max-gen-toks", type=int, default=32)
    a = ap.parse_args()
    print(write(a.out, mc=a.mc, ppl=a.ppl, gen=a.gen, max_gen_toks=a.max_gen_toks))
