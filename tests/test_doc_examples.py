"""Every example in the README and in docs/ runs as written, or at least is valid (issue 23).

The fenced ```yaml, ```bash and ```python blocks of README.md and docs/*.md are extracted and, in a sandbox of tiny
Llama-shaped checkpoints named as the examples name them (./base, ./ft-a, ./base+./lora-math, ...; 32 layers so that
the slicing examples' layer ranges exist):

- a recipe (YAML with `merge_method`, a mergekit-moe config, a multi-stage file) whose models are all sandbox
  names is compiled with `lazymerge.plan` (every check a merge makes before reading a tensor); one naming models
  the sandbox does not have (a hub id, a GGUF file) is parsed and its method checked; any other YAML must parse;
- every `lazymerge ...` / `lazymerge-yaml ...` command line is parsed by the real click commands (unknown options,
  missing arguments and bad values fail), and the local `plan`, `run` and `lazymerge-yaml` lines are run, on the
  README's own recipe saved as recipe.yaml / config.yml (moe.yaml: its MoE config);
- a Python block must compile.

A block preceded by a line `<!-- example: not checked (REASON) -->` is left out (none is, today).
"""
from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import click
import pytest
import torch
import yaml
from click.testing import CliRunner
from safetensors.torch import save_file

from lazymerge import mergekit_yaml
from lazymerge.cli import main as cli_main
from lazymerge.planner.compile import _method_of
from lazymerge.planner.stages import resolve_stages
from lazymerge.synth import ModelShape, make_checkpoint

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\w+)[^\n]*\n(.*?)^```", re.M | re.S)
SKIP = "<!-- example: not checked"
SHAPE = ModelShape("doc", hidden=16, intermediate=32, layers=32, heads=2, kv_heads=1, vocab=64)
MODELS = ("base", "ft-a", "ft-b", "ft-c", "ft-toxic", "ft-instruct", "ft-dpo", "code-ft", "story-ft")
ADAPTERS = ("lora-math", "lora-code", "adapter")
FISHERS = ("fisher-a", "fisher-b")
SANDBOX_NAMES = {*MODELS, *ADAPTERS, *FISHERS}


def blocks() -> list[tuple[str, str, str]]:
    """(where, language, text) of every fenced block not marked as unchecked."""
    out = []
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        for m in FENCE.finditer(text):
            before = text[:m.start()].rstrip().rsplit("\n", 1)[-1]
            if before.startswith(SKIP):
                continue
            line = text[:m.start()].count("\n") + 1
            out.append((f"{page.relative_to(ROOT)}:{line}", m.group(1).lower(), m.group(2)))
    return out


ALL = blocks()


def of(*langs: str) -> list[tuple[str, str]]:
    return [pytest.param(text, id=where) for where, lang, text in ALL if lang in langs]


def test_the_pages_have_examples():
    langs = [lang for _, lang, _ in ALL]
    assert langs.count("yaml") >= 15 and langs.count("bash") >= 10, langs


# -- the sandbox ----------------------------------------------------------------------------------------------


def _adapter(path: Path, base: Path, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    path.mkdir()
    tensors = {}
    for i in range(SHAPE.layers):
        p = f"base_model.model.model.layers.{i}.self_attn.q_proj"
        tensors[f"{p}.lora_A.weight"] = torch.randn(2, SHAPE.hidden, generator=g) * 0.01
        tensors[f"{p}.lora_B.weight"] = torch.randn(SHAPE.hidden, 2, generator=g) * 0.01
    save_file(tensors, str(path / "adapter_model.safetensors"))
    (path / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"],
        "base_model_name_or_path": str(base), "task_type": "CAUSAL_LM"}))


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("doc-models")
    base = make_checkpoint(root / "base", SHAPE, seed=0, dtype=torch.float32)
    for i, name in enumerate(MODELS[1:] + FISHERS, start=1):
        make_checkpoint(root / name, SHAPE, seed=i, base=base, dtype=torch.float32)
    for i, name in enumerate(ADAPTERS):
        _adapter(root / name, base, i)
    return root


def _cwd(sandbox: Path, tmp_path: Path, monkeypatch) -> Path:
    """A fresh working directory with the sandbox's models in it (examples write ./merged etc. there)."""
    for p in sandbox.iterdir():
        (tmp_path / p.name).symlink_to(p, target_is_directory=True)
    monkeypatch.chdir(tmp_path)
    return tmp_path


# -- YAML -----------------------------------------------------------------------------------------------------


def _is_recipe(doc) -> bool:
    return isinstance(doc, dict) and ("merge_method" in doc or "experts" in doc)


def _refs(node) -> list[str]:
    if isinstance(node, dict):
        return [r for k, v in node.items()
                for r in ([v] if k in ("model", "base_model", "source_model") and isinstance(v, str) else _refs(v))]
    if isinstance(node, list):
        return [r for item in node for r in _refs(item)]
    return []


def _local(ref: str, stages: set[str]) -> bool:
    return all(p.strip() in stages or p.strip().removeprefix("./") in SANDBOX_NAMES for p in ref.split("+"))


@pytest.mark.parametrize("text", of("yaml", "yml"))
def test_yaml_example(text, sandbox, tmp_path, monkeypatch):
    docs = list(yaml.safe_load_all(text))
    if not any(_is_recipe(d) for d in docs):
        return                                   # a YAML that is not a recipe (a search space ...): it parsed
    import lazymerge

    _cwd(sandbox, tmp_path, monkeypatch)
    stages = {d.get("name") for d in docs if isinstance(d, dict) and d.get("name")}
    if all(_local(r, stages) for r in _refs(docs)):
        lazymerge.plan(text, memory="64MiB").close()
    else:                                        # models this sandbox cannot provide: structure and method only
        for r in resolve_stages(text):
            if r.merge_method != "moe":
                _method_of(r)


# -- shell ----------------------------------------------------------------------------------------------------

RECIPE_FILES = {"recipe.yaml": 0, "config.yml": 0, "moe.yaml": 1}   # the README's first recipe and its MoE config


def _readme_recipes() -> list[str]:
    texts = [t for where, lang, t in ALL if where.startswith("README.md") and lang == "yaml"]
    recipes = [t for t in texts if "merge_method" in t and "lora" not in t]
    moes = [t for t in texts if "experts:" in t]
    return [recipes[0], moes[0]]


def commands(text: str) -> list[list[str]]:
    """The lazymerge command lines of a shell block (continuations joined, comments dropped)."""
    out = []
    for line in text.replace("\\\n", " ").splitlines():
        argv = shlex.split(line, comments=True)
        while argv and "=" in argv[0] and not argv[0].startswith("-"):
            argv = argv[1:]                       # VAR=value prefixes
        if argv and argv[0] in ("lazymerge", "lazymerge-yaml"):
            out.append(argv)
        for part in line.split("&&")[1:]:       # `pip install ... && lazymerge demo`
            argv = shlex.split(part, comments=True)
            if argv and argv[0] == "lazymerge":
                out.append(argv)
    return out


def _resolve(argv: list[str]) -> tuple[click.Command, list[str]]:
    if argv[0] == "lazymerge-yaml":
        return mergekit_yaml.main, argv[1:]
    if argv[1] not in cli_main.commands:
        raise AssertionError(f"lazymerge has no command {argv[1]!r}")
    return cli_main.commands[argv[1]], argv[2:]


def _runs_here(argv: list[str]) -> bool:
    """Run for real: a local plan, run or lazymerge-yaml on the recipe files (no cluster, GPU, data or Ctrl-C)."""
    if argv[0] == "lazymerge-yaml":
        return not {"--cuda", "--gpu-rich"} & set(argv)
    return (argv[1] in ("plan", "run") and "--help" not in argv and not any(a.startswith("--cluster") for a in argv)
            and not any(a.startswith("cuda") for a in argv) and "--resume" not in argv
            and any(a in RECIPE_FILES for a in argv) and not any(a.startswith("/") for a in argv))


@pytest.mark.parametrize("text", of("bash", "sh", "shell", "console"))
def test_shell_example(text, sandbox, tmp_path, monkeypatch):
    cwd = _cwd(sandbox, tmp_path, monkeypatch)
    recipes = _readme_recipes()
    for name, i in RECIPE_FILES.items():
        (cwd / name).write_text(recipes[i])
    for argv in commands(text):
        cmd, args = _resolve(argv)
        if "--help" in args:
            continue
        cmd.make_context(argv[0], list(args), resilient_parsing=False)   # options, arguments, values
        if _runs_here(argv):
            r = CliRunner().invoke(cmd, args)
            assert r.exit_code == 0, f"{shlex.join(argv)}: {r.output}"


# -- Python ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text", of("python", "py"))
def test_python_example_compiles(text):
    compile(text, "<doc example>", "exec")


def test_the_readme_commands_run():
    """The README's merge, plan, MoE and lazymerge-yaml lines are among those run for real, not only parsed."""
    ran = [shlex.join(a) for where, lang, t in ALL if where.startswith("README.md") and lang == "bash"
           for a in commands(t) if _runs_here(a)]
    assert {"lazymerge plan recipe.yaml", "lazymerge run moe.yaml ./moe --memory 1GiB"} <= set(ran), ran
    assert any(r.startswith("lazymerge-yaml config.yml") for r in ran) and len(ran) >= 4, ran


def test_commands_are_extracted():
    """The extraction itself: continuations, comments, environment prefixes and `&&` chains."""
    text = ("pip install x && lazymerge demo   # note\nlazymerge search r.yaml --data d \\\n    --trials 2\n"
            "DASK_SCHEDULER_ADDRESS=tcp://h:1 lazymerge run r.yaml /o\ndask scheduler\n")
    assert commands(text) == [["lazymerge", "demo"], ["lazymerge", "search", "r.yaml", "--data", "d", "--trials", "2"],
                              ["lazymerge", "run", "r.yaml", "/o"]]


def test_the_readme_is_a_front_door():
    """At most 200 lines, and its table lists every page of docs/."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(readme.splitlines()) <= 200
    missing = [p.name for p in sorted((ROOT / "docs").glob("*.md")) if f"](docs/{p.name})" not in readme]
    assert not missing, f"docs pages the README's table does not list: {missing}"
