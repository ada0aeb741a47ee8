"""Op names -> functions. The only place where graph tasks meet kernels and I/O.

Each op takes the run context, its input values (in the task's input order) and the task's attributes. Kernels
stay pure; reading from checkpoints and writing to the output go through the context.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from ..errors import CheckpointError
from . import kernels as K

TORCH_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                "BOOL": torch.bool}


@dataclass
class RunContext:
    """What ops may touch: opened inputs, the output writer, the device, and counters."""

    sources: dict[str, Any]
    writer: Any
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    strict: bool = False
    bytes_read: int = 0
    bytes_written: int = 0
    warnings: list[str] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _warned: set = field(default_factory=set)

    def count(self, read: int = 0, written: int = 0) -> None:
        with self._lock:
            self.bytes_read += read
            self.bytes_written += written

    def non_finite(self, model: str, name: str) -> None:
        msg = f"{self.sources[model].path}: tensor '{name}' contains NaN or Inf"
        if self.strict:
            raise CheckpointError(msg + " (--strict)")
        with self._lock:
            if (model, name) not in self._warned:
                self._warned.add((model, name))
                self.warnings.append(msg)


Op = Callable[[RunContext, list[Any], dict[str, Any]], Any]
OPS: dict[str, Op] = {}


def op(name: str) -> Callable[[Op], Op]:
    def deco(fn: Op) -> Op:
        OPS[name] = fn
        return fn
    return deco


@op("load")
def _load(ctx: RunContext, ins: list[Any], a: dict[str, Any]) -> torch.Tensor:
    ckpt = ctx.sources[a["model"]]
    x = ckpt.read(a["name"], rows=a["rows"], dtype=None if a["raw"] else torch.float32, device=ctx.device)
    ctx.count(read=a["read_bytes"])
    if x.is_floating_point() and not bool(torch.isfinite(x).all()):
        ctx.non_finite(a["model"], a["name"])
    return x


@op("delta")
def _delta(ctx: RunContext, ins: list[Any], a: dict[str, Any]) -> torch.Tensor:
    return K.delta(ins[0], ins[1])


@op("select")
def _select(ctx: RunContext, ins: list[Any], a: dict[str, Any]) -> Any:
    if a["pass_"] == 1:
        return K.topk_pass1(ins[0])
    return K.topk_pass2(ins[0], ins[1])


@op("reduce")
def _reduce(ctx: RunContext, ins: list[Any], a: dict[str, Any]) -> Any:
    kind = a["kind"]
    if kind == "topk1":
        return K.topk_reduce1(ins, a["k"])
    if kind == "topk2":
        return K.topk_reduce2(ins[1:], ins[0])
    if kind == "rescale_norm":
        split = a["split"]
        before = K.norm_from_partials(ins[:split], a["norm"])
        after = K.norm_from_partials(ins[split:], a["norm"])
        return 1.0 if before < 1e-7 or after < 1e-7 else before / after
    mode = a.get("mode", "total")
    if mode == "total":
        gram = K.gram_total(ins)
    elif mode == "rows":
        gram = torch.cat(list(ins))
    else:
        gram = K.col_gram_total(ins)
    return REDUCERS[kind](gram, a)


def _maybe_base(c: torch.Tensor, a: dict[str, Any]) -> torch.Tensor:
    return K.with_base(c) if a.get("with_base") else c


# Gram matrix -> lincomb coefficients, per method.
REDUCERS: dict[str, Callable[[torch.Tensor, dict[str, Any]], Any]] = {
    "slerp": lambda G, a: K.slerp_coeffs(G, a["t"]),
    "model_stock": lambda G, a: K.model_stock_coeffs(K.model_stock_t(G), a["n"]),
    "nuslerp": lambda G, a: _maybe_base(K.nuslerp_coeffs(G, a["weights"]), a),
    "multislerp": lambda G, a: _maybe_base(
        K.multislerp_coeffs(G, a["weights"], a["normalize_weights"], a["eps"]), a),
    "karcher": lambda G, a: K.karcher_coeffs(G, None, a["max_iter"], a["tol"]),
}


@op("trim")
def _trim(ctx: RunContext, ins: list[Any], a: dict[str, Any]) -> torch.Tensor:
    d = ins[0]
    method = a["method"]
    if method == "magnitude":
        return d * K.topk_mask(d, ins[1], a["block"])
    if method == "outliers":
        keep = torch.ones_like(d, dtype=torch.bool)
        i = 1
        if a["has_upto"]:
            keep &= K.topk_mask(d, ins[i], a["block"])
            i += 1
        if a["has_top"]:
            keep &= ~K.topk_mask(d, ins[i], a["block"])
        return d * keep
    u = K.uniform_rows(K.derive_seed(*a["seed_parts"]), tuple(a["shape"]), tuple(a["rows"])).to(d.device)
    u = u.reshape(d.shape)
    if method == "random":
        kept = K.random_mask(d, a["density"], u)
        return K.dare_rescale(kept, a["density"]) if a["rescale"] else kept
    if method == "della":
        return K.rank_magnitude_sampling(d, u, a["density"], a["epsilon"], a["rescale"])
    raise KeyError(f"unknown trim method {method!r}")


@op("norm")
def _norm(ctx: RunContext, ins: list[Any], a: dict[str, Any]) -> torch.Tensor:
    return K.norm_partials(ins[0], a["kind"])


@op("rescale")
def _rescale(ctx: RunContext, ins: list[Any], a: dict[str, Any]) -> torch.Tensor:
    factor = ins[1] if len(ins) > 1 else a["factor"]
    return K.scale(ins[0], float(factor))


@op("elect")
def _elect(ctx: RunContext, ins: list[Any], a: dict[str, Any]) -> torch.Tensor:
    es = [K.scale(t, w) for t, w in zip(ins, a["weights"])]
    return K.elect_sign(es, a["consensus"])


@op("combine")
def _combine(ctx: RunContext, ins: list[Any], a: dict[str, Any]) -> torch.Tensor:
    weights = a["weights"]
    base, ts = ins[0], ins[1:1 + len(weights)]
    sign = ins[1 + len(weights)] if a["elect"] else None
    es = [K.scale(t, w) for t, w in zip(ts, weights)]
    d = K.combine(es, weights, sign=sign, normalize=a["normalize"])
    return base + a["lam"] * d if a["lam"] != 1.0 else base + d


@op("weighted_sum")
def _weighted_sum(ctx: RunContext, ins: list[Any], a: dict[str, Any]) -> torch.Tensor:
    y = K.weighted_sum(ins, a["weights"])
    if a["normalize"]:
        y = y / sum(a["weights"])
    return y


@op("fisher")
def _fisher(ctx: RunContext, ins: list[Any], a: dict[str, Any]) -> torch.Tensor:
    n = len(a["weights"])
    return K.fisher_merge(ins[:n], ins[n:], a["weights"])


@op("gram")
def _gram(ctx: RunContext, ins: list[Any], a: dict[str, Any]) -> torch.Tensor:
    return K.col_gram(ins) if a.get("mode") == "cols" else K.row_gram(ins)


@op("lincomb")
def _lincomb(ctx: RunContext, ins: list[Any], a: dict[str, Any]) -> torch.Tensor:
    xs, coeffs = ins[:-1], ins[-1]
    mode = a.get("mode", "total")
    if mode == "cols":
        return K.lincomb_cols(xs, coeffs)
    if mode == "rows":
        r0, r1 = a["rows"] or (0, 1)
        coeffs = coeffs[r0:r1]
    return K.lincomb(xs, coeffs)


@op("write")
def _write(ctx: RunContext, ins: list[Any], a: dict[str, Any]) -> None:
    y = ins[0].to(device="cpu", dtype=TORCH_DTYPES[a["dtype"]]).contiguous()
    ctx.writer.write_rows(a["name"], a["row_start"], y)
    ctx.count(written=y.numel() * y.element_size())
    return None
