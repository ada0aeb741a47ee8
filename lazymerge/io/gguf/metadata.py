"""The GGUF metadata of a merge's output, key for key as llama.cpp's converter writes it: `general.*` (gguf's own
`Metadata`, from the output's config and model name), the architecture's hyperparameters (each family's
`set_gguf_parameters` in convert_hf_to_gguf.py), the file type, then the tokenizer (io.gguf.vocab). Keys are
added to a `gguf.GGUFWriter`, in the converter's order; the writer serializes them (io.gguf.layout).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

from lazymerge.errors import OutputError
from lazymerge.io.gguf.names import _hparam, _rope_parameters
from lazymerge.io.gguf.vocab import add_vocab

GGML_QUANT_VERSION = 2


def add_metadata(w: Any, arch: str, config: dict, model_dir: Path, name: str, file_type: int,
                 warnings: list[str]) -> None:
    """Every key after general.architecture, for a model whose config and tokenizer files are in `model_dir`
    (a directory named as the output, as the converter names a model after its directory). The tensor infos
    must already be added (general.size_label counts the parameters)."""
    import gguf

    total, shared, expert, count = w.get_total_parameter_count()
    meta = gguf.Metadata.load(None, model_dir, None, total)
    if meta.name is None:
        meta.name = name
    if meta.size_label is None and total > 0:
        meta.size_label = gguf.size_label(total, shared, expert, count)
    w.add_type(gguf.GGUFType.MODEL)
    meta.set_gguf_meta_model(w)
    try:
        _PARAMS.get(arch, _text)(w, arch, config, file_type)
    except (KeyError, TypeError, ValueError) as exc:
        raise OutputError(f"config.json: cannot write the {arch} GGUF hyperparameters ({type(exc).__name__}: "
                          f"{exc})") from None
    w.add_quantization_version(GGML_QUANT_VERSION)
    add_vocab(w, arch, model_dir, config, warnings)


def _need(config: dict, keys: Sequence[str]) -> Any:
    value = _hparam(config, keys)
    if value is None:
        raise KeyError(keys[0])
    return value


def _text(w: Any, arch: str, config: dict, file_type: int) -> None:
    """TextModel.set_gguf_parameters, and what llama / qwen2moe add to it."""
    import gguf

    w.add_block_count(_need(config, ("n_layers", "num_hidden_layers", "n_layer", "num_layers")))
    for keys, add in (
            (("max_position_embeddings", "n_ctx", "n_positions", "max_length", "max_sequence_length",
              "model_max_length"), w.add_context_length),
            (("hidden_size", "n_embd", "dim"), w.add_embedding_length),
            (("prefix_dense_intermediate_size", "dense_intermediate_size", "intermediate_size", "n_inner",
              "hidden_dim"), w.add_feed_forward_length),
            (("num_attention_heads", "n_head", "n_heads"), w.add_head_count),
            (("num_key_value_heads", "n_kv_heads"), w.add_head_count_kv)):
        if (value := _hparam(config, keys)) is not None:
            add(value)
    if config.get("is_causal") is False:
        w.add_causal_attention(False)
    rope_all = _rope_parameters(config)
    rope = rope_all.get("full_attention", rope_all)
    rope_type, factor = rope.get("rope_type"), rope.get("factor")
    if rope_type == "linear" and factor is not None:
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(factor)
    elif rope_type == "yarn" and factor is not None:
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(factor)
        w.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
        for key, add in (("extrapolation_factor", w.add_rope_scaling_yarn_ext_factor),
                         ("beta_fast", w.add_rope_scaling_yarn_beta_fast),
                         ("beta_slow", w.add_rope_scaling_yarn_beta_slow)):
            if rope.get(key) is not None:
                add(rope[key])
        if (attn := rope.get("attention_factor", rope.get("attn_factor"))) is not None:
            w.add_rope_scaling_yarn_attn_factor(attn)
    elif rope_type in ("su", "longrope"):
        w.add_rope_scaling_type(gguf.RopeScalingType.LONGROPE)
    if rope.get("rope_theta") is not None:
        w.add_rope_freq_base(rope["rope_theta"])
    if (local := rope_all.get("sliding_attention", {}).get("rope_theta")) is not None:
        w.add_rope_freq_base_swa(local)
    if (eps := _hparam(config, ("rms_norm_eps", "norm_eps"))) is not None:
        w.add_layer_norm_rms_eps(eps)
    if (eps := _hparam(config, ("layer_norm_eps", "layer_norm_epsilon", "norm_epsilon"))) is not None:
        w.add_layer_norm_eps(eps)
    if (n := _hparam(config, ("num_local_experts", "num_experts", "n_routed_experts"))) is not None:
        w.add_expert_count(n)
    if (n := _hparam(config, ("num_experts_per_tok", "num_experts_per_token", "top_k_experts"))) is not None:
        w.add_expert_used_count(n)
    if config.get("head_dim") is not None:
        w.add_key_length(config["head_dim"])
        w.add_value_length(config["head_dim"])
    w.add_file_type(file_type)
    if arch == "llama":
        w.add_vocab_size(config["vocab_size"])
        w.add_rope_dimension_count(config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"])
    if arch in ("qwen2moe", "qwen3moe"):
        if config.get("moe_intermediate_size") is not None:
            w.add_expert_feed_forward_length(config["moe_intermediate_size"])
        if config.get("shared_expert_intermediate_size") is not None:
            w.add_expert_shared_feed_forward_length(config["shared_expert_intermediate_size"])


def _gemma(w: Any, arch: str, config: dict, file_type: int) -> None:
    """GemmaModel / Gemma2Model.set_gguf_parameters."""
    w.add_context_length(config["max_position_embeddings"])
    w.add_embedding_length(config["hidden_size"])
    w.add_block_count(config["num_hidden_layers"])
    w.add_feed_forward_length(config["intermediate_size"])
    w.add_head_count(config["num_attention_heads"])
    w.add_head_count_kv(config.get("num_key_value_heads", config["num_attention_heads"]))
    w.add_layer_norm_rms_eps(config["rms_norm_eps"])
    w.add_key_length(config["head_dim"])
    w.add_value_length(config["head_dim"])
    w.add_file_type(file_type)
    if arch == "gemma2":
        w.add_attn_logit_softcapping(config["attn_logit_softcapping"])
        w.add_final_logit_softcapping(config["final_logit_softcapping"])
        w.add_sliding_window(config["sliding_window"])


def _gemma3(w: Any, arch: str, config: dict, file_type: int) -> None:
    """Gemma3Model.set_gguf_parameters: the text model's keys, some overridden (a key added twice keeps its
    first place and takes the second value, as in the converter's writer)."""
    _text(w, arch, config, file_type)
    rope = _rope_parameters(config)
    w.add_context_length(config.get("max_position_embeddings", 131072))
    w.add_head_count(config.get("num_attention_heads", 8))
    w.add_layer_norm_rms_eps(config.get("rms_norm_eps", 1e-6))
    w.add_key_length(config.get("head_dim", 256))
    w.add_value_length(config.get("head_dim", 256))
    w.add_rope_freq_base(rope.get("full_attention", rope).get("rope_theta", 1_000_000.0))
    if config.get("final_logit_softcapping"):
        w.add_final_logit_softcapping(config["final_logit_softcapping"])
    if config.get("sliding_window_pattern") != 1:
        w.add_sliding_window(config["sliding_window"])
    w.add_head_count_kv(config.get("num_key_value_heads", 4))


