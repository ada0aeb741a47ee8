"""Models named by hub id (`org/name`, `org/name@revision`, `base+adapter`), against a loopback hub.

Every test counts what the loopback hub (tests/hubserver.py) served and compares outputs byte for byte with the
same recipe on local directories holding the same files:

- `plan` reads headers only: 8 + N bytes of each shard, by range requests;
- `run` into an empty cache downloads only the shards the plan reads, gives the local run's bytes, records
  each input's commit in the report and the saved recipe; a second run with HF_HUB_OFFLINE=1 sends no request;
- revisions (`@sha`, a tag, a branch), `base+adapter` from the hub, an adapter whose base is a hub id, a slice
  recipe that never fetches the shard of the layers it leaves out;
- an unknown repo or revision, a gated repo without (or with a wrong) token, an uncached file offline: one
  line, exit 2, naming the repo (and file), nothing written.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

import lazymerge
from hubfix import (cached_shards, copy_dir, go_offline, header_bytes, hub_env, published, rewrite,  # noqa: F401
                    shard_hashes, write_text_data)
from lazymerge.cli import main
from lazymerge.io.hub import HubRef, parse_hub_ref, pinned_name
from lazymerge.io.models import part_key

TIES = {"merge_method": "ties", "base_model": "org/base", "dtype": "bfloat16",
        "models": [{"model": "org/ft1", "parameters": {"weight": 0.6, "density": 0.5}},
                   {"model": "org/ft2", "parameters": {"weight": 0.4, "density": 0.7}}]}


def local_merge(recipe: dict, published, out: Path, **kw) -> dict[str, str]:
    """`recipe` merged from the local directories holding what the hub serves (`published`, or a mapping of
    names to directories)."""
    lazymerge.merge(rewrite(recipe, getattr(published, "local", published)), out, **kw)
    return shard_hashes(out)


def safetensors_served(hub, repo: str | None = None) -> dict[str, int]:
    return {f"{r}/{f}": n for (r, f), n in hub.served.items()
            if f.endswith(".safetensors") and (repo is None or r == repo)}


# -- references ---------------------------------------------------------------------------------------------
def test_hub_ids_are_recognised_and_local_paths_win(tmp_path: Path, monkeypatch) -> None:
    assert parse_hub_ref("org/name") == HubRef("org/name", None)
    assert parse_hub_ref("org/name@v1.2") == HubRef("org/name", "v1.2")
    assert parse_hub_ref("org/name@refs/pr/3") == HubRef("org/name", "refs/pr/3")
    for not_hub in ("name", "/abs/path", "./org/name", "a/b/c", "~/x", "org/name@", "org/../x", "org/name+x"):
        assert parse_hub_ref(not_hub) is None, not_hub
    assert part_key("org/name") == part_key("org/name@main") == "org/name@main"
    monkeypatch.chdir(tmp_path)
    (tmp_path / "org" / "name").mkdir(parents=True)          # an existing directory of that name wins
    assert part_key("org/name") == str(tmp_path / "org" / "name")
    sha = "a" * 40
    assert pinned_name(Path(f"/c/hub/models--org--m/snapshots/{sha}/model.safetensors")) == \
        f"org/m@{sha}: model.safetensors"
    assert pinned_name(Path("/data/models/m/model.safetensors")) is None


# -- plan ---------------------------------------------------------------------------------------------------
def test_plan_of_a_two_repo_recipe_reads_headers_only(published, hub_env: Path) -> None:
    recipe = {"merge_method": "linear", "models": [{"model": "org/ft1", "parameters": {"weight": 0.5}},
                                                   {"model": "org/ft2@main", "parameters": {"weight": 0.5}}]}
    path = hub_env.parent.parent / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    result = CliRunner().invoke(main, ["plan", str(path)])
    assert result.exit_code == 0, result.output + result.stderr
    assert f"input         org/ft1@main at {published.shas['ft1']}" in result.output
    served = safetensors_served(published.hub)
    want = {f"org/{m}/{f.name}": header_bytes(f) for m in ("ft1", "ft2")
            for f in published.local[m].glob("*.safetensors")}
    assert served == want                                  # each shard's 8 + N header bytes, nothing more
    assert not cached_shards(hub_env)
    # planning again needs no range request: the headers were kept beside the cache
    published.hub.reset()
    lazymerge.plan(recipe).close()
    assert safetensors_served(published.hub) == {}


# -- run ----------------------------------------------------------------------------------------------------
def test_run_into_an_empty_cache_then_offline(published, hub_env: Path, tmp_path: Path, monkeypatch) -> None:
    want = local_merge(TIES, published, tmp_path / "local")
    report = lazymerge.merge(TIES, tmp_path / "hub")
    assert shard_hashes(tmp_path / "hub") == want
    shas = {f"org/{m}@main": published.shas[m] for m in ("base", "ft1", "ft2")}
    assert report.inputs == shas
    saved = json.loads((tmp_path / "hub" / "lazymerge_report.json").read_text())
    assert saved["inputs"] == shas
    pinned = yaml.safe_load((tmp_path / "hub" / "lazymerge_recipe.yaml").read_text())
    assert pinned["base_model"] == f"org/base@{published.shas['base']}"
    assert [m["model"] for m in pinned["models"]] == [f"org/ft1@{published.shas['ft1']}",
                                                       f"org/ft2@{published.shas['ft2']}"]
    # each shard downloaded once, whole (plus its header, read before the plan decided to download it)
    sizes = {f"org/{m}/{f.name}": f.stat().st_size + header_bytes(f)
             for m in ("base", "ft1", "ft2") for f in published.local[m].glob("*.safetensors")}
    assert safetensors_served(published.hub) == sizes
    assert report.bytes_transferred >= sum(f.stat().st_size for m in ("base", "ft1", "ft2")
                                           for f in published.local[m].glob("*.safetensors"))

    go_offline(monkeypatch)
    published.hub.reset()
    report = lazymerge.merge(TIES, tmp_path / "offline")
    assert published.hub.requests == [] and report.bytes_transferred == 0
    assert shard_hashes(tmp_path / "offline") == want and report.inputs == shas
    # the saved, pinned recipe reproduces the merge by itself
    lazymerge.merge(tmp_path / "hub" / "lazymerge_recipe.yaml", tmp_path / "again")
    assert shard_hashes(tmp_path / "again") == want


def test_revisions_sha_tag_and_branch(published, hub_env: Path, tmp_path: Path) -> None:
    first, second = published.shas["evolving@1"], published.shas["evolving@2"]

    def linear(ref: str) -> dict:
        return {"merge_method": "linear", "dtype": "bfloat16",
                "models": [{"model": ref, "parameters": {"weight": 0.7}},
                           {"model": "org/ft3", "parameters": {"weight": 0.3}}]}

    as_ft1 = local_merge(linear("org/ft1"), published, tmp_path / "ft1")
    as_ft2 = local_merge(linear("org/ft2"), published, tmp_path / "ft2")
    assert as_ft1 != as_ft2
    for ref, want, sha in ((f"org/evolving@{first}", as_ft1, first), ("org/evolving@v1", as_ft1, first),
                           ("org/evolving", as_ft2, second), (f"org/evolving@{second[:40]}", as_ft2, second)):
        out = tmp_path / ref.replace("/", "_")
        report = lazymerge.merge(linear(ref), out)
        assert shard_hashes(out) == want, ref
        key = ref if "@" in ref else f"{ref}@main"
        assert report.inputs[key] == sha


def test_base_plus_adapter_from_the_hub(published, hub_env: Path, tmp_path: Path) -> None:
    recipe = {"merge_method": "linear", "dtype": "bfloat16",
              "models": [{"model": "org/base+org/lora", "parameters": {"weight": 0.5}},
                         {"model": "org/ft1", "parameters": {"weight": 0.5}}]}
    want = local_merge(recipe, published, tmp_path / "local")
    plain = local_merge({**recipe, "models": [{"model": "org/base", "parameters": {"weight": 0.5}},
                                              recipe["models"][1]]}, published, tmp_path / "plain")
    assert want != plain                                   # the adapter changes the merge
    report = lazymerge.merge(recipe, tmp_path / "hub")
    assert shard_hashes(tmp_path / "hub") == want
    assert report.inputs["org/lora@main"] == published.shas["lora"]
    # the adapter alone: its base_model_name_or_path (org/base) is a hub id, resolved on the same hub
    alone = {**recipe, "models": [{"model": "org/lora", "parameters": {"weight": 0.5}}, recipe["models"][1]]}
    lazymerge.merge(alone, tmp_path / "alone")
    assert shard_hashes(tmp_path / "alone") == want


def test_slice_recipe_fetches_only_the_shards_it_reads(published, hub_env: Path, tmp_path: Path) -> None:
    recipe = {"merge_method": "passthrough", "dtype": "bfloat16",
              "slices": [{"sources": [{"model": "org/deep", "layer_range": [0, 2]}]}]}
    want = local_merge(recipe, published, tmp_path / "local")
    lazymerge.merge(recipe, tmp_path / "hub")
    assert shard_hashes(tmp_path / "hub") == want
    shards = sorted(published.local["deep"].glob("model-*.safetensors"))
    served = safetensors_served(published.hub, "org/deep")
    for f in shards[:3]:       # embeddings/head, layer 0, layer 1: downloaded
        assert served[f"org/deep/{f.name}"] == f.stat().st_size + header_bytes(f), f.name
    last = shards[3]           # layers 2-3: only its header was read, by the plan
    assert served[f"org/deep/{last.name}"] == header_bytes(last)
    assert sorted(p.name for p in cached_shards(hub_env) if p.suffix == ".safetensors") == \
        [f.name for f in shards[:3]]


def test_tokenizer_source_from_the_hub(published, hub_env: Path, tmp_path: Path) -> None:
    """`tokenizer_source` naming a hub model that is none of the inputs: its tokenizer files (and config) only
    are fetched, its commit pinned like an input's."""
    recipe = {"merge_method": "linear", "dtype": "bfloat16", "tokenizer_source": "org/ft3",
              "models": [{"model": "org/ft1", "parameters": {"weight": 0.5}},
                         {"model": "org/ft2", "parameters": {"weight": 0.5}}]}
    local_merge(recipe, published, tmp_path / "local")
    report = lazymerge.merge(recipe, tmp_path / "hub")
    for f in ("tokenizer.json", "tokenizer_config.json", *shard_hashes(tmp_path / "local")):
        assert (tmp_path / "hub" / f).read_bytes() == (tmp_path / "local" / f).read_bytes(), f
    assert json.loads((tmp_path / "hub" / "tokenizer_config.json").read_text())["name_or_path"] == "tiny-llama-ft3"
    assert report.inputs["org/ft3@main"] == published.shas["ft3"]
    assert not [f for f in published.hub.served if f[0] == "org/ft3" and f[1].endswith(".safetensors")]
    pinned = yaml.safe_load((tmp_path / "hub" / "lazymerge_recipe.yaml").read_text())
    assert pinned["tokenizer_source"] == f"org/ft3@{published.shas['ft3']}"


