"""Layer-streaming forward: a model's hidden states, layer by layer, with one decoder layer's weights in memory.

The model is transformers' own class, built as a meta-device skeleton (accelerate) from the checkpoint's
config.json; each decoder layer's parameters are read from the checkpoint (memory-mapped safetensors, or a
`base+adapter` source), used for every sequence, and dropped before the next layer is read. So a MoE router in
`hidden` mode, or an evaluation, runs a model larger than RAM allows at once, and computes exactly what the model's
own forward computes (the same modules, masks and rotary embeddings, as `LlamaModel.forward` does).

This is a minimal implementation of the contract shared with the evaluation work (issue 11):
`layer_inputs(target, input_ids, *, memory=None, device="cpu", dtype=torch.float32)`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import torch

from ..errors import CheckpointError


def _open(target: Any) -> tuple[Any, bool]:
    """(source, opened_here): a checkpoint directory is opened; an opened source (Checkpoint, base+adapter) is used."""
    if hasattr(target, "read") and hasattr(target, "tensors"):
        return target, False
    from ..io.adapters import open_model

    return open_model(target), True


def _skeleton(source: Any, dtype: torch.dtype) -> Any:
    """transformers' model class for the source's config, on the meta device (no memory for weights)."""
    try:
        from accelerate import init_empty_weights
        from transformers import AutoConfig, AutoModelForCausalLM
    except ImportError as exc:   # pragma: no cover - transformers is an optional dependency
        raise CheckpointError(f"layer streaming needs transformers ({exc}); pip install 'lazymerge[moe]'") from None
    if not source.config:
        raise CheckpointError(f"{source.path}: config.json is missing; cannot build the model to run it")
    cfg = dict(source.config)
    model_type = cfg.pop("model_type", None)
    try:
        config = AutoConfig.for_model(model_type, **cfg)
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{source.path}: config.json: model_type {model_type!r} is not a transformers "
                              f"model ({str(exc).splitlines()[0]})") from None
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def _materialise(module: torch.nn.Module, prefix: str, source: Any, device: Any, dtype: torch.dtype) -> None:
    from accelerate.utils import set_module_tensor_to_device

    for pname, _ in list(module.named_parameters()):
        full = f"{prefix}{pname}"
        if full not in source.tensors:
            raise CheckpointError(f"{source.path}: tensor '{full}' is missing")
        set_module_tensor_to_device(module, pname, device, value=source.read(full, dtype=dtype))


def layer_inputs(target: Any, input_ids: list[torch.Tensor], *, memory: Any = None, device: Any = "cpu",
                 dtype: torch.dtype = torch.float32) -> Iterator[tuple[int, list[torch.Tensor]]]:
    """For each decoder layer i: (i, the hidden states at that layer's input, one `[seq_len, hidden]` tensor per
    sequence, in `dtype`). `target` is a checkpoint directory (or an opened lazymerge source). Each sequence runs
    alone (no padding). Peak memory: one decoder layer's weights (plus the embedding while it is used) and the
    sequences' activations; `memory` is accepted for the shared contract and not needed beyond that."""
    batches = [(ids.reshape(1, -1), None) for ids in input_ids]
    for i, states in batched_layer_inputs(target, batches, device=device, dtype=dtype):
        yield i, [h[0] for h in states]


def batched_layer_inputs(target: Any, batches: list[tuple[torch.Tensor, torch.Tensor | None]], *,
                         device: Any = "cpu", dtype: torch.dtype = torch.float32
                         ) -> Iterator[tuple[int, list[torch.Tensor]]]:
    """`layer_inputs` for padded batches: each `(input_ids [B, L], attention_mask [B, L] or None)` runs as one
    batch, exactly as the model's forward runs it (positions 0..L-1, padding masked). Yields, per layer, one
    `[B, L, hidden]` tensor per batch. A batch computes what a caller that batches the same way (mergekit-moe's
    router pass) computes, bit for bit: a reduced-precision matmul's rounding depends on the batch shape."""
    source, opened = _open(target)
    try:
        model = _skeleton(source, dtype)
        inner = model.model
        with torch.no_grad():
            _materialise(inner.embed_tokens, "model.embed_tokens.", source, device, dtype)
            states = [inner.embed_tokens(ids.to(device)) for ids, _ in batches]
            inner.embed_tokens.to("meta")
            rotary = inner.rotary_emb.to(device)
            from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

            config = model.config
            layer_types = getattr(config, "layer_types", None)
            extras = []
            for h, (_, mask) in zip(states, batches):
                pos = torch.arange(h.shape[1], device=device).unsqueeze(0)
                kw = {"config": config, "inputs_embeds": h, "cache": None, "position_ids": pos,
                      "attention_mask": None if mask is None else mask.to(device)}
                masks = {"full_attention": create_causal_mask(**kw)}
                if "sliding_attention" in (layer_types or ()):
                    masks["sliding_attention"] = create_sliding_window_causal_mask(**kw)
                extras.append((pos, masks, rotary(h, pos)))
            for i, layer in enumerate(inner.layers[: config.num_hidden_layers]):
                yield i, list(states)
                if i == config.num_hidden_layers - 1:
                    break
                _materialise(layer, f"model.layers.{i}.", source, device, dtype)
                kind = layer_types[i] if layer_types else "full_attention"
                new = []
                for h, (pos, masks, pe) in zip(states, extras):
                    out = layer(h, attention_mask=masks[kind], position_embeddings=pe, position_ids=pos,
                                use_cache=False)
                    new.append(out[0] if isinstance(out, tuple) else out)
                states = new
                layer.to("meta")
    finally:
        if opened:
            source.close()
