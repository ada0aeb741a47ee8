"""The op registry: the whole vocabulary of the task graph, each op declared once.

An op is a frozen dataclass of its attributes (what the planner puts in a `Task`), registered with `@op` on the
function that runs it, its scratch estimate and, from the dataclass's docstring, one line saying what it does.
"What does op X take, return and cost" is answered here and nowhere else: the planner emits tasks with these
attribute types (`planner.graph.TensorBuilder.emit`), the scheduler runs them (`run_task`), docs/DESIGN.md lists
them (`describe()`).

An op function takes the run context, its input values (in the task's input order), its attributes and `own`:
for each input, whether this task is its last reader, so that it may overwrite it instead of allocating (the
scheduler donates buffers). Kernels stay pure; reading and writing go through the context.

Scratch: the temporaries an op allocates while it runs, in float32 blocks of its row block (e.g. a top-k pass
holds |d| and its bit pattern; `combine` holds agreement masks and a weight sum; Gram and lincomb work in float64).
Counted against the budget so that RSS, not just our bookkeeping, stays within it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import torch

from .. import memory
from ..dtypes import BLOCK_CODES, torch_dtype
from ..io.checkpoint import Checkpoint
from ..io.gguf.rows import RowEncoding, encode
from . import kernels as K
from . import lazy
from .context import RunContext
from .quantize import quantize
from .vocab_rows import VocabRows, load_block, read_token_rows

Tensor = torch.Tensor


class Attrs:
    """Base of every op's attributes; `op` is the registered name (set by `@op`)."""

    op: ClassVar[str] = ""


OpFn = Callable[[RunContext, list[Any], Any, tuple[bool, ...]], Any]


@dataclass(frozen=True)
class OpSpec:
    name: str
    attrs: type                  # the frozen dataclass of the task's attributes
    run: OpFn
    scratch: float | Callable[[Any], float]   # temporaries, in float32 blocks of the task's row block (or a
                                              # function of the attributes whose docstring says how)
    doc: str                     # one line: what it computes
    lazy: bool = False           # takes the lazy values of engine/lazy.py itself (else they come materialized)

    def scratch_blocks(self, attrs: Any) -> float:
        return self.scratch(attrs) if callable(self.scratch) else self.scratch


OPS: dict[str, OpSpec] = {}


def op(name: str, attrs: type, scratch: float | Callable[[Any], float], lazy: bool = False
       ) -> Callable[[OpFn], OpFn]:
    """Register `fn` as op `name` with attributes `attrs`; `lazy`: it handles engine/lazy.py's values itself."""

    def deco(fn: OpFn) -> OpFn:
        if name in OPS:
            raise AssertionError(f"op {name!r} registered twice")
        attrs.op = name
        OPS[name] = OpSpec(name, attrs, fn, scratch, (attrs.__doc__ or "").strip().splitlines()[0], lazy)
        return fn

    return deco


def eager(ins: list[Any], own: tuple[bool, ...]) -> tuple[list[Any], tuple[bool, ...]]:
    """The inputs with every lazy value (engine/lazy.py) computed as a fresh float32 block, which is then ours."""
    if not any(lazy.is_lazy(x) for x in ins):
        return ins, own
    return [lazy.materialize(x) for x in ins], tuple(o or lazy.is_lazy(x) for x, o in zip(ins, own))


def run_task(ctx: RunContext, attrs: Attrs, ins: list[Any], own: tuple[bool, ...]) -> Any:
    spec = OPS[attrs.op]
    if not spec.lazy:
        ins, own = eager(ins, own)
    return spec.run(ctx, ins, attrs, own)


def describe() -> str:
    """The registry as a Markdown table (docs/DESIGN.md embeds it; a test keeps the two equal)."""
    lines = ["| op | attributes | scratch | what it computes |", "| --- | --- | --- | --- |"]
    for s in OPS.values():
        fields = ", ".join(f"`{f}`" for f in s.attrs.__dataclass_fields__) or "-"
        doc = s.doc.replace("|", "\\|")
        scratch = (s.scratch.__doc__ or "").strip() if callable(s.scratch) else f"{s.scratch:g}"
        lines.append(f"| `{s.name}` | {fields} | {scratch} | {doc} |")
    return "\n".join(lines)


# -- reading and writing -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Load(Attrs):
    """Rows of an input tensor as float32 (or as stored when `raw`), vocab rows mapped when `vocab` is set."""

    model: str
    name: str
    rows: tuple[int, int] | None         # None: the whole tensor (a 0-d/1-d tensor is one row)
    read_bytes: int
    raw: bool = False
    vocab: VocabRows | None = None
    evict: bool = True                   # False: a later phase reads these rows again; leave them in the page cache


