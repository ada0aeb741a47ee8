"""`lazymerge-yaml`: mergekit-yaml's command line on lazymerge, so that a pasted

    mergekit-yaml config.yml ./out --cuda --copy-tokenizer --out-shard-size 1B --lazy-unpickle --allow-crimes

works with only the program name changed. Every flag of mergekit 0.1.5's `mergekit-yaml` is accepted with its
meaning, or refused with a one-line hint where lazymerge has no such thing; the merge itself is `lazymerge run`'s
(same checks, same output, a model card by default as mergekit writes one). `--help` says what each flag does here.
"""
from __future__ import annotations

import re
from pathlib import Path

import click

from .cli import SIZE_HELP, _friendly, run_cmd
from .errors import LazyMergeError

_KMB = re.compile(r"^\s*(\d+)\s*([kKmMbB]?)\s*$")
_KMB_FACTOR = {"": 1, "k": 10**3, "m": 10**6, "b": 10**9}


class UnsupportedFlag(LazyMergeError):
    """A mergekit-yaml flag lazymerge has no equivalent for (the message says what to do instead)."""


def shard_bytes(value: str) -> str | int:
    """mergekit's `--out-shard-size`: K, M, B are thousands, millions, billions (`parse_kmb`), and its writer counts
    them in bytes (numel x element size), so `1B` is 10^9 bytes. Other sizes (`2GiB`) are lazymerge's own."""
    m = _KMB.match(value)
    if m:
        return int(m.group(1)) * _KMB_FACTOR[m.group(2).lower()]
    return value


REFUSED = {
    "multi_gpu": "--multi-gpu: lazymerge runs kernels on one device (--device cuda:N); to spread a merge over "
                 "several GPUs or machines use `lazymerge run --cluster` (docs/cluster.md)",
    "unsafe_truncate_embeddings": "--unsafe-truncate-embeddings: set `tokenizer_source: base` in the recipe, which "
                                  "aligns the vocabularies token by token instead of cutting rows",
    "transformers_cache": "--transformers-cache: set HF_HUB_CACHE (or HF_HOME) in the environment instead",
    "lora_merge_dtype": "--lora-merge-dtype: adapters are applied in float32 inside the merge; set the output "
                        "`dtype:` in the recipe",
}


def _opt(decl: str, help: str, **kw: object):   # noqa: A002 - click's name
    return click.option(decl, help=help, **kw)


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.argument("config_file", type=click.Path(dir_okay=False, path_type=Path))
@click.argument("out_path", type=click.Path(path_type=Path))
@_opt("--cuda/--no-cuda", "Run the kernels on the GPU (--device cuda).", default=False)
@_opt("--device", "Where kernels run: cpu, cuda, cuda:1 ... (overrides --cuda).", default=None)
@_opt("--gpu-rich", "As --cuda (lazymerge uses one device).", is_flag=True)
@_opt("--low-cpu-memory/--no-low-cpu-memory", "Accepted: host memory is bounded by --memory anyway.", default=False)
@_opt("--read-to-gpu/--no-read-to-gpu", "Accepted: with --cuda, blocks are read then moved to the GPU.",
      default=False)
@_opt("--multi-gpu/--no-multi-gpu", "Refused: one device per merge; see `lazymerge run --cluster`.", default=False)
@_opt("--lazy-unpickle/--no-lazy-unpickle", "Accepted: inputs are always read lazily (safetensors memory-mapped); "
      "PyTorch .bin inputs also need --allow-pickle.", default=False)
@_opt("--allow-crimes/--no-allow-crimes", "Accepted: lazymerge checks tensor names and shapes, not architecture "
      "names, so architectures whose tensors line up can always be mixed.", default=False)
@_opt("--unsafe-truncate-embeddings/--no-unsafe-truncate-embeddings", "Refused: use tokenizer_source in the recipe.",
      default=False)
@_opt("--trust-remote-code/--no-trust-remote-code", "Accepted: a merge runs no model code.", default=False)
@_opt("--transformers-cache", "Refused: set HF_HUB_CACHE instead.", default=None)
@_opt("--lora-merge-cache", "Accepted: adapters are applied per tensor inside the merge, nothing is cached.",
      default=None)
