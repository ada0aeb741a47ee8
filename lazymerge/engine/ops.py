"""Op names -> functions. The only place where graph tasks meet kernels and I/O.

Each op takes the run context, its input values (in the task's input order), the task's attributes and `own`:
for each input, whether this task is its last reader, so the op may overwrite it instead of allocating (the
scheduler donates buffers). Kernels stay pure; reading and writing go through the context.
"""
from __future__ import annotations

import math
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


Op = Callable[[RunContext, list[Any], dict[str, Any], tuple[bool, ...]], Any]
OPS: dict[str, Op] = {}


def op(name: str) -> Callable[[Op], Op]:
    def deco(fn: Op) -> Op:
        OPS[name] = fn
        return fn
    return deco


@op("load")
def _load(ctx: RunContext, ins: list[Any], a: dict[str, Any], own: tuple[bool, ...]) -> torch.Tensor:
    ckpt = ctx.sources[a["model"]]
    if "vocab_map" in a:      # a vocab-indexed tensor whose rows are mapped token by token (planner/vocab.py)
        from ..planner.vocab import load_block

        def read(key: str, rows: tuple[int, int]) -> torch.Tensor:
            return ctx.sources[key].read(a["name"], rows=rows, dtype=torch.float32, device=ctx.device)

        x = load_block(read, a["model"], a["vocab_map"], a["vocab_fill"], a["vocab_row_shape"])
    else:
        x = ckpt.read(a["name"], rows=a["rows"], dtype=None if a["raw"] else torch.float32, device=ctx.device)
    ctx.count(read=a["read_bytes"])
    # a sum is NaN/Inf whenever any entry is (and a reduction is cheaper than an element-wise isfinite)
    if x.is_floating_point() and not math.isfinite(float(x.sum())) and not bool(torch.isfinite(x).all()):
        ctx.non_finite(a["model"], a["name"])
    return x


@op("delta")
def _delta(ctx: RunContext, ins: list[Any], a: dict[str, Any], own: tuple[bool, ...]) -> torch.Tensor:
    return ins[0].sub_(ins[1]) if own[0] else K.delta(ins[0], ins[1])


@op("select")
def _select(ctx: RunContext, ins: list[Any], a: dict[str, Any], own: tuple[bool, ...]) -> Any:
    # partials (histograms, Gram rows, norms) are small: they live on the CPU whatever the device
    if a["pass_"] == 1:
        return K.topk_pass1(ins[0]).cpu()
    return K.topk_pass2(ins[0], ins[1]).cpu()


@op("reduce")
def _reduce(ctx: RunContext, ins: list[Any], a: dict[str, Any], own: tuple[bool, ...]) -> Any:
    kind = a["kind"]
    if kind in PARTIAL_REDUCERS:          # sce / arcee_fusion / ramplus_tl statistics (end of this module)
        return PARTIAL_REDUCERS[kind](ins, a)
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
def _trim(ctx: RunContext, ins: list[Any], a: dict[str, Any], own: tuple[bool, ...]) -> torch.Tensor:
    d = ins[0]
    method = a["method"]
    if method == "magnitude":
        return _keep(d, K.topk_mask(d, ins[1], a["block"]), own[0])
    if method == "outliers":
        keep = None
        i = 1
        if a["has_upto"]:
            keep = K.topk_mask(d, ins[i], a["block"])
            i += 1
        if a["has_top"]:
            top = K.topk_mask(d, ins[i], a["block"]).logical_not_()
            keep = top if keep is None else keep.logical_and_(top)
        return _keep(d, keep, own[0])
    u = K.uniform_rows(K.derive_seed(*a["seed_parts"]), tuple(a["shape"]), tuple(a["rows"])).to(d.device)
    u = u.reshape(d.shape)
    if method == "random":
        kept = _keep(d, u < a["density"], own[0])
        return kept.div_(a["density"]) if a["rescale"] else kept
    if method == "della":
        return K.rank_magnitude_sampling(d, u, a["density"], a["epsilon"], a["rescale"])
    raise KeyError(f"unknown trim method {method!r}")


