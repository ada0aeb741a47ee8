"""The `lazymerge` command: a thin shell over the Python API (`lazymerge.plan`, `lazymerge.merge`).

Every user-caused failure is printed as one `error: ...` line with a non-zero exit status, never a traceback.
"""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, Callable

import click

from ._version import __version__
from .console import SIZE_HELP, EvalBar, MergeBar, friendly, hub_progress


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
    mergekit: lazymerge-yaml config.yml ./out --cuda ...   (mergekit-yaml's command line)
    """


def _run_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    options = [
        click.option("--memory", "-m", default=None, metavar="SIZE",
                     help=f"Budget for tensors lazymerge holds ({SIZE_HELP}). Default: 60% of available RAM."),
        click.option("--shard-size", default=None, metavar="SIZE",
                     help="Largest output shard (GB = 10^9 bytes, GiB = 2^30). Default: 5GB; a GGUF is one file "
                          "unless a size is given (then llama.cpp's split files)."),
        click.option("--gguf-type", default=None, metavar="TYPE",
                     help="Write the merge as GGUF with this tensor type: auto, f32, f16, bf16, q8_0, q4_0, q4_1, "
                          "q5_0 or q5_1 (implied by an OUT ending in .gguf; default auto: bf16, or f16 for a "
                          "float16 merge). docs/gguf.md"),
        click.option("--format", "fmt", type=click.Choice(["safetensors", "gguf"]), default=None,
                     help="Output format (default: gguf for an OUT ending in .gguf or with --gguf-type, else "
                          "safetensors). gguf with a directory OUT: the directory holds <OUT name>.gguf."),
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
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Where the output will go (a .gguf: plan that GGUF): check free disk space there.")
@click.option("--graph", "graph_file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write the task graph as JSON (node-link format).")
@friendly
def plan_cmd(recipe: Path, memory: str | None, shard_size: str | None, gguf_type: str | None, fmt: str | None,
             allow_pickle: bool, stage: str | None, out: Path | None, graph_file: Path | None) -> None:
    """Validate RECIPE and show what a run would do: tasks, bytes read and written, estimated peak memory.

    Reads checkpoint headers only; no tensor data is touched. For hub models (org/name[@revision]) the headers
    are read with HTTP range requests: a few KB per shard, no shard is downloaded.
    """
    import shutil

    from .api import plan
    from .units import human

    p = plan(recipe, memory=memory, shard_size=shard_size, allow_pickle=allow_pickle, stage=stage, out=out,
             gguf_type=gguf_type, format=fmt)
    try:
        click.echo(p.summary())
        for ref, sha in sorted(p.pins.items()):
            click.echo(f"input         {ref} at {sha}")
        if p.pins:
            from .engine.inputs import planned_reads
            from .io.models import files_to_fetch

            need = [(hub, n) for hub, names in files_to_fetch(planned_reads(p.sources, p.tasks.tasks)) for n in names]
            size = sum(hub.files.get(n) or 0 for hub, n in need)
            click.echo(f"download      {human(size)} in {len(need)} file(s) not in the Hugging Face cache "
                       "(none with --stream-inputs)")
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
@click.option("--quiet", "-q", is_flag=True, help="No progress bars; print only the report.")
@click.option("--stream-inputs", is_flag=True,
              help="Read hub models straight from the hub with HTTP range requests, block by block, and never "
                   "store them (disk needed: the output). Without it, the files the merge needs are downloaded "
                   "into the Hugging Face cache first.")
@click.option("--write-model-card/--no-write-model-card", default=True, show_default=True,
              help="Write OUT/README.md: a model card with Hugging Face front matter (base_model, tags) and the "
                   "recipe, ready to upload (a .gguf file OUT has no directory: no card).")
@click.option("--copy-tokenizer/--no-copy-tokenizer", default=True, show_default=True,
              help="Copy the base (first) model's tokenizer files into OUT.")
@click.option("--cluster", default=None, metavar="ADDRESS", envvar="DASK_SCHEDULER_ADDRESS", show_envvar=True,
              help="Run on Dask: local:N (N worker processes here) or tcp://HOST:PORT (a running scheduler); "
                   "'none' runs here. Inputs and OUT must be at the same paths on every worker; --memory is then "
                   "per worker. Needs pip install 'lazymerge[dask]'.")
@friendly
def run_cmd(recipe: Path, out: Path, memory: str | None, shard_size: str | None, gguf_type: str | None,
            fmt: str | None, allow_pickle: bool, stage: str | None, seed: int, device: str, overwrite: bool,
            resume: bool, strict: bool, workers: int | None, quiet: bool, stream_inputs: bool,
            write_model_card: bool, copy_tokenizer: bool, cluster: str | None) -> None:
    """Merge the models in RECIPE into the checkpoint directory OUT, or into the GGUF file OUT (.gguf).

    Models are local directories or Hugging Face hub ids (org/name, org/name@revision, base+adapter), pinned to
    a commit when the run starts; HF_TOKEN, HF_ENDPOINT, HF_HOME and HF_HUB_OFFLINE=1 are honoured (docs/hub.md).

    RECIPE may also be a mergekit-moe config (base_model + experts, or merge_method: moe): OUT is then a Mixtral,
    Qwen2-MoE or Qwen3-MoE whose experts are the listed models' MLPs, routed by their prompts (gate_mode).

    A model in RECIPE is a checkpoint directory, base_dir+adapter_dir, or a GGUF model (a .gguf file, split
    files, or a directory holding one), dequantized block by block (docs/gguf.md).

    OUT appears only when the merge is complete. The report is printed and saved to OUT/lazymerge_report.json,
    the recipe to OUT/lazymerge_recipe.yaml.

    A GGUF (for llama.cpp, Ollama, LM Studio) is written in the same pass, each row block quantized as it is
    merged, with the metadata llama.cpp's converter writes (docs/gguf.md):

    \b
      lazymerge run recipe.yaml merged.Q8_0.gguf --gguf-type q8_0
      lazymerge run recipe.yaml ./merged-gguf --format gguf --gguf-type q4_0 --shard-size 4GB

    \b
    On a Dask cluster (same output, bit for bit):
      lazymerge run recipe.yaml ./merged --cluster local:4 --memory 8GiB
      lazymerge run recipe.yaml /shared/merged --cluster tcp://scheduler:8786
    """
    from .api import merge

    bar = MergeBar(enabled=not quiet)
    try:
        with hub_progress(not quiet):
            report = merge(recipe, out, memory=memory, shard_size=shard_size, seed=seed, device=device,
                           progress=bar, overwrite=overwrite, resume=resume, strict=strict,
                           allow_pickle=allow_pickle, workers=workers, stage=stage,
                           cluster=_cluster_opener(cluster), stream_inputs=stream_inputs,
                           write_model_card=write_model_card, copy_tokenizer=copy_tokenizer, gguf_type=gguf_type,
                           format=fmt)
    finally:
        bar.close()
    click.echo(report.summary())


def _cluster_opener(spec: str | None) -> Callable[[], Any] | None:
    """For --cluster: a function that connects (announcing the dashboard) and returns the client's context, which
    the API calls once the recipe has compiled (a bad recipe fails before any cluster starts); None: run here."""
    import contextlib

    if spec is None or spec.strip().lower() in ("", "none"):
        return None

    @contextlib.contextmanager
    def connected() -> Any:
        from .cluster import open_cluster

        with open_cluster(spec) as client:
            n = len(client.scheduler_info().get("workers", {}))
            link = client.dashboard_link if "dashboard" in client.scheduler_info().get("services", {}) else None
            click.echo(f"cluster       {client.scheduler.address} ({n} workers)"
                       + (f", dashboard {link}" if link else ""), err=True)
            yield client

    return connected


@main.command("demo")
@click.option("--dir", "workdir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Keep the generated models and the merge here (default: a temporary directory).")
@click.option("--preset", default="small", show_default=True, help="Model shape: tiny, small.")
@click.option("--method", default="ties", show_default=True, help="Merge method to demonstrate.")
@click.option("--memory", "-m", default="16MiB", show_default=True, metavar="SIZE",
              help="Budget for the merge (small, so that large tensors are split into row blocks).")
@friendly
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
@click.argument("finetuned")
@click.argument("base")
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@click.option("--rank", "-r", type=click.IntRange(min=1), required=True, help="LoRA rank of the adapter.")
@click.option("--include-embeddings", is_flag=True, help="Also factor embedding and lm_head deltas.")
@click.option("--device", default="cpu", show_default=True, help="Where the SVDs run.")
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
@click.option("--allow-pickle", is_flag=True, help="Also read PyTorch .bin checkpoints (weights_only).")
@friendly
def extract_lora_cmd(finetuned: str, base: str, out: Path, rank: int, include_embeddings: bool, device: str,
                     overwrite: bool, allow_pickle: bool) -> None:
    """Write a PEFT LoRA adapter OUT that approximates FINETUNED - BASE at rank R.

    FINETUNED and BASE are checkpoint directories or hub ids (org/name[@revision]).

    Each linear weight's difference is factored by truncated SVD, one tensor at a time; the relative
    reconstruction error of every tensor is reported.
    """
    from .extract import extract_lora

    report = extract_lora(finetuned, base, out, rank, include_embeddings=include_embeddings, device=device,
                          overwrite=overwrite, allow_pickle=allow_pickle)
    click.echo(report.summary())


@main.command("fisher")
@click.argument("model")
@click.argument("data", type=click.Path(dir_okay=False, path_type=Path))
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@click.option("--max-samples", default=256, show_default=True, help="Sequences of the text to use.")
@click.option("--seq-len", default=512, show_default=True, help="Tokens per sequence.")
@click.option("--device", default="cpu", show_default=True)
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
@friendly
def fisher_cmd(model: str, data: Path, out: Path, max_samples: int, seq_len: int, device: str,
               overwrite: bool) -> None:
    """Compute MODEL's diagonal Fisher information on the text file DATA into the checkpoint OUT.

    MODEL is a model directory or a hub id (org/name[@revision], downloaded whole into the Hugging Face cache).

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
@friendly
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
                          "(see docs/search.md). Default: 60% of available RAM."),
        click.option("--device", default="cpu", show_default=True, help="cpu, cuda, cuda:1 ..."),
        click.option("--seed", default=0, show_default=True, help="Merge seed (DARE, DELLA) for a recipe."),
    ]
    for o in reversed(options):
        fn = o(fn)
    return fn


