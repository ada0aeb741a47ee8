"""The layer-streaming forward pass: every sequence through one decoder layer, then the next.

A whole-model forward holds every layer's weights; here the weights of one decoder layer are materialised, all
batches of sequences go through it, and its weights go back to the meta device before the next layer's are
read (or merged). What stays in memory between layers is the hidden states of all sequences (the activations),
never the model.

The code around the decoder layers (embeddings, position embeddings, rotary tables, attention masks, the final
norm) is the model's own: for each batch the stack's `forward` is called once with every decoder layer replaced
by a stand-in that records the arguments the model passes it, then returns its input. That yields the embedded
inputs and each layer's exact call arguments, whatever the architecture. After the last layer the same trick
(the last stand-in returning the real final hidden states) runs the model's own final norm.

`layer_inputs` is the public piece other features (MoE routing from hidden states) build on.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
from torch import nn

from ..engine.run import release_freed_memory, resolve_device
from ..errors import CheckpointError
from ..planner.plan import resolve_budget
from .head import HEAD_WORK_BYTES, OutputHead
from .loading import ParamMap
from .skeleton import Skeleton, build_skeleton, materialize, release, set_rows
from .weights import WeightSource, open_target

EMBED_BLOCK_BYTES = 64 << 20           # rows of the embedding read at a time when no budget is given


class _Stand(nn.Module):
    """Takes a decoder layer's place while the model's own code around the layers runs. It answers as the real
    layers do: the hidden states, or (older families: Bloom, Falcon, MPT) a tuple whose first item they are."""

    def __init__(self, index: int, calls: dict[int, tuple[tuple, dict]], replay: torch.Tensor | None = None,
                 as_tuple: bool = False):
        super().__init__()
        self.index, self.calls, self.replay, self.as_tuple = index, calls, replay, as_tuple

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        self.calls[self.index] = (hidden_states, args, kwargs)
        out = hidden_states if self.replay is None else self.replay
        return (out,) if self.as_tuple else out


@dataclass
class Batch:
    """One batch of sequences between layers: hidden states and what each layer is called with."""

    hidden: torch.Tensor                                       # [B, S, H]
    calls: list[tuple[tuple, dict]] = field(default_factory=list)   # per layer: (args, kwargs) after hidden


@dataclass
class StreamStats:
    layers_over_budget: int = 0
    largest_unit: int = 0              # bytes of the largest set of weights held at once


class LayerStream:
    """A target (checkpoint or recipe) ready to stream: its skeleton, weight source and parameter map."""

    def __init__(self, source: WeightSource, *, budget: int | None, device: torch.device,
                 dtype: torch.dtype = torch.float32):
        self.source, self.budget, self.device, self.dtype = source, budget, device, dtype
        self.sk: Skeleton = build_skeleton(source.config_dir, dtype)
        self.params = ParamMap(self.sk.model, source.shapes, source.label, head=self.sk.head_name,
                               embed=self.sk.embed_name)
        self.stats = StreamStats()
        self._static_loaded = False
        self._base_output: Any = None           # the class of what the decoder stack returns (finish)
        self._layer_tuple: bool | None = None    # whether the decoder layers return tuples (known once seen)

    # -- weights -----------------------------------------------------------------------------------------
    def tensor_name(self, param: str) -> str:
        """The source tensor that is `param` as stored (the embedding, the head: read in row blocks)."""
        return self.params.tensor_of(param)

    def weight_bytes(self, params: list[str]) -> int:
        """Bytes held while `params` are loaded: their values in the compute dtype, plus what a converter holds
        besides its output (MoE experts fused on loading)."""
        item = torch.tensor([], dtype=self.dtype).element_size()
        total = sum(math.prod(self.params.shapes[p]) for p in params) * item
        return total + self.params.transient_bytes(params) * item // 4

    def load(self, params: list[str]) -> dict[str, torch.Tensor]:
        """{parameter: value in the compute dtype}: each stored tensor converted as it is read, so its stored
        copy never sits whole beside the converted one (io converts through a small staging buffer)."""
        return self.params.load(params, lambda names: self.source.load(names, self.dtype))

    def materialize_params(self, params: list[str]) -> None:
        """Give `params` real storage on the device (`release` sends them back to meta)."""
        values = self.load(params)
        materialize(self.sk.model, values, self.dtype, self.device)

    def _account(self, nbytes: int) -> None:
        """A unit of weights held at once; over budget when larger than the share of the budget weights get
        (all of it for a checkpoint; half for a recipe, whose merge works in the other half)."""
        self.stats.largest_unit = max(self.stats.largest_unit, nbytes)
        if self.budget is not None and nbytes > self.budget * self.source.weight_share:
            self.stats.layers_over_budget += 1

    def row_block(self, name: str, extra_row_bytes: int = 0) -> int:
        """Rows of a [rows, cols] tensor to hold at once (plus `extra_row_bytes` of work per row) in the budget."""
        cols = math.prod(self.source.shapes[name][1:])
        per_row = cols * 4 + extra_row_bytes
        # a quarter of the budget, for a checkpoint and a recipe alike: the head's blocks fix the order in which
        # the log-sum-exp adds, so the same --memory must give the same blocks for a merge and its recipe (a
        # recipe's merge works in another quarter; the block's stored copy and temporaries fit in the rest)
        cap = self.budget if self.budget is not None else EMBED_BLOCK_BYTES * 4
        # and never more than EMBED_BLOCK_BYTES: larger blocks only make larger temporaries (a head block's logits
        # for every token) that no longer fit any cache; the default budget (60% of RAM) made the 4096-token
        # perplexity of a 270 MB model hold 3.9 GB of logits and run slower than under 512 MiB
        cap = min(cap, EMBED_BLOCK_BYTES * 4)
        return max(1, min(self.source.shapes[name][0], cap // 4 // max(1, per_row)))

    # -- stages ------------------------------------------------------------------------------------------
    def load_static(self) -> None:
        """The parameters outside the layers, the embedding and the head (final norm, position embeddings):
        small, loaded once and kept."""
        if not self._static_loaded:
            self.materialize_params(self.sk.static_params)
            self._static_loaded = True

    def _embedding_rows(self, ids: torch.Tensor) -> torch.Tensor:
        """The embedding rows of the given (sorted, unique) token ids, read block by block."""
        name = self.tensor_name(self.sk.embed_name)
        if hasattr(self.source, "rows"):                  # a source that reads rows by id (evaluate.reuse)
            return self.source.rows(name, ids, self.row_block(name)).to(self.dtype)
        rows = torch.empty((len(ids), *self.source.shapes[name][1:]), dtype=self.dtype)

        def take(start: int, block: torch.Tensor) -> None:
            sel = (ids >= start) & (ids < start + block.shape[0])
            if sel.any():
                rows[sel] = block[ids[sel] - start].to(self.dtype)

        self.source.for_row_blocks(name, self.row_block(name), take)
        return rows

    @contextmanager
    def _embedding(self, rows: torch.Tensor) -> Iterator[None]:
        """The input embedding holding only `rows` (the rows of the token ids in use, which the ids are remapped
        to; or a zero row where the stack runs only for the code around the layers). Its padding index is
        lifted meanwhile: the pad token's row (SmolLM2's 2, Phi-3's 32000) need not be among those held, and
        the index only matters for training."""
        emb = self.sk.embed
        pad, weight = getattr(emb, "padding_idx", None), emb.weight
        set_rows(emb, rows.to(device=self.device, dtype=self.dtype))
        if pad is not None:
            emb.padding_idx = None
        try:
            yield
        finally:
            emb.weight = weight                   # the skeleton's own (meta) parameter again
            if pad is not None:
                emb.padding_idx = pad

    def _run_stack(self, ids: torch.Tensor, stands: list[_Stand], mask: torch.Tensor | None = None,
                   call: dict[str, Any] | None = None) -> Any:
        original = list(self.sk.layers)
        try:
            for i, s in enumerate(stands):
                self.sk.layers[i] = s
            with torch.no_grad():
                extra: dict[str, Any] = {"use_cache": False}
                if mask is not None:
                    extra["attention_mask"] = mask.to(self.device)
                extra.update(call or {})
                return self.sk.base(input_ids=ids.to(self.device), **extra)
        finally:
            for i, layer in enumerate(original):
                self.sk.layers[i] = layer

    def embed(self, batches: list[torch.LongTensor],
              masks: list[torch.Tensor | None] | None = None,
              call_kwargs: list[dict[str, Any]] | None = None) -> list[Batch]:
        """Embedded inputs and each layer's call arguments, per batch ([B, S] token ids each; `masks`: each
        batch's attention mask for padded batches, given to the model's forward as a caller would; `call_kwargs`:
        more keyword arguments of the model's forward per batch, e.g. a KV cache and position ids when decoding)."""
        self.load_static()
        vocab = self.source.shapes[self.tensor_name(self.sk.embed_name)][0]
        all_ids = torch.unique(torch.cat([b.reshape(-1) for b in batches]))
        if len(all_ids) and (int(all_ids[0]) < 0 or int(all_ids[-1]) >= vocab):
            raise CheckpointError(f"{self.source.label}: token id {int(all_ids[-1])} is outside the embedding "
                                  f"({vocab} rows): the tokenizer does not match the model")
        rows = self._embedding_rows(all_ids)
        self._account(rows.numel() * rows.element_size())
        out = []
        with self._embedding(rows):
            del rows
            for k, ids in enumerate(batches):
                calls = self._calls(torch.searchsorted(all_ids, ids), None if masks is None else masks[k],
                                    None if call_kwargs is None else call_kwargs[k])
                out.append(Batch(calls[0][0], [(calls[i][1], calls[i][2]) for i in range(self.sk.num_layers)]))
        return out

    def _calls(self, ids: torch.Tensor, mask: torch.Tensor | None,
               call: dict[str, Any] | None = None) -> dict[int, tuple]:
        """Each layer's call (hidden states, args, kwargs) as the stack makes it. Until a real layer has run, how
        layers answer is learnt here: a stack that takes item [0] of what a layer returns hands the next layer
        states of another shape, and the pass is made again with stand-ins that answer with tuples."""
        n = self.sk.num_layers
        for as_tuple in ([self._layer_tuple] if self._layer_tuple is not None else [False, True]):
            calls: dict[int, tuple] = {}
            self._run_stack(ids, [_Stand(i, calls, as_tuple=as_tuple) for i in range(n)], mask, call)
            if n < 2 or calls[1][0].shape == calls[0][0].shape:
                if n >= 2:
                    self._layer_tuple = as_tuple
                return calls
        raise CheckpointError(f"{type(self.sk.model).__name__}: its layers do not hand on their hidden states "
                              "unchanged in shape; evaluation cannot stream them")

    def run_layer(self, i: int, batches: list[Batch], on_batch: Callable[[], None] | None = None) -> None:
        """Replace each batch's hidden states by layer i's output, holding only layer i's weights."""
        params = self.sk.layer_params[i]
        self._account(self.weight_bytes(params))
        self.materialize_params(params)
        layer = self.sk.layers[i]
        try:
            with torch.no_grad():
                for b in batches:
                    args, kwargs = b.calls[i]
                    y = layer(b.hidden, *args, **kwargs)
                    self._layer_tuple = isinstance(y, tuple)
                    b.hidden = y[0] if isinstance(y, tuple) else y
                    if on_batch is not None:
                        on_batch()
        finally:
            release(self.sk.model, params)

    def finish(self, batches: list[Batch]) -> list[torch.Tensor]:
        """The model's own code after the last layer (final norm, OPT's projection out) applied to each batch's
        hidden states: what the output head reads."""
        n = self.sk.num_layers
        out = []
        with self._embedding(torch.zeros((1, *self.sk.embed_shape[1:]))):
            for b in batches:
                calls: dict[int, tuple] = {}
                stands = [_Stand(i, calls, b.hidden if i == n - 1 else None, bool(self._layer_tuple))
                          for i in range(n)]
                ids = torch.zeros(b.hidden.shape[:2], dtype=torch.long)
                res = self._run_stack(ids, stands)
                self._base_output = type(res)
                out.append(res.last_hidden_state if hasattr(res, "last_hidden_state") else res[0])
                b.hidden = None
        return out

    def head_blocks(self, hidden: torch.Tensor, fn: Callable[[int, torch.Tensor], None],
                    extra_row_bytes: int = 0) -> None:
        """`fn(start, logits)` for consecutive blocks of vocabulary rows: the logits [N, rows] of `hidden`
        ([N, H], final hidden states from `finish`) as the model's own forward makes them from its head's rows
        (the head's bias, Cohere's logit_scale, Granite's logits_scaling, Gemma 2's soft-capping), never all
        vocabulary rows at once. `extra_row_bytes`: the caller's work per row of a block, for its size."""
        name = self.tensor_name(self.sk.head_name)
        extra = self.load(self.sk.head_extra)      # a bias: one value per vocabulary row, small
        head = OutputHead(self.sk, hidden.to(self.device), extra, self._base_output)
        per_row = hidden.shape[0] * HEAD_WORK_BYTES + extra_row_bytes
        with head:
            self.source.for_row_blocks(name, self.row_block(name, per_row),
                                       lambda start, rows: fn(start, head.logits(start, rows)))

    def close(self) -> None:
        self.source.close()