def _finite(x: Tensor) -> bool:
    if K.fused.finite_checkable(x):
        return K.fused.all_finite(x)
    # a sum is NaN/Inf whenever any entry is (and a reduction is cheaper than an element-wise isfinite)
    return math.isfinite(float(x.sum())) or bool(torch.isfinite(x).all())


@op("load", Load, scratch=0.0)
def _load(ctx: RunContext, ins: list[Any], a: Load, own: tuple[bool, ...]) -> Tensor:
    ckpt = ctx.sources[a.model]
    if a.vocab is not None:      # a vocab-indexed tensor whose rows are mapped token by token (engine/vocab_rows.py)
        names = dict(a.vocab.names)      # a fill's source reads its own tensor (tied: its embedding)

        def read(key: str, rows: tuple[int, int]) -> Tensor:
            name = a.name if key == a.model else names[key]
            return read_token_rows(ctx.sources[key], name, rows, ctx.device)

        x = load_block(read, a.model, a.vocab)
    elif _stays_stored(ctx, ckpt, a):
        # read as stored and checked; widened, if at all, inside the kernel that consumes it (engine/lazy.py)
        raw = ckpt.read_stored(a.name, rows=a.rows, evict=a.evict)
        ctx.count(read=a.read_bytes)
        if not K.fused.all_finite(raw):
            ctx.non_finite(a.model, a.name)
        return lazy.Stored(raw)
    else:
        x = ckpt.read(a.name, rows=a.rows, dtype=None if a.raw else torch.float32, device=ctx.device,
                      evict=a.evict)
    ctx.count(read=a.read_bytes)
    if x.is_floating_point() and not _finite(x):
        ctx.non_finite(a.model, a.name)
    return x


def _stays_stored(ctx: RunContext, ckpt: Any, a: Load) -> bool:
    """Whether to read the block as stored and hand it on as `lazy.Stored`: bfloat16 on a checkpoint (whose stored
    bits are the file's: an adapted or computed source rounds when asked for its stored dtype), on the CPU."""
    if a.raw or ctx.device.type != "cpu" or type(ckpt) is not Checkpoint or a.read_bytes < 2 * K.fused.MIN_NUMEL:
        return False
    info = ckpt.tensors.get(a.name)
    return info is not None and info.dtype == "BF16" and K.fused.finite_checkable_dtype(torch.bfloat16)


@dataclass(frozen=True)
class Cast(Attrs):
    """A block read as stored (a raw `load`) as a new float32 block: each phase's copy of an input block read once."""


@op("cast", Cast, scratch=0.0, lazy=True)
def _cast(ctx: RunContext, ins: list[Any], a: Cast, own: tuple[bool, ...]) -> Any:
    if lazy.stored_ok(ins[0]):
        return lazy.Stored(ins[0])         # no copy: the phase's consumers read the stored block
    ins, own = eager(ins, own)
    if ins[0].device.type != "cpu":
        return ins[0].to(torch.float32, copy=True)
    return memory.empty(tuple(ins[0].shape), torch.float32).copy_(ins[0])


@dataclass(frozen=True)
class Write(Attrs):
    """Cast a block to the output dtype (or quantize it: GGUF) and write it at its rows of the output tensor."""

    name: str
    row_start: int
    dtype: str                           # safetensors code, or a GGUF block type (dtypes.BLOCK_CODES)
    gguf: RowEncoding | None = None      # GGUF output: what llama.cpp's converter does to these rows first


def _write_scratch(a: Write) -> float:
    """0; GGUF: 1.5 (rounded through bf16/f16, then widened), 1 (a transformed copy)"""
    if a.gguf is None:
        return 0.0
    if a.gguf.via in ("BF16", "F16"):
        return 1.5
    return 1.0 if a.gguf.transform.permute or a.gguf.transform.offset else 0.0


@op("write", Write, scratch=_write_scratch, lazy=True)
def _write(ctx: RunContext, ins: list[Any], a: Write, own: tuple[bool, ...]) -> None:
    x = ins[0]
    gguf = a.gguf is not None or a.dtype in BLOCK_CODES
    # a fused chain's block is computed straight in the output dtype; GGUF rows are encoded from float32
    y = None if gguf else lazy.write_value(x, torch_dtype(a.dtype))
    if y is None:
        x = lazy.materialize(x)
        if a.gguf is not None:
            x = encode(x.cpu(), a.gguf)
        if a.dtype in BLOCK_CODES:
            y = quantize(x.reshape(x.shape[0] if x.dim() >= 2 else 1, -1), a.dtype)
        elif x.device.type == "cpu":
            y = memory.empty(tuple(x.shape), torch_dtype(a.dtype)).copy_(x)
        else:
            y = x.to(device="cpu", dtype=torch_dtype(a.dtype)).contiguous()
    ctx.writer.write_rows(a.name, a.row_start, y)
    ctx.count(written=y.numel() * y.element_size())
    return None


