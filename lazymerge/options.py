"""The options of a merge that travel with it: from `lazymerge.merge` to the planner and the engine here, or to
every worker of a cluster, which compiles the same plan again from them.

One frozen value instead of a keyword list repeated at each hop, so that no hop can drop one: what a worker
compiles and runs is exactly what the client was asked for, and the worker's plan cache keys on all of it
(`lazymerge.cluster.worker`). Options that never leave the client (the output directory, --overwrite,
--resume, progress and cancel callbacks) are not here.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any


DEFAULT_SHARD_SIZE = "5GB"         # safetensors shards; a GGUF output is one file unless a size is given


@dataclass(frozen=True)
class RunOptions:
    """How a recipe is compiled (`memory` .. `stream_inputs`) and run (`device` .. `workers`)."""

    memory: int | str | None = None     # tensor budget (bytes, "2GiB", "unlimited"); None: a share of free RAM
    shard_size: int | str | None = None   # None: 5GB safetensors shards, or one GGUF file
    seed: int = 0
    allow_pickle: bool = False
    max_block_rows: int | None = None
    stage: str | None = None            # the output stage of a multi-stage recipe
    stream_inputs: bool = False         # hub inputs are read by range requests, not downloaded first
    device: str = "cpu"
    strict: bool = False                # NaN/Inf in an input fails instead of warning
    workers: int | None = None          # scheduler threads (per partition on a cluster)

    def compile_args(self) -> dict[str, Any]:
        """The keywords of `compile_plan`."""
        shard_size = DEFAULT_SHARD_SIZE if self.shard_size is None else self.shard_size
        return {"memory": self.memory, "shard_size": shard_size, "seed": self.seed,
                "allow_pickle": self.allow_pickle, "max_block_rows": self.max_block_rows, "stage": self.stage,
                "stream_inputs": self.stream_inputs}
