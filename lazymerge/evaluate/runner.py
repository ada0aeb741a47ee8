"""`evaluate`: perplexity of a checkpoint or a recipe, out of core, inside the memory budget.

Order of work: tokenize the data into windows; embed every window (the embedding rows the data uses, read block
by block); push all windows through decoder layer 0, then layer 1, ... holding one layer's weights; apply the
final norm; fold the head's row blocks into a streaming log-sum-exp. Peak memory is the budget (weights, merge
work, head blocks) plus the activations (`activation_bytes`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch

from ..engine.report import RssSampler
from ..errors import RecipeError
from ..io.models import pin_refs
from ..moe.routers import prepare_routers
from ..planner.compile import compile_plan
from .data import DataError, load_tokenizer, load_windows
from .head import StreamingNLL
from .report import EvalProgress, EvalReport, bootstrap_ppl, perplexity
from .stream import LayerStream, open_stream
from .weights import is_recipe

DEFAULT_SEQ_LEN = 512
DEFAULT_MAX_TOKENS = 4096
DEFAULT_BATCH = 4


def activation_bytes(config: Any, windows: int, seq_len: int, batch: int, itemsize: int = 4) -> int:
    """Memory for activations besides the budget: the hidden states of every window (and a batch's new output
    while the old is still referenced), plus one batch's work inside a layer (MLP 3*I, attention q/k/v/o 4*H and
    scores heads*S per token) and the final hidden states the head reads."""
    c = config.get_text_config()
    h = c.hidden_size
    inter = getattr(c, "intermediate_size", None) or getattr(c, "n_inner", None) or 4 * h
    heads = getattr(c, "num_attention_heads", None) or 1       # attention-free stacks (Mamba): no scores
    tokens = windows * seq_len
    b = min(batch, windows)
    return itemsize * (2 * tokens * h + b * seq_len * (h + 3 * inter + 4 * h + heads * seq_len))


def score_windows(stream: LayerStream, windows: torch.Tensor, *, batch: int = DEFAULT_BATCH,
                  progress: Callable[[EvalProgress], None] | None = None) -> torch.Tensor:
    """Per-window NLL (float64, summed over the window's seq_len - 1 predicted tokens)."""
    batches_ids = list(torch.split(windows, max(1, batch)))
    n_layers = stream.sk.num_layers
    total = n_layers * len(batches_ids) + 1
    done = [0]

    def tick(stage: str) -> None:
        done[0] += 1
        if progress is not None:
            progress(EvalProgress(done[0], total, stage))

    batches = stream.embed(batches_ids)
    for i in range(n_layers):
        stream.run_layer(i, batches, on_batch=lambda i=i: tick(f"layer {i + 1}/{n_layers}"))
    final = stream.finish(batches)
    hidden = torch.cat([f[:, :-1].reshape(-1, f.shape[-1]) for f in final])
    del final
    targets = windows[:, 1:].reshape(-1).to(hidden.device)
    loss = StreamingNLL(targets)
    stream.head_blocks(hidden, loss)
    tick("head")
    return loss.nll().reshape(windows.shape[0], -1).sum(dim=1).cpu()


def stream_windows(stream: LayerStream, data: "str | Path", *, seq_len: int | None, max_tokens: int,
                   windows: torch.Tensor | None = None) -> torch.Tensor:
    """The windows `stream`'s model is scored on: `data` tokenized with its tokenizer, in windows of `seq_len`
    (default min(512, its positions)); `windows` given are checked against its positions and kept."""
    limit = getattr(stream.sk.config.get_text_config(), "max_position_embeddings", None)
    if windows is not None:
        seq_len = windows.shape[1]
    elif seq_len is None:
        seq_len = min(DEFAULT_SEQ_LEN, limit) if limit else DEFAULT_SEQ_LEN
    if limit and seq_len > limit:
        raise DataError(f"seq-len: {seq_len} is longer than the model's {limit} positions")
    if windows is None:
        tok = load_tokenizer(stream.source.config_dir, stream.source.label)
        windows = load_windows(data, tok, seq_len=seq_len, max_tokens=max_tokens)
    return windows


def evaluation_windows(target: Any, data: "str | Path", *, memory: int | str | None = None,
                       seq_len: int | None = None, max_tokens: int = DEFAULT_MAX_TOKENS,
                       device: "str | torch.device" = "cpu", seed: int = 0) -> torch.Tensor:
    """The windows `evaluate(target, data, ...)` scores, without scoring them: what a search computes once and
    evaluates every candidate on (a candidate differs in numbers only, never in tokenizer or positions)."""
    stream = open_stream(target, memory=memory, device=device, seed=seed)
    try:
        return stream_windows(stream, data, seq_len=seq_len, max_tokens=max_tokens)
    finally:
        stream.close()


def evaluate(target: Any, data: "str | Path", *, memory: int | str | None = None, seq_len: int | None = None,
             max_tokens: int = DEFAULT_MAX_TOKENS, batch: int = DEFAULT_BATCH, device: "str | torch.device" = "cpu",
             seed: int = 0, progress: Callable[[EvalProgress], None] | None = None,
             windows: torch.Tensor | None = None, stream_inputs: bool = False) -> EvalReport:
    """Perplexity of `target` (a checkpoint directory, or a recipe merged on the fly and never written) on
    `data` (text file, .jsonl with `text`, or a saved `datasets` directory), out of core within `memory`.

    `windows` ([W, seq_len] token ids) skips tokenization (search evaluates many candidates on the same data).
    """
    return _evaluate(target, data, memory=memory, seq_len=seq_len, max_tokens=max_tokens, batch=batch,
                     device=device, seed=seed, progress=progress, windows=windows, stream_inputs=stream_inputs)[0]


def _evaluate(target: Any, data: "str | Path", *, memory: int | str | None, seq_len: int | None, max_tokens: int,
              batch: int, device: "str | torch.device", seed: int,
              progress: Callable[[EvalProgress], None] | None,
              windows: torch.Tensor | None = None, stream_inputs: bool = False) -> tuple[EvalReport, torch.Tensor]:
    with RssSampler() as rss:
        stream = open_stream(target, memory=memory, device=device, seed=seed, stream_inputs=stream_inputs,
                             prepare=lambda plan: prepare_routers(plan, progress=progress))
        # after the libraries and the (weightless) skeleton: what the budget and the activations come on top of
        start_rss = rss.peak = rss.proc.memory_info().rss
        try:
            windows = stream_windows(stream, data, seq_len=seq_len, max_tokens=max_tokens, windows=windows)
            seq_len = windows.shape[1]
            window_nll = score_windows(stream, windows, batch=batch, progress=progress)
        finally:
            stream.close()
    predicted = seq_len - 1
    total = float(window_nll.sum())
    n_tokens = windows.shape[0] * predicted
    lo, hi = bootstrap_ppl(window_nll, predicted)
    return EvalReport(
        target=str(target) if isinstance(target, (str, Path)) else "recipe",
        perplexity=perplexity(total / n_tokens), nll=total / n_tokens, tokens=n_tokens, windows=windows.shape[0],
        seq_len=seq_len, ppl_low=lo, ppl_high=hi, total_nll=total, wall_s=rss.wall, peak_rss=rss.peak,
        start_rss=start_rss, budget=stream.budget,
        activation_bytes=activation_bytes(stream.sk.config, windows.shape[0], seq_len, batch),
        largest_unit=stream.stats.largest_unit,
        over_budget_units=stream.stats.layers_over_budget + stream.source.over_budget, device=str(stream.device),
        window_nll=window_nll.tolist()), windows


def compare_inputs(recipe: Any, data: "str | Path", *, memory: int | str | None = None, seq_len: int | None = None,
                   max_tokens: int = DEFAULT_MAX_TOKENS, batch: int = DEFAULT_BATCH,
                   device: "str | torch.device" = "cpu", seed: int = 0,
                   progress: Callable[[EvalProgress], None] | None = None,
                   stream_inputs: bool = False) -> list[EvalReport]:
    """The merge of `recipe` and each of its input models on the same data: one report each, inputs first, the
    merge last. Each model reads the data through its own tokenizer (with the merge's seq_len): an input whose
    vocabulary the merge aligned to other token ids (`tokenizer_source`) is scored on its own ids, never on the
    merge's. Inputs that share the merge's tokenizer get the very same windows. Hub inputs are reopened at the
    commit the merge reads."""
    inputs = [t for _, t in input_targets(recipe)]
    merged = evaluate(recipe, data, memory=memory, seq_len=seq_len, max_tokens=max_tokens, batch=batch,
                      device=device, seed=seed, progress=progress, stream_inputs=stream_inputs)
    reports = [evaluate(t, data, memory=memory, seq_len=merged.seq_len, max_tokens=max_tokens, batch=batch,
                        device=device, seed=seed, progress=progress, stream_inputs=stream_inputs) for t in inputs]
    return reports + [merged]


def input_targets(recipe: Any) -> list[tuple[str, Any]]:
    """(label, evaluation target) of each input model of `recipe`: its checkpoint directory, its hub id pinned to
    the commit the merge reads, or for a base+adapter input a passthrough recipe of it (merged on the fly)."""
    if not is_recipe(recipe):
        raise RecipeError(f"{recipe}: --compare-inputs needs a recipe, not a checkpoint directory")
    p = compile_plan(recipe, memory="unlimited")
    try:
        inputs = []
        for key, src in p.sources.items():
            # the reference that reopens exactly this input: hub ids pinned to the commit the merge reads
            ref = pin_refs(key, p.pins)
            adapter = getattr(src, "adapter", None)
            inputs.append((key, {"merge_method": "passthrough", "models": [{"model": ref}]} if adapter is not None
                           else (Path(src.path) if getattr(src, "hub", None) is None else ref)))
    finally:
        p.close()
    return inputs