@_opt("--lora-merge-dtype", "Refused: set the recipe's dtype.", default=None)
@_opt("--random-seed", "Seed for random methods (DARE, DELLA, MoE routers).", type=int, default=None)
@click.option("-v", "verbose", count=True, help="Accepted (the report is always printed).")
@_opt("--quiet/--no-quiet", "No progress bar; print only the report.", default=False)
@click.option("-j", "--num-threads", "num_threads", type=click.IntRange(min=1), default=None,
              help="Tasks run at once (lazymerge's --workers; kernel threads share the cores among them).")
@_opt("--async-write/--no-async-write", "Accepted: shards are always written while the next tensors compute.",
      default=False)
@_opt("--write-threads", "Accepted (see --async-write).", type=int, default=1)
@_opt("--out-shard-size", "Largest output shard: 5B, 500M (mergekit's K/M/B, counted in bytes as its writer does) "
      "or a size such as 2GiB.", default="5B", show_default=True, metavar="SIZE")
@_opt("--copy-tokenizer/--no-copy-tokenizer", "Copy the base (else first) model's tokenizer to the output.",
      default=True, show_default=True)
@_opt("--clone-tensors/--no-clone-tensors", "Accepted: every output tensor is written from its own buffer.",
      default=False)
@_opt("--write-model-card/--no-write-model-card", "Write README.md with Hugging Face front matter and the recipe.",
      default=True, show_default=True)
@_opt("--safe-serialization/--no-safe-serialization", "Output in safetensors (the only format lazymerge writes).",
      default=True, show_default=True)
@_opt("--memory", f"lazymerge: budget for tensors held at once ({SIZE_HELP}). Default: 60% of available RAM.",
      default=None, metavar="SIZE")
@_opt("--allow-pickle", "lazymerge: also read PyTorch .bin checkpoints (torch.load with weights_only=True).",
      is_flag=True)
@_opt("--overwrite", "lazymerge: replace OUT_PATH if it exists (only once the new one is complete).", is_flag=True)
@click.pass_context
def main(ctx: click.Context, config_file: Path, out_path: Path, cuda: bool, device: str | None, gpu_rich: bool,
         multi_gpu: bool, unsafe_truncate_embeddings: bool, transformers_cache: str | None,
         lora_merge_dtype: str | None, random_seed: int | None, quiet: bool, num_threads: int | None,
         out_shard_size: str, copy_tokenizer: bool, write_model_card: bool, safe_serialization: bool,
         memory: str | None, allow_pickle: bool, overwrite: bool, **accepted: object) -> None:
    """Merge the models in CONFIG_FILE (a mergekit YAML config) into OUT_PATH, as mergekit-yaml does, within
    --memory.

    Takes mergekit-yaml's flags: each is honoured, accepted where lazymerge already behaves so, or refused with a
    hint (below). The output is a Hugging Face checkpoint with a model card (README.md); OUT_PATH appears only
    when the merge is complete. lazymerge's own options: `lazymerge run --help`.
    """
    _check(multi_gpu=multi_gpu, unsafe_truncate_embeddings=unsafe_truncate_embeddings,
           transformers_cache=transformers_cache, lora_merge_dtype=lora_merge_dtype,
           safe_serialization=safe_serialization)
    ctx.invoke(run_cmd, recipe=config_file, out=out_path, memory=memory, shard_size=shard_bytes(out_shard_size),
               allow_pickle=allow_pickle, seed=random_seed or 0,
               device=device or ("cuda" if cuda or gpu_rich else "cpu"), overwrite=overwrite, workers=num_threads,
               quiet=quiet, write_model_card=write_model_card, copy_tokenizer=copy_tokenizer)


@_friendly
def _check(*, multi_gpu: bool, unsafe_truncate_embeddings: bool, transformers_cache: str | None,
           lora_merge_dtype: str | None, safe_serialization: bool) -> None:
    """Refuse the flags lazymerge has no meaning for, one line each (the first one given)."""
    given = dict(multi_gpu=multi_gpu, unsafe_truncate_embeddings=unsafe_truncate_embeddings,
                 transformers_cache=transformers_cache is not None, lora_merge_dtype=lora_merge_dtype is not None)
    for name, on in given.items():
        if on:
            raise UnsupportedFlag(REFUSED[name])
    if not safe_serialization:
        raise UnsupportedFlag("--no-safe-serialization: lazymerge writes safetensors only (loadable everywhere "
                              "PyTorch .bin files are)")


if __name__ == "__main__":  # pragma: no cover
    main(prog_name="lazymerge-yaml")