# -- element-wise ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Delta(Attrs):
    """The task vector: input 0 minus input 1 (the base)."""


@op("delta", Delta, scratch=0.0, lazy=True)
def _delta(ctx: RunContext, ins: list[Any], a: Delta, own: tuple[bool, ...]) -> Any:
    tv = lazy.delta(ins[0], ins[1])
    if tv is not None:
        return tv
    ins, own = eager(ins, own)
    return ins[0].sub_(ins[1]) if own[0] else K.delta(ins[0], ins[1])


@dataclass(frozen=True)
class Rescale(Attrs):
    """Input 0 times `factor`, or times the scalar of input 1 (a norm factor) when `factor` is None."""

    factor: float | None = None


@op("rescale", Rescale, scratch=0.0, lazy=True)
def _rescale(ctx: RunContext, ins: list[Any], a: Rescale, own: tuple[bool, ...]) -> Any:
    factor = float(ins[1] if len(ins) > 1 else a.factor)
    tv = lazy.rescale(ins[0], factor)
    if tv is not None:
        return tv
    ins, own = eager(ins, own)
    return ins[0].mul_(factor) if own[0] else K.scale(ins[0], factor)


@dataclass(frozen=True)
class WeightedSum(Attrs):
    """sum_i w_i x_i over the inputs, divided by sum_i w_i when `normalize` (linear)."""

    weights: tuple[float, ...]
    normalize: bool


@op("weighted_sum", WeightedSum, scratch=1.0, lazy=True)
def _weighted_sum(ctx: RunContext, ins: list[Any], a: WeightedSum, own: tuple[bool, ...]) -> Any:
    fused_sum = lazy.weighted_sum(ins, a.weights, a.normalize)
    if fused_sum is not None:
        return fused_sum
    ins, own = eager(ins, own)
    weights = a.weights
    acc = ins[0].mul_(weights[0]) if own[0] else K.scale(ins[0], weights[0])
    for x, w, o in zip(ins[1:], weights[1:], own[1:]):
        acc.add_(x.mul_(w) if o else K.scale(x, w))
    if a.normalize:
        acc.div_(sum(weights))
    return acc


@dataclass(frozen=True)
class Elect(Attrs):
    """TIES sign election over the weighted task vectors: True where the elected sign is + (fused: in `combine`)."""

    consensus: str                       # "sum" or "count"


@op("elect", Elect, scratch=1.0, lazy=True)
def _elect(ctx: RunContext, ins: list[Any], a: Elect, own: tuple[bool, ...]) -> Any:
    if a.consensus in ("sum", "count") and all(isinstance(x, lazy.TaskVector) for x in ins):
        return K.fused.elect_later(a.consensus, ins)     # elected inside the fused combine (engine/lazy.py)
    ins, own = eager(ins, own)
    if a.consensus in ("sum", "count") and K.fused.use(*ins):
        return K.fused.elect_later(a.consensus, ins)     # the fused combine elects in its own pass
    return K.elect_nonneg(ins, a.consensus)


@dataclass(frozen=True)
class Combine(Attrs):
    """base + lam * D, D mixing the weighted task vectors (inputs: base, e_1..e_n[, elected sign])."""

    weights: tuple[float, ...]
    normalize: bool
    lam: float
    elect: bool


@op("combine", Combine, scratch=3.0, lazy=True)
def _combine(ctx: RunContext, ins: list[Any], a: Combine, own: tuple[bool, ...]) -> Any:
    """D is per methods.md step 4: the elected entries' (or all entries') sum, normalised by the weights."""
    weights = a.weights
    n = len(weights)
    deferred = ins[1 + n] if a.elect else None
    if not a.elect or isinstance(deferred, K.fused.Deferred):
        fused_block = lazy.combine(ins[0], ins[1:1 + n], weights, deferred.consensus if a.elect else None,
                                   a.normalize, a.lam)
        if fused_block is not None:
            return fused_block
    ins, own = eager(ins, own)
    base, es = ins[0], ins[1:1 + n]
    if a.elect and (K.fused.use(base, *es) or isinstance(ins[1 + n], K.fused.Deferred)):
        # the whole chain below (and the election, when deferred) in one pass: engine/fused.py
        out = base if own[0] else memory.empty_like(base)
        return K.fused.combine_elected(es, weights, ins[1 + n], a.normalize, a.lam, base, out)
    if a.elect:
        d = K.combine_elected(es, weights, ins[1 + n], a.normalize, own[1:1 + n])
    else:
        d = K.sum_into(es, own[1])
        if a.normalize:
            total = K.weighted_sum([torch.ones(())] * n, weights)   # the float32 sum of the weights
            if abs(float(total)) >= 1e-8:
                d.div_(total)
    if a.lam != 1.0:
        d.mul_(a.lam)
    return base.add_(d) if own[0] else d.add_(base)   # d is ours; float addition commutes bit for bit


