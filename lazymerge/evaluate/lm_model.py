"""A model held open for lm-eval's requests: token-level loglikelihoods and greedy generations on the
layer-streaming forward, within one memory budget. `lazymerge.lm_eval.LazyMergeLM` adds lm-eval's text rules.

The budget (`--memory`) covers the weights a layer needs (and, for a recipe, the merge's work: half of it), the
weights kept between passes, and the KV caches of generation:

- weights are kept in memory, converted once, while they fit the weights' share of the budget less one layer's
  working set (`reuse.ReusedWeights`): a model within its budget is read (or merged) once for every request
  type and decoding step; a larger budget is never slower;
- generation's KV caches get what the kept weights leave; beyond it they spill to disk (`kvcache.KVStore`), and
  a recipe's merged tensors that are not kept spill too, so a decoding step reads them instead of merging again.

Activations (hidden states of the sequences of a pass, one batch's work) come on top, and are reported.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

from ..engine.report import RssSampler
from ..moe.routers import prepare_routers
from .data import load_tokenizer
from .decode import DecodeOptions, greedy_decode
from .lm_requests import (DEFAULT_ACTIVATIONS, DEFAULT_BATCH_TOKENS, ScoreOptions, activation_bytes, prepare,
                          score_requests)
from .reuse import ReusedWeights
from .report import EvalProgress
from .stream import open_stream


@dataclass(frozen=True)
class ModelOptions:
    memory: Any = None                       # the budget: bytes, "2GiB", None (a share of free RAM), "unlimited"
    device: str = "cpu"
    seed: int = 0                            # a recipe's merge seed (DARE, DELLA)
    batch_size: int | None = None            # sequences per forward call (None: DEFAULT_BATCH_TOKENS tokens)
    activations: int = DEFAULT_ACTIVATIONS   # hidden states held at once; more sequences take several passes
    spill_dir: str | None = None             # spill files (default: the system's temporary directory)


class StreamingModel:
    """A checkpoint directory or a recipe (merged layer by layer, never written), opened once for many calls."""

    def __init__(self, target: Any, opts: ModelOptions = ModelOptions()):
        self.opts = opts
        # a MoE recipe's routers are computed as its merge computes them (the router pass streams the base model)
        self.stream = open_stream(target, memory=opts.memory, device=opts.device, seed=opts.seed,
                                  prepare=prepare_routers)
        try:
            self.tokenizer = load_tokenizer(self.stream.source.config_dir, self.stream.source.label)
            self.config = self.stream.sk.config
            self._reuse = ReusedWeights(self.stream.source, keep=self._keep_bytes(), spill_dir=opts.spill_dir)
            self.stream.source = self._reuse
        except BaseException:
            self.stream.close()
            raise
        self.stats: dict[str, Any] = {"budget": self.stream.budget, "peak_rss": 0, "start_rss": 0,
                                      "activation_bytes": 0, "kv_peak_bytes": 0, "kv_spilled_bytes": 0,
                                      "sequences": 0, "passes": 0, "wall_s": 0.0}

    # -- budget ------------------------------------------------------------------------------------------------
    def model_bytes(self) -> int:
        """Float32 bytes of every weight the forward uses (a tied head counted once)."""
        sk = self.stream.sk
        params = [p for names in sk.layer_params for p in names] + sk.static_params + [sk.embed_name]
        if self.stream.tensor_name(sk.head_name) != self.stream.tensor_name(sk.embed_name):
            params.append(sk.head_name)
        return self.stream.weight_bytes(params)

    def _largest_layer(self) -> int:
        return max(self.stream.weight_bytes(p) for p in self.stream.sk.layer_params)

    def _weight_budget(self) -> int | None:
        b = self.stream.budget
        return None if b is None else int(b * self.stream.source.weight_share)

    def _keep_bytes(self) -> int:
        w = self._weight_budget()
        total = self.model_bytes()
        if w is None or total <= w:
            return total
        return max(0, w - self._largest_layer())

    def kv_budget(self) -> int | None:
        w = self._weight_budget()
        if w is None:
            return None
        held = self._reuse.keep if self._reuse.keep >= self.model_bytes() else self._reuse.keep + self._largest_layer()
        return max(0, w - held)

    # -- requests ----------------------------------------------------------------------------------------------
    def _measure(self, fn: Callable[[], Any]) -> Any:
        with RssSampler() as rss:
            now = rss.sample()
            if not self.stats["start_rss"]:
                self.stats["start_rss"] = now
            try:
                result = fn()
            finally:
                self.stats["wall_s"] += rss.wall
        self.stats["peak_rss"] = max(self.stats["peak_rss"], rss.peak)
        return result

    def loglikelihood(self, requests: Sequence[tuple[Sequence[int], Sequence[int]]], max_length: int,
                      progress: Callable[[EvalProgress], None] | None = None) -> list[tuple[float, bool]]:
        """(log p(continuation | context), greedy) per (context tokens, continuation tokens) request."""
        if not requests:
            return []
        opts = ScoreOptions(max_length=max_length, batch_size=self.opts.batch_size,
                            activations=self.opts.activations)
        prep = prepare(requests, opts, self.config.get_text_config().hidden_size)
        self._reuse.spill = len(prep.passes) > 1        # later passes read a recipe's merge back, not merge again
        out = self._measure(lambda: score_requests(self.stream, prep, progress))
        batch = self.opts.batch_size * prep.longest if self.opts.batch_size else DEFAULT_BATCH_TOKENS
        acts = activation_bytes(self.config, prep.pass_tokens(), max(batch, prep.longest), prep.longest)
        self.stats["activation_bytes"] = max(self.stats["activation_bytes"], acts)
        self.stats["sequences"] += len(prep.seqs)
        self.stats["passes"] += len(prep.passes)
        return out

    def generate(self, prompts: Sequence[Sequence[int]], max_new: Sequence[int], eos: set[int],
                 stop: Callable[[int, list[int]], bool] | None = None,
                 progress: Callable[[EvalProgress], None] | None = None) -> list[list[int]]:
        """Greedy continuations (token ids) of the prompts, batched; see `decode.greedy_decode`."""
        opts = DecodeOptions(group_size=self.opts.batch_size, kv_budget=self.kv_budget(),
                             spill_dir=self.opts.spill_dir)
        self._reuse.spill = True                # every decoding step reads the weights again
        out, kv = self._measure(lambda: greedy_decode(self.stream, prompts, max_new, eos, stop, opts, progress))
        self.stats["kv_peak_bytes"] = max(self.stats["kv_peak_bytes"], kv.peak_bytes)
        self.stats["kv_spilled_bytes"] += kv.spilled_bytes
        if prompts:
            longest = max(len(p) for p in prompts)
            work = activation_bytes(self.config, 0, max(opts.group_tokens, longest), longest)
            self.stats["activation_bytes"] = max(self.stats["activation_bytes"], work)
        return out

    def report(self) -> dict[str, Any]:
        """What the calls so far cost: budget, peak RSS (and RSS at the start), activations, KV cache, spills."""
        return {**self.stats, "kept_weight_bytes": self._reuse.kept_bytes,
                "weights_spilled_bytes": self._reuse.spilled_bytes, "model_bytes": self.model_bytes(),
                "over_budget_units": self.stream.stats.layers_over_budget + self.stream.source.over_budget}

    def close(self) -> None:
        self.stream.close()