# -- errors -------------------------------------------------------------------------------------------------
def one_line_error(tmp_path: Path, recipe: dict, *words: str, args: tuple[str, ...] = ()) -> None:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["run", str(path), str(out), "-q", *args])
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert result.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""
    for w in words:
        assert w in lines[0], (w, lines[0])
    assert not out.exists() and not list(tmp_path.glob(".out*"))


def test_hub_errors_are_one_line(published, hub_env: Path, tmp_path: Path, monkeypatch) -> None:
    one = {"merge_method": "linear", "models": [{"model": "org/ft1", "parameters": {"weight": 1.0}}]}

    def with_model(ref: str) -> dict:
        return {**one, "models": [*one["models"], {"model": ref, "parameters": {"weight": 1.0}}]}

    one_line_error(tmp_path, with_model("org/nope"), "org/nope", "no such model repository", "models[1].model")
    one_line_error(tmp_path, with_model("org/ft2@no-such-branch"), "org/ft2@no-such-branch", "no such revision")
    one_line_error(tmp_path, with_model("org/gated"), "org/gated", "config.json", "gated", "HF_TOKEN")
    monkeypatch.setenv("HF_TOKEN", "hf_wrong")
    one_line_error(tmp_path, with_model("org/gated"), "org/gated", "gated")
    monkeypatch.setenv("HF_TOKEN", published.hub.TOKEN)     # a token with access: the merge runs
    lazymerge.merge(with_model("org/gated"), tmp_path / "gated_ok")
    monkeypatch.delenv("HF_TOKEN")

    # offline: a repository never fetched, then a shard only the plan's header read knows of
    go_offline(monkeypatch)
    one_line_error(tmp_path, with_model("org/ft3"), "org/ft3", "HF_HUB_OFFLINE=1", "not in the Hugging Face cache")
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    from huggingface_hub import constants
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    lazymerge.plan(with_model("org/ft3")).close()            # headers and small files cached, no shard
    go_offline(monkeypatch)
    published.hub.reset()
    one_line_error(tmp_path, with_model("org/ft3"), "org/ft3", "model-0000", ".safetensors", "HF_HUB_OFFLINE=1")
    assert published.hub.requests == []