@dataclass(frozen=True)
class Fisher(Attrs):
    """Fisher-weighted average sum_i w_i F_i x_i / sum_i w_i F_i (inputs: x_1..x_n, F_1..F_n)."""

    weights: tuple[float, ...]


@op("fisher", Fisher, scratch=4.0)
def _fisher(ctx: RunContext, ins: list[Any], a: Fisher, own: tuple[bool, ...]) -> Tensor:
    n = len(a.weights)
    return K.fisher_merge(ins[:n], ins[n:], a.weights)


# -- sparsification: exact top-k over the whole tensor, random drops ----------------------------------------


@dataclass(frozen=True)
class TopkPass1(Attrs):
    """Top-k, pass 1 over one block: a histogram of the high 16 bits of abs(d) (CPU)."""


@op("topk_pass1", TopkPass1, scratch=2.0, lazy=True)
def _topk_pass1(ctx: RunContext, ins: list[Any], a: TopkPass1, own: tuple[bool, ...]) -> Tensor:
    h = lazy.topk_hist(ins[0])
    if h is not None:
        return h
    ins, own = eager(ins, own)
    # partials (histograms, Gram rows, norms) are small: they live on the CPU whatever the device
    return K.topk_pass1(ins[0]).cpu()


@dataclass(frozen=True)
class TopkReduce1(Attrs):
    """Top-k, pass 1 reduced over all blocks: the high-bits bucket that holds the k-th largest abs(d)."""

    k: int
    tag: str                             # which threshold of the tensor ("keep", "upto", "top")


@op("topk_reduce1", TopkReduce1, scratch=0.0)
def _topk_reduce1(ctx: RunContext, ins: list[Any], a: TopkReduce1, own: tuple[bool, ...]) -> Any:
    return K.topk_reduce1(ins, a.k)


@dataclass(frozen=True)
class TopkPass2(Attrs):
    """Top-k, pass 2 over one block: a histogram of the low bits inside the bucket (inputs: d, pass-1 state)."""


@op("topk_pass2", TopkPass2, scratch=2.0, lazy=True)
def _topk_pass2(ctx: RunContext, ins: list[Any], a: TopkPass2, own: tuple[bool, ...]) -> Tensor:
    s1 = ins[1]
    if not (s1["all"] or s1.get("none")):
        h = lazy.topk_hist(ins[0], s1["bin"])
        if h is not None:
            return h
    ins, own = eager(ins, own)
    return K.topk_pass2(ins[0], ins[1]).cpu()


@dataclass(frozen=True)
class TopkReduce2(Attrs):
    """Top-k, pass 2 reduced: the exact k-th largest abs(d) and how many ties to keep (inputs: state 1, hists)."""

    tag: str


@op("topk_reduce2", TopkReduce2, scratch=0.0)
def _topk_reduce2(ctx: RunContext, ins: list[Any], a: TopkReduce2, own: tuple[bool, ...]) -> Any:
    return K.topk_reduce2(ins[1:], ins[0])


def _keep(d: Tensor, keep: Tensor, owned: bool) -> Tensor:
    """Zero the entries not kept: one multiply by the mask (a dropped negative entry becomes -0.0, which adds
    like +0.0 and never agrees in a sign election)."""
    return d.mul_(keep) if owned else d * keep


@dataclass(frozen=True)
class TrimMagnitude(Attrs):
    """Keep the entries of d at or above the top-k threshold (inputs: d, top-k state), zero the rest (TIES)."""

    block: int                           # the block's index: ties at the threshold are broken by flat index


@op("trim_magnitude", TrimMagnitude, scratch=2.0, lazy=True)
def _trim_magnitude(ctx: RunContext, ins: list[Any], a: TrimMagnitude, own: tuple[bool, ...]) -> Any:
    tv = lazy.trim_magnitude(ins[0], ins[1], a.block)
    if tv is not None:
        return tv
    ins, own = eager(ins, own)
    return K.topk_keep(ins[0], ins[1], a.block, own[0])


