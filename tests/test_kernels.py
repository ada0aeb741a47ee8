"""Tests of the pure tensor kernels.

Two kinds of checks: values against a plain whole-tensor formula written here (independent of the kernels), and
bit-identity (``torch.equal``) of every blocked kernel across row blockings: whole tensor, 1-row blocks, uneven
blocks.
"""
from __future__ import annotations

import math

import pytest
import torch

import reference as oracle

from lazymerge.engine import kernels as K
from lazymerge.io.adapters import lora_rows

TOL = 1e-6


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=gen(seed), dtype=torch.float32)


def blockings(rows: int) -> list[list[tuple[int, int]]]:
    """Whole, one row per block, and an uneven split (sizes 3, 1, 5, 2, 3, 1, 5, ...)."""
    uneven, a, sizes = [], 0, [3, 1, 5, 2]
    while a < rows:
        b = min(rows, a + sizes[len(uneven) % len(sizes)])
        uneven.append((a, b))
        a = b
    return [[(0, rows)], [(r, r + 1) for r in range(rows)], uneven]


def blocked(fn, tensors: list[torch.Tensor], blocks: list[tuple[int, int]]) -> torch.Tensor:
    """Run a row-wise kernel block by block and glue the rows back."""
    return torch.cat([fn(*[t[a:b] for t in tensors]) for a, b in blocks])


def assert_block_invariant(fn, tensors: list[torch.Tensor]) -> torch.Tensor:
    outs = [blocked(fn, tensors, bl) for bl in blockings(tensors[0].shape[0])]
    for out in outs[1:]:
        assert torch.equal(out, outs[0])
    return outs[0]


# ----------------------------------------------------------------------------------------------------------------
# Element-wise
# ----------------------------------------------------------------------------------------------------------------


def test_delta_scale_weighted_sum():
    x, b, y = randn(9, 4, seed=1), randn(9, 4, seed=2), randn(9, 4, seed=3)
    assert torch.equal(K.delta(x, b), x - b)
    assert (K.scale(x, 0.3).double() - x.double() * 0.3).abs().max() < TOL
    out = assert_block_invariant(lambda p, q: K.weighted_sum([p, q], [0.7, -0.2]), [x, y])
    expect = x.double() * 0.7 + y.double() * -0.2
    assert (out.double() - expect).abs().max() < TOL
    with pytest.raises(ValueError):
        K.weighted_sum([x], [1.0, 2.0])


def test_elect_sign_and_combine_match_ties_formula():
    es = [randn(11, 5, seed=s) for s in range(3)]
    es[1][0, :3] = 0.0  # zero entries never agree with the elected sign
    weights = [0.5, 1.0, 0.8]
    # plain TIES formula on the stacked tensors
    stack = torch.stack(es).double()
    sign_ref = torch.where(stack.sum(0) >= 0, 1.0, -1.0)
    agree = torch.sign(stack) == sign_ref
    mixed_ref = (stack * agree).sum(0)
    div_ref = (torch.tensor(weights, dtype=torch.float64).view(3, 1, 1) * agree).sum(0)
    div_ref[div_ref == 0] = 1
    sign = assert_block_invariant(lambda *e: oracle.elect_sign(list(e)), es)
    assert torch.equal(sign.double(), sign_ref)
    assert torch.equal(oracle.elect_sign(es, dtype=torch.int8), sign_ref.to(torch.int8))
    mixed = assert_block_invariant(lambda *a: oracle.combine_block(list(a[:3]), weights, sign=a[3]), es + [sign])
    assert (mixed.double() - mixed_ref).abs().max() < TOL
    normed = assert_block_invariant(
        lambda *a: oracle.combine_block(list(a[:3]), weights, sign=a[3], normalize=True), es + [sign]
    )
    assert (normed.double() - mixed_ref / div_ref).abs().max() < TOL


def test_elect_sign_count_and_ties_to_plus():
    es = [
        torch.tensor([5.0, -1.0, 0.0, 1.0]),
        torch.tensor([-1.0, -1.0, 0.0, -1.0]),
        torch.tensor([-1.0, 2.0, 0.0, 0.0]),
    ]
    # sum:   3, 0, 0, 0            -> +1 +1 +1 +1
    # count: -1, -1, 0, 0          -> -1 -1 +1 +1
    assert oracle.elect_sign(es, "sum").tolist() == [1.0, 1.0, 1.0, 1.0]
    assert oracle.elect_sign(es, "count").tolist() == [-1.0, -1.0, 1.0, 1.0]
    with pytest.raises(ValueError):
        oracle.elect_sign(es, "majority")