# -- other places a model is named ----------------------------------------------------------------------------
def test_moe_experts_from_the_hub(published, hub_env: Path, tmp_path: Path) -> None:
    moe = {"base_model": "org/base", "gate_mode": "random", "experts_per_token": 1, "dtype": "bfloat16",
           "experts": [{"source_model": "org/ft1"}, {"source_model": "org/ft2@main", "noise_scale": 0.01}]}
    want = local_merge(moe, published, tmp_path / "local")
    report = lazymerge.merge(moe, tmp_path / "hub")
    assert shard_hashes(tmp_path / "hub") == want
    assert set(report.inputs) == {"org/base@main", "org/ft1@main", "org/ft2@main"}
    # a Qwen2-MoE with a shared expert named by hub id (at a tag)
    shared = {**moe, "architecture": "qwen", "shared_experts": [{"source_model": "org/evolving@v1"}]}
    want = local_merge(shared, {**published.local, "evolving@v1": published.local["ft1"]}, tmp_path / "local_q")
    report = lazymerge.merge(shared, tmp_path / "hub_q")
    assert shard_hashes(tmp_path / "hub_q") == want
    assert report.inputs["org/evolving@v1"] == published.shas["evolving@1"]


def test_extract_lora_and_fisher_take_hub_ids(published, hub_env: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    from lazymerge.extract import extract_lora

    extract_lora("org/ft1", "org/base", tmp_path / "hub_lora", 2)
    extract_lora(published.local["ft1"], published.local["base"], tmp_path / "local_lora", 2)
    assert shard_hashes(tmp_path / "hub_lora") == shard_hashes(tmp_path / "local_lora")
    cfg = json.loads((tmp_path / "hub_lora" / "adapter_config.json").read_text())
    assert (cfg["base_model_name_or_path"], cfg["revision"]) == ("org/base", published.shas["base"])

    pytest.importorskip("transformers")
    from lazymerge.fisher import compute_fisher

    data = tmp_path / "data.txt"
    data.write_text(" ".join(f"tok{i % 90 + 3}" for i in range(200)))
    compute_fisher("org/ft2", data, tmp_path / "hub_fisher", max_samples=2, seq_len=16)
    compute_fisher(published.local["ft2"], data, tmp_path / "local_fisher", max_samples=2, seq_len=16)
    got, want = load_file(tmp_path / "hub_fisher" / "model.safetensors"), \
        load_file(tmp_path / "local_fisher" / "model.safetensors")
    assert got.keys() == want.keys() and all((got[k] == want[k]).all() for k in got)


# -- pickles, local paths, progress -------------------------------------------------------------------------------
def test_pickle_weights_only_with_allow_pickle(published, hub_env: Path, tmp_path: Path) -> None:
    def linear(ref: str) -> dict:
        return {"merge_method": "linear", "dtype": "bfloat16",
                "models": [{"model": "org/ft1", "parameters": {"weight": 0.5}},
                           {"model": ref, "parameters": {"weight": 0.5}}]}

    # a repository with only pytorch_model.bin: refused by default, before a byte of it is transferred
    one_line_error(tmp_path, linear("org/pickled"), "org/pickled", "pytorch_model.bin", "--allow-pickle")
    assert published.hub.bytes_served("org/pickled", ".bin") == 0
    one_line_error(tmp_path, linear("org/pickled"), "org/pickled", "pytorch_model.bin", "--allow-pickle",
                   args=("--stream-inputs",))
    # --allow-pickle: downloaded and read (weights_only), the local directory's result
    want = local_merge(linear("org/pickled"), published, tmp_path / "local", allow_pickle=True)
    assert want == local_merge(linear("org/ft3"), published, tmp_path / "ft3")      # the .bin holds ft3
    lazymerge.merge(linear("org/pickled"), tmp_path / "hub", allow_pickle=True)
    assert shard_hashes(tmp_path / "hub") == want
    # safetensors and a .bin: the safetensors are read, the .bin (other weights) is never fetched
    published.hub.reset()
    lazymerge.merge(linear("org/both"), tmp_path / "both", allow_pickle=True)
    assert shard_hashes(tmp_path / "both") == want
    assert published.hub.bytes_served("org/both", ".bin") == 0
    assert not [r for r in published.hub.requests if r[1].endswith(".bin")]


def test_an_existing_local_directory_wins_over_the_hub(published, hub_env: Path, tmp_path: Path,
                                                        monkeypatch) -> None:
    recipe = {"merge_method": "linear", "dtype": "bfloat16",
              "models": [{"model": "org/ft1", "parameters": {"weight": 0.5}},
                         {"model": "org/ft2", "parameters": {"weight": 0.5}}]}
    cwd = tmp_path / "cwd"
    (cwd / "org").mkdir(parents=True)
    copy_dir(published.local["ft3"], cwd / "org" / "ft2")      # ./org/ft2 holds ft3's files
    monkeypatch.chdir(cwd)
    want = local_merge({**recipe, "models": [recipe["models"][0], {"model": "org/ft3", "parameters":
                                                                   {"weight": 0.5}}]}, published, tmp_path / "l")
    report = lazymerge.merge(recipe, tmp_path / "out")
    assert shard_hashes(tmp_path / "out") == want
    assert set(report.inputs) == {"org/ft1@main"}                 # only the hub input is pinned
    assert not [r for r in published.hub.requests if "org/ft2" in r[1]]


def _run_on_a_terminal(args: list[str], env: dict[str, str]) -> tuple[int, str]:
    """`lazymerge ARGS` in a subprocess whose stdout and stderr are a pseudo-terminal (progress bars are drawn
    on terminals only, as tqdm does); its exit status and everything it printed."""
    import os
    import pty
    import subprocess
    import sys
    import threading

    import fcntl
    import struct
    import termios

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))     # 120 columns, as a window
    proc = subprocess.Popen([sys.executable, "-m", "lazymerge.cli", *args], env=env, stdout=slave, stderr=slave,
                            cwd=Path(__file__).resolve().parents[1])
    os.close(slave)
    chunks: list[bytes] = []

    def drain() -> None:
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:         # EIO: the child closed the terminal
                return
            if not data:
                return
            chunks.append(data)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    try:
        rc = proc.wait(timeout=600)
    finally:
        reader.join(timeout=10)
        os.close(master)
    return rc, b"".join(chunks).decode(errors="replace")