def open_stream(target: Any, *, memory: Any = None, device: "str | torch.device" = "cpu",
                dtype: torch.dtype = torch.float32, seed: int = 0, workers: int = 2,
                prepare: Callable[[Any], None] | None = None, stream_inputs: bool = False) -> LayerStream:
    """`target` (checkpoint directory, hub id or recipe) ready to stream. `prepare(plan)` runs on a recipe's compiled
    plan before anything is read: the evaluation entry points pass the merge's own `moe.routers.prepare_routers`, so a
    MoE recipe's routers are computed as a merge computes them (this module cannot import it: the router pass
    streams the base model through here). `stream_inputs` reads hub inputs by range requests, storing none."""
    release_freed_memory()                  # freed weights go back to the OS: RSS follows what is live
    budget = resolve_budget(memory)
    dev = resolve_device(device)
    source = open_target(target, memory=budget, seed=seed, device=dev, workers=workers, prepare=prepare,
                         stream=stream_inputs)
    try:
        return LayerStream(source, budget=budget, device=dev, dtype=dtype)
    except BaseException:
        source.close()
        raise


def layer_inputs(target: Any, input_ids: list[torch.LongTensor], *, memory: Any = None,
                 device: "str | torch.device" = "cpu",
                 dtype: torch.dtype = torch.float32) -> Iterator[tuple[int, list[torch.Tensor]]]:
    """For each decoder layer i in order, the hidden states at that layer's input: one `[seq_len, hidden]` tensor
    per input sequence (1-D token id tensors, any lengths), in `dtype`.

    Computed layer by layer with one layer's weights in memory (`memory`: the budget, as for merges). `target`
    is a checkpoint directory or a recipe (merged on the fly, never written). The tensors yielded for layer i are
    not modified afterwards; drop them to free them.
    """
    stream = open_stream(target, memory=memory, device=device, dtype=dtype)
    try:
        batches = stream.embed([ids.reshape(1, -1).long() for ids in input_ids])
        for i in range(stream.sk.num_layers):
            yield i, [b.hidden[0] for b in batches]
            stream.run_layer(i, batches)
    finally:
        stream.close()