def test_combine_without_sign():
    es = [randn(6, 3, seed=s) for s in range(2)]
    plain = oracle.combine_block(es, [0.25, 0.5])
    assert (plain.double() - (es[0].double() + es[1].double())).abs().max() < TOL
    normed = oracle.combine_block(es, [0.25, 0.5], normalize=True)
    assert (normed.double() - (es[0].double() + es[1].double()) / 0.75).abs().max() < TOL
    # a ~zero weight sum is replaced by 1
    assert torch.equal(oracle.combine_block(es, [1.0, -1.0], normalize=True), oracle.combine_block(es, [1.0, -1.0]))


def test_lincomb_global_and_rowwise():
    xs = [randn(7, 3, 2, seed=s) for s in range(3)]
    c = torch.tensor([0.3, -1.25, 2.0], dtype=torch.float64)
    out = assert_block_invariant(lambda *x: K.lincomb(list(x), c), xs)
    expect = 0.3 * xs[0].double() - 1.25 * xs[1].double() + 2.0 * xs[2].double()
    assert (out.double() - expect).abs().max() < TOL
    crow = torch.randn(7, 3, generator=gen(9), dtype=torch.float64)
    out = torch.cat([K.lincomb([x[a:b] for x in xs], crow[a:b]) for a, b in blockings(7)[2]])
    expect = sum(crow[:, i].view(7, 1, 1) * xs[i].double() for i in range(3))
    assert (out.double() - expect).abs().max() < TOL
    # a 1-d tensor is one row
    v = [randn(5, seed=s) for s in range(2)]
    out = K.lincomb(v, torch.tensor([[2.0, 3.0]], dtype=torch.float64))
    assert (out.double() - (2 * v[0].double() + 3 * v[1].double())).abs().max() < TOL
    with pytest.raises(ValueError):
        K.lincomb(xs, crow[:3])


# ----------------------------------------------------------------------------------------------------------------
# Randomness
# ----------------------------------------------------------------------------------------------------------------


def test_derive_seed():
    s = K.derive_seed(0, "model.layers.0.mlp", 1)
    assert s == K.derive_seed(0, "model.layers.0.mlp", 1)
    assert 0 <= s < 2**63
    others = {
        K.derive_seed(1, "model.layers.0.mlp", 1),
        K.derive_seed(0, "model.layers.0.mlp", 2),
        K.derive_seed(0, "model.layers.0.mlp", "1"),
        K.derive_seed(0, "model.layers.0.", "mlp", 1),
    }
    assert s not in others and len(others) == 4
    with pytest.raises(TypeError):
        K.derive_seed(0, 1.5)


@pytest.mark.parametrize(
    "shape, blocks",
    [
        ((10, 300_000), [(0, 10), (3, 7), (9, 10), (0, 1)]),  # row_numel > 2^20 / 4: groups of 3 rows
        ((2000, 3), [(0, 2000), (0, 1), (1999, 2000), (17, 1500)]),  # one group holds every row
        ((9, 2**21), [(0, 9), (4, 5), (2, 8)]),  # rows larger than a group: one row per group
        ((700_000, 2), [(0, 700_000), (524_287, 524_289), (1, 2)]),  # block straddling a group boundary
    ],
)
def test_uniform_rows_block_invariant(shape, blocks):
    whole = K.uniform_rows(42, shape, (0, shape[0]))
    assert whole.shape == shape and whole.dtype == torch.float32
    assert float(whole.min()) >= 0.0 and float(whole.max()) < 1.0
    for a, b in blocks:
        assert torch.equal(K.uniform_rows(42, shape, (a, b)), whole[a:b])
    assert not torch.equal(K.uniform_rows(43, shape, (0, 1)), whole[:1])


def test_uniform_rows_small_tensors():
    assert K.uniform_rows(1, (5,), (0, 1)).shape == (5,)
    assert K.uniform_rows(1, (), (0, 1)).shape == ()
    with pytest.raises(ValueError):
        K.uniform_rows(1, (5,), (0, 5))


