"""The model as transformers defines it, built on the meta device: structure without weights.

Evaluation never writes a forward pass of its own: it builds the architecture's own `*ForCausalLM` from
config.json under accelerate's `init_empty_weights` (parameters on the meta device, buffers such as rotary
frequencies real), then gives parameters real storage one decoder layer at a time and sends them back to meta
afterwards. Which tensors form a layer, which is the input embedding and which the output head is read from the
module tree, so architecture specifics (Gemma's embedding scale, GPT-2's position embeddings and Conv1D, tied
heads) stay transformers' business.
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
    layer_params: list[list[str]]      # per layer: full parameter names (= checkpoint tensor names)
    static_params: list[str]           # the rest of the stack (final norm, position embeddings): small, kept
    embed: nn.Module
    embed_name: str
    head_name: str                     # parameter name of the output head ("lm_head.weight")
    config: Any
    dtype: torch.dtype

    @property
    def num_layers(self) -> int:
        return len(self.layers)


def build_skeleton(config_dir: Path, dtype: torch.dtype) -> Skeleton:
    transformers = require_transformers()
    from accelerate import init_empty_weights

    try:
        config = transformers.AutoConfig.from_pretrained(str(config_dir), local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise CheckpointError(f"{config_dir}/config.json: transformers cannot read it: "
                              f"{str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__}"
                              ) from None
    try:
        with init_empty_weights():
            model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    except ValueError as exc:
        raise CheckpointError(f"{config_dir}/config.json: no causal-LM class in transformers for model_type "
                              f"'{getattr(config, 'model_type', '?')}': {str(exc).splitlines()[0]}") from None
    model.eval()
    base = model.base_model
    n_layers = config.get_text_config().num_hidden_layers
    module_names = {m: n for n, m in model.named_modules()}
    layers = None
    for child in base.children():
        if isinstance(child, nn.ModuleList) and len(child) == n_layers:
            layers = child
            break
    if layers is None:
        raise CheckpointError(f"{config_dir}: cannot find the {n_layers} decoder layers of "
                              f"{type(model).__name__}")
    prefix = module_names[layers]
    layer_params = [[f"{prefix}.{i}.{n}" for n, _ in layer.named_parameters()] for i, layer in enumerate(layers)]
    embed = base.get_input_embeddings()
    embed_name = module_names[embed] + ".weight"
    head = model.get_output_embeddings()
    head_name = module_names[head] + ".weight" if head is not None else embed_name
    in_layers = {n for names in layer_params for n in names}
    static = [n for n, _ in model.named_parameters()
              if n not in in_layers and n not in (embed_name, head_name)]
    return Skeleton(model, base, layers, layer_params, static, embed, embed_name, head_name, config, dtype)


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
