"""A merge's output as llama.cpp's converter lays it out: which GGUF tensor each output tensor becomes, its type,
and what is done to its rows (convert_hf_to_gguf.py, the `gguf` package's tensor name map).

Names go through `gguf.get_tensor_name_map`, as the converter's do; a MoE's experts (one Hugging Face tensor per
expert) are rows of one stacked GGUF tensor per layer and projection (`ffn_gate_exps`...). Types follow the
converter's rules for f32/f16/bf16/q8_0 (1-d tensors, norms and routers in F32; a row that is not whole blocks
falls back to F16) and llama-quantize's for q4_0/q4_1/q5_0/q5_1, except that the output head it would store as
Q6_K (which `gguf` cannot quantize) is stored as Q8_0.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Sequence

from lazymerge.dtypes import BLOCK_CODES
from lazymerge.errors import OutputError
from lazymerge.io.gguf.rows import RowTransform

GGUF_TYPES = ("auto", "f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1")
# --gguf-type -> (type of the weight matrices, llama.cpp's general.file_type: LlamaFileType)
_TYPE = {"f32": ("F32", 0), "f16": ("F16", 1), "bf16": ("BF16", 32), "q8_0": ("Q8_0", 7), "q4_0": ("Q4_0", 2),
         "q4_1": ("Q4_1", 3), "q5_0": ("Q5_0", 8), "q5_1": ("Q5_1", 9)}
_GGML_TYPE = {"F32": 0, "F16": 1, "BF16": 30, "Q4_0": 2, "Q4_1": 3, "Q5_0": 6, "Q5_1": 7, "Q8_0": 8}


@dataclass(frozen=True)
class GGUFArch:
    """A Hugging Face architecture as llama.cpp's converter writes it."""

    hf: str
    gguf: str                   # llama.cpp architecture (gguf.MODEL_ARCH_NAMES)
    permute_qk: bool = False    # LlamaModel.undo_permute: q/k rows in llama.cpp's rotary order
    norm_offset: float = 0.0    # Gemma: norm weights stored plus one
    experts: str | None = None  # the per-expert tensor names it stacks
    stack_order: tuple[str, ...] = ()   # the order it writes a layer's stacked projections in


_MIXTRAL = r"model\.layers\.(?P<bid>\d+)\.block_sparse_moe\.experts\.(?P<xid>\d+)\.(?P<w>w[123])\.weight"
_QWEN_MOE = r"model\.layers\.(?P<bid>\d+)\.mlp\.experts\.(?P<xid>\d+)\.(?P<w>gate_proj|up_proj|down_proj)\.weight"
ARCHS = {a.hf: a for a in (
    GGUFArch("LlamaForCausalLM", "llama", permute_qk=True),
    GGUFArch("MistralForCausalLM", "llama", permute_qk=True),
    GGUFArch("MixtralForCausalLM", "llama", permute_qk=True, experts=_MIXTRAL, stack_order=("w1", "w2", "w3")),
    GGUFArch("Qwen2ForCausalLM", "qwen2"),
    GGUFArch("Qwen2MoeForCausalLM", "qwen2moe", experts=_QWEN_MOE, stack_order=("down_proj", "gate_proj", "up_proj")),
    GGUFArch("Qwen3ForCausalLM", "qwen3"),
    GGUFArch("Qwen3MoeForCausalLM", "qwen3moe", experts=_QWEN_MOE, stack_order=("down_proj", "gate_proj", "up_proj")),
    GGUFArch("GemmaForCausalLM", "gemma", norm_offset=1.0),
    GGUFArch("Gemma2ForCausalLM", "gemma2", norm_offset=1.0),
    GGUFArch("Gemma3ForCausalLM", "gemma3", norm_offset=1.0),
    GGUFArch("Phi3ForCausalLM", "phi3"),
)}
_BY_MODEL_TYPE = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "mixtral": "MixtralForCausalLM",
                  "qwen2": "Qwen2ForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM", "qwen3": "Qwen3ForCausalLM",
                  "qwen3_moe": "Qwen3MoeForCausalLM", "gemma": "GemmaForCausalLM", "gemma2": "Gemma2ForCausalLM",
                  "gemma3_text": "Gemma3ForCausalLM", "phi3": "Phi3ForCausalLM"}
# tensors the converter keeps in F32 whatever the type (prepare_tensors)
_F32_TENSORS = re.compile(r"(^|\.)(ffn_gate_inp|ffn_gate_inp_shexp|position_embd|token_types)\.weight$")