def test_random_mask_and_dare_rescale():
    shape = (200, 500)
    d = randn(*shape, seed=4)
    u = K.uniform_rows(7, shape, (0, shape[0]))
    kept = oracle.random_mask(d, 0.3, u)
    assert torch.equal(kept, torch.where(u < 0.3, d, torch.zeros(())))
    frac = float((kept != 0).double().mean())
    assert abs(frac - 0.3) < 0.01  # 100k Bernoulli(0.3) draws: sd 0.0015
    assert torch.allclose(oracle.dare_rescale(kept, 0.3), kept / 0.3, rtol=1e-6, atol=0)
    assert oracle.random_mask(d, 1.0, u) is d and oracle.dare_rescale(d, 1.0) is d


# ----------------------------------------------------------------------------------------------------------------
# Top-k
# ----------------------------------------------------------------------------------------------------------------


def topk_blocked(d: torch.Tensor, k: int, blocks: list[tuple[int, int]]) -> torch.Tensor:
    s1 = K.topk_reduce1([K.topk_pass1(d[a:b]) for a, b in blocks], k)
    s2 = K.topk_reduce2([K.topk_pass2(d[a:b], s1) for a, b in blocks], s1)
    return torch.cat([K.topk_mask(d[a:b], s2, i) for i, (a, b) in enumerate(blocks)])


def all_blockings_agree(d: torch.Tensor, k: int) -> torch.Tensor:
    masks = [topk_blocked(d, k, bl) for bl in blockings(d.shape[0])]
    for m in masks[1:]:
        assert torch.equal(m, masks[0])
    return masks[0]


@pytest.mark.parametrize("k", [1, 17, 200, 399])
def test_topk_matches_torch_topk_without_ties(k):
    d = randn(20, 20, seed=5) * 3
    assert len(set(d.abs().flatten().tolist())) == d.numel()
    mask = all_blockings_agree(d, k)
    ref = torch.zeros(d.numel(), dtype=torch.bool)
    ref[torch.topk(d.abs().flatten(), k).indices] = True
    assert torch.equal(mask.flatten(), ref)


def test_topk_many_ties_exact_count_and_flat_index_order():
    d = torch.randint(-3, 4, (23, 7), generator=gen(6)).to(torch.float32) * 0.5  # heavy ties, +-0 included
    mags = d.abs().flatten()
    for k in [1, 30, 80, 150, 160]:
        mask = all_blockings_agree(d, k).flatten()
        assert int(mask.sum()) == k
        # the k-th largest magnitude: everything above it kept, ties kept in flat-index order
        kth = sorted(mags.tolist(), reverse=True)[k - 1]
        assert bool(mask[mags > kth].all()) and not bool(mask[mags < kth].any())
        tie_idx = torch.nonzero(mags == kth).flatten()
        n_above = int((mags > kth).sum())
        assert mask[tie_idx].tolist() == [i < k - n_above for i in range(len(tie_idx))]


def test_topk_edge_cases():
    d = randn(4, 5, seed=7)
    assert bool(all_blockings_agree(d, 20).all()) and bool(all_blockings_agree(d, 1000).all())
    zeros = torch.zeros(6, 3)
    mask = all_blockings_agree(zeros, 4).flatten()
    assert mask.tolist() == [True] * 4 + [False] * 14
    with pytest.raises(ValueError, match="k=0"):
        K.topk_reduce1([K.topk_pass1(d)], 0)
    assert oracle.magnitude_k(100, 0.25) == 25 and oracle.magnitude_k(100, 1.0) == 100
    with pytest.raises(ValueError):
        oracle.magnitude_k(100, 0.001)
    one_d = randn(50, seed=8)
    m = topk_blocked(one_d, 5, [(0, 50)])
    ref = torch.zeros(50, dtype=torch.bool)
    ref[torch.topk(one_d.abs(), 5).indices] = True
    assert torch.equal(m, ref)


# ----------------------------------------------------------------------------------------------------------------
# Breadcrumbs
# ----------------------------------------------------------------------------------------------------------------