@dataclass(frozen=True)
class TrimOutliers(Attrs):
    """Breadcrumbs: zero the smallest entries of d and the largest-magnitude outliers (inputs: d, states)."""

    block: int
    has_upto: bool                       # a threshold below which entries are dropped is an input
    has_top: bool                        # a threshold above which entries are dropped is an input


@op("trim_outliers", TrimOutliers, scratch=2.0, lazy=True)
def _trim_outliers(ctx: RunContext, ins: list[Any], a: TrimOutliers, own: tuple[bool, ...]) -> Any:
    states = iter(ins[1:])
    tv = lazy.trim_outliers(ins[0], next(states) if a.has_upto else None, next(states) if a.has_top else None,
                            a.block)
    if tv is not None:
        return tv
    ins, own = eager(ins, own)
    d = ins[0]
    keep = None
    i = 1
    if a.has_upto:
        keep = K.topk_mask(d, ins[i], a.block)
        i += 1
    if a.has_top:
        top = K.topk_mask(d, ins[i], a.block).logical_not_()
        keep = top if keep is None else keep.logical_and_(top)
    return _keep(d, keep, own[0])


@dataclass(frozen=True)
class DropRandom(Attrs):
    """DARE: keep each entry of d with probability `density` (block-invariant random stream), rescale by 1/p."""

    density: float
    rescale: bool
    seed_parts: tuple                    # (run seed, tensor name, model rank): the random stream's key
    shape: tuple[int, ...]               # the whole tensor's shape (fixes the row groups)
    rows: tuple[int, int]


def _uniform(a: DropRandom | DropDella, d: Tensor) -> Tensor:
    u = K.uniform_rows(K.derive_seed(*a.seed_parts), tuple(a.shape), tuple(a.rows)).to(d.device)
    return u.reshape(d.shape)


@op("drop_random", DropRandom, scratch=2.0, lazy=True)
def _drop_random(ctx: RunContext, ins: list[Any], a: DropRandom, own: tuple[bool, ...]) -> Any:
    tv = lazy.drop_random(ins[0], a.density, a.rescale, a.seed_parts, a.shape, a.rows)
    if tv is not None:
        return tv
    ins, own = eager(ins, own)
    d = ins[0]
    kept = _keep(d, _uniform(a, d) < a.density, own[0])
    return kept.div_(a.density) if a.rescale else kept


@dataclass(frozen=True)
class DropDella(Attrs):
    """DELLA: drop entries of d with probabilities ranked by magnitude in density ± epsilon, rescale."""

    density: float
    epsilon: float
    rescale: bool
    seed_parts: tuple
    shape: tuple[int, ...]
    rows: tuple[int, int]


@op("drop_della", DropDella, scratch=2.0, lazy=True)
def _drop_della(ctx: RunContext, ins: list[Any], a: DropDella, own: tuple[bool, ...]) -> Any:
    tv = lazy.drop_della(ins[0], a.density, a.epsilon, a.rescale, a.seed_parts, a.shape, a.rows)
    if tv is not None:
        return tv
    ins, own = eager(ins, own)
    d = ins[0]
    return K.rank_magnitude_sampling(d, _uniform(a, d), a.density, a.epsilon, a.rescale)


@dataclass(frozen=True)
class Norm(Attrs):
    """Per-row partials of the l1 / l2 / linf norm of one block (CPU, float64)."""

    kind: str


@op("norm", Norm, scratch=2.0)
def _norm(ctx: RunContext, ins: list[Any], a: Norm, own: tuple[bool, ...]) -> Tensor:
    return K.norm_partials(ins[0], a.kind).cpu()


@dataclass(frozen=True)
class NormFactor(Attrs):
    """norm(d) / norm(trimmed d) from both tensors' norm partials (1 when either is ~0): `rescale_norm`."""

    norm: str
    split: int                           # the first `split` inputs are the partials before trimming


@op("norm_factor", NormFactor, scratch=0.0)
def _norm_factor(ctx: RunContext, ins: list[Any], a: NormFactor, own: tuple[bool, ...]) -> float:
    before = K.norm_from_partials(ins[:a.split], a.norm)
    after = K.norm_from_partials(ins[a.split:], a.norm)
    return 1.0 if before < 1e-7 or after < 1e-7 else before / after


# -- inner products: Gram partials -> coefficients -> linear combination ------------------------------------
# `mode` says which vectors the inner products are over: "total" (the flattened tensor), "rows" (each row) or
# "cols" (each column).


