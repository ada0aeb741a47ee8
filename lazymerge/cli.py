"""The `lazymerge` command: a thin shell over the Python API (`lazymerge.plan`, `lazymerge.merge`).

Every user-caused failure is printed as one `error: ...` line with a non-zero exit status, never a traceback.
"""
from __future__ import annotations

import functools
import os
import signal
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

import click

from ._version import __version__
from .errors import LazyMergeError

SIZE_HELP = "e.g. 2GiB, 1500MB, 8G (binary), or 'unlimited'"


def _friendly(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn LazyMergeError / Ctrl-C into one line and an exit status."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        def on_term(signum: int, frame: Any) -> None:
            raise KeyboardInterrupt

        old = signal.signal(signal.SIGTERM, on_term)
        try:
            return fn(*args, **kwargs)
        except LazyMergeError as exc:
            click.echo(f"error: {exc}", err=True)
            _exit(exc.exit_code)
        except KeyboardInterrupt:
            click.echo("error: interrupted", err=True)
            _exit(130)
        finally:
            signal.signal(signal.SIGTERM, old)

    return wrapper


def _exit(code: int) -> None:
    """Exit with `code`. Interrupted, in a process of our own (stdio not redirected by an embedding caller or a
    test runner), leave at once: temporary files are already removed, and the interpreter's normal teardown with
    torch loaded takes about a second the user would spend waiting after Ctrl-C."""
    if code == 130 and sys.stdout is sys.__stdout__ and sys.stderr is sys.__stderr__:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


class _Bar:
    """A click progress bar over bytes written, with tensors done and an ETA."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.bar: Any = None
        self.last = 0

    def __call__(self, p: Any) -> None:
        if not self.enabled:
            return
        if self.bar is None:
            self.bar = click.progressbar(length=max(p.bytes_total, 1), label="merging", show_eta=True,
                                         show_percent=True, file=sys.stderr,
                                         item_show_func=lambda _: self.info)
            self.bar.__enter__()
        self.info = f"{p.tensors_done}/{p.tensors_total} tensors"
        self.bar.update(p.bytes_done - self.last, self.info)
        self.last = p.bytes_done

    def close(self) -> None:
        if self.bar is not None:
            self.bar.__exit__(None, None, None)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="lazymerge")
def main() -> None:
    """Merge LLM checkpoints inside a memory budget.

    A recipe (mergekit-compatible YAML) is compiled into a graph of small per-tensor tasks, which a scheduler
    runs within --memory, reading safetensors shards lazily and writing sharded safetensors.

    \b
    Try it:   lazymerge demo
    Check:    lazymerge plan recipe.yaml
    Merge:    lazymerge run recipe.yaml ./merged --memory 2GiB
    MoE:      lazymerge run moe.yaml ./moe --memory 1GiB   (a mergekit-moe config)
    """


def _run_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    options = [
        click.option("--memory", "-m", default=None, metavar="SIZE",
                     help=f"Budget for tensors lazymerge holds ({SIZE_HELP}). Default: 60% of available RAM."),
        click.option("--shard-size", default="5GB", show_default=True, metavar="SIZE",
                     help="Largest output shard (GB = 10^9 bytes, GiB = 2^30)."),
        click.option("--allow-pickle", is_flag=True,
                     help="Also read PyTorch .bin checkpoints (torch.load with weights_only=True)."),
        click.option("--stage", default=None, metavar="NAME",
                     help="Multi-stage recipe: the stage to produce (default: the unnamed or last document)."),
    ]
    for o in reversed(options):
        fn = o(fn)
    return fn


@main.command("plan")
@click.argument("recipe", type=click.Path(dir_okay=False, path_type=Path))
@_run_options
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Where the output will go: check free disk space there.")
@click.option("--graph", "graph_file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write the task graph as JSON (node-link format).")
@_friendly
def plan_cmd(recipe: Path, memory: str | None, shard_size: str, allow_pickle: bool, stage: str | None,
             out: Path | None, graph_file: Path | None) -> None:
    """Validate RECIPE and show what a run would do: tasks, bytes read and written, estimated peak memory.

    Reads checkpoint headers only; no tensor data is touched.
    """
    import shutil

    from .api import plan
    from .units import human

    p = plan(recipe, memory=memory, shard_size=shard_size, allow_pickle=allow_pickle, stage=stage)
    try:
        click.echo(p.summary())
        where = (out.parent if out is not None else Path.cwd()).resolve()
        while not where.exists():
            where = where.parent
        free = shutil.disk_usage(where).free
        if free < p.bytes_written:
            click.echo(f"warning       only {human(free)} free in {where}, the output needs "
                       f"{human(p.bytes_written)}", err=True)
        if graph_file is not None:
            import dataclasses
            import json

            import networkx as nx

            data = nx.node_link_data(p.graph, edges="edges")
            for node in data["nodes"]:
                t = node.pop("task")
                attrs = dataclasses.asdict(t.attrs)
                attrs.pop("seed_parts", None)
                node.update(op=t.op, tensor=t.tensor, block=t.block, nbytes=t.nbytes, attrs=attrs)
            graph_file.write_text(json.dumps(data, default=str))
            click.echo(f"graph         {graph_file}")
    finally:
        p.close()


@main.command("run")
@click.argument("recipe", type=click.Path(dir_okay=False, path_type=Path))
@click.argument("out", type=click.Path(path_type=Path))   # an existing file is refused with the other checks
@_run_options
@click.option("--seed", default=0, show_default=True, help="Seed for random methods (DARE, DELLA; a MoE's random routers and expert noise).")
@click.option("--device", default="cpu", show_default=True, help="Where kernels run: cpu, cuda, cuda:1 ...")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists (only once the new one is complete).")
@click.option("--resume", is_flag=True, help="Continue an interrupted run into OUT, keeping finished shards.")
@click.option("--strict", is_flag=True, help="Fail (instead of warning) on NaN/Inf in an input tensor.")
@click.option("--workers", type=int, default=None,
              help="Tasks run at once (default: one per usable core, at least 2, fewer when the budget is small; "
                   "kernel threads share the cores among them; with --cluster, per partition).")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar; print only the report.")
@click.option("--cluster", default=None, metavar="ADDRESS", envvar="DASK_SCHEDULER_ADDRESS", show_envvar=True,
              help="Run on Dask: local:N (N worker processes here) or tcp://HOST:PORT (a running scheduler); "
                   "'none' runs here. Inputs and OUT must be at the same paths on every worker; --memory is then "
                   "per worker. Needs pip install 'lazymerge[dask]'.")
@_friendly
def run_cmd(recipe: Path, out: Path, memory: str | None, shard_size: str, allow_pickle: bool, stage: str | None,
            seed: int, device: str, overwrite: bool, resume: bool, strict: bool, workers: int | None,
            quiet: bool, cluster: str | None) -> None:
    """Merge the models in RECIPE into the checkpoint directory OUT.

    RECIPE may also be a mergekit-moe config (base_model + experts, or merge_method: moe): OUT is then a Mixtral,
    Qwen2-MoE or Qwen3-MoE whose experts are the listed models' MLPs, routed by their prompts (gate_mode).

    A model in RECIPE is a checkpoint directory, base_dir+adapter_dir, or a GGUF model (a .gguf file, split
    files, or a directory holding one), dequantized block by block (docs/gguf.md).

    OUT appears only when the merge is complete. The report is printed and saved to OUT/lazymerge_report.json,
    the recipe to OUT/lazymerge_recipe.yaml.

    \b
    On a Dask cluster (same output, bit for bit):
      lazymerge run recipe.yaml ./merged --cluster local:4 --memory 8GiB
      lazymerge run recipe.yaml /shared/merged --cluster tcp://scheduler:8786
    """
    from .api import merge

    bar = _Bar(enabled=not quiet)
    try:
        with _cluster_client(cluster) as client:
            report = merge(recipe, out, memory=memory, shard_size=shard_size, seed=seed, device=device,
                           progress=bar, overwrite=overwrite, resume=resume, strict=strict,
                           allow_pickle=allow_pickle, workers=workers, stage=stage, cluster=client)
    finally:
        bar.close()
    click.echo(report.summary())


def _cluster_client(spec: str | None) -> Any:
    """A Dask client for --cluster (announcing the dashboard), or a null context for a local run."""
    import contextlib

    if spec is None or spec.strip().lower() in ("", "none"):
        return contextlib.nullcontext(None)

    @contextlib.contextmanager
    def connected() -> Any:
        from .cluster import open_cluster

        with open_cluster(spec) as client:
            n = len(client.scheduler_info().get("workers", {}))
            click.echo(f"cluster       {client.scheduler.address} ({n} workers), dashboard "
                       f"{client.dashboard_link}", err=True)
            yield client

    return connected()


@main.command("demo")
@click.option("--dir", "workdir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Keep the generated models and the merge here (default: a temporary directory).")
@click.option("--preset", default="small", show_default=True, help="Model shape: tiny, small.")
@click.option("--method", default="ties", show_default=True, help="Merge method to demonstrate.")
@click.option("--memory", "-m", default="16MiB", show_default=True, metavar="SIZE",
              help="Budget for the merge (small, so that large tensors are split into row blocks).")
@_friendly
def demo_cmd(workdir: Path | None, preset: str, method: str, memory: str) -> None:
    """Make three small Llama-shaped checkpoints, merge them, and print the report.

    A self-contained check that lazymerge works on this machine; nothing is downloaded.
    """
    from .demo import run_demo

    if workdir is None:
        with tempfile.TemporaryDirectory(prefix="lazymerge-demo-") as tmp:
            click.echo(run_demo(Path(tmp), preset=preset, method=method, memory=memory))
    else:
        click.echo(run_demo(workdir, preset=preset, method=method, memory=memory))


@main.command("extract-lora")
@click.argument("finetuned", type=click.Path(file_okay=False, path_type=Path))
@click.argument("base", type=click.Path(file_okay=False, path_type=Path))
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@click.option("--rank", "-r", type=click.IntRange(min=1), required=True, help="LoRA rank of the adapter.")
@click.option("--include-embeddings", is_flag=True, help="Also factor embedding and lm_head deltas.")
@click.option("--device", default="cpu", show_default=True, help="Where the SVDs run.")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
@click.option("--allow-pickle", is_flag=True, help="Also read PyTorch .bin checkpoints (weights_only).")
@_friendly
def extract_lora_cmd(finetuned: Path, base: Path, out: Path, rank: int, include_embeddings: bool, device: str,
                     overwrite: bool, allow_pickle: bool) -> None:
    """Write a PEFT LoRA adapter OUT that approximates FINETUNED - BASE at rank R.

    Each linear weight's difference is factored by truncated SVD, one tensor at a time; the relative
    reconstruction error of every tensor is reported.
    """
    from .extract import extract_lora

    report = extract_lora(finetuned, base, out, rank, include_embeddings=include_embeddings, device=device,
                          overwrite=overwrite, allow_pickle=allow_pickle)
    click.echo(report.summary())


@main.command("fisher")
@click.argument("model", type=click.Path(file_okay=False, path_type=Path))
@click.argument("data", type=click.Path(dir_okay=False, path_type=Path))
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@click.option("--max-samples", default=256, show_default=True, help="Sequences of the text to use.")
@click.option("--seq-len", default=512, show_default=True, help="Tokens per sequence.")
@click.option("--device", default="cpu", show_default=True)
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
@_friendly
def fisher_cmd(model: Path, data: Path, out: Path, max_samples: int, seq_len: int, device: str,
               overwrite: bool) -> None:
    """Compute MODEL's diagonal Fisher information on the text file DATA into the checkpoint OUT.

    Use it in a recipe with `merge_method: fisher` and `parameters: {fisher: OUT}` per model.
    Needs transformers: pip install 'lazymerge[fisher]'.
    """
    from .fisher import compute_fisher

    report = compute_fisher(model, data, out, max_samples=max_samples, seq_len=seq_len, device=device,
                            overwrite=overwrite)
    click.echo(f"fisher        {report.samples} sequences, {report.tokens} tokens, {report.wall_s:.1f} s -> "
               f"{report.out}")


@main.command("convert-config")
@click.argument("input", type=click.Path(dir_okay=False, path_type=Path))
@click.option("-o", "--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write the recipe to this file (default: print it).")
@_friendly
def convert_config_cmd(input: Path, out: Path | None) -> None:
    """Convert a simple merge config INPUT (JSON or YAML: strategy weighted | task_arithmetic | slerp |
    sequential, a list of {path, weight}, an optional base) into a lazymerge recipe.

    \b
    strategy: weighted         -> merge_method: linear
    strategy: task_arithmetic  -> merge_method: task_arithmetic (op: subtract or a negative weight subtracts)
    strategy: slerp            -> merge_method: slerp (t, or the second model's weight)
    strategy: sequential       -> a multi-stage recipe, one stage per added model
    """
    from .convert import convert_file

    text = convert_file(input, out)
    if text is None:
        click.echo(f"wrote {out}", err=True)
    else:
        click.echo(text, nl=False)


class _EvalBar:
    """A click progress bar over evaluation steps (layers x batches, then the head)."""

    def __init__(self, enabled: bool, label: str = "evaluating"):
        self.enabled, self.label = enabled, label
        self.bar: Any = None
        self.last = 0
        self.info = ""

    def __call__(self, p: Any) -> None:
        if not self.enabled:
            return
        if self.bar is None or p.done < self.last:
            self.close()
            self.bar = click.progressbar(length=max(p.total, 1), label=self.label, show_eta=True,
                                         file=sys.stderr, item_show_func=lambda _: self.info)
            self.bar.__enter__()
            self.last = 0
        self.info = p.stage
        self.bar.update(p.done - self.last, p.stage)
        self.last = p.done

    def close(self) -> None:
        if self.bar is not None:
            self.bar.__exit__(None, None, None)
            self.bar = None


def _eval_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    options = [
        click.option("--data", "-d", "data", type=click.Path(path_type=Path), default=None,
                     help="Evaluation text: a .txt file (one document), a .jsonl with a 'text' field per line, or "
                          "a directory saved by datasets' save_to_disk."),
        click.option("--seq-len", type=click.IntRange(min=2), default=None,
                     help="Tokens per window (default: min(512, the model's max positions))."),
        click.option("--max-tokens", type=click.IntRange(min=2), default=4096, show_default=True,
                     help="Use the first N tokens of the data (documents joined with EOS)."),
        click.option("--batch", type=click.IntRange(min=1), default=4, show_default=True,
                     help="Windows per forward call."),
        click.option("--memory", "-m", default=None, metavar="SIZE",
                     help=f"Budget for weights and merge work ({SIZE_HELP}); activations come on top "
                          "(see README). Default: 60% of available RAM."),
        click.option("--device", default="cpu", show_default=True, help="cpu, cuda, cuda:1 ..."),
        click.option("--seed", default=0, show_default=True, help="Merge seed (DARE, DELLA) for a recipe."),
    ]
    for o in reversed(options):
        fn = o(fn)
    return fn


@main.command("eval")
@click.argument("target", type=click.Path(path_type=Path))
@_eval_options
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--compare-inputs", is_flag=True, help="Recipe TARGET: also evaluate each input model; one table.")
@click.option("--prompt", default=None, help="Print a greedy continuation of TEXT (a sanity check).")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=20, show_default=True,
              help="Tokens to generate for --prompt.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@_friendly
def eval_cmd(target: Path, data: Path | None, seq_len: int | None, max_tokens: int, batch: int, memory: str | None,
             device: str, seed: int, as_json: bool, compare_inputs: bool, prompt: str | None,
             max_new_tokens: int, quiet: bool) -> None:
    """Perplexity of TARGET on --data, without ever holding the whole model.

    TARGET is a checkpoint directory, a GGUF model or a merge recipe. A recipe is merged one decoder layer at a
    time, in memory, and never written; the result equals evaluating the written merge. Each decoder layer's
    weights are loaded (or merged), every window goes through it, and they are freed before the next layer.

    \b
    lazymerge eval ./merged --data wiki.txt --memory 512MiB
    lazymerge eval model.Q4_K_M.gguf --data wiki.txt
    lazymerge eval recipe.yaml --data eval.jsonl --compare-inputs
    lazymerge eval ./merged --prompt "The capital of France is" --max-new-tokens 10
    """
    import json

    from .api import evaluate, generate

    if prompt is not None:
        text = generate(target, prompt, max_new_tokens=max_new_tokens, memory=memory, device=device, seed=seed,
                        progress=_EvalBar(enabled=not quiet, label="generating"))
        click.echo(json.dumps({"prompt": prompt, "completion": text}) if as_json else prompt + text)
        if data is None:
            return
    if data is None:
        raise click.UsageError("--data is required (or --prompt)")
    kwargs = dict(memory=memory, seq_len=seq_len, max_tokens=max_tokens, batch=batch, device=device, seed=seed)
    if compare_inputs:
        from .api import compare_inputs as compare

        bar = _EvalBar(enabled=not quiet)
        try:
            reports = compare(target, data, progress=bar, **kwargs)
        finally:
            bar.close()
        if as_json:
            click.echo(json.dumps([json.loads(r.to_json()) for r in reports], indent=2))
        else:
            from .evaluate.report import comparison_table

            click.echo(comparison_table(reports))
        return
    bar = _EvalBar(enabled=not quiet)
    try:
        report = evaluate(target, data, progress=bar, **kwargs)
    finally:
        bar.close()
    click.echo(report.to_json() if as_json else report.summary())


@main.command("search")
@click.argument("recipe", type=click.Path(dir_okay=False, path_type=Path))
@_eval_options
@click.option("--space", "-s", "space", multiple=True, metavar="PATH=LOW..HIGH",
              help="A recipe value to search, by its place: models[0].parameters.density=0.2..0.9, "
                   "parameters.t=0..1, parameters.t[1]=0..1 (a gradient's entry); ':log' for a log range. "
                   "Repeat for several.")
@click.option("--space-file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="A search YAML: space: {PATH: [LOW, HIGH]}, and optionally trials, sampler, seed.")
@click.option("--trials", "-n", type=click.IntRange(min=1), default=None,
              help="Completed trials to reach (default 20, or the search file's).")
@click.option("--study", type=click.Path(dir_okay=False, path_type=Path), default=Path("search.db"),
              show_default=True, help="SQLite file keeping the trials: the same command again continues it.")
@click.option("--sampler", type=click.Choice(["tpe", "cmaes", "random"]), default=None,
              help="optuna sampler (default tpe), seeded by --seed.")
@click.option("--best", "best_file", type=click.Path(dir_okay=False, path_type=Path), default=Path("best.yaml"),
              show_default=True, help="Where to write the best recipe.")
@click.option("--out", type=click.Path(path_type=Path), default=None, help="Merge the best recipe into OUT.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@click.option("--cluster", default=None, metavar="ADDRESS", envvar="DASK_SCHEDULER_ADDRESS", show_envvar=True,
              help="Evaluate trials on Dask workers, one trial per worker at a time: local:N, tcp://HOST:8786, "
                   "or none (default: local, or DASK_SCHEDULER_ADDRESS). Data and models must be at the same "
                   "paths on every worker; the study stays here.")
@_friendly
def search_cmd(recipe: Path, data: Path | None, seq_len: int | None, max_tokens: int, batch: int,
               memory: str | None, device: str, seed: int, space: tuple[str, ...], space_file: Path | None,
               trials: int | None, study: Path, sampler: str | None, best_file: Path, out: Path | None,
               quiet: bool, cluster: str | None) -> None:
    """Search RECIPE's parameters for the merge with the lowest perplexity on --data.

    Each trial puts sampled values into the recipe and evaluates that merge layer by layer, never writing it
    (as `lazymerge eval` does), within --memory. Trials are kept in --study: after Ctrl-C or a crash, run the
    same command again to continue; completed trials are never lost.

    \b
    lazymerge search recipe.yaml --data eval.jsonl --space 'models[0].parameters.weight=0..1' --trials 12
    lazymerge search recipe.yaml --data eval.txt -s 'parameters.t[0]=0..1' -s 'parameters.t[1]=0..1' --out ./best
    lazymerge search recipe.yaml --data eval.txt -s 'parameters.t=0..1' --cluster local:2 --memory 2GiB

    With --cluster, the completed trials' values are reproducible but a seeded sampler's proposals depend on the
    order trials finish in.
    """
    from .api import search
    from .evaluate.search import parse_space, read_space_file

    if data is None:
        raise click.UsageError("--data is required")
    dims = [parse_space(s) for s in space]
    extra: dict[str, Any] = {}
    if space_file is not None:
        file_dims, extra = read_space_file(space_file)
        dims += file_dims
    bar = _EvalBar(enabled=not quiet)

    def on_trial(t: Any) -> None:
        bar.close()
        if not quiet:
            vals = ", ".join(f"{k}={v:.4f}" for k, v in t.params.items())
            ppl = f"{t.perplexity:.4f}" if t.perplexity is not None else "-"
            click.echo(f"trial {t.number:>3}  perplexity {ppl}  {vals}", err=True)

    try:
        with _cluster_client(cluster) as client:
            report = search(recipe, data, dims, trials=trials or int(extra.get("trials", 20)), study=study,
                            sampler=sampler or str(extra.get("sampler", "tpe")),
                            seed=seed if "seed" not in extra else int(extra["seed"]), memory=memory, seq_len=seq_len,
                            max_tokens=max_tokens, batch=batch, device=device, best_file=best_file, out=out,
                            on_trial=on_trial, progress=bar, cluster=client)
    finally:
        bar.close()
    click.echo(report.summary())


if __name__ == "__main__":  # pragma: no cover
    main()