def breadcrumbs_reference(d: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """methods.md, literally: ascending ranks [bot, n - top) survive."""
    n = d.numel()
    keep, top = int(density * n), int(gamma * n)
    bot = n - keep - top
    if bot < 0:
        top, bot = top + bot, 0
    order = sorted(range(n), key=lambda i: abs(d.flatten()[i].item()))
    mask = torch.zeros(n, dtype=torch.bool)
    mask[order[bot : n - top]] = True
    return mask.reshape(d.shape)


def outliers_mask(d_block: torch.Tensor, state_hi: dict, state_top: dict | None, block_index: int) -> torch.Tensor:
    """Breadcrumbs keep-mask as the engine's `trim_outliers` op forms it: in the top k_hi, not in the top k_top."""
    keep = K.topk_mask(d_block, state_hi, block_index)
    if state_top is not None:
        keep &= ~K.topk_mask(d_block, state_top, block_index)
    return keep


def breadcrumbs_blocked(d: torch.Tensor, density: float, gamma: float, blocks) -> torch.Tensor:
    k_hi, k_top = oracle.breadcrumbs_counts(d.numel(), density, gamma)

    def state(k):
        s1 = K.topk_reduce1([K.topk_pass1(d[a:b]) for a, b in blocks], k)
        return K.topk_reduce2([K.topk_pass2(d[a:b], s1) for a, b in blocks], s1)

    hi, top = state(k_hi), (state(k_top) if k_top else None)
    return torch.cat([outliers_mask(d[a:b], hi, top, i) for i, (a, b) in enumerate(blocks)])


@pytest.mark.parametrize("density, gamma", [(0.5, 0.1), (0.3, 0.0), (0.95, 0.2), (0.9, 0.01), (1.0, 0.1)])
def test_breadcrumbs_matches_rank_formula(density, gamma):
    d = randn(13, 9, seed=9)
    ref = breadcrumbs_reference(d, density, gamma) if density < 1 else torch.ones(13, 9, dtype=torch.bool)
    masks = [breadcrumbs_blocked(d, density, gamma, bl) for bl in blockings(13)]
    for m in masks:
        assert torch.equal(m, ref)


def test_breadcrumbs_counts():
    assert oracle.breadcrumbs_counts(1000, 0.5, 0.01) == (510, 10)
    assert oracle.breadcrumbs_counts(1000, 0.5, 0.0) == (500, 0)  # top == 0 keeps up to the largest
    assert oracle.breadcrumbs_counts(1000, 0.995, 0.01) == (1000, 5)  # bot < 0 -> fewer outliers removed
    with pytest.raises(ValueError):
        oracle.breadcrumbs_counts(10, 0.05, 0.01)


# ----------------------------------------------------------------------------------------------------------------
# DELLA
# ----------------------------------------------------------------------------------------------------------------


def della_reference(d: torch.Tensor, u: torch.Tensor, density: float, eps: float, rescale: bool) -> torch.Tensor:
    """Row by row in float64: rank = position in an ascending sort of |d| (ties by index), r = rank/(m-1)."""
    rows = d.reshape(1, -1) if d.dim() < 2 else d
    ur = u.reshape(rows.shape)
    out = torch.zeros(rows.shape, dtype=torch.float64)
    m = rows.shape[1]
    for i in range(rows.shape[0]):
        vals = rows[i].tolist()
        order = sorted(range(m), key=lambda j: (abs(vals[j]), j))
        for rank, j in enumerate(order):
            p = density - eps + 2 * eps * (rank / (m - 1) if m > 1 else 0.5)
            if ur[i, j].item() < p:
                out[i, j] = vals[j] / p if rescale else vals[j]
    return out.reshape(d.shape)


@pytest.mark.parametrize("shape", [(12, 10), (40,), (6, 1)])
@pytest.mark.parametrize("rescale", [True, False])
def test_della_matches_rank_formula(shape, rescale):
    d = randn(*shape, seed=10)
    if len(shape) == 2 and shape[1] > 1:
        d[3] = 0.25  # a constant row: ranks by index
    u = K.uniform_rows(3, shape, (0, 1 if len(shape) < 2 else shape[0]))
    if len(shape) < 2:
        out = K.rank_magnitude_sampling(d, u, 0.4, 0.15, rescale)
    else:
        out = assert_block_invariant(lambda x, v: K.rank_magnitude_sampling(x, v, 0.4, 0.15, rescale), [d, u])
    ref = della_reference(d, u, 0.4, 0.15, rescale)
    assert torch.equal(out != 0, ref != 0)
    assert (out.double() - ref).abs().max() < TOL


def test_della_ranks_along_dim1_for_3d():
    d = randn(3, 5, 4, seed=12)
    u = K.uniform_rows(4, (3, 5, 4), (0, 3))
    out = assert_block_invariant(lambda x, v: K.rank_magnitude_sampling(x, v, 0.5, 0.2, True), [d, u])
    # mergekit ranks along dim 1: the vectors d[i, :, c]
    def as_rows(t: torch.Tensor) -> torch.Tensor:
        return t.movedim(1, -1).reshape(-1, 5)

    ref = della_reference(as_rows(d), as_rows(u), 0.5, 0.2, True)
    assert (as_rows(out).double() - ref).abs().max() < TOL


def test_della_validation():
    d = randn(3, 4, seed=11)
    u = K.uniform_rows(0, (3, 4), (0, 3))
    with pytest.raises(ValueError, match="epsilon"):
        K.rank_magnitude_sampling(d, u, 0.1, 0.15)
    with pytest.raises(ValueError, match="epsilon"):
        K.rank_magnitude_sampling(d, u, 0.9, 0.1)
    assert K.rank_magnitude_sampling(d, u, 1.0, 0.15) is d


# ----------------------------------------------------------------------------------------------------------------
# Norms
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["l1", "l2", "linf"])
def test_norms_exact_across_blockings(kind):
    x = randn(17, 6, seed=12)
    flat = x.double().flatten()
    expect = {"l1": flat.abs().sum(), "l2": flat.norm(), "linf": flat.abs().max()}[kind].item()
    values = set()
    for bl in blockings(17):
        values.add(K.norm_from_partials([K.norm_partials(x[a:b], kind) for a, b in bl], kind))
    assert len(values) == 1
    assert abs(values.pop() - expect) <= 1e-12 * expect
    assert K.norm_partials(randn(5, seed=1), kind).shape == (1,)
    with pytest.raises(ValueError):
        K.norm_partials(x, "l3")