def _keep(d: torch.Tensor, keep: torch.Tensor, owned: bool) -> torch.Tensor:
    """Zero the entries not kept: one multiply by the mask (a dropped negative entry becomes -0.0, which adds
    like +0.0 and never agrees in a sign election)."""
    return d.mul_(keep) if owned else d * keep


@op("norm")
def _norm(ctx: RunContext, ins: list[Any], a: dict[str, Any], own: tuple[bool, ...]) -> torch.Tensor:
    return K.norm_partials(ins[0], a["kind"]).cpu()


@op("rescale")
def _rescale(ctx: RunContext, ins: list[Any], a: dict[str, Any], own: tuple[bool, ...]) -> torch.Tensor:
    factor = float(ins[1] if len(ins) > 1 else a["factor"])
    return ins[0].mul_(factor) if own[0] else K.scale(ins[0], factor)


@op("elect")
def _elect(ctx: RunContext, ins: list[Any], a: dict[str, Any], own: tuple[bool, ...]) -> torch.Tensor:
    return K.elect_nonneg(ins, a["consensus"])


@op("combine")
def _combine(ctx: RunContext, ins: list[Any], a: dict[str, Any], own: tuple[bool, ...]) -> torch.Tensor:
    """base + lam * D, where D mixes the weighted task vectors (elected or summed) per methods.md step 4."""
    weights = a["weights"]
    n = len(weights)
    base, es = ins[0], ins[1:1 + n]
    if a["elect"]:
        d = K.combine_elected(es, weights, ins[1 + n], a["normalize"], own[1:1 + n])
    else:
        d = K.sum_into(es, own[1])
        if a["normalize"]:
            total = K.weighted_sum([torch.ones(())] * n, weights)   # the float32 sum of the weights
            if abs(float(total)) >= 1e-8:
                d.div_(total)
    if a["lam"] != 1.0:
        d.mul_(a["lam"])
    return base.add_(d) if own[0] else d.add_(base)   # d is ours; float addition commutes bit for bit


@op("weighted_sum")
def _weighted_sum(ctx: RunContext, ins: list[Any], a: dict[str, Any], own: tuple[bool, ...]) -> torch.Tensor:
    weights = a["weights"]
    acc = ins[0].mul_(weights[0]) if own[0] else K.scale(ins[0], weights[0])
    for x, w, o in zip(ins[1:], weights[1:], own[1:]):
        acc.add_(x.mul_(w) if o else K.scale(x, w))
    if a["normalize"]:
        acc.div_(sum(weights))
    return acc


@op("fisher")
def _fisher(ctx: RunContext, ins: list[Any], a: dict[str, Any], own: tuple[bool, ...]) -> torch.Tensor:
    n = len(a["weights"])
    return K.fisher_merge(ins[:n], ins[n:], a["weights"])


@op("gram")
def _gram(ctx: RunContext, ins: list[Any], a: dict[str, Any], own: tuple[bool, ...]) -> torch.Tensor:
    return (K.col_gram(ins) if a.get("mode") == "cols" else K.row_gram(ins)).cpu()


@op("lincomb")
def _lincomb(ctx: RunContext, ins: list[Any], a: dict[str, Any], own: tuple[bool, ...]) -> torch.Tensor:
    xs, coeffs = ins[:-1], ins[-1].to(ins[0].device)
    mode = a.get("mode", "total")
    if mode == "cols":
        return K.lincomb_cols(xs, coeffs)
    if mode == "rows":
        r0, r1 = a["rows"] or (0, 1)
        coeffs = coeffs[r0:r1]
    return K.lincomb(xs, coeffs)


@op("write")
def _write(ctx: RunContext, ins: list[Any], a: dict[str, Any], own: tuple[bool, ...]) -> None:
    y = ins[0].to(device="cpu", dtype=TORCH_DTYPES[a["dtype"]]).contiguous()
    ctx.writer.write_rows(a["name"], a["row_start"], y)
    ctx.count(written=y.numel() * y.element_size())
    return None


# ----------------------------------------------------------------------------------------------------------------
# Newer mergekit methods: sce, nearswap, arcee_fusion, ram / ramplus_tl (planner/methods.py builds their graphs).
# Small pure ops over engine.kernels; their whole-tensor statistics go through `reduce` (PARTIAL_REDUCERS).
# ----------------------------------------------------------------------------------------------------------------