def _task_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    options = [
        click.option("--include-path", type=click.Path(file_okay=False, path_type=Path), default=None,
                     help="A directory of lm-eval task YAMLs (local data: dataset_path: json, data_files)."),
        click.option("--num-fewshot", type=click.IntRange(min=0), default=None,
                     help="Few-shot examples per request (default: each task's own)."),
        click.option("--limit", type=click.FloatRange(min=0, min_open=True), default=None,
                     help="Only the first N documents of each task (a fraction below 1: that share)."),
    ]
    for o in reversed(options):
        fn = o(fn)
    return fn


@main.command("eval")
@click.argument("target", type=click.Path(path_type=Path))
@_eval_options
@click.option("--tasks", "-t", default=None, metavar="NAMES",
              help="lm-eval tasks, comma-separated (arc_easy,hellaswag): lm-eval's results table instead of "
                   "perplexity. Needs pip install 'lazymerge[tasks]'.")
@_task_options
@click.option("--log-samples", is_flag=True, help="--tasks: also write lm-eval's samples_TASK_*.jsonl files.")
@click.option("--output-path", type=click.Path(path_type=Path), default=None,
              help="--tasks: write lm-eval's results (results_*.json, samples) under this directory.")
@click.option("--activations", default=None, metavar="SIZE",
              help="--tasks: hidden states held at once, on top of --memory (default 1GiB); more requests are "
                   "run in several passes over the weights.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--compare-inputs", is_flag=True, help="Recipe TARGET: also evaluate each input model; one table.")