def test_norm_rescale_factor():
    assert oracle.norm_rescale_factor(2.0, 0.5) == 4.0
    assert oracle.norm_rescale_factor(2.0, 1e-9) == 1.0 and oracle.norm_rescale_factor(0.0, 1.0) == 1.0


# ----------------------------------------------------------------------------------------------------------------
# Gram statistics
# ----------------------------------------------------------------------------------------------------------------


def test_row_gram_single_row_bit_identical_on_wide_rows():
    # rows wide enough (> torch's 32768-element grain) for a one-output reduction to be split across threads
    xs = [randn(5, 70_001, seed=s) for s in range(2)]
    whole = K.row_gram(xs)
    for r in range(5):
        assert torch.equal(K.row_gram([x[r : r + 1] for x in xs]), whole[r : r + 1])
    assert torch.equal(K.row_gram([x[1:4] for x in xs]), whole[1:4])
    expect = (xs[0][2].double() * xs[1][2].double()).sum()
    assert abs(whole[2, 0, 1].item() - expect.item()) < 1e-9


def test_gram_total_exact_and_blocking_invariant():
    xs = [randn(19, 4, 3, seed=s) for s in range(3)]
    totals = [K.gram_total([K.row_gram([x[a:b] for x in xs]) for a, b in bl]) for bl in blockings(19)]
    for t in totals[1:]:
        assert torch.equal(t, totals[0])
    flat = torch.stack([x.double().flatten() for x in xs])
    for i in range(3):
        for j in range(3):
            exact = math.fsum((flat[i] * flat[j]).tolist())  # products of float32 are exact in float64
            assert abs(totals[0][i, j].item() - exact) <= 1e-14 * max(1.0, abs(exact))
    one_d = [randn(8, seed=s) for s in range(2)]
    assert K.row_gram(one_d).shape == (1, 2, 2)


def test_col_gram_exact_across_blockings():
    xs = [randn(21, 6, seed=s) * 10.0 ** (s - 1) for s in range(3)]
    xs[0][4, 2] = 3e-39  # a subnormal float32
    totals = [K.col_gram_total([K.col_gram([x[a:b] for x in xs]) for a, b in bl]) for bl in blockings(21)]
    for t in totals[1:]:
        assert torch.equal(t, totals[0])
    for c in range(6):
        for i in range(3):
            for j in range(3):
                exact = math.fsum((xs[i][:, c].double() * xs[j][:, c].double()).tolist())
                assert totals[0][c, i, j].item() == exact


