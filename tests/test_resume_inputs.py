"""`--resume` keeps a finished shard only when nothing that made it has changed: the recipe and the weight files,
and also the small files that decide what is merged (issue 27): an adapter's adapter_config.json (its scale), a
model's config.json (the layer count that places gradients), the tokenizer files that map vocabularies. Edit one
between an interrupted run and its resume: the resumed output is a fresh run's of the edited inputs, bit for bit.

Runs are held at a known point in-process: the progress callback sets the `cancel` event once N tensors are
written (the tasks in flight then finish: with two workers a shard more may be done, never fewer; the tiny
vocabulary models run with one, in the plan's order). Each test checks that the edit changes a tensor of a shard
the interrupted run finished, else it would prove nothing. (One worker is not used for the Llama-sized ones: each
task then gets two kernel threads, whose wake-ups cost milliseconds per task on a busy machine.)"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import build_model_set, read_all
from test_budget_invariance import output_hash, write_lora
from test_vocab import make_abc

import lazymerge
from lazymerge.errors import MergeAborted

SHARD = "24KB"          # the tiny Llama's 2 layers over several shards


def interrupted(recipe, out: Path, after: int, workers: int = 2, **kw) -> set[str]:
    """Run `recipe` with --resume and stop it once `after` tensors are written; returns the finished shards.
    With one worker the tasks run in the plan's order, so which shards are done is fixed."""
    import threading

    cancel = threading.Event()

    def progress(p) -> None:
        if p.tensors_done >= after:
            cancel.set()

    with pytest.raises(MergeAborted):
        lazymerge.merge(recipe, out, resume=True, progress=progress, cancel=cancel, workers=workers, **kw)
    tmp = out.parent / f".{out.name}.lazymerge-tmp"
    return set(json.loads((tmp / "journal.json").read_text())["shards"])


def tensors_of(out: Path, shards: set[str]) -> set[str]:
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    return {n for n, f in index.items() if f in shards}


def check_resume_follows_edit(recipe, tmp_path: Path, edit, after: int, workers: int = 2, **kw) -> None:
    """Interrupt, edit an input, resume: equal to a fresh run on the edited inputs, and the edit changed a tensor
    of a shard the first run had finished (else the test would prove nothing)."""
    lazymerge.merge(recipe, tmp_path / "before", **kw)
    done = interrupted(recipe, tmp_path / "out", after, workers, **kw)
    assert done, "the interrupted run finished no shard"
    edit()
    lazymerge.merge(recipe, tmp_path / "fresh", **kw)
    old, new = read_all(tmp_path / "before"), read_all(tmp_path / "fresh")
    changed = {n for n in new if not torch.equal(old[n], new[n])}
    assert changed & tensors_of(tmp_path / "fresh", done), (changed, done)
    report = lazymerge.merge(recipe, tmp_path / "out", resume=True, **kw)
    assert report.resumed_tensors == 0
    assert output_hash(tmp_path / "out") == output_hash(tmp_path / "fresh")


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    return build_model_set(tmp_path_factory.mktemp("resume_models"), torch.float32)


def test_edited_adapter_config_is_recomputed(models: dict, tmp_path: Path) -> None:
    lora = write_lora(tmp_path / "lora", seed=2)
    recipe = {"merge_method": "ties", "base_model": str(models["base"]), "dtype": "float32",
              "parameters": {"weight": 0.5, "density": 0.6},
              "models": [{"model": f"{models['base']}+{lora}"}, {"model": str(models["ft1"])}]}

    def edit() -> None:
        cfg = json.loads((lora / "adapter_config.json").read_text())
        cfg["lora_alpha"] = 2 * cfg["lora_alpha"]          # every delta doubles; no weight file changes
        (lora / "adapter_config.json").write_text(json.dumps(cfg))

    check_resume_follows_edit(recipe, tmp_path, edit, after=15, shard_size=SHARD)