@click.option("--prompt", default=None, help="Print a greedy continuation of TEXT (a sanity check).")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=20, show_default=True,
              help="Tokens to generate for --prompt.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@click.option("--stream-inputs", is_flag=True,
              help="Read hub models layer by layer with HTTP range requests instead of downloading them.")
@click.pass_context
@friendly
def eval_cmd(ctx: click.Context, target: Path, data: Path | None, seq_len: int | None, max_tokens: int, batch: int,
             memory: str | None, device: str, seed: int, tasks: str | None, include_path: Path | None,
             num_fewshot: int | None, limit: float | None, log_samples: bool, output_path: Path | None,
             activations: str | None, as_json: bool, compare_inputs: bool, prompt: str | None, max_new_tokens: int,
             quiet: bool, stream_inputs: bool) -> None:
    """Perplexity of TARGET on --data, or its lm-eval task scores (--tasks), without ever holding the whole
    model.

    TARGET is a checkpoint directory, a GGUF model, a hub id (org/name[@revision]) or a merge recipe. A recipe
    is merged one decoder layer at a time, in memory, and never written; the result equals evaluating the written
    merge. Each decoder layer's weights are loaded (or merged), every window (or task request) goes through it,
    and they are freed before the next layer.

    With --tasks, lm-evaluation-harness runs its tasks on lazymerge's layer-streaming model: its task manager,
    evaluator, results files and table; the numbers equal lm-eval's `hf` model in float32.

    \b
    lazymerge eval ./merged --data wiki.txt --memory 512MiB
    lazymerge eval model.Q4_K_M.gguf --data wiki.txt
    lazymerge eval recipe.yaml --data eval.jsonl --compare-inputs
    lazymerge eval recipe.yaml --tasks arc_easy,hellaswag --limit 200 --memory 2GiB --output-path results/
    lazymerge eval ./merged --tasks my_task --include-path ./tasks --log-samples --output-path results/
    lazymerge eval ./merged --prompt "The capital of France is" --max-new-tokens 10
    """
    import json

    from .api import evaluate, generate

    if tasks is not None:
        if data is not None or prompt is not None:
            raise click.UsageError("--tasks cannot be combined with --data or --prompt: run them separately")
        if stream_inputs:
            raise click.UsageError("--stream-inputs is not supported with --tasks yet")
        batch_set = ctx.get_parameter_source("batch") != click.core.ParameterSource.DEFAULT
        _eval_tasks(target, tasks, include_path=include_path, num_fewshot=num_fewshot, limit=limit,
                    log_samples=log_samples, output_path=output_path, memory=memory, device=device, seed=seed,
                    batch=batch if batch_set else None, activations=activations, as_json=as_json,
                    compare_inputs=compare_inputs, quiet=quiet)
        return
    for flag, value in (("--include-path", include_path), ("--num-fewshot", num_fewshot), ("--limit", limit),
                        ("--log-samples", log_samples or None), ("--output-path", output_path),
                        ("--activations", activations)):
        if value is not None:
            raise click.UsageError(f"{flag} needs --tasks")
    with hub_progress(not quiet):       # huggingface_hub's download bars, as the merge's own
        if prompt is not None:
            text = generate(target, prompt, max_new_tokens=max_new_tokens, memory=memory, device=device, seed=seed,
                            progress=EvalBar(enabled=not quiet, label="generating"), stream_inputs=stream_inputs)
            click.echo(json.dumps({"prompt": prompt, "completion": text}) if as_json else prompt + text)
            if data is None:
                return
        if data is None:
            raise click.UsageError("--data is required (or --prompt)")
        kwargs = dict(memory=memory, seq_len=seq_len, max_tokens=max_tokens, batch=batch, device=device, seed=seed,
                      stream_inputs=stream_inputs)
        if compare_inputs:
            from .api import compare_inputs as compare

            bar = EvalBar(enabled=not quiet)
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
        bar = EvalBar(enabled=not quiet)
        try:
            report = evaluate(target, data, progress=bar, **kwargs)
        finally:
            bar.close()
        click.echo(report.to_json() if as_json else report.summary())