# --- plain whole-tensor references for the interpolation methods -------------------------------------------------


def slerp_reference(t: float, v0: torch.Tensor, v1: torch.Tensor) -> torch.Tensor:
    a, b = v0.double().flatten(), v1.double().flatten()
    na, nb = a.norm(), b.norm()
    ua = a / na if na > 1e-8 else a
    ub = b / nb if nb > 1e-8 else b
    dot = (ua * ub).sum().item()
    if abs(dot) > 0.9995:
        out = (1 - t) * a + t * b
    else:
        th = math.acos(dot)
        out = math.sin((1 - t) * th) / math.sin(th) * a + math.sin(t * th) / math.sin(th) * b
    return out.reshape(v0.shape)


def global_combination(xs: list[torch.Tensor], solve) -> torch.Tensor:
    """Gram over blocks (uneven), solve once, apply per block; all blockings must agree."""
    outs = []
    for bl in blockings(xs[0].shape[0]):
        G = K.gram_total([K.row_gram([x[a:b] for x in xs]) for a, b in bl])
        c = solve(G)
        outs.append(torch.cat([K.lincomb([x[a:b] for x in xs], c) for a, b in bl]))
    for o in outs[1:]:
        assert torch.equal(o, outs[0])
    return outs[0]


@pytest.mark.parametrize("t", [0.0, 0.3, 0.75, 1.0])
def test_slerp_matches_direct_formula(t):
    v0, v1 = randn(9, 5, seed=13), randn(9, 5, seed=14)
    out = global_combination([v0, v1], lambda G: K.slerp_coeffs(G, t))
    assert (out.double() - slerp_reference(t, v0, v1)).abs().max() < TOL


def test_slerp_colinear_and_zero_inputs():
    v0 = randn(6, 4, seed=15)
    out = global_combination([v0, v0 * 2.0], lambda G: K.slerp_coeffs(G, 0.4))
    assert (out.double() - (0.6 * v0.double() + 0.4 * 2.0 * v0.double())).abs().max() < TOL
    z = torch.zeros(6, 4)
    out = global_combination([z, v0], lambda G: K.slerp_coeffs(G, 0.4))
    assert (out.double() - slerp_reference(0.4, z, v0)).abs().max() < TOL


def test_slerp_rowwise_coeffs():
    v0, v1 = randn(5, 7, seed=16), randn(5, 7, seed=17)
    c = K.slerp_coeffs(K.row_gram([v0, v1]), 0.6)
    assert c.shape == (5, 2)
    out = K.lincomb([v0, v1], c)
    for r in range(5):
        assert (out[r].double() - slerp_reference(0.6, v0[r], v1[r])).abs().max() < TOL


def nuslerp_reference(t: float, v0: torch.Tensor, v1: torch.Tensor) -> torch.Tensor:
    """Plain nuslerp of two vectors (mergekit's formula: clamp norms at 1e-7, lerp only when sin ~ 0)."""
    a, b = v0.double(), v1.double()
    ua, ub = a / max(a.norm().item(), 1e-7), b / max(b.norm().item(), 1e-7)
    th = math.acos(max(-1.0, min(1.0, (ua * ub).sum().item())))
    if abs(math.sin(th)) < 1e-8:
        return (1 - t) * a + t * b
    return (math.sin((1 - t) * th) * a + math.sin(t * th) * b) / math.sin(th)


def test_nuslerp_flatten_with_base():
    b, x0, x1 = randn(8, 6, seed=18), randn(8, 6, seed=19), randn(8, 6, seed=20)
    weights = [1.0, 3.0]  # t = 0.75
    d0, d1 = x0 - b, x1 - b
    out = global_combination([b, x0, x1], lambda G: K.with_base(K.nuslerp_coeffs(_delta_gram(G), weights)))
    expect = b.double() + nuslerp_reference(0.75, d0.flatten(), d1.flatten()).reshape(8, 6)
    assert (out.double() - expect).abs().max() < TOL
    assert K.nuslerp_t([1.0, -1.0]) == 0.5


def _delta_gram(G: torch.Tensor) -> torch.Tensor:
    """Gram matrix of [x_i - b] from the Gram matrix of [b, x_1, ...] (test helper, float64)."""
    return G[1:, 1:] - G[1:, :1] - G[:1, 1:] + G[0, 0]


