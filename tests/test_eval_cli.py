"""`lazymerge eval` / `search` on the command line: JSON fields, one-line errors, generation, --compare-inputs."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch

pytest.importorskip("transformers")

from click.testing import CliRunner  # noqa: E402
from evalkit import corpus, make_finetune, make_model, one_thread, write_texts  # noqa: E402,F401

import lazymerge  # noqa: E402
from lazymerge.cli import main  # noqa: E402

ARGS = ["--seq-len", "32", "--max-tokens", "300", "-q"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("evalcli")
    base = make_model(root / "base", "llama", seed=2)
    ft = make_finetune(base, root / "ft", seed=21, std=0.1)
    data = write_texts(root / "data.jsonl", corpus(8))
    recipe = root / "recipe.yaml"
    recipe.write_text(json.dumps({"merge_method": "linear", "dtype": "bfloat16", "models": [
        {"model": str(base), "parameters": {"weight": 0.3}}, {"model": str(ft), "parameters": {"weight": 0.7}}]}))
    return {"root": root, "base": base, "ft": ft, "data": data, "recipe": recipe}


def cli(*args: str):
    return CliRunner().invoke(main, list(args))


def one_line_error(res, *words: str) -> None:
    assert res.exit_code != 0
    lines = [ln for ln in res.output.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), res.output
    assert res.exception is None or isinstance(res.exception, SystemExit)
    for w in words:
        assert w in lines[0], (w, lines[0])


def test_json_fields_match_api(setup):
    res = cli("eval", str(setup["base"]), "--data", str(setup["data"]), "--json", *ARGS)
    assert res.exit_code == 0, res.output
    got = json.loads(res.output)
    api = lazymerge.evaluate(setup["base"], setup["data"], seq_len=32, max_tokens=300)
    for key in ("perplexity", "nll", "tokens", "windows"):
        assert got[key] == getattr(api, key)
    assert got["tokens"] == got["windows"] * 31


def test_target_without_config(setup, tmp_path):
    d = tmp_path / "noconfig"
    d.mkdir()
    shutil.copy(setup["base"] / "model.safetensors", d)
    one_line_error(cli("eval", str(d), "--data", str(setup["data"]), *ARGS), "noconfig", "no config.json")


def test_target_without_tokenizer(setup, tmp_path):
    d = tmp_path / "notok"
    d.mkdir()
    for f in ("model.safetensors", "config.json"):
        shutil.copy(setup["base"] / f, d)
    one_line_error(cli("eval", str(d), "--data", str(setup["data"]), *ARGS), "notok", "no tokenizer")


def test_bad_data(setup, tmp_path):
    one_line_error(cli("eval", str(setup["base"]), "--data", str(tmp_path / "nope.txt"), *ARGS), "does not exist")
    short = tmp_path / "short.txt"
    short.write_text("the cat")
    one_line_error(cli("eval", str(setup["base"]), "--data", str(short), *ARGS), "fewer than one window")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"txt": 1}\n')
    one_line_error(cli("eval", str(setup["base"]), "--data", str(bad), *ARGS), "bad.jsonl:2", "'text'")
    one_line_error(cli("eval", str(setup["base"]), "--data", str(setup["data"]), "--seq-len", "4096", "-q"),
                   "longer than the model's 128 positions")


def test_search_bad_key_cli(setup, tmp_path):
    one_line_error(cli("search", str(setup["recipe"]), "--data", str(setup["data"]), "--space",
                       "models[0].parameters.density=0..1", "--study", str(tmp_path / "s.db"), *ARGS),
                   "recipe.yaml", "models[0].parameters.density", "not in the recipe")


def test_one_line_error_in_a_real_process(setup, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "lazymerge.cli", "eval", str(tmp_path), "--data",
                           str(setup["data"])], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [f"error: {tmp_path}: no config.json (evaluation builds the model "
                                                "from it)"]


def test_generate_streamed_equals_whole_equals_transformers(setup):
    import transformers as T

    tok = T.AutoTokenizer.from_pretrained(str(setup["base"]))
    model = T.AutoModelForCausalLM.from_pretrained(str(setup["base"]), dtype=torch.float32).eval()
    ids = tok("the cat sat on", return_tensors="pt")["input_ids"]
    ref = model.generate(ids, max_new_tokens=6, do_sample=False, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.eos_token_id)
    expected = tok.decode(ref[0, ids.shape[1]:], skip_special_tokens=True)
    whole = lazymerge.generate(setup["base"], "the cat sat on", max_new_tokens=6, memory="unlimited")
    streamed = lazymerge.generate(setup["base"], "the cat sat on", max_new_tokens=6, memory="16KiB")
    assert whole == expected and streamed == expected
    res = cli("eval", str(setup["recipe"]), "--prompt", "the cat sat on", "--max-new-tokens", "3", "--memory",
              "16KiB", "--json", "-q")
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["prompt"] == "the cat sat on"


def test_compare_inputs_table(setup):
    reports = lazymerge.compare_inputs(setup["recipe"], setup["data"], seq_len=32, max_tokens=300)
    assert [r.target for r in reports] == [str(setup["base"]), str(setup["ft"]), str(setup["recipe"])]
    for r, target in zip(reports, (setup["base"], setup["ft"], setup["recipe"])):
        alone = lazymerge.evaluate(target, setup["data"], seq_len=32, max_tokens=300)
        assert r.window_nll == alone.window_nll
    res = cli("eval", str(setup["recipe"]), "--data", str(setup["data"]), "--compare-inputs", *ARGS)
    assert res.exit_code == 0, res.output
    rows = res.output.strip().splitlines()
    assert rows[0].split()[:2] == ["model", "perplexity"]
    assert [float(row.split()[1]) for row in rows[1:4]] == pytest.approx([r.perplexity for r in reports],
                                                                         rel=1e-4)


def test_datasets_directory(setup, tmp_path):
    datasets = pytest.importorskip("datasets")
    docs = corpus(8)
    datasets.Dataset.from_dict({"text": docs}).save_to_disk(str(tmp_path / "ds"))
    jsonl = write_texts(tmp_path / "same.jsonl", docs)
    a = lazymerge.evaluate(setup["base"], tmp_path / "ds", seq_len=32, max_tokens=300)
    b = lazymerge.evaluate(setup["base"], jsonl, seq_len=32, max_tokens=300)
    assert a.window_nll == b.window_nll
