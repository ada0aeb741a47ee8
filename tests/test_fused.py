"""The fused numba kernels (engine/fused.py) against the torch kernels they replace: torch.equal, bit for bit.

Data with many exact ties (values on a coarse grid), zeros of both signs, both signs, a tie exactly at the top-k
threshold split across blocks, and divisors that are exactly 0."""
from __future__ import annotations

import pytest
import torch

from lazymerge.engine import fused
from lazymerge.engine import kernels as K

pytestmark = pytest.mark.skipif(not fused.available(), reason="numba not installed (the 'fast' extra)")

N = 3 * 7919       # > MIN_NUMEL, not a multiple of any chunk count


def grid(seed: int, n: int = N, levels: int = 9) -> torch.Tensor:
    """float32 values on a coarse grid (many exact ties), with +0.0, -0.0 and both signs."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(-levels, levels + 1, (n,), generator=g).to(torch.float32) * 0.37
    x[torch.randint(0, n, (n // 20,), generator=g)] = -0.0
    return x


@pytest.fixture
def torch_only(monkeypatch):
    def run(fn, *args):
        monkeypatch.setenv("LAZYMERGE_FUSED", "0")
        try:
            return fn(*args)
        finally:
            monkeypatch.delenv("LAZYMERGE_FUSED")
    return run


@pytest.mark.parametrize("seed", [0, 1])
def test_topk_histograms_and_trim(seed: int, torch_only) -> None:
    d = grid(seed).reshape(3, -1)
    blocks = [d[:1].clone(), d[1:].clone()]
    for k in (1, 5, N // 3, N // 2 + 17, N - 1, N):
        h1 = [K.topk_pass1(b) for b in blocks]
        assert all(torch.equal(h, torch_only(K.topk_pass1, b)) for h, b in zip(h1, blocks))
        s1 = K.topk_reduce1(h1, k)
        h2 = [K.topk_pass2(b, s1) for b in blocks]
        assert all(torch.equal(h, torch_only(K.topk_pass2, b, s1)) for h, b in zip(h2, blocks))
        s2 = K.topk_reduce2(h2, s1)
        kept = 0
        for j, b in enumerate(blocks):
            ref = b * K.topk_mask(b, s2, j)
            got = K.topk_keep(b, s2, j)
            assert torch.equal(got, ref) and torch.equal(got.signbit(), ref.signbit())
            owned = b.clone()
            assert K.topk_keep(owned, s2, j, owned=True).data_ptr() == owned.data_ptr()
            assert torch.equal(owned.signbit(), ref.signbit()) and torch.equal(owned, ref)
            kept += int(K.topk_mask(b, s2, j).sum())
        assert kept == min(k, N)


@pytest.mark.parametrize("n", [1, 2, 3])
@pytest.mark.parametrize("consensus", ["sum", "count"])
def test_elect_and_combine(n: int, consensus: str, torch_only) -> None:
    es = [grid(10 + i) for i in range(n)]
    es[0][:50] = 0.0                                  # every model 0 there: a divisor of exactly 0
    for e in es[1:]:
        e[:50] = -0.0
    base = torch.randn(N, generator=torch.Generator().manual_seed(9))
    nonneg = K.elect_nonneg(es, consensus)
    assert torch.equal(nonneg, torch_only(K.elect_nonneg, es, consensus))
    weights = (0.3, 0.7, 1.1)[:n]
    for normalize in (True, False):
        for lam in (1.0, 0.7):
            ref = K.combine_elected([e.clone() for e in es], weights, nonneg, normalize)
            if lam != 1.0:
                ref.mul_(lam)
            ref = ref.add_(base)
            got = fused.combine_elected(es, weights, nonneg, normalize, lam, base, torch.empty_like(base))
            assert torch.equal(got, ref)
            # the election done inside the combine pass (what the `elect` task defers to), in place into base
            inplace = base.clone()
            got = fused.combine_elected(es, weights, fused.elect_later(consensus, es), normalize, lam, inplace, inplace)
            assert got.data_ptr() == inplace.data_ptr() and torch.equal(got, ref)
    assert torch.equal(fused.resolve(fused.elect_later(consensus, es)), nonneg)


def test_small_blocks_and_switch_stay_on_torch(monkeypatch) -> None:
    monkeypatch.setattr(fused, "MIN_NUMEL", 1 << 14)
    small = torch.ones(10)
    assert not fused.use(small) and fused.use(torch.ones(N))
    monkeypatch.setenv("LAZYMERGE_FUSED", "0")
    assert not fused.use(torch.ones(N))


def test_threads_from_cores_and_budget() -> None:
    """No fixed cap: one worker per core while the budget can feed them, kernel threads share the cores."""
    from lazymerge.engine.run import MIN_WORKER_BYTES, choose_threads
    assert choose_threads(None, cores=16) == (16, 1)
    assert choose_threads(768 << 20, cores=16) == (12, 1)            # 768 MiB feeds 12 workers of 64 MiB
    assert choose_threads(3 * MIN_WORKER_BYTES, cores=16) == (3, 5)
    assert choose_threads(1 << 20, cores=16) == (2, 8)               # at least 2: a read overlaps a kernel
    assert choose_threads(None, cores=1) == (2, 1)
    assert choose_threads(None, workers=1, cores=4) == (1, 4)        # --workers wins; threads fill the cores


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_all_finite_matches_isfinite(dtype) -> None:
    x = grid(3).to(dtype)
    assert fused.finite_checkable(x) and fused.all_finite(x)
    for bad in (float("nan"), float("inf"), float("-inf")):
        y = x.clone()
        y[N // 2] = bad
        assert not fused.all_finite(y) and not bool(torch.isfinite(y).all())
    y = x.clone()
    y[7] = torch.finfo(dtype).max                   # huge but finite
    assert fused.all_finite(y)


def test_widen_matches_torch_conversion_bit_for_bit() -> None:
    """Every one of the 65536 bfloat16 bit patterns (NaNs with payloads, infinities, subnormals, -0.0) widens to
    the float32 torch makes, and the finiteness count matches torch.isfinite."""
    patterns = torch.arange(-(1 << 15), 1 << 15, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    x = torch.cat([patterns, patterns.flip(0)]).reshape(2, -1)
    got, finite = fused.widen_checked(x)
    ref = x.float()
    assert got.shape == ref.shape and got.dtype == torch.float32
    assert torch.equal(got.view(torch.int32), ref.view(torch.int32))
    assert finite is False
    ok = x[:, :1000].clone()
    ok[~torch.isfinite(ok)] = 1.0
    assert fused.widen_checked(ok)[1] is True


def test_load_reads_bf16_as_stored_and_checks_it(tmp_path, monkeypatch) -> None:
    """The load op's stored path gives the same float32 block as the plain read, and still reports a NaN."""
    from safetensors.torch import save_file

    from lazymerge.engine import lazy, ops
    from lazymerge.engine.context import RunContext
    from lazymerge.io.checkpoint import Checkpoint

    w = grid(5).reshape(3, -1).to(torch.bfloat16)
    w[2, 11] = float("nan")
    save_file({"w": w}, str(tmp_path / "model.safetensors"))
    ckpt = Checkpoint.open(tmp_path)
    seen: list[tuple[str, str]] = []
    ctx = RunContext(sources={"m": ckpt}, writer=None, device=torch.device("cpu"))
    monkeypatch.setattr(ctx, "non_finite", lambda model, name: seen.append((model, name)))
    a = ops.Load("m", "w", (0, 3), w.numel() * 2)
    assert ops.readwrite._stays_stored(ctx, ckpt, a)
    x = lazy.materialize(ops.run_task(ctx, a, [], ()))          # read as stored, widened where it is used
    assert torch.equal(x.view(torch.int32), ckpt.read("w", (0, 3), torch.float32).view(torch.int32))
    assert seen == [("m", "w")]