@dataclass(frozen=True)
class Gram(Attrs):
    """Partial Gram matrix of the inputs over one block: per row in float64, or exact per column (limbs)."""

    mode: str


@op("gram", Gram, scratch=6.0, lazy=True)
def _gram(ctx: RunContext, ins: list[Any], a: Gram, own: tuple[bool, ...]) -> Tensor:
    if a.mode != "cols":
        g = lazy.row_gram(ins)
        if g is not None:
            return g
    ins, own = eager(ins, own)
    return (K.col_gram(ins) if a.mode == "cols" else K.row_gram(ins)).cpu()


def _gram_total(parts: list[Any], mode: str) -> Tensor:
    """The Gram matrix (matrices, per row or column) from all blocks' partials, order-independently."""
    if mode == "total":
        return K.gram_total(parts)
    if mode == "rows":
        return torch.cat(list(parts))
    return K.col_gram_total(parts)


def _maybe_base(c: Tensor, with_base: bool) -> Tensor:
    return K.with_base(c) if with_base else c


@dataclass(frozen=True)
class SlerpCoeffs(Attrs):
    """slerp's two coefficients (base, other) at `t` from the Gram partials of the pair."""

    t: float
    mode: str = "total"


@op("slerp_coeffs", SlerpCoeffs, scratch=0.0)
def _slerp_coeffs(ctx: RunContext, ins: list[Any], a: SlerpCoeffs, own: tuple[bool, ...]) -> Tensor:
    return K.slerp_coeffs(_gram_total(ins, a.mode), a.t)


@dataclass(frozen=True)
class ModelStockCoeffs(Attrs):
    """Model Stock's coefficients (base, fine-tunes) from the task vectors' Gram partials."""

    n: int
    mode: str = "total"


@op("model_stock_coeffs", ModelStockCoeffs, scratch=0.0)
def _model_stock_coeffs(ctx: RunContext, ins: list[Any], a: ModelStockCoeffs, own: tuple[bool, ...]) -> Tensor:
    return K.model_stock_coeffs(K.model_stock_t(_gram_total(ins, a.mode)), a.n)


@dataclass(frozen=True)
class NuslerpCoeffs(Attrs):
    """nuslerp's coefficients from the Gram partials (a leading base coefficient when `with_base`)."""

    weights: tuple[float, ...]
    with_base: bool
    mode: str = "total"


@op("nuslerp_coeffs", NuslerpCoeffs, scratch=0.0)
def _nuslerp_coeffs(ctx: RunContext, ins: list[Any], a: NuslerpCoeffs, own: tuple[bool, ...]) -> Tensor:
    return _maybe_base(K.nuslerp_coeffs(_gram_total(ins, a.mode), a.weights), a.with_base)


@dataclass(frozen=True)
class MultislerpCoeffs(Attrs):
    """multislerp's coefficients from the Gram partials (a leading base coefficient when `with_base`)."""

    weights: tuple[float, ...]
    normalize_weights: bool
    eps: float
    with_base: bool
    mode: str = "total"


@op("multislerp_coeffs", MultislerpCoeffs, scratch=0.0)
def _multislerp_coeffs(ctx: RunContext, ins: list[Any], a: MultislerpCoeffs, own: tuple[bool, ...]) -> Tensor:
    G = _gram_total(ins, a.mode)
    return _maybe_base(K.multislerp_coeffs(G, a.weights, a.normalize_weights, a.eps), a.with_base)


@dataclass(frozen=True)
class KarcherCoeffs(Attrs):
    """The Karcher mean's coefficients from the models' Gram partials (fixed-point iteration)."""

    max_iter: int
    tol: float
    mode: str = "total"


@op("karcher_coeffs", KarcherCoeffs, scratch=0.0)
def _karcher_coeffs(ctx: RunContext, ins: list[Any], a: KarcherCoeffs, own: tuple[bool, ...]) -> Tensor:
    return K.karcher_coeffs(_gram_total(ins, a.mode), None, a.max_iter, a.tol)


@dataclass(frozen=True)
class Lincomb(Attrs):
    """sum_i c_i x_i in float64, rounded once (inputs: x_1..x_n, coefficients)."""

    rows: tuple[int, int]                # the block's rows (for per-row coefficients)
    mode: str = "total"