def test_downloads_show_progress_unless_quiet(published, hub_env: Path, tmp_path: Path, monkeypatch) -> None:
    import os
    import re
    import sys

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"merge_method": "linear", "models": [
        {"model": "org/ft1", "parameters": {"weight": 0.5}}, {"model": "org/ft2", "parameters": {"weight": 0.5}}]}))
    shards = sorted(f.name for f in published.local["ft2"].glob("model-*.safetensors"))
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_DISABLE_PROGRESS_BARS"}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1])
    rc, shown = _run_on_a_terminal(["run", str(recipe), str(tmp_path / "out")], env)
    assert rc == 0, shown
    for name in shards:                             # huggingface_hub's bar for each shard downloaded
        assert re.search(re.escape(name) + r": +100%", shown), shown
    # --quiet turns them off for the command (in this process: the bars need a terminal to be seen)
    from huggingface_hub.utils import are_progress_bars_disabled, enable_progress_bars

    from lazymerge.console import hub_progress as _hub_progress

    monkeypatch.setattr(sys.modules["huggingface_hub.utils.tqdm"], "HF_HUB_DISABLE_PROGRESS_BARS", None)
    enable_progress_bars()
    with _hub_progress(False):
        assert are_progress_bars_disabled("huggingface_hub.http_get")
    assert not are_progress_bars_disabled("huggingface_hub.http_get")