@dataclass(frozen=True)
class GGUFPiece:
    """One output tensor (Hugging Face name) in the GGUF: the tensor it becomes, its type, what is done to its
    rows, and, for a MoE expert, its place in the stacked tensor (`expert` of `experts`)."""

    name: str
    shape: tuple[int, ...]
    gguf: str
    code: str                     # F32, F16, BF16 or a block type (lazymerge.dtypes.BLOCK_CODES)
    transform: RowTransform
    expert: int = 0
    experts: int = 1

    @property
    def gguf_shape(self) -> tuple[int, ...]:
        """Its GGUF tensor's shape (torch order): the stack of every expert's."""
        return (self.experts, *self.shape) if self.experts > 1 else self.shape

    @property
    def head_rows(self) -> int:
        """Rows a block must hold whole for `transform` (a permuted tensor's head), 1 otherwise."""
        return self.transform.head_rows(self.shape[0]) if len(self.shape) >= 2 and self.transform.permute else 1


def _gguf() -> Any:
    try:
        import gguf
    except ImportError:
        raise OutputError("writing GGUF needs the gguf package: pip install 'lazymerge[gguf]'") from None
    return gguf


def arch_of(config: dict | None, where: str) -> GGUFArch:
    """The output's architecture, or a one-line error: an architecture the GGUF writer cannot map."""
    if not config:
        raise OutputError(f"{where}: the merged model has no config.json; GGUF output needs its architecture")
    names = config.get("architectures") or []
    hf = names[0] if names else _BY_MODEL_TYPE.get(str(config.get("model_type")))
    if hf not in ARCHS:
        raise OutputError(f"{where}: architecture {hf or config.get('model_type')!r} cannot be written as GGUF "
                          f"(supported: {', '.join(sorted(ARCHS))})")
    return ARCHS[hf]


def weight_type(gguf_type: str, out_codes: set[str]) -> tuple[str, int]:
    """(type of the weight matrices, general.file_type) of a --gguf-type; `auto`, as the converter's: BF16 unless
    the model is F16."""
    if gguf_type == "auto":
        gguf_type = "f16" if out_codes == {"F16"} else "bf16"
    return _TYPE[gguf_type]


def ggml_type(code: str) -> int:
    return _GGML_TYPE[code]


def _hparam(config: dict, keys: Sequence[str]) -> Any:
    return next((config[k] for k in keys if k in config), None)


def plan_pieces(arch: GGUFArch, config: dict, outputs: Sequence[tuple[str, tuple[int, ...]]], gguf_type: str,
                out_codes: set[str]) -> list[GGUFPiece]:
    """Every output tensor's GGUF piece, in output order; a tensor the name map does not know is an error."""
    gguf = _gguf()
    layers = _hparam(config, ("n_layers", "num_hidden_layers", "n_layer", "num_layers"))
    enum = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch.gguf)
    name_map = gguf.get_tensor_name_map(enum, int(layers or 0))
    heads = _hparam(config, ("n_heads", "num_attention_heads"))
    kv_heads = _hparam(config, ("n_kv_heads", "num_key_value_heads"))
    weights, _ = weight_type(gguf_type, out_codes)
    experts_of = _expert_counts(arch, outputs)
    names = {n for n, _ in outputs}
    has_output = "lm_head.weight" in names
    pieces = []
    for name, shape in outputs:
        expert, n_exp, hf_name = 0, 1, name
        m = re.fullmatch(arch.experts, name) if arch.experts else None
        if m:           # the converter stacks them, then maps the stack's name
            expert, n_exp = int(m["xid"]), experts_of[(m["bid"], m["w"])]
            hf_name = (f"layers.{m['bid']}.feed_forward.experts.{m['w']}.weight" if "block_sparse_moe" in name
                       else f"model.layers.{m['bid']}.mlp.experts.{m['w']}.weight")
        gname = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gname is None:
            raise OutputError(f"{name}: no GGUF name for this {arch.hf} tensor in gguf's tensor name map")
        transform = RowTransform()
        if arch.permute_qk and name.endswith(("q_proj.weight", "q_proj.bias")):
            transform = RowTransform(permute=int(heads))
        elif arch.permute_qk and name.endswith(("k_proj.weight", "k_proj.bias")):
            transform = RowTransform(permute=int(kv_heads))
        elif arch.norm_offset and name.endswith("norm.weight"):
            transform = RowTransform(offset=arch.norm_offset)
        ndim = len(shape) + (n_exp > 1)
        head = gname in ("output.weight",) or (gname == "token_embd.weight" and not has_output)
        code = _type_of(gname, ndim, shape[-1] if shape else 1, weights, head)
        pieces.append(GGUFPiece(name, tuple(shape), gname, code, transform, expert, n_exp))
    _check_stacks(pieces)
    return pieces