@op("lincomb", Lincomb, scratch=4.0, lazy=True)
def _lincomb(ctx: RunContext, ins: list[Any], a: Lincomb, own: tuple[bool, ...]) -> Any:
    coeffs = ins[-1]
    if a.mode == "rows":
        r0, r1 = a.rows or (0, 1)
        coeffs = coeffs[r0:r1]
    if a.mode != "cols":
        fused_block = lazy.lincomb(ins[:-1], coeffs.cpu())
        if fused_block is not None:
            return fused_block
    ins, own = eager(ins, own)
    xs = ins[:-1]
    coeffs = coeffs.to(xs[0].device)
    if a.mode == "cols":
        return K.lincomb_cols(xs, coeffs)
    return K.lincomb(xs, coeffs)


# -- mergekit's newer methods: sce, nearswap, arcee_fusion, ram / ramplus_tl (planner/methods.py) ----------


def _variance_scratch(a: Any) -> float:
    """2(n+4): float64 copies of the n deltas, their mean and sum"""
    return (a.n + 4) * 2


@dataclass(frozen=True)
class Variance(Attrs):
    """SCE's selection key: the per-entry variance of the n task vectors (inputs: d_1..d_n)."""

    n: int


@op("variance", Variance, scratch=_variance_scratch, lazy=True)
def _variance(ctx: RunContext, ins: list[Any], a: Variance, own: tuple[bool, ...]) -> Tensor:
    key = lazy.variance_key(ins)
    if key is not None:
        return key
    ins, own = eager(ins, own)
    return K.variance_key(ins)


@dataclass(frozen=True)
class CountNonzero(Attrs):
    """How many entries of a block are non-zero (an int)."""


@op("count_nonzero", CountNonzero, scratch=0.25)
def _count_nonzero(ctx: RunContext, ins: list[Any], a: CountNonzero, own: tuple[bool, ...]) -> int:
    return K.count_nonzero(ins[0])


@dataclass(frozen=True)
class TopkReduce1Fraction(Attrs):
    """Top-k, pass 1 reduced with k a fraction of the non-zero keys (inputs: histograms, then counts): SCE."""

    fraction: float
    split: int                           # the first `split` inputs are the histograms


@op("topk_reduce1_fraction", TopkReduce1Fraction, scratch=0.0)
def _topk_reduce1_fraction(ctx: RunContext, ins: list[Any], a: TopkReduce1Fraction, own: tuple[bool, ...]) -> Any:
    return K.topk_reduce1_fraction(ins[:a.split], ins[a.split:], a.fraction)


@dataclass(frozen=True)
class KeyMask(Attrs):
    """The top-k mask of a block chosen by a key other than the tensor itself (inputs: key, top-k state): SCE."""

    block: int


@op("keymask", KeyMask, scratch=2.0)
def _keymask(ctx: RunContext, ins: list[Any], a: KeyMask, own: tuple[bool, ...]) -> Tensor:
    return K.topk_mask(ins[0], ins[1], a.block)


@dataclass(frozen=True)
class Keep(Attrs):
    """Zero the entries of input 0 where the mask (input 1) is False."""


@op("keep", Keep, scratch=0.25)
def _keep_op(ctx: RunContext, ins: list[Any], a: Keep, own: tuple[bool, ...]) -> Tensor:
    return _keep(ins[0], ins[1], own[0])


@dataclass(frozen=True)
class SceWeights(Attrs):
    """SCE's per-model weights from the l2 partials of the selected task vectors (n groups, model-major)."""

    n: int
    numel: int


@op("sce_weights", SceWeights, scratch=0.0)
def _sce_weights(ctx: RunContext, ins: list[Any], a: SceWeights, own: tuple[bool, ...]) -> Any:
    per = len(ins) // a.n
    return K.sce_weights([list(ins[i * per:(i + 1) * per]) for i in range(a.n)], a.numel)


@dataclass(frozen=True)
class SceCombine(Attrs):
    """base + the SCE mix of the n selected task vectors (inputs: base, d_1..d_n, weights, elected sign)."""

    n: int


@op("sce_combine", SceCombine, scratch=4.0)
def _sce_combine(ctx: RunContext, ins: list[Any], a: SceCombine, own: tuple[bool, ...]) -> Tensor:
    nonneg = ins[1 + a.n]
    if isinstance(nonneg, K.fused.Deferred):       # a deferred election, computed before anything is modified
        nonneg = K.fused.elect_nonneg([lazy.materialize(e) for e in nonneg.es], nonneg.consensus) \
            if any(lazy.is_lazy(e) for e in nonneg.es) else K.fused.resolve(nonneg)
    return K.sce_combine(ins[0], ins[1:1 + a.n], ins[2 + a.n], nonneg)


@dataclass(frozen=True)
class Nearswap(Attrs):
    """NearSwap: the other model's value where it is within t of the base, interpolated elsewhere."""

    t: float