def _eval_tasks(target: Path, tasks: str, *, include_path: Path | None, num_fewshot: int | None,
                limit: float | None, log_samples: bool, output_path: Path | None, memory: str | None, device: str,
                seed: int, batch: int | None, activations: str | None, as_json: bool, compare_inputs: bool,
                quiet: bool) -> None:
    """`lazymerge eval --tasks`: lm-eval's tasks, results files and table (see lazymerge.tasks)."""
    import json

    from . import tasks as T

    names = tuple(t.strip() for t in tasks.split(",") if t.strip())
    if not names:
        raise click.UsageError("--tasks: no task named")
    opts = T.TaskOptions(tasks=names, include_path=None if include_path is None else str(include_path),
                         num_fewshot=num_fewshot, limit=limit, log_samples=log_samples,
                         output_path=None if output_path is None else str(output_path), memory=memory,
                         device=device, seed=seed, batch_size=batch, activations=activations, progress=not quiet)
    runs = T.compare_tasks(target, opts) if compare_inputs else [T.run_tasks(target, opts)]
    if as_json:
        from lm_eval.utils import handle_non_serializable

        out = [{"model": r.label, "results": r.results, "lazymerge": r.report} for r in runs]
        click.echo(json.dumps(out if compare_inputs else out[0], indent=2, default=handle_non_serializable))
        return
    for r in runs:
        if compare_inputs:
            click.echo(f"\n{r.label}")
        click.echo(T.table(r))
        click.echo(T.cost_line(r), err=True)
        for f in r.files:
            click.echo(f"wrote {f}", err=True)
    if compare_inputs:
        click.echo("\n" + T.comparison_table(runs))


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
@click.option("--objective", default="perplexity", show_default=True, metavar="perplexity|task:NAME[:METRIC]",
              help="What to optimise: the perplexity on --data, or an lm-eval task metric to maximise "
                   "(task:arc_easy:acc; default METRIC: the task's first). Needs pip install 'lazymerge[tasks]'.")