def test_nuslerp_rows_and_columns():
    x0, x1 = randn(10, 4, seed=21), randn(10, 4, seed=22)
    weights = [2.0, 1.0]
    t = 1 / 3
    # flatten off, row_wise off: vectors along the last dim = rows of a 2-d tensor
    out = K.lincomb([x0, x1], K.nuslerp_coeffs(K.row_gram([x0, x1]), weights))
    for r in range(10):
        assert (out[r].double() - nuslerp_reference(t, x0[r], x1[r])).abs().max() < TOL
    # nuslerp_row_wise: vectors along dim 0 = columns, Gram reduced across row blocks
    outs = []
    for bl in blockings(10):
        G = K.col_gram_total([K.col_gram([x0[a:b], x1[a:b]]) for a, b in bl])
        c = K.nuslerp_coeffs(G, weights)
        outs.append(torch.cat([K.lincomb_cols([x0[a:b], x1[a:b]], c) for a, b in bl]))
    for o in outs[1:]:
        assert torch.equal(o, outs[0])
    for col in range(4):
        assert (outs[0][:, col].double() - nuslerp_reference(t, x0[:, col], x1[:, col])).abs().max() < TOL
    with pytest.raises(ValueError):
        K.col_gram([x0[0], x1[0]])


def multislerp_reference(xs: list[torch.Tensor], weights: list[float], eps: float = 1e-8) -> torch.Tensor:
    flat = torch.stack([x.double().flatten() for x in xs])
    w = torch.tensor(weights, dtype=torch.float64)
    w = w / w.sum()
    norms = flat.norm(dim=1, keepdim=True)
    units = flat / (norms + eps)
    mean = (units * w.view(-1, 1)).sum(0)
    mean = mean / mean.norm()
    tangents = units - (units * mean).sum(-1, keepdim=True) * mean
    tr = (tangents * w.view(-1, 1)).sum(0)
    tn = tr.norm() + eps
    res = mean * torch.cos(tn) + tr * (torch.sin(tn) / tn)
    return (res * (norms.squeeze(-1) * w).sum()).reshape(xs[0].shape)


def test_multislerp_matches_direct_formula():
    xs = [randn(7, 5, seed=s) + 0.5 for s in range(23, 26)]
    weights = [0.2, 0.5, 0.3]
    out = global_combination(xs, lambda G: K.multislerp_coeffs(G, weights))
    assert (out.double() - multislerp_reference(xs, weights)).abs().max() < TOL


def test_multislerp_antipodal():
    x = randn(4, 3, seed=26)
    two = K.lincomb([x, -x], K.multislerp_coeffs(K.gram_total([K.row_gram([x, -x])]), [1.0, 1.0]))
    assert two.abs().max() < TOL  # falls back to w0 x0 + w1 x1
    G3 = K.gram_total([K.row_gram([x, -x, x * 0])])
    with pytest.raises(ValueError):
        K.multislerp_coeffs(G3, [1.0, 1.0, 0.0])
    with pytest.raises(ValueError):
        K.multislerp_coeffs(G3, [1.0, 1.0])
    with pytest.raises(ValueError):
        K.karcher_coeffs(G3, [1.0, 1.0])


def karcher_reference(xs: list[torch.Tensor], max_iter: int = 10, tol: float = 1e-5) -> torch.Tensor:
    """Direct iterative Karcher mean on the flattened tensors (float64), equal weights."""
    n = len(xs)
    flat = [x.double().flatten() for x in xs]
    norms = [v.norm().item() for v in flat]
    valid = [i for i in range(n) if norms[i] > tol]
    a = 1.0 / len(valid)
    units = [flat[i] / norms[i] for i in valid]
    u = sum(a * v for v in units)
    u = u / u.norm()
    for _ in range(max_iter):
        T = torch.zeros_like(u)
        for v in units:
            dot = max(-1.0, min(1.0, (u * v).sum().item()))
            th = math.acos(dot)
            if th >= tol:
                T = T + a * th / math.sin(th) * (v - dot * u)
        tn = T.norm().item()
        if tn < tol:
            break
        u = math.cos(tn) * u + math.sin(tn) * T / tn
        u = u / u.norm()
    return (u * sum(nrm / n for nrm in norms)).reshape(xs[0].shape)


