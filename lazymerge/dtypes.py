"""The one table of the dtypes lazymerge knows: safetensors code, torch dtype, bytes per element, names.

io reads and writes by safetensors code; the planner sizes tasks and picks output dtypes by code; the engine casts
to the torch dtype; recipes and config.json name dtypes as torch does. All of them read this table.
"""
from __future__ import annotations

import torch

# (safetensors code, torch name, bytes per element); codes this torch build lacks are left out of DTYPES
_TABLE = (
    ("F64", "float64", 8),
    ("F32", "float32", 4),
    ("F16", "float16", 2),
    ("BF16", "bfloat16", 2),
    ("I64", "int64", 8),
    ("I32", "int32", 4),
    ("I16", "int16", 2),
    ("I8", "int8", 1),
    ("U8", "uint8", 1),
    ("BOOL", "bool", 1),
    ("F8_E4M3", "float8_e4m3fn", 1),
    ("F8_E5M2", "float8_e5m2", 1),
)

# safetensors code -> (torch dtype, bytes per element)
DTYPES: dict[str, tuple[torch.dtype, int]] = {
    code: (getattr(torch, name), size) for code, name, size in _TABLE if hasattr(torch, name)
}
# the codes that are merged (float weights); every other tensor (integer buffers, float8) is copied as stored
FLOAT_CODES = frozenset({"F64", "F32", "F16", "BF16"})
# dtype names a recipe may use (mergekit's spellings) -> code
RECIPE_NAMES = {
    "float32": "F32", "fp32": "F32", "float": "F32",
    "float16": "F16", "fp16": "F16", "half": "F16",
    "bfloat16": "BF16", "bf16": "BF16",
    "float64": "F64",
}
# GGUF block types lazymerge writes (GGML's legacy quants): code -> (values per block, bytes per block), as
# gguf.GGML_QUANT_SIZES. A row of such a tensor is a whole number of blocks: its bytes are `row_nbytes`.
BLOCK_CODES: dict[str, tuple[int, int]] = {
    "Q8_0": (32, 34), "Q4_0": (32, 18), "Q4_1": (32, 20), "Q5_0": (32, 22), "Q5_1": (32, 24),
}
_CODE_OF: dict[torch.dtype, str] = {torch_dtype: code for code, (torch_dtype, _) in DTYPES.items()}
_NAME_OF = {code: name for code, name, _ in _TABLE}


def torch_dtype(code: str) -> torch.dtype:
    return DTYPES[code][0]


def itemsize(code: str) -> int:
    return DTYPES[code][1]


def row_nbytes(code: str, row_numel: int) -> int:
    """Bytes of a row of `row_numel` values stored as `code` (a safetensors code or a GGUF block type)."""
    if code in BLOCK_CODES:
        per, nbytes = BLOCK_CODES[code]
        return row_numel // per * nbytes
    return row_numel * DTYPES[code][1]


def torch_name(code: str) -> str:
    """The name config.json's `torch_dtype` uses for a code ("BF16" -> "bfloat16")."""
    return _NAME_OF[code]


def dtype_code(dtype: torch.dtype) -> str:
    """The safetensors code for a torch dtype (for writers and for pickled checkpoints, which carry torch dtypes)."""
    try:
        return _CODE_OF[dtype]
    except KeyError:
        raise ValueError(f"dtype {dtype} has no safetensors code") from None
