"""Coming from mergekit (issue 23): `lazymerge-yaml` takes mergekit-yaml's command line, and a merge writes a model
card (README.md with Hugging Face front matter) as mergekit does.

The flag list below is mergekit 0.1.5's `mergekit-yaml --help`, copied from that program (the venv at
/work/venvs/mergekit, when present, is also asked directly), not from our command.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from conftest import read_all, write_recipe

from lazymerge import card, mergekit_yaml
from lazymerge.planner.recipe import parse_recipe

MERGEKIT_YAML = Path("/work/venvs/mergekit/bin/mergekit-yaml")
# mergekit 0.1.5, `mergekit-yaml --help`: every option (a boolean's --no- form beside it)
MERGEKIT_FLAGS = [
    "--allow-crimes", "--no-allow-crimes", "--unsafe-truncate-embeddings", "--no-unsafe-truncate-embeddings",
    "--trust-remote-code", "--no-trust-remote-code", "--transformers-cache", "--lora-merge-cache",
    "--lora-merge-dtype", "--random-seed", "-v", "--quiet", "--no-quiet", "--cuda", "--no-cuda", "--device",
    "--low-cpu-memory", "--no-low-cpu-memory", "--lazy-unpickle", "--no-lazy-unpickle", "--read-to-gpu",
    "--no-read-to-gpu", "--multi-gpu", "--no-multi-gpu", "-j", "--num-threads", "--gpu-rich", "--async-write",
    "--no-async-write", "--write-threads", "--out-shard-size", "--copy-tokenizer", "--no-copy-tokenizer",
    "--clone-tensors", "--no-clone-tensors", "--write-model-card", "--no-write-model-card", "--safe-serialization",
    "--no-safe-serialization",
]
TOKENIZER = {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"}


def our_flags() -> set[str]:
    return {o for p in mergekit_yaml.main.params for o in (*p.opts, *p.secondary_opts)}


def test_every_mergekit_yaml_flag_is_known():
    assert set(MERGEKIT_FLAGS) <= our_flags(), sorted(set(MERGEKIT_FLAGS) - our_flags())


@pytest.mark.skipif(not MERGEKIT_YAML.exists(), reason="no mergekit venv (parity data machine only)")
def test_every_flag_of_the_installed_mergekit_yaml_is_known():
    text = subprocess.run([str(MERGEKIT_YAML), "--help"], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "COLUMNS": "1000"}).stdout    # one option per line, unwrapped
    theirs = {tok.rstrip(",") for line in text.splitlines() if line.lstrip().startswith("-")
              for tok in line.strip().split("  ")[0].split() if tok.startswith("-")} - {"-h", "--help"}
    assert theirs and theirs <= our_flags(), sorted(theirs - our_flags())


def ties(models: dict[str, Path]) -> dict:
    return {"merge_method": "ties", "base_model": str(models["base"]), "dtype": "float32",
            "models": [{"model": str(models["ft1"]), "parameters": {"weight": 0.5, "density": 0.5}},
                       {"model": str(models["ft2"]), "parameters": {"weight": 0.5, "density": 0.7}}]}


def test_pasted_command_line_means_what_it_meant(tmp_path, models_fp32, monkeypatch):
    """The issue's command line, program name changed: each flag reaches the merge with mergekit's meaning."""
    seen = {}

    def fake_merge(recipe, out, **kw):
        seen.update(kw, recipe=recipe, out=out)
        raise KeyboardInterrupt          # stop here: the merge itself is tested below

    monkeypatch.setattr("lazymerge.api.merge", fake_merge)
    recipe = write_recipe(tmp_path, ties(models_fp32), "config.yml")
    r = CliRunner().invoke(mergekit_yaml.main, [str(recipe), str(tmp_path / "out"), "--cuda", "--copy-tokenizer",
                                                "--out-shard-size", "1B", "--lazy-unpickle", "--allow-crimes",
                                                "--random-seed", "7", "-j", "3", "--quiet"])
    assert r.exit_code == 130, r.output
    assert seen["device"] == "cuda" and seen["shard_size"] == 10**9 and seen["copy_tokenizer"] is True
    assert seen["seed"] == 7 and seen["workers"] == 3 and seen["write_model_card"] is True
    assert Path(seen["recipe"]) == recipe and seen["allow_pickle"] is False


@pytest.mark.parametrize("value, size", [("5B", 5 * 10**9), ("500M", 5 * 10**8), ("64k", 64000), ("1234", 1234),
                                         ("2GiB", "2GiB")])
def test_out_shard_size_reads_mergekits_units(value, size):
    assert mergekit_yaml.shard_bytes(value) == size


@pytest.mark.parametrize("flags, words", [
    (["--multi-gpu"], ["--multi-gpu", "--cluster"]),
    (["--gpu-rich", "--multi-gpu"], ["--multi-gpu"]),
    (["--unsafe-truncate-embeddings"], ["tokenizer_source"]),
    (["--transformers-cache", "/tmp/x"], ["HF_HUB_CACHE"]),
    (["--lora-merge-dtype", "bfloat16"], ["dtype"]),
    (["--no-safe-serialization"], ["safetensors"]),
])
def test_refused_flags_give_one_line(tmp_path, models_fp32, flags, words):
    recipe = write_recipe(tmp_path, ties(models_fp32), "config.yml")
    r = CliRunner().invoke(mergekit_yaml.main, [str(recipe), str(tmp_path / "out"), *flags])
    assert r.exit_code == 2, r.output
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.output
    assert all(w in lines[0] for w in words), lines[0]
    assert not (tmp_path / "out").exists()


def test_lazymerge_yaml_merges_like_lazymerge_run(tmp_path, models_fp32):
    """A real run through the console entry point: mergekit's shard size in bytes, no tokenizer copied, the
    model card; the tensors are those of `lazymerge run` with the same recipe."""
    recipe = write_recipe(tmp_path, ties(models_fp32), "config.yml")
    out = tmp_path / "merged"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.run([sys.executable, "-m", "lazymerge.mergekit_yaml", str(recipe), str(out),
                           "--out-shard-size", "100K", "--no-copy-tokenizer", "--lazy-unpickle", "--allow-crimes",
                           "--trust-remote-code", "--clone-tensors", "--async-write", "-v", "--quiet"],
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr
    ref = tmp_path / "ref"
    r = CliRunner().invoke(__import__("lazymerge.cli", fromlist=["main"]).main,
                           ["run", str(recipe), str(ref), "--shard-size", "100000", "-q"])
    assert r.exit_code == 0, r.output
    files = {p.name for p in out.iterdir()}
    assert not files & TOKENIZER and TOKENIZER <= {p.name for p in ref.iterdir()}
    shards = sorted(out.glob("*.safetensors"))
    assert len(shards) > 1
    for s in shards:                       # a shard holds at most 100 KB of data, or one larger tensor
        raw = s.read_bytes()
        n = int.from_bytes(raw[:8], "little")
        tensors = [k for k in json.loads(raw[8:8 + n]) if k != "__metadata__"]
        assert len(raw) - 8 - n <= 100_000 or len(tensors) == 1, (s.name, len(raw), tensors)
    a, b = read_all(out), read_all(ref)
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)
    assert (out / "README.md").read_bytes() == (ref / "README.md").read_bytes()   # not named after the directory


def front_matter(text: str) -> dict:
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


def test_model_card_lists_hub_ids_as_base_model(tmp_path):
    """Hub ids (owner/name, not a local path) go into `base_model`; local paths only into the text."""
    local = tmp_path / "local-ft"
    local.mkdir()
    text = (f"merge_method: ties\nbase_model: meta-llama/Llama-3.1-8B\n"
            f"models:\n  - model: {local}\n    parameters: {{weight: 0.5, density: 0.5}}\n"
            f"  - model: NousResearch/Hermes-3-Llama-3.1-8B\n    parameters: {{weight: 0.5, density: 0.5}}\n"
            f"dtype: bfloat16  # a comment the card keeps\n")
    md = card.model_card(parse_recipe(text + "name: my-merge\n"), text)
    meta = front_matter(md)
    assert meta["base_model"] == ["meta-llama/Llama-3.1-8B", "NousResearch/Hermes-3-Llama-3.1-8B"]
    assert meta["tags"] == ["merge", "lazymerge"] and meta["library_name"] == "transformers"
    assert "# my-merge\n" in md and "ties merge method using [meta-llama/Llama-3.1-8B]" in md
    assert f"* {local}\n" in md and "* [NousResearch/Hermes-3-Llama-3.1-8B](https://huggingface.co/" in md
    assert "```yaml\n" + text.strip() + "\n```" in md


def test_model_card_slerp_and_adapters():
    """slerp's base is one of its two endpoints (listed with the models, as mergekit does); `base+adapter`
    names both."""
    text = ("merge_method: slerp\nbase_model: org/a+org/lora-a\nmodels:\n  - model: org/a+org/lora-a\n"
            "  - model: org/b\nparameters: {t: 0.5}\n")
    md = card.model_card(parse_recipe(text), text)
    assert front_matter(md)["base_model"] == ["org/a", "org/lora-a", "org/b"]
    assert "as a base" not in md and "* [org/b](https://huggingface.co/org/b)" in md


def test_run_writes_a_model_card_and_no_write_model_card_does_not(tmp_path, models_fp32):
    from lazymerge.cli import main

    recipe = write_recipe(tmp_path, ties(models_fp32))
    r = CliRunner().invoke(main, ["run", str(recipe), str(tmp_path / "a"), "-q"])
    assert r.exit_code == 0, r.output
    md = (tmp_path / "a" / "README.md").read_text()
    meta = front_matter(md)
    assert "base_model" not in meta and meta["tags"] == ["merge", "lazymerge"]   # local paths only
    assert md.startswith("---\n") and "\n# Merged model\n" in md and f"using {models_fp32['base']} as a base" in md and f"* {models_fp32['ft1']}\n" in md
    assert recipe.read_text().strip() in md
    r = CliRunner().invoke(main, ["run", str(recipe), str(tmp_path / "b"), "-q", "--no-write-model-card"])
    assert r.exit_code == 0, r.output
    assert not (tmp_path / "b" / "README.md").exists() and (tmp_path / "b" / "config.json").exists()


def test_the_console_script_is_declared():
    import tomllib

    meta = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    assert meta["project"]["scripts"]["lazymerge-yaml"] == "lazymerge.mergekit_yaml:main"