def converter_order(arch: GGUFArch, pieces: Sequence[GGUFPiece]) -> list[str]:
    """The GGUF tensors in the order llama.cpp's converter writes them from a one-file checkpoint: by Hugging Face
    name, a layer's stacked experts once its last expert tensor has been read (`modify_tensors`)."""
    order: list[str] = []
    pending: dict[str, list[GGUFPiece]] = {}
    for p in sorted(pieces, key=lambda p: p.name):
        m = re.fullmatch(arch.experts, p.name) if arch.experts and p.experts > 1 else None
        if m is None:
            order.append(p.gguf)
            continue
        group = pending.setdefault(m["bid"], [])
        group.append(p)
        if len(group) == p.experts * len(arch.stack_order):
            by_w = {re.fullmatch(arch.experts, q.name)["w"]: q.gguf for q in group}      # type: ignore[index]
            order += [by_w[w] for w in arch.stack_order if w in by_w]
    order += [p.gguf for group in pending.values() for p in group if p.gguf not in order]
    return list(dict.fromkeys(order))


def _expert_counts(arch: GGUFArch, outputs: Sequence[tuple[str, tuple[int, ...]]]) -> dict[tuple[str, str], int]:
    counts: dict[tuple[str, str], int] = {}
    for name, _ in outputs:
        m = re.fullmatch(arch.experts, name) if arch.experts else None
        if m:
            counts[(m["bid"], m["w"])] = counts.get((m["bid"], m["w"]), 0) + 1
    return counts


def _check_stacks(pieces: list[GGUFPiece]) -> None:
    """A stacked tensor holds experts 0..n-1 once each, all of one shape and type."""
    stacks: dict[str, list[GGUFPiece]] = {}
    for p in pieces:
        stacks.setdefault(p.gguf, []).append(p)
    for gname, group in stacks.items():
        ids = sorted(p.expert for p in group)
        if ids != list(range(len(group))) or len({(p.shape, p.code) for p in group}) != 1:
            raise OutputError(f"{group[0].name}: the tensors stacked into GGUF tensor {gname!r} are not experts "
                              f"0..{len(group) - 1} of one shape")


def _type_of(gname: str, ndim: int, row: int, weights: str, head: bool) -> str:
    if ndim <= 1 or gname.endswith("_norm.weight") or _F32_TENSORS.search(gname) or not gname.endswith(".weight"):
        return "F32"
    code = weights
    if code in BLOCK_CODES and code != "Q8_0" and head:
        code = "Q8_0"                      # llama-quantize: Q6_K, which gguf cannot write; Q8_0 is closer than Q4
    if code in BLOCK_CODES and row % BLOCK_CODES[code][0]:
        code = "F16"                       # the converter's QuantError fallback
    return code


def rope_freqs(config: dict) -> list[float] | None:
    """llama 3's rope scaling as the per-dimension factors llama.cpp reads from `rope_freqs.weight`
    (LlamaModel.generate_extra_tensors), or None when the config has no llama3 rope scaling."""
    rope = _rope_parameters(config)
    rope = rope.get("full_attention", rope)
    if str(rope.get("rope_type", "")).lower() != "llama3":
        return None
    base = rope.get("rope_theta", 10000.0)
    dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    import torch

    freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    factor = rope.get("factor", 8.0)
    low, high = rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    old = rope.get("original_max_position_embeddings", 8192)
    low_wavelen, high_wavelen = old / low, old / high
    out = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            out.append(1)
        elif wavelen > low_wavelen:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return [float(v) for v in torch.tensor(out, dtype=torch.float32)]


def _rope_parameters(config: dict) -> dict:
    """TextModel.__init__'s rope parameters: rope_parameters (transformers 5) or rope_scaling, with the global
    rope_theta and friends mirrored in."""
    rope = dict(config.get("rope_parameters", config.get("rope_scaling")) or {})
    if "full_attention" not in rope and "sliding_attention" not in rope:
        local = _hparam(config, ("local_rope_theta", "rope_local_theta", "rope_theta_local", "swa_rope_theta",
                                 "rope_local_base_freq"))
        theta = _hparam(config, ("global_rope_theta", "rope_global_theta", "rope_theta_global", "rope_theta",
                                 "rotary_emb_base"))
        partial = _hparam(config, ("partial_rotary_factor", "rope_pct", "rope_percent"))
        original = config.get("original_max_position_embeddings")
        if local is not None:
            rope["sliding_attention"] = {"rope_theta": local}
        if "rope_theta" not in rope and theta is not None:
            rope["rope_theta"] = theta
        if "rope_type" not in rope and rope.get("type") is not None:
            rope["rope_type"] = rope["type"]
        if "partial_rotary_factor" not in rope and partial is not None:
            rope["partial_rotary_factor"] = partial
        if "original_max_position_embeddings" not in rope and original is not None:
            rope["original_max_position_embeddings"] = original
    return rope