def _phi3(w: Any, arch: str, config: dict, file_type: int) -> None:
    """Phi3MiniModel.set_gguf_parameters (and the attention factor its extra tensors come with)."""
    rope = _rope_parameters(config)
    n_embd, n_head = config["hidden_size"], config["num_attention_heads"]
    rope_dims = int(rope.get("partial_rotary_factor", 1.0) * n_embd) // n_head
    if rope.get("long_factor"):
        scale = config["max_position_embeddings"] / rope["original_max_position_embeddings"]
        kind = str(rope.get("rope_type", "")).lower()
        if kind in ("su", "longrope"):
            attn = math.sqrt(1 + math.log(scale) / math.log(rope["original_max_position_embeddings"])) \
                if scale > 1.0 else 1.0
        elif kind == "yarn":
            attn = 0.1 * math.log(scale) + 1.0 if scale > 1.0 else 1.0
        else:
            raise ValueError(f"rope scaling type {kind!r}")
        w.add_rope_scaling_attn_factors(attn)
    w.add_context_length(config["max_position_embeddings"])
    w.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
    w.add_embedding_length(n_embd)
    w.add_feed_forward_length(config["intermediate_size"])
    w.add_block_count(config["num_hidden_layers"])
    w.add_head_count(n_head)
    w.add_head_count_kv(config["num_key_value_heads"])
    w.add_layer_norm_rms_eps(config["rms_norm_eps"])
    w.add_rope_dimension_count(rope_dims)
    w.add_rope_freq_base(rope.get("full_attention", rope)["rope_theta"])
    w.add_file_type(file_type)
    w.add_sliding_window(config.get("sliding_window") or 0)


def phi3_rope_factors(config: dict) -> tuple[list[float], list[float]] | None:
    """Phi-3's long-context rope factors (`rope_factors_long/short.weight`), when its config has them."""
    rope = _rope_parameters(config)
    long, short = rope.get("long_factor"), rope.get("short_factor")
    if not long:
        return None
    if short is None or len(long) != len(short):
        raise OutputError("config.json: rope_scaling long_factor and short_factor must have the same length")
    return [float(v) for v in long], [float(v) for v in short]


_PARAMS = {"gemma": _gemma, "gemma2": _gemma, "gemma3": _gemma3, "phi3": _phi3}