def test_karcher_matches_direct_iteration():
    xs = [randn(6, 8, seed=s) + 0.3 for s in range(27, 31)]
    out = global_combination(xs, lambda G: K.karcher_coeffs(G))
    assert (out.double() - karcher_reference(xs)).abs().max() < TOL
    # a zero input is dropped from the direction but counts (norm 0) in the scale
    xz = xs[:2] + [torch.zeros(6, 8)]
    out = global_combination(xz, lambda G: K.karcher_coeffs(G))
    assert (out.double() - karcher_reference(xz)).abs().max() < TOL
    assert torch.equal(K.karcher_coeffs(torch.eye(1, dtype=torch.float64) * 4), torch.ones(1, dtype=torch.float64))


def model_stock_reference(b: torch.Tensor, xs: list[torch.Tensor]) -> torch.Tensor:
    ds = [(x.double() - b.double()).flatten() for x in xs]
    n = len(xs)
    cosines = [
        max(-1.0, min(1.0, ((ds[i] * ds[j]).sum() / max((ds[i].norm() * ds[j].norm()).item(), 1e-6)).item()))
        for i in range(n)
        for j in range(i + 1, n)
    ]
    cos = sum(cosines) / len(cosines)
    t = n * cos / (1 + (n - 1) * cos)
    return t * sum(x.double() for x in xs) / n + (1 - t) * b.double()


def test_model_stock_global_and_filter_wise():
    b = randn(9, 6, seed=31)
    xs = [b + 0.1 * randn(9, 6, seed=32) + 0.05 * randn(9, 6, seed=s) for s in (33, 34, 35)]

    def solve(G):
        return K.model_stock_coeffs(K.model_stock_t(_delta_gram(G)), 3)

    out = global_combination([b] + xs, solve)
    assert (out.double() - model_stock_reference(b, xs)).abs().max() < TOL
    # filter_wise: per row
    t_rows = K.model_stock_t(_delta_gram_rows(K.row_gram([b] + xs)))
    out = K.lincomb([b] + xs, K.model_stock_coeffs(t_rows, 3))
    for r in range(9):
        ref = model_stock_reference(b[r], [x[r] for x in xs])
        assert (out[r].double() - ref).abs().max() < TOL
    with pytest.raises(ValueError):
        K.model_stock_t(torch.eye(1, dtype=torch.float64))


def _delta_gram_rows(G: torch.Tensor) -> torch.Tensor:
    return G[:, 1:, 1:] - G[:, 1:, :1] - G[:, :1, 1:] + G[:, :1, :1]


# ----------------------------------------------------------------------------------------------------------------
# LoRA
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fan_in_fan_out", [False, True])
def test_lora_rows(fan_in_fan_out):
    A, B = randn(4, 11, seed=36), randn(13, 4, seed=37)  # r=4, in=11, out=13
    full = 0.5 * (B.double() @ A.double())
    if fan_in_fan_out:
        full = full.t()
    rows = full.shape[0]
    outs = [torch.cat([lora_rows(A, B, 0.5, (a, b), fan_in_fan_out) for a, b in bl]) for bl in blockings(rows)]
    for o in outs[1:]:
        assert torch.equal(o, outs[0])
    assert outs[0].dtype == torch.float32
    assert (outs[0].double() - full).abs().max() < TOL


# -- the engine's lean, in-place variants give the same values as the plain kernels ---------------------------


@pytest.mark.parametrize("consensus", ["sum", "count"])
@pytest.mark.parametrize("normalize", [True, False])
def test_lean_election_matches_plain_kernels(consensus: str, normalize: bool) -> None:
    g = torch.Generator().manual_seed(3)
    for _ in range(10):
        es = [torch.randn(1000, generator=g) * (torch.rand(1000, generator=g) > 0.3) for _ in range(3)]
        w = [0.5, 0.7, 0.2]
        sign = oracle.elect_sign(es, consensus)
        nonneg = K.elect_nonneg(es, consensus)
        assert torch.equal(nonneg, sign > 0)
        ref = oracle.combine_block(es, w, sign=sign, normalize=normalize)
        got = K.combine_elected([e.clone() for e in es], w, nonneg, normalize, own=(True, False, True))
        assert torch.equal(got, ref)
        summed = K.sum_into([e.clone() for e in es], own0=True)
        assert torch.equal(summed, oracle.combine_block(es, w, normalize=False))