# -- eval and search name hub models --------------------------------------------------------------------------
def test_eval_and_search_take_hub_ids(published, hub_env: Path, tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    pytest.importorskip("optuna")
    data = write_text_data(tmp_path / "data.txt", 300, seed=1)
    kw = dict(seq_len=32, max_tokens=128)
    # eval of a hub id on the command line (downloaded): the local directory's perplexity
    want = lazymerge.evaluate(published.local["ft2"], data, **kw)
    result = CliRunner().invoke(main, ["eval", "org/ft2", "--data", str(data), "--seq-len", "32",
                                       "--max-tokens", "128", "-q", "--json"])
    assert result.exit_code == 0, result.output + result.stderr
    assert json.loads(result.output)["perplexity"] == want.perplexity
    # search over a hub recipe: the local recipe's trials, and a best recipe naming the commits it read
    recipe = {"merge_method": "linear", "dtype": "bfloat16",
              "models": [{"model": "org/ft1", "parameters": {"weight": 0.5}},
                         {"model": "org/evolving", "parameters": {"weight": 0.5}}]}
    space = ["models[0].parameters.weight=0..1"]
    local = dict(published.local, evolving=published.local["ft2"])
    ref = lazymerge.search(rewrite(recipe, local), data, space, trials=2, best_file=None, **kw)
    got = lazymerge.search(recipe, data, space, trials=2, best_file=tmp_path / "best.yaml", **kw)
    assert [t.perplexity for t in got.trials] == [t.perplexity for t in ref.trials]
    best = yaml.safe_load((tmp_path / "best.yaml").read_text())
    assert [m["model"] for m in best["models"]] == [f"org/ft1@{published.shas['ft1']}",
                                                     f"org/evolving@{published.shas['evolving@2']}"]