@op("nearswap", Nearswap, scratch=3.0)
def _nearswap(ctx: RunContext, ins: list[Any], a: Nearswap, own: tuple[bool, ...]) -> Tensor:
    return K.nearswap(ins[0], ins[1], a.t)


@dataclass(frozen=True)
class FusionImportance(Attrs):
    """Arcee Fusion's importance of each entry of the other model against the base (inputs: x, base)."""


@op("fusion_importance", FusionImportance, scratch=6.0)
def _fusion_importance(ctx: RunContext, ins: list[Any], a: FusionImportance, own: tuple[bool, ...]) -> Tensor:
    return K.fusion_importance(ins[0], ins[1])


@dataclass(frozen=True)
class QuantilePass1(Attrs):
    """Order statistics, pass 1 over one block: a histogram of the high bits of the signed keys (CPU)."""


@op("quantile_pass1", QuantilePass1, scratch=5.0)
def _quantile_pass1(ctx: RunContext, ins: list[Any], a: QuantilePass1, own: tuple[bool, ...]) -> Tensor:
    return K.order_pass1(ins[0]).cpu()


@dataclass(frozen=True)
class FusionQuantiles1(Attrs):
    """Order statistics, pass 1 reduced: the buckets of Arcee Fusion's quantile ranks of `numel` keys."""

    numel: int


@op("fusion_quantiles1", FusionQuantiles1, scratch=0.0)
def _fusion_quantiles1(ctx: RunContext, ins: list[Any], a: FusionQuantiles1, own: tuple[bool, ...]) -> Any:
    return K.order_reduce1(ins, K.fusion_quantile_ranks(a.numel))


@dataclass(frozen=True)
class QuantilePass2(Attrs):
    """Order statistics, pass 2 over one block: the low bits inside the buckets (inputs: keys, pass-1 state)."""


@op("quantile_pass2", QuantilePass2, scratch=5.0)
def _quantile_pass2(ctx: RunContext, ins: list[Any], a: QuantilePass2, own: tuple[bool, ...]) -> Tensor:
    return K.order_pass2(ins[0], ins[1]).cpu()


@dataclass(frozen=True)
class QuantileReduce2(Attrs):
    """Order statistics, pass 2 reduced: the exact quantile values (inputs: state 1, histograms)."""


@op("quantile_reduce2", QuantileReduce2, scratch=0.0)
def _quantile_reduce2(ctx: RunContext, ins: list[Any], a: QuantileReduce2, own: tuple[bool, ...]) -> Any:
    return K.order_reduce2(ins[1:], ins[0])


@dataclass(frozen=True)
class Fusion(Attrs):
    """Arcee Fusion: the other model's changes whose importance reaches the threshold (x, base, importance, q)."""


@op("fusion", Fusion, scratch=3.0)
def _fusion(ctx: RunContext, ins: list[Any], a: Fusion, own: tuple[bool, ...]) -> Tensor:
    return K.fusion_apply(ins[0], ins[1], ins[2], ins[3])


@dataclass(frozen=True)
class RamCounts(Attrs):
    """RAM+: per-model counts of unique and overlapping entries of one block (inputs: d_1..d_n; CPU)."""

    epsilon: float


@op("ram_counts", RamCounts, scratch=3.0)
def _ram_counts(ctx: RunContext, ins: list[Any], a: RamCounts, own: tuple[bool, ...]) -> Tensor:
    return K.ram_counts(ins, a.epsilon).cpu()


@dataclass(frozen=True)
class RamplusLambdas(Attrs):
    """RAM+: each model's scale for its unique entries, from all blocks' counts."""

    r: float
    alpha: float
    epsilon: float


@op("ramplus_lambdas", RamplusLambdas, scratch=0.0)
def _ramplus_lambdas(ctx: RunContext, ins: list[Any], a: RamplusLambdas, own: tuple[bool, ...]) -> Any:
    return K.ramplus_lambdas(torch.stack(list(ins)).sum(dim=0), a.r, a.alpha, a.epsilon)


@dataclass(frozen=True)
class Ram(Attrs):
    """RAM: base + deltas contributed by one model whole, averaged where several contribute (RAM+ with lambdas)."""

    epsilon: float
    n: int
    plus: bool


@op("ram", Ram, scratch=5.0)
def _ram(ctx: RunContext, ins: list[Any], a: Ram, own: tuple[bool, ...]) -> Tensor:
    return K.ram_merge(ins[0], ins[1:1 + a.n], a.epsilon, ins[1 + a.n] if a.plus else None)