@_task_options
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@click.option("--cluster", default=None, metavar="ADDRESS", envvar="DASK_SCHEDULER_ADDRESS", show_envvar=True,
              help="Evaluate trials on Dask workers, one trial per worker at a time: local:N, tcp://HOST:8786, "
                   "or none (default: local, or DASK_SCHEDULER_ADDRESS). Models must be at the same paths on "
                   "every worker; the data is tokenized here and sent with each trial; the study stays here.")
@friendly
def search_cmd(recipe: Path, data: Path | None, seq_len: int | None, max_tokens: int, batch: int,
               memory: str | None, device: str, seed: int, space: tuple[str, ...], space_file: Path | None,
               trials: int | None, study: Path, sampler: str | None, best_file: Path, out: Path | None,
               objective: str, include_path: Path | None, num_fewshot: int | None, limit: float | None,
               quiet: bool, cluster: str | None) -> None:
    """Search RECIPE's parameters for the merge with the lowest perplexity on --data, or the best score on an
    lm-eval task (--objective task:NAME[:METRIC]).

    Each trial puts sampled values into the recipe and evaluates that merge layer by layer, never writing it
    (as `lazymerge eval` does), within --memory. Trials are kept in --study: after Ctrl-C or a crash, run the
    same command again to continue; completed trials are never lost.

    \b
    lazymerge search recipe.yaml --data eval.jsonl --space 'models[0].parameters.weight=0..1' --trials 12
    lazymerge search recipe.yaml --data eval.txt -s 'parameters.t[0]=0..1' -s 'parameters.t[1]=0..1' --out ./best
    lazymerge search recipe.yaml --data eval.txt -s 'parameters.t=0..1' --cluster local:2 --memory 2GiB
    lazymerge search recipe.yaml -s 'parameters.t=0..1' --objective task:my_task:acc --include-path ./tasks

    With --cluster, the completed trials' values are reproducible but a seeded sampler's proposals depend on the
    order trials finish in.
    """
    from .api import search
    from .evaluate.search import parse_space, read_space_file

    if objective == "perplexity" and data is None:
        raise click.UsageError("--data is required (or --objective task:NAME)")
    if objective != "perplexity" and data is not None:
        raise click.UsageError("--data is for the perplexity objective; a task objective reads the task's data")
    if objective == "perplexity":
        for flag, value in (("--include-path", include_path), ("--num-fewshot", num_fewshot), ("--limit", limit)):
            if value is not None:
                raise click.UsageError(f"{flag} needs --objective task:NAME")
    dims = [parse_space(s) for s in space]
    extra: dict[str, Any] = {}
    if space_file is not None:
        file_dims, extra = read_space_file(space_file)
        dims += file_dims
    bar = EvalBar(enabled=not quiet)
    label = objective.partition(":")[2].replace(":", " ") or objective

    def on_trial(t: Any) -> None:
        bar.close()
        if not quiet:
            vals = ", ".join(f"{k}={v:.4f}" for k, v in t.params.items())
            value = f"{t.score:.4f}" if t.score is not None else "-"
            click.echo(f"trial {t.number:>3}  {label} {value}  {vals}", err=True)

    try:
        report = search(recipe, data, dims, trials=trials or int(extra.get("trials", 20)), study=study,
                        sampler=sampler or str(extra.get("sampler", "tpe")),
                        seed=seed if "seed" not in extra else int(extra["seed"]), memory=memory, seq_len=seq_len,
                        max_tokens=max_tokens, batch=batch, device=device, best_file=best_file, out=out,
                        on_trial=on_trial, progress=bar, cluster=_cluster_opener(cluster), objective=objective,
                        include_path=include_path, num_fewshot=num_fewshot, limit=limit)
    finally:
        bar.close()
    click.echo(report.summary())


if __name__ == "__main__":  # pragma: no cover
    main()
