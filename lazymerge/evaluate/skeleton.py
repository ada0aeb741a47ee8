"""The model as transformers defines it, built on the meta device: structure without weights.

Evaluation never writes a forward pass of its own: it builds the architecture's own `*ForCausalLM` from
config.json under accelerate's `init_empty_weights` (parameters on the meta device, buffers such as rotary
frequencies real), then gives parameters real storage one decoder layer at a time and sends them back to meta
afterwards. Which tensors form a layer, which is the input embedding and which the output head is read from the
module tree, so architecture specifics (Gemma's embedding scale, GPT-2's position embeddings and Conv1D, OPT's
projections, the head's bias and logit scaling) stay transformers' business.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import CheckpointError, LazyMergeError


def require_transformers() -> Any:
    try:
        import accelerate  # noqa: F401
        import transformers
    except ImportError:
        raise LazyMergeError("evaluation needs transformers and accelerate: pip install 'lazymerge[eval]'") from None
    transformers.logging.set_verbosity_error()
    return transformers


@dataclass
class Skeleton:
    model: nn.Module                   # the *ForCausalLM, parameters on meta until materialised
    base: nn.Module                    # its decoder stack (model.model, model.transformer)
    layers: nn.ModuleList
    layer_params: list[list[str]]      # per layer: full parameter names
    static_params: list[str]           # the rest of the stack (final norm, position embeddings): small, kept
    embed: nn.Module
    embed_name: str                    # parameter name of the input embedding ("model.embed_tokens.weight")
    embed_shape: tuple[int, ...]       # its shape as the config makes it ([vocab, width])
    head: nn.Module                    # the output head module (its weight is read in vocabulary row blocks)
    head_name: str                     # parameter name of the head's weight ("lm_head.weight")
    head_extra: list[str]              # the head's other parameters (a bias, one value per vocabulary row)
    config: Any
    dtype: torch.dtype

    @property
    def num_layers(self) -> int:
        return len(self.layers)


def _config(config_dir: Path) -> Any:
    transformers = require_transformers()
    try:
        config = transformers.AutoConfig.from_pretrained(str(config_dir), local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError, ImportError) as exc:
        raise CheckpointError(f"{config_dir}/config.json: transformers cannot read it: "
                              f"{str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__}"
                              ) from None
    # evaluation computes in float32 (flash kernels do not) on any machine: an attention implementation the
    # config asks for beyond eager/sdpa (flash_attention_2, as some fine-tunes ship it) gives way to transformers'
    # own default, the one `from_pretrained` would pick without it
    if getattr(config, "_attn_implementation", None) not in (None, "eager", "sdpa"):
        config._attn_implementation = None
    return config


def _decoder_layers(base: nn.Module, n_layers: int) -> nn.ModuleList | None:
    """The stack's decoder layers: the shallowest ModuleList of `num_hidden_layers` modules (model.layers,
    transformer.h, or OPT's model.decoder.layers)."""
    best = None
    for name, module in base.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == n_layers:
            depth = name.count(".")
            if best is None or depth < best[0]:
                best = (depth, module)
    return None if best is None else best[1]


def build_skeleton(config_dir: Path, dtype: torch.dtype) -> Skeleton:
    transformers = require_transformers()
    from accelerate import init_empty_weights

    config = _config(config_dir)
    try:
        with init_empty_weights():
            model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    except (ValueError, ImportError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{config_dir}/config.json: transformers cannot build a causal LM for model_type "
                              f"'{getattr(config, 'model_type', '?')}': {str(exc).strip().splitlines()[0]}") from None
    model.eval()
    base = model.base_model
    n_layers = config.get_text_config().num_hidden_layers
    module_names = {m: n for n, m in model.named_modules()}
    layers = _decoder_layers(base, n_layers)
    if layers is None:
        raise CheckpointError(f"{config_dir}: cannot find the {n_layers} decoder layers of "
                              f"{type(model).__name__}")
    prefix = module_names[layers]
    layer_params = [[f"{prefix}.{i}.{n}" for n, _ in layer.named_parameters()] for i, layer in enumerate(layers)]
    embed = base.get_input_embeddings()
    embed_name = module_names[embed] + ".weight"
    head = model.get_output_embeddings()
    if head is None or not isinstance(getattr(head, "weight", None), torch.Tensor):
        raise CheckpointError(f"{config_dir}: {type(model).__name__} has no output head that evaluation can read")
    head_name = module_names[head] + ".weight"
    head_extra = [f"{module_names[head]}.{n}" for n, _ in head.named_parameters() if n != "weight"]
    if any(not n.endswith(".bias") for n in head_extra):
        raise CheckpointError(f"{config_dir}: {type(model).__name__}'s output head has parameters besides a weight "
                              f"and a bias ({', '.join(head_extra)}); evaluation cannot stream it")
    in_layers = {n for names in layer_params for n in names}
    skip = in_layers | {embed_name, head_name, *head_extra}
    static = [n for n, _ in model.named_parameters() if n not in skip]
    return Skeleton(model, base, layers, layer_params, static, embed, embed_name, tuple(embed.weight.shape), head,
                    head_name, head_extra, config, dtype)


def materialize(model: nn.Module, values: dict[str, torch.Tensor], dtype: torch.dtype,
                device: torch.device) -> None:
    """Give parameters real storage, converted to `dtype`. `values` is emptied as it goes, so a stored
    (bfloat16) copy and its float32 conversion coexist for one tensor at a time, not for the whole layer."""
    from accelerate.utils import set_module_tensor_to_device

    while values:
        name, value = values.popitem()
        set_module_tensor_to_device(model, name, device, value=value.to(device=device, dtype=dtype))
        del value


def release(model: nn.Module, names: list[str]) -> None:
    """Send parameters back to the meta device: their storage is freed."""
    from accelerate.utils import set_module_tensor_to_device

    for name in names:
        set_module_tensor_to_device(model, name, "meta")


def set_rows(module: nn.Module, weight: torch.Tensor) -> None:
    """Give an embedding a weight with only some of its rows (evaluation remaps token ids to them)."""
    module.weight = nn.Parameter(weight, requires_grad=False)