def test_edited_config_layer_count_is_recomputed(models: dict, tmp_path: Path) -> None:
    """A gradient is placed by the lead's num_hidden_layers: 2 -> 4 moves layer 1 from t=1 to t=1/3."""
    import shutil

    lead = tmp_path / "lead"
    shutil.copytree(models["ft1"], lead)
    recipe = {"merge_method": "linear", "dtype": "float32",
              "models": [{"model": str(lead), "parameters": {"weight": [0.2, 1.0]}},
                         {"model": str(models["ft2"]), "parameters": {"weight": 1.0}}]}

    def edit() -> None:
        cfg = json.loads((lead / "config.json").read_text())
        cfg["num_hidden_layers"] = 4
        (lead / "config.json").write_text(json.dumps(cfg))

    check_resume_follows_edit(recipe, tmp_path, edit, after=18, shard_size=SHARD)


def test_edited_tokenizer_is_recomputed(tmp_path: Path) -> None:
    """tokenizer_source: union maps each model's embedding rows by token; swapping two tokens' ids in one model's
    tokenizer.json (no weight file changes) moves its rows."""
    abc = make_abc(tmp_path / "m")
    recipe = {"merge_method": "linear", "tokenizer_source": "union", "dtype": "float32",
              "models": [{"model": str(abc["A"]), "parameters": {"weight": 0.5}},
                         {"model": str(abc["B"]), "parameters": {"weight": 0.5}}]}

    def edit() -> None:
        path = abc["B"] / "tokenizer.json"
        doc = json.loads(path.read_text())
        vocab = doc["model"]["vocab"]
        vocab["a"], vocab["e"] = vocab["e"], vocab["a"]
        path.write_text(json.dumps(doc))

    check_resume_follows_edit(recipe, tmp_path, edit, after=1, workers=1, shard_size="100B")


def test_edited_tokenizer_source_directory_is_recomputed(tmp_path: Path) -> None:
    """The output's vocabulary from a directory that is none of the models: its tokenizer.json decides the rows."""
    import shutil

    abc = make_abc(tmp_path / "m")
    tok = tmp_path / "tok"
    shutil.copytree(abc["B"], tok)
    recipe = {"merge_method": "linear", "tokenizer_source": str(tok), "dtype": "float32",
              "models": [{"model": str(abc["A"]), "parameters": {"weight": 0.5}},
                         {"model": str(abc["C"]), "parameters": {"weight": 0.5}}]}

    def edit() -> None:
        path = tok / "tokenizer.json"
        doc = json.loads(path.read_text())
        vocab = doc["model"]["vocab"]
        vocab["a"], vocab["b"] = vocab["b"], vocab["a"]
        path.write_text(json.dumps(doc))

    check_resume_follows_edit(recipe, tmp_path, edit, after=1, workers=1, shard_size="100B")


def test_unchanged_resume_keeps_every_finished_shard(models: dict, tmp_path: Path) -> None:
    lora = write_lora(tmp_path / "lora", seed=2)
    recipe = {"merge_method": "ties", "base_model": str(models["base"]), "dtype": "float32",
              "parameters": {"weight": 0.5, "density": 0.6},
              "models": [{"model": f"{models['base']}+{lora}"}, {"model": str(models["ft1"])}]}
    done = interrupted(recipe, tmp_path / "out", after=15, shard_size=SHARD)
    tmp = tmp_path / ".out.lazymerge-tmp"
    stamps = {f: (tmp / f).stat().st_mtime_ns for f in done}
    report = lazymerge.merge(recipe, tmp_path / "out", resume=True, shard_size=SHARD)
    lazymerge.merge(recipe, tmp_path / "fresh", shard_size=SHARD)
    assert report.resumed_tensors == len(tensors_of(tmp_path / "out", done)) > 0
    assert {f: (tmp_path / "out" / f).stat().st_mtime_ns for f in done} == stamps   # not rewritten
    assert output_hash(tmp_path / "out") == output_hash(tmp_path / "fresh")