@op("variance")
def _variance(ctx: RunContext, ins: list[Any], a: dict[str, Any], own: tuple[bool, ...]) -> torch.Tensor:
    return K.variance_key(ins)


@op("count_nonzero")
def _count_nonzero(ctx: RunContext, ins: list[Any], a: dict[str, Any], own: tuple[bool, ...]) -> int:
    return K.count_nonzero(ins[0])


@op("keymask")
def _keymask(ctx: RunContext, ins: list[Any], a: dict[str, Any], own: tuple[bool, ...]) -> torch.Tensor:
    """The top-k mask of a block chosen by a key other than the tensor itself (SCE: the variance)."""
    return K.topk_mask(ins[0], ins[1], a["block"])


@op("keep")
def _keep_op(ctx: RunContext, ins: list[Any], a: dict[str, Any], own: tuple[bool, ...]) -> torch.Tensor:
    return _keep(ins[0], ins[1], own[0])


@op("sce_combine")
def _sce_combine(ctx: RunContext, ins: list[Any], a: dict[str, Any], own: tuple[bool, ...]) -> torch.Tensor:
    n = a["n"]
    return K.sce_combine(ins[0], ins[1:1 + n], ins[2 + n], ins[1 + n])


@op("nearswap")
def _nearswap(ctx: RunContext, ins: list[Any], a: dict[str, Any], own: tuple[bool, ...]) -> torch.Tensor:
    return K.nearswap(ins[0], ins[1], a["t"])


@op("fusion_importance")
def _fusion_importance(ctx: RunContext, ins: list[Any], a: dict[str, Any], own: tuple[bool, ...]) -> torch.Tensor:
    return K.fusion_importance(ins[0], ins[1])


@op("quantile")
def _quantile(ctx: RunContext, ins: list[Any], a: dict[str, Any], own: tuple[bool, ...]) -> torch.Tensor:
    if a["pass_"] == 1:
        return K.order_pass1(ins[0]).cpu()
    return K.order_pass2(ins[0], ins[1]).cpu()


@op("fusion")
def _fusion(ctx: RunContext, ins: list[Any], a: dict[str, Any], own: tuple[bool, ...]) -> torch.Tensor:
    return K.fusion_apply(ins[0], ins[1], ins[2], ins[3])


@op("ram_counts")
def _ram_counts(ctx: RunContext, ins: list[Any], a: dict[str, Any], own: tuple[bool, ...]) -> torch.Tensor:
    return K.ram_counts(ins, a["epsilon"]).cpu()


@op("ram")
def _ram(ctx: RunContext, ins: list[Any], a: dict[str, Any], own: tuple[bool, ...]) -> torch.Tensor:
    n = a["n"]
    return K.ram_merge(ins[0], ins[1:1 + n], a["epsilon"], ins[1 + n] if a["plus"] else None)


def _split(ins: list[Any], a: dict[str, Any]) -> list[list[Any]]:
    """Partials emitted model-major (`a["n"]` groups of equal length)."""
    per = len(ins) // a["n"]
    return [list(ins[i * per:(i + 1) * per]) for i in range(a["n"])]


# reduce kinds over partials: (inputs, attributes) -> the statistic
PARTIAL_REDUCERS: dict[str, Callable[[list[Any], dict[str, Any]], Any]] = {
    # SCE: histograms of every block, then every block's count of non-zero variances
    "topk1_frac": lambda ins, a: K.topk_reduce1_fraction(ins[:a["split"]], ins[a["split"]:], a["fraction"]),
    "sce_weights": lambda ins, a: K.sce_weights(_split(ins, a), a["numel"]),
    "fusion_quantiles1": lambda ins, a: K.order_reduce1(ins, K.fusion_quantile_ranks(a["numel"])),
    "quantile2": lambda ins, a: K.order_reduce2(ins[1:], ins[0]),
    "ramplus": lambda ins, a: K.ramplus_lambdas(torch.stack(list(ins)).sum(dim=0), a["r"], a["alpha"],
                                                a["epsilon"]),
}
