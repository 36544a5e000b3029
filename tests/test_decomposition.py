"""TT-SVD, TT-rounding and their error measures, against numpy float64 references.

Tolerances: float64 results are compared at ~1e-10 relative (TT-SVD is a chain of backward
stable SVDs, so exact reconstructions are accurate to ~1e-14; 1e-10 leaves room for the
conditioning of the small test matrices). Error *bounds* (``<= eps``) are checked exactly, with
no slack, because the implementation keeps a rounding margin to make them hold as measured.
"""

import doctest
import itertools
import math
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import ttlayers.decomposition as decomposition
from ttlayers import TTLinear, max_ranks, tt_round, tt_svd, tt_to_dense
from ttlayers.decomposition import relative_error, tt_relative_error

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

# (in_modes, out_modes): d = 1..4, odd and unequal modes, modes of 1.
MODES = [
    ((6,), (5,)),
    ((3, 4), (2, 5)),
    ((4, 1), (1, 6)),
    ((2, 3, 2), (3, 1, 4)),
    ((2, 2, 3), (3, 2, 2)),
    ((2, 2, 2, 2), (2, 3, 1, 2)),
]


# --- independent numpy references ----------------------------------------------------------


def np_dense(cores):
    """The TT matrix in numpy: contract the chain over (m_1, n_1, ..., m_d, n_d), then permute."""
    g = [c.detach().cpu().double().numpy() for c in cores]
    d = len(g)
    acc = np.ones((1, 1))  # (everything so far, r)
    for core in g:
        r0, m, n, r1 = core.shape
        acc = (acc @ core.reshape(r0, m * n * r1)).reshape(-1, r1)
    in_modes = [c.shape[1] for c in g]
    out_modes = [c.shape[2] for c in g]
    t = acc.reshape([s for m, n in zip(in_modes, out_modes, strict=True) for s in (m, n)])
    t = t.transpose([2 * k + 1 for k in range(d)] + [2 * k for k in range(d)])
    return t.reshape(math.prod(out_modes), math.prod(in_modes))


def np_unfolding(w, in_modes, out_modes, k):
    """Bond-k unfolding of W: rows (j_1, i_1, ..., j_k, i_k), columns the rest."""
    d = len(in_modes)
    t = w.reshape(*out_modes, *in_modes).transpose([a for q in range(d) for a in (d + q, q)])
    rows = math.prod(m * n for m, n in zip(in_modes[:k], out_modes[:k], strict=True))
    return t.reshape(rows, -1)


def np_fold(unfolding, in_modes, out_modes):
    d = len(in_modes)
    t = unfolding.reshape([s for m, n in zip(in_modes, out_modes, strict=True) for s in (m, n)])
    t = t.transpose([2 * q + 1 for q in range(d)] + [2 * q for q in range(d)])
    return t.reshape(math.prod(out_modes), math.prod(in_modes))


def np_rel_error(w, approx):
    return np.linalg.norm(w - approx) / np.linalg.norm(w)


def random_tt(in_modes, out_modes, ranks, generator, dtype=torch.float64):
    return [
        torch.randn(ranks[k], m, n, ranks[k + 1], generator=generator, dtype=dtype)
        for k, (m, n) in enumerate(zip(in_modes, out_modes, strict=True))
    ]


def decaying_matrix(out_features, in_features, power, generator):
    """W = U diag(s) V^T with s_k = k^-power: slowly decaying for small power."""
    q1, _ = torch.linalg.qr(torch.randn(out_features, out_features, generator=generator).double())
    q2, _ = torch.linalg.qr(torch.randn(in_features, in_features, generator=generator).double())
    k = min(out_features, in_features)
    s = torch.arange(1, k + 1, dtype=torch.float64) ** -power
    return q1[:, :k] @ torch.diag(s) @ q2[:, :k].T


def ranks_of(cores):
    return (1, *(int(c.shape[3]) for c in cores))


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(0)


# --- TT-SVD ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("in_modes", "out_modes"), MODES)
def test_exact_at_full_rank(in_modes, out_modes, gen):
    w = torch.randn(math.prod(out_modes), math.prod(in_modes), generator=gen, dtype=torch.float64)
    cores = tt_svd(w, in_modes, out_modes)
    assert ranks_of(cores) == max_ranks(in_modes, out_modes)  # a random W has full TT ranks
    np.testing.assert_allclose(np_dense(cores), w.numpy(), rtol=0, atol=1e-12)


@pytest.mark.parametrize(("in_modes", "out_modes"), MODES)
def test_from_dense_layer_matches_dense_layer(in_modes, out_modes, gen):
    dense = nn.Linear(math.prod(in_modes), math.prod(out_modes), dtype=torch.float64)
    layer = TTLinear.from_dense(dense, in_modes=in_modes, out_modes=out_modes)
    x = torch.randn(7, dense.in_features, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(layer(x), dense(x), rtol=1e-10, atol=1e-12)
    assert layer.conversion_error is not None and layer.conversion_error < 1e-13


@pytest.mark.parametrize(
    ("in_modes", "out_modes", "ranks"),
    [
        ((3, 4), (2, 5), (1, 3, 1)),
        ((2, 3, 2), (3, 2, 4), (1, 2, 5, 1)),
        ((2, 2, 3, 2), (3, 2, 2, 2), (1, 4, 3, 2, 1)),
    ],
)
def test_recovers_known_ranks(in_modes, out_modes, ranks, gen):
    # Ranks below the caps, so the rank is a property of W, not of its shape.
    assert all(
        r < cap for r, cap in zip(ranks[1:-1], max_ranks(in_modes, out_modes)[1:-1], strict=True)
    )
    w = np_dense(random_tt(in_modes, out_modes, ranks, gen))
    cores = tt_svd(torch.from_numpy(w), in_modes, out_modes)
    assert ranks_of(cores) == ranks
    np.testing.assert_allclose(np_dense(cores), w, rtol=0, atol=1e-10 * np.abs(w).max())


@pytest.mark.parametrize("rank", [1, 2, 5, 9])
def test_two_cores_is_eckart_young(rank, gen):
    in_modes, out_modes = (3, 4), (5, 2)
    w = torch.randn(10, 12, generator=gen, dtype=torch.float64)
    cores = tt_svd(w, in_modes, out_modes, rank=rank)
    # Best rank-r approximation of the bond-1 unfolding, by numpy's SVD.
    a = np_unfolding(w.numpy(), in_modes, out_modes, 1)
    u, s, vt = np.linalg.svd(a, full_matrices=False)
    best = np_fold((u[:, :rank] * s[:rank]) @ vt[:rank], in_modes, out_modes)
    np.testing.assert_allclose(np_dense(cores), best, rtol=0, atol=1e-10)
    expected = np.sqrt(np.sum(s[rank:] ** 2)) / np.linalg.norm(s)
    assert relative_error(w, cores) == pytest.approx(expected, rel=1e-9, abs=1e-14)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("eps", [0.02, 0.1, 0.3, 0.6])
@pytest.mark.parametrize(
    ("in_modes", "out_modes"),
    [((4, 6), (6, 4)), ((2, 3, 4), (4, 3, 2)), ((2, 3, 2, 2), (2, 2, 3, 2))],
)
def test_eps_bound_slow_decay(in_modes, out_modes, eps, dtype, gen):
    w = decaying_matrix(math.prod(out_modes), math.prod(in_modes), 0.3, gen).to(dtype)
    cores = tt_svd(w, in_modes, out_modes, eps=eps)
    assert np_rel_error(w.double().numpy(), np_dense(cores)) <= eps
    # Not vacuous: the ranks actually dropped for the loosest bound.
    if eps == 0.6:
        assert sum(ranks_of(cores)) < sum(max_ranks(in_modes, out_modes))


@pytest.mark.parametrize("eps", [0.05, 0.2, 0.5])
def test_eps_rank_is_the_smallest_within_budget_for_two_cores(eps, gen):
    in_modes, out_modes = (4, 5), (5, 4)
    w = decaying_matrix(20, 20, 0.5, gen)
    cores = tt_svd(w, in_modes, out_modes, eps=eps)
    s = np.linalg.svd(np_unfolding(w.numpy(), in_modes, out_modes, 1), compute_uv=False)
    tails = np.sqrt(np.cumsum((s**2)[::-1])[::-1]) / np.linalg.norm(s)
    smallest = int(np.argmax(tails <= eps)) if (tails <= eps).any() else len(s)
    assert ranks_of(cores)[1] == smallest


@pytest.mark.parametrize(("in_modes", "out_modes"), [((4, 6), (6, 4)), ((2, 3, 4), (4, 3, 2))])
def test_error_falls_monotonically_with_rank(in_modes, out_modes, gen):
    w = decaying_matrix(math.prod(out_modes), math.prod(in_modes), 0.7, gen)
    errors = [
        np_rel_error(w.numpy(), np_dense(tt_svd(w, in_modes, out_modes, rank=r)))
        for r in range(1, max(max_ranks(in_modes, out_modes)) + 1)
    ]
    assert all(b <= a + 1e-12 for a, b in itertools.pairwise(errors)), errors
    assert errors[0] > 0.1 and errors[-1] < 1e-12


def test_rank_and_eps_together_smaller_wins(gen):
    w = decaying_matrix(24, 24, 0.5, gen)
    by_eps = ranks_of(tt_svd(w, (4, 6), (6, 4), eps=0.1))
    by_both = ranks_of(tt_svd(w, (4, 6), (6, 4), eps=0.1, rank=3))
    assert by_eps[1] > 3 and by_both == (1, 3, 1)
    loose = ranks_of(tt_svd(w, (4, 6), (6, 4), eps=0.9, rank=20))
    assert loose[1] < 20


def test_rank_sequence_and_clipping(gen):
    w = torch.randn(24, 24, generator=gen, dtype=torch.float64)
    assert ranks_of(tt_svd(w, (2, 3, 4), (4, 3, 2), rank=[3, 5])) == (1, 3, 5, 1)
    # Caps (1, 8, 8, 1): an int above them is clipped silently, a sequence with a warning.
    assert ranks_of(tt_svd(w, (2, 3, 4), (4, 3, 2), rank=1000)) == (1, 8, 8, 1)
    with pytest.warns(UserWarning, match="clipped"):
        cores = tt_svd(w, (2, 3, 4), (4, 3, 2), rank=[20, 3])
    assert ranks_of(cores) == (1, 8, 3, 1)


def test_rank_cap_keeps_requested_rank_for_low_rank_source(gen):
    # Fine-tuning capacity: rank=4 gives rank 4 even when W itself has TT rank 1 ...
    w = np_dense(random_tt((2, 3, 4), (4, 3, 2), (1, 1, 1, 1), gen))
    cores = tt_svd(torch.from_numpy(w), (2, 3, 4), (4, 3, 2), rank=4)
    assert ranks_of(cores) == (1, 4, 4, 1)
    np.testing.assert_allclose(np_dense(cores), w, rtol=0, atol=1e-12 * np.abs(w).max())
    # ... while the exact and eps modes find rank 1.
    assert ranks_of(tt_svd(torch.from_numpy(w), (2, 3, 4), (4, 3, 2))) == (1, 1, 1, 1)
    assert ranks_of(tt_svd(torch.from_numpy(w), (2, 3, 4), (4, 3, 2), eps=0.01)) == (1, 1, 1, 1)


@pytest.mark.parametrize("kwargs", [{}, {"eps": 0.1}, {"rank": 3}])
def test_zero_matrix(kwargs):
    w = torch.zeros(12, 12)
    cores = tt_svd(w, (2, 2, 3), (3, 2, 2), **kwargs)
    assert all(torch.isfinite(c).all() for c in cores)
    assert torch.count_nonzero(tt_to_dense(cores)) == 0
    if "rank" not in kwargs:
        assert ranks_of(cores) == (1, 1, 1, 1)
    assert relative_error(w, cores) == 0.0
    assert tt_relative_error(cores, cores) == 0.0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_source(dtype, gen):
    w = decaying_matrix(24, 24, 0.5, gen)
    cores = tt_svd(w.to(dtype), (4, 6), (6, 4), eps=0.2)
    assert all(c.dtype == dtype for c in cores)
    # The bound holds in float32; casting the cores back adds ~sqrt(d) units of `dtype`.
    slack = 4 * torch.finfo(dtype).eps
    assert np_rel_error(w.numpy(), np_dense(cores)) <= 0.2 + slack
    layer = TTLinear.from_dense(nn.Linear(24, 24, dtype=dtype), rank=4)
    assert layer.cores[0].dtype == dtype and layer.bias is not None and layer.bias.dtype == dtype


def test_float64_stays_float64(gen):
    w = torch.randn(6, 6, generator=gen, dtype=torch.float64)
    assert all(c.dtype == torch.float64 for c in tt_svd(w, (2, 3), (3, 2), rank=2))


@pytest.mark.parametrize(
    ("matrix", "kwargs", "error", "match"),
    [
        (torch.full((6, 6), math.nan), {}, ValueError, "matrix holds NaN or Inf"),
        (torch.eye(6).index_fill(0, torch.tensor([2]), math.inf), {}, ValueError, "matrix"),
        (torch.eye(6), {"eps": 0.0}, ValueError, "eps must be"),
        (torch.eye(6), {"eps": 1.0}, ValueError, "eps must be"),
        (torch.eye(6), {"eps": -0.1}, ValueError, "eps must be"),
        (torch.eye(6), {"eps": math.nan}, ValueError, "eps must be"),
        (torch.eye(6), {"eps": "0.1"}, TypeError, "eps"),
        (torch.eye(6), {"eps": True}, TypeError, "eps"),
        (torch.eye(6), {"rank": 0}, ValueError, "rank must be a positive"),
        (torch.eye(6), {"rank": -2}, ValueError, "rank must be a positive"),
        (torch.eye(6), {"rank": [2, 2]}, ValueError, "inner bond ranks"),
        (torch.eye(6), {"rank": 2.5}, TypeError, "rank"),
        (np.eye(6), {}, TypeError, "matrix must be a tensor"),
        (torch.ones(6, 6, 1), {}, ValueError, "2-D"),
        (torch.ones(6, 6, dtype=torch.int64), {}, TypeError, "floating-point"),
        (torch.eye(6), {"in_modes": (2, 2)}, ValueError, "in_modes must multiply"),
        (torch.eye(6), {"out_modes": (3, 3)}, ValueError, "out_modes must multiply"),
        (torch.eye(6), {"in_modes": (6,)}, ValueError, "same length"),
    ],
)
def test_tt_svd_bad_input(matrix, kwargs, error, match):
    modes = {"in_modes": (2, 3), "out_modes": (3, 2)}
    modes.update({k: kwargs.pop(k) for k in ("in_modes", "out_modes") if k in kwargs})
    with pytest.raises(error, match=match):
        tt_svd(matrix, modes["in_modes"], modes["out_modes"], **kwargs)


@pytest.mark.parametrize(
    ("source", "error", "match"),
    [
        ("weight", TypeError, "nn.Linear or a 2-D"),
        (torch.ones(4, 4, 4), TypeError, "3-D"),
        (nn.Conv1d(2, 2, 1), TypeError, "Conv1d"),
    ],
)
def test_from_dense_bad_source(source, error, match):
    with pytest.raises(error, match=match):
        TTLinear.from_dense(source)


def test_from_dense_nan_weight_named():
    linear = nn.Linear(8, 8)
    with torch.no_grad():
        linear.weight[3, 1] = math.nan
    with pytest.raises(ValueError, match=r"source\.weight holds NaN"):
        TTLinear.from_dense(linear, rank=2)
    with pytest.raises(ValueError, match="source holds NaN"):  # the caller's name, not "matrix"
        TTLinear.from_dense(linear.weight, rank=2)


def test_from_dense_nan_or_inf_bias_named_as_with_calibration():
    # The data-aware path refused a NaN bias and plain TT-SVD copied it into the new layer.
    for bad in (math.nan, math.inf):
        linear = nn.Linear(8, 8)
        with torch.no_grad():
            linear.bias[3] = bad
        with pytest.raises(ValueError, match=r"source\.bias holds NaN or Inf"):
            TTLinear.from_dense(linear, rank=2)


def test_from_dense_carries_bias_dtype_and_is_trainable(gen):
    dense = nn.Linear(12, 10, dtype=torch.float64)
    layer = TTLinear.from_dense(dense, 3, in_modes=(3, 4), out_modes=(2, 5))
    assert layer.ranks == (1, 3, 1) and layer.cores[0].dtype == torch.float64
    assert layer.bias is not None and torch.equal(layer.bias, dense.bias)
    assert layer.bias is not dense.bias
    expected = np_rel_error(dense.weight.detach().numpy(), np_dense(layer.cores))
    assert layer.conversion_error == pytest.approx(expected, rel=1e-9)
    # Fine-tunable: gradients reach every core.
    layer(torch.randn(5, 12, generator=gen, dtype=torch.float64)).square().sum().backward()
    assert all(
        c.requires_grad and c.grad is not None and c.grad.abs().sum() > 0 for c in layer.cores
    )


def test_from_dense_tensor_source_has_no_bias(gen):
    w = torch.randn(10, 12, generator=gen)
    layer = TTLinear.from_dense(w, eps=0.5, num_cores=2)
    assert layer.bias is None and layer.num_cores == 2
    assert layer.conversion_error is not None and 0 < layer.conversion_error <= 0.5


def test_to_linear_round_trip(gen):
    dense = nn.Linear(12, 10, dtype=torch.float64)
    back = TTLinear.from_dense(dense, in_modes=(3, 4), out_modes=(2, 5)).to_linear()
    assert isinstance(back, nn.Linear) and back.weight.dtype == torch.float64
    torch.testing.assert_close(back.weight, dense.weight, rtol=0, atol=1e-13)
    torch.testing.assert_close(back.bias, dense.bias, rtol=0, atol=0)
    layer = TTLinear.from_dense(dense, rank=2, in_modes=(3, 4), out_modes=(2, 5))
    x = torch.randn(4, 12, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(layer.to_linear()(x), layer(x), rtol=1e-12, atol=1e-12)


# --- TT-rounding ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("in_modes", "out_modes", "rank"),
    [((4, 6), (6, 4), 4), ((2, 3, 4), (4, 3, 2), 3), ((2, 3, 2, 2), (2, 2, 3, 2), 4)],
)
def test_round_matches_tt_svd_of_dense(in_modes, out_modes, rank, gen):
    # A full-rank TT of a decaying matrix, rounded, against TT-SVD of the same dense matrix.
    # An exact TT's rounding truncates the same unfoldings' SVDs as TT-SVD does, so the two
    # results are one matrix in exact arithmetic (distinct singular values at each cut); in
    # float64 they differ by rounding, ~1e-15 (1e-10 leaves room for conditioning).
    w = decaying_matrix(math.prod(out_modes), math.prod(in_modes), 0.7, gen)
    full = tt_svd(w, in_modes, out_modes)
    rounded = tt_round(full, rank=rank)
    direct = tt_svd(w, in_modes, out_modes, rank=rank)
    assert ranks_of(rounded) == ranks_of(direct)
    np.testing.assert_allclose(np_dense(rounded), np_dense(direct), rtol=0, atol=1e-10)


def test_round_removes_redundant_rank_exactly(gen):
    # A + A written with doubled ranks: rounding with neither argument halves them back.
    in_modes, out_modes, ranks = (2, 3, 2), (3, 2, 2), (1, 2, 3, 1)
    a = random_tt(in_modes, out_modes, ranks, gen)
    doubled = decomposition._tt_difference(a, [-c if k == 0 else c for k, c in enumerate(a)])
    assert ranks_of(doubled) == (1, 4, 6, 1)
    rounded = tt_round(doubled)
    assert ranks_of(rounded) == ranks
    np.testing.assert_allclose(np_dense(rounded), 2 * np_dense(a), rtol=0, atol=1e-11)


def test_round_with_a_rank_cap_keeps_zero_directions_up_to_the_cap(gen):
    # As tt_svd does (test_rank_cap_keeps_requested_rank_for_low_rank_source): a cap asks for
    # that rank, so a TT that needs less is padded with zero directions, not cut below it;
    # the matrix is unchanged.
    in_modes, out_modes = (2, 3, 2), (3, 2, 2)
    a = random_tt(in_modes, out_modes, (1, 2, 2, 1), gen)
    zero = [torch.zeros_like(core) for core in a]
    padded = decomposition._tt_difference(a, zero)  # ranks (1, 4, 4, 1), the matrix of a
    rounded = tt_round(padded, rank=3)
    assert ranks_of(rounded) == (1, 3, 3, 1)
    np.testing.assert_allclose(np_dense(rounded), np_dense(a), rtol=0, atol=1e-11)
    # With eps, or with neither, the redundant rank goes.
    assert ranks_of(tt_round(padded)) == (1, 2, 2, 1)


def test_round_exact_at_tiny_eps(gen):
    a = random_tt((2, 3, 2), (3, 2, 2), (1, 3, 4, 1), gen)
    rounded = tt_round(a, eps=1e-10)
    assert ranks_of(rounded) == (1, 3, 4, 1)
    np.testing.assert_allclose(np_dense(rounded), np_dense(a), rtol=0, atol=1e-10)


@pytest.mark.parametrize("eps", [0.05, 0.2, 0.5])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_round_eps_bound(eps, dtype, gen):
    a = random_tt((2, 3, 2, 2), (2, 2, 3, 2), (1, 4, 9, 4, 1), gen, dtype)
    rounded = tt_round(a, eps=eps)
    assert all(c.dtype == dtype for c in rounded)
    assert np_rel_error(np_dense(a), np_dense(rounded)) <= eps
    assert all(r <= r0 for r, r0 in zip(ranks_of(rounded), ranks_of(a), strict=True))


def test_round_clips_overlarge_ranks_to_feasible(gen):
    # Ranks (1, 9, 1) for modes whose bond cap is 6: plain rounding brings them to the cap.
    a = random_tt((2, 3), (3, 2), (1, 9, 1), gen)
    rounded = tt_round(a)
    assert ranks_of(rounded) == max_ranks((2, 3), (3, 2))
    np.testing.assert_allclose(np_dense(rounded), np_dense(a), rtol=0, atol=1e-11)


def test_round_and_tt_error_never_form_dense(monkeypatch, gen):
    def forbidden(*args, **kwargs):
        raise AssertionError("formed the dense matrix")

    monkeypatch.setattr(decomposition, "tt_to_dense", forbidden)
    a = random_tt((2, 3, 2), (3, 2, 2), (1, 3, 4, 1), gen)
    rounded = tt_round(a, rank=2)
    assert tt_relative_error(a, rounded) > 0


def test_layer_round(gen):
    dense = nn.Linear(24, 24, dtype=torch.float64)
    layer = TTLinear.from_dense(dense, in_modes=(2, 3, 4), out_modes=(4, 3, 2))
    smaller = layer.round(3)
    assert smaller is not layer and smaller.ranks == (1, 3, 3, 1) and layer.ranks == (1, 8, 8, 1)
    assert smaller.bias is not None and torch.equal(smaller.bias, dense.bias)
    expected = np_rel_error(np_dense(layer.cores), np_dense(smaller.cores))
    assert smaller.conversion_error == pytest.approx(expected, rel=1e-8)
    assert layer.round(eps=0.3).conversion_error <= 0.3


def test_round_bad_input(gen):
    a = random_tt((2, 3), (3, 2), (1, 2, 1), gen)
    with pytest.raises(ValueError, match="eps must be"):
        tt_round(a, eps=1.5)
    with pytest.raises(ValueError, match="rank must be a positive"):
        tt_round(a, rank=0)
    with pytest.raises(ValueError, match=r"cores\[1\] holds NaN"):
        tt_round([a[0], torch.full_like(a[1], math.nan)])
    with pytest.raises(ValueError, match="do not chain"):
        tt_round([a[0], a[0]])
    with pytest.raises(TypeError, match="sequence"):
        tt_round(a[0])
    # The same error as tt_to_dense and TTLinear.from_cores give (a ValueError before).
    with pytest.raises(TypeError, match=r"one dtype and device.*cores\[1\] torch.float32"):
        tt_round([a[0], a[1].float()])
    # The messages name the argument: tt_relative_error's first one is "reference".
    with pytest.raises(ValueError, match=r"reference\[1\] must be 4-D"):
        tt_relative_error([a[0], a[1][0]], a)
    with pytest.raises(ValueError, match=r"reference\[0\] and reference\[1\] do not chain"):
        tt_relative_error([a[0], a[0]], a)
    # A chain with a bond of rank 0 (the zero matrix) came back with rank-0 cores.
    with pytest.raises(ValueError, match=r"cores\[0\] has a size of 0"):
        tt_round([a[0][..., :0], a[1][:0]])


def test_round_and_tt_to_dense_take_a_layers_parameter_list():
    # layer.cores is an nn.ParameterList, not a Sequence: it was refused by tt_round.
    layer = TTLinear(12, 12, 3, in_modes=(3, 4), out_modes=(4, 3), dtype=torch.float64)
    rounded = tt_round(layer.cores, rank=2)
    reference = tt_round([core.detach() for core in layer.cores], rank=2)
    for got, want in zip(rounded, reference, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(tt_to_dense(layer.cores), layer.to_dense(), rtol=0, atol=0)


@pytest.mark.parametrize(
    ("cores", "kind", "match"),
    [
        (None, TypeError, "sequence of 4-D tensors.*got NoneType"),
        ({torch.ones(1, 2, 2, 1)}, TypeError, "in chain order; got set"),
        (torch.ones(1, 2, 3, 1), TypeError, r"got one tensor of shape \(1, 2, 3, 1\)"),
        (torch.ones(2, 1, 2, 2, 1), TypeError, r"got one tensor of shape \(2, 1, 2, 2, 1\)"),
        ([torch.ones(1, 2, 2, 1, dtype=torch.bool)], TypeError, r"cores\[0\] .*torch.bool"),
        ([torch.ones(1, 2, 2, 1, dtype=torch.int64)], TypeError, r"cores\[0\] .*torch.int64"),
        ([torch.ones(1, 2, 2, 1, dtype=torch.complex64)], TypeError, "complex64"),
    ],
)
def test_tt_to_dense_names_what_is_wrong_with_the_cores(cores, kind, match):
    # Before: len() of None, a stacked tensor taken core by core, mm on bools, and an
    # integer (or complex) matrix where every other function refuses such cores.
    with pytest.raises(kind, match=match):
        tt_to_dense(cores)


def test_exact_mode_keeps_full_rank_for_float64_weights_near_overflow(gen):
    # Found by a review (helper 88): the zero cut s[0] * max(rows, cols) * eps overflowed to
    # inf for entries near 1e306, so every singular value counted as zero and the exact mode
    # returned rank 1 (error 0.93); ten times larger, the cores held Inf and the reported
    # error was NaN. A random 32 x 32 matrix has full rank 32 at bond 1 of (4, 8) x (8, 4).
    # Reference: numpy float64 on the matrix divided back by the scale (exact for a power of
    # ten up to one rounding); 1e-13 is a few hundred units of float64 roundoff.
    w = torch.randn(32, 32, generator=gen, dtype=torch.float64)
    for scale in (1e306, 1e307):
        cores = tt_svd(w * scale, (4, 8), (8, 4))
        assert ranks_of(cores) == (1, 32, 1)
        assert np_rel_error(w.numpy(), np_dense(cores) / scale) <= 1e-13
        layer = TTLinear.from_dense(w * scale, in_modes=(4, 8), out_modes=(8, 4))
        assert layer.conversion_error is not None and layer.conversion_error <= 1e-13


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("in_modes", "out_modes"), [((4, 8), (8, 4)), ((4, 2, 4), (2, 4, 4))])
def test_finite_weights_whose_norm_passes_the_dtypes_largest_value(dtype, in_modes, out_modes):
    # Found by a review (helper 88): entries up to 3e38 are finite in float32 and bfloat16,
    # but the norm of a 32 x 32 matrix of them is not; the SVDs gave Inf singular values:
    # Inf cores from tt_svd, a "cores[1] holds NaN or Inf" error from from_dense (which the
    # user never passed cores to), or LAPACK's "failed to converge". Now the weight is
    # decomposed divided by its largest entry. The exact mode at full rank reproduces W to
    # the working float32 precision (1e-5 relative: ~100 units of roundoff over three
    # SVDs), rounded once more to the result dtype for bfloat16 (2**-8 per entry, so 1e-2).
    torch.manual_seed(0)
    w = (torch.randn(32, 32, dtype=torch.float64) * 1e38).to(dtype)
    cores = tt_svd(w, in_modes, out_modes)
    assert all(bool(torch.isfinite(core).all()) for core in cores)
    tolerance = 1e-5 if dtype == torch.float32 else 1e-2
    w64 = w.double().numpy() / 1e38
    assert np_rel_error(w64, np_dense(cores) / 1e38) <= tolerance
    layer = TTLinear.from_dense(w, in_modes=in_modes, out_modes=out_modes)
    assert layer.conversion_error is not None and layer.conversion_error <= tolerance


@pytest.mark.parametrize("eps", [1e-2, 0.3])
def test_eps_ranks_and_errors_of_a_weight_whose_norm_passes_float64s_range(eps):
    # Found by a review (helper 89): entries near 1e307 are finite, but the Frobenius norm of a
    # 64 x 48 matrix of them (5.5e308) is not. The bond tolerance eps * ||W|| / sqrt(d - 1)
    # was inf, so eps kept rank 1 (true error 0.965), and relative_error reported 0.0 or
    # NaN. Reference: the same matrix at scale 1, whose ranks and relative errors the scaled
    # one must reproduce (relative errors are scale-free: equal to 1e-9 relative, the
    # rounding of a division by a power of ten). tt_round of the scaled cores, likewise.
    torch.manual_seed(0)
    w = torch.randn(64, 48, dtype=torch.float64)
    reference = tt_svd(w, (6, 8), (8, 8), eps=eps)
    scaled = tt_svd(w * 1e307, (6, 8), (8, 8), eps=eps)
    assert ranks_of(scaled) == ranks_of(reference)
    error = relative_error(w * 1e307, scaled)
    assert error == pytest.approx(relative_error(w, reference), rel=1e-9, abs=1e-13)
    assert error <= eps
    exact = tt_svd(w * 1e307, (6, 8), (8, 8))
    rounded = tt_round(exact, eps=eps)
    assert ranks_of(rounded) == ranks_of(reference)
    assert relative_error(w * 1e307, rounded) <= eps
    # The TT-to-TT measure too (it gave 0.0): the same as at scale 1.
    expected = tt_relative_error(tt_svd(w, (6, 8), (8, 8)), reference)
    assert tt_relative_error(exact, scaled) == pytest.approx(expected, rel=1e-9, abs=1e-13)


def test_rounding_cores_whose_product_passes_float32s_range():
    # Found by a review (helper 89): from_dense now takes a float32 weight of entries near
    # 3e38, but the layer's round() then failed in LAPACK ("svd failed to converge"): the QR
    # sweep gathered the whole norm, 9.5e39, into the first core. tt_round now rounds such
    # cores divided by their largest entries, as tt_svd does. Reference: the same weight at
    # scale 1 (ranks equal; errors equal to float32 rounding, 1e-4 relative of an error of
    # ~0.2, measured in float64).
    torch.manual_seed(0)
    w = torch.empty(64, 48).uniform_(-1, 1)
    big = (w.double() * 3e38).float()
    layer = TTLinear.from_dense(big, in_modes=(2, 3, 8), out_modes=(4, 4, 4), eps=1e-2)
    rounded = layer.round(eps=0.3)
    unit = TTLinear.from_dense(w, in_modes=(2, 3, 8), out_modes=(4, 4, 4), eps=1e-2).round(eps=0.3)
    assert rounded.ranks == unit.ranks
    assert all(bool(torch.isfinite(core).all()) for core in rounded.cores)
    expected = np_rel_error(w.double().numpy(), np_dense(unit.cores))
    assert np_rel_error(big.double().numpy() / 3e38, np_dense(rounded.cores) / 3e38) == (
        pytest.approx(expected, rel=1e-4)
    )


def test_rounding_and_comparing_cores_at_the_ends_of_their_dtypes_range():
    # Found by reviews (helpers 90 and 91), each case against the same TT at a normal scale:
    # - float32 cores of entries near 1.7e38: tt_round gave the rounded TT's whole norm back
    #   to its last core, which overflowed (Inf cores); now it is spread over the cores;
    # - cores of 1e-37, 1 and 1e37, whose product is normal but whose QR sweep carried 1e37
    #   into the middle core: tt_round failed in LAPACK, tt_relative_error gave NaN;
    # - a finite float64 core whose Frobenius norm is inf: tt_relative_error gave NaN;
    # - a zero core beside cores of 1e30: tt_round failed in LAPACK;
    # - cores 1e30 times the reference's: tt_relative_error gave NaN, not about 1e90.
    # Float32 errors agree to 1e-4 relative: float32 rounding of errors of 0.03-0.1 (measured
    # 1e-6); float64 ones to 1e-12.
    torch.manual_seed(0)
    unit = [torch.rand(1, 2, 2, 4), torch.rand(4, 2, 2, 1)]
    big = [core * 1.7e38 for core in unit]
    rounded = tt_round(big, eps=0.1)
    assert all(bool(torch.isfinite(core).all()) for core in rounded)
    assert ranks_of(rounded) == ranks_of(tt_round(unit, eps=0.1))
    expected = tt_relative_error(unit, tt_round(unit, eps=0.1))
    assert tt_relative_error(big, rounded) == pytest.approx(expected, rel=1e-4)

    # A TT with a decaying spectrum, so that eps = 0.2 truncates it (ranks (1, 16, 12, 1)
    # down to a few).
    spread = tt_svd(
        decaying_matrix(64, 64, 1.0, torch.Generator().manual_seed(1)).float(), (4, 4, 4), (4, 4, 4)
    )
    wide = [spread[0] / 1e37, spread[1], spread[2] * 1e37]
    truncated = tt_round(wide, eps=0.2)
    assert ranks_of(truncated) == ranks_of(tt_round(spread, eps=0.2))
    assert ranks_of(truncated) < ranks_of(spread)
    expected = tt_relative_error(spread, tt_round(spread, eps=0.2))
    assert tt_relative_error(wide, truncated) == pytest.approx(expected, rel=1e-4)
    # A TT against itself: 0 up to float32 rounding of the difference's cores, a few units
    # of 1.2e-7 (measured 3e-7 at most over 30 seeds); NaN before.
    assert tt_relative_error(wide, wide) <= 1e-5

    huge = [torch.rand(1, 2, 2, 4).double() * 1.7e308, torch.rand(4, 2, 2, 1).double()]
    assert tt_relative_error(huge, [huge[0] * 0.5, huge[1]]) == pytest.approx(0.5, rel=1e-12)
    larger = [core * 1e30 for core in unit]  # float32 cores; the ratio is about 1e60 - 1
    assert tt_relative_error(unit, larger) == pytest.approx(1e60, rel=1e-5)

    zero = [torch.zeros(1, 3, 2, 4), torch.randn(4, 3, 2, 4) * 1e30, torch.randn(4, 3, 2, 1) * 1e30]
    assert all(bool(torch.isfinite(core).all()) for core in tt_round(zero, eps=0.1))
    assert tt_to_dense(tt_round(zero, eps=0.1)).abs().max() == 0

    # The rounded TT (norm about 2**2047) no float64 cores hold spread evenly: named.
    with pytest.raises(ValueError, match=r"cores: the rounded TT overflows torch\.float64"):
        tt_round([huge[0], huge[1] * 1.7e308], eps=0.1)


def test_rounding_at_extreme_scales_keeps_a_tight_eps_in_float64():
    # Found by a review (helper 91): the scale was given back as exp(log(scale)), which loses
    # about |log| ulps (700 near float64's limits): with eps = 3e-14, just above the
    # warning's threshold (100 ulps), rounding cores of 1e300 ended at 5.2e-13. Powers of two
    # are given back exactly now. Reference: the error measured in float64 on the cores
    # divided back by the same power of two (exact).
    for seed in range(5):
        gen = torch.Generator().manual_seed(seed)
        cores = [
            torch.randn(1, 3, 4, 5, generator=gen, dtype=torch.float64),
            torch.randn(5, 4, 3, 5, generator=gen, dtype=torch.float64),
            torch.randn(5, 3, 3, 1, generator=gen, dtype=torch.float64),
        ]
        scaled = [core * 2.0**996 for core in cores]  # about 1e300 each
        rounded = tt_round(scaled, eps=3e-14)
        back = [core * 2.0**-996 for core in rounded]
        assert tt_relative_error(cores, back) <= 3e-14, seed


def test_exponent_shifts_are_exact_and_rounded_once():
    # The scalings divide and multiply by powers of two in steps the dtype holds as factors.
    # Reference: exact rational arithmetic (fractions), rounded once to float64. Found by a
    # review (helper 92): full steps first rounded a subnormal result twice (1.598964e-318
    # for 1.59897e-318); the remainder now goes first.
    from fractions import Fraction

    shift = decomposition._shift
    x = 2.5836914528418247e298
    assert shift(torch.tensor([x], dtype=torch.float64), -2047).item() == float(
        Fraction(x) / 2**2047
    )
    gen = np.random.default_rng(0)
    for _ in range(2000):
        value = float(gen.uniform(1, 2)) * 2.0 ** int(gen.integers(-1000, 1000))
        exponent = int(gen.integers(-2300, 2300))
        exact = Fraction(value) * Fraction(2) ** exponent
        try:
            expected = float(exact)
        except OverflowError:  # rounds past the largest float64: inf, as the product does
            expected = math.inf
        assert shift(torch.tensor([value], dtype=torch.float64), exponent).item() == expected


def test_relative_error_of_a_float64_weight_of_subnormal_entries():
    # Found by a review (helper 92): the TT was rebuilt at the weight's scale, where products
    # of subnormal-sized entries lose their bits, then shifted: 1.3e-13 reported for a true
    # 2.5e-15. The cores are shifted before the rebuild now. Reference: numpy float64 on the
    # matrix and cores scaled up by 2**1074 (exact); 1e-3 relative covers the rounding of an
    # error of order 1e-15.
    torch.manual_seed(0)
    w = torch.randn(24, 24, dtype=torch.float64) * 1e-310
    cores = tt_svd(w, (2, 3, 4), (4, 3, 2))
    up = [core.numpy() * 2.0**358 for core in cores]  # 2**1074 in all, over three cores
    w_up = w.numpy() * 2.0**537 * 2.0**537  # 2**1074 is not a float itself
    expected = np_rel_error(w_up, np_dense([torch.from_numpy(c) for c in up]))
    assert relative_error(w, cores) == pytest.approx(expected, rel=1e-3, abs=1e-16)


def test_float32_weights_of_subnormal_entries_are_decomposed_and_measured_exactly():
    # Found by a review (helper 88): entries near 1e-44 are float32 subnormals (a few bits
    # each). Decomposed as they were, the SVDs and the rebuilt products lost most of their
    # bits: a reported conversion_error of 0.199 where the float64 measure gave 0.048. Now
    # both the decomposition (divided by the largest entry) and the measure (in float64)
    # are scale-free: the exact mode reproduces the matrix as given to float32 precision
    # (1e-5 relative, as above), and the reported error is the float64 one (1e-9 relative:
    # both are float64 computations of the same difference).
    torch.manual_seed(0)
    w = (torch.randn(32, 32, dtype=torch.float64) * 1e-44).float()
    assert bool((w.abs() < torch.finfo(torch.float32).tiny).any())  # subnormals indeed
    layer = TTLinear.from_dense(w, in_modes=(4, 2, 4), out_modes=(2, 4, 4))
    expected = np_rel_error(w.double().numpy(), np_dense(layer.cores))
    assert expected <= 1e-5
    assert layer.conversion_error == pytest.approx(expected, rel=1e-9)


def test_a_half_precision_result_warns_about_its_own_rounding_first():
    # Found by a review (helper 88): a bfloat16 weight at eps = 1e-5 came out at 2.4e-3 with
    # only the float32 warning ("Decompose in float64 for a smaller eps"), which cannot help:
    # the floor is the bfloat16 rounding of the cores. The warning names that floor now.
    w = decaying_matrix(24, 24, 0.3, torch.Generator().manual_seed(0)).to(torch.bfloat16)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tt_svd(w, (4, 6), (6, 4), eps=1e-5)
    messages = [str(warning.message) for warning in caught]
    assert len(messages) == 1 and "rounding the cores to torch.bfloat16" in messages[0]


# --- error measures -------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_tt_relative_error_matches_dense(dtype, gen):
    a = random_tt((2, 3, 2), (3, 2, 2), (1, 3, 4, 1), gen, dtype)
    b = random_tt((2, 3, 2), (3, 2, 2), (1, 2, 5, 1), gen, dtype)
    small = [a[0] * (1 + 1e-3), a[1], a[2]]
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    for other in (b, small):
        expected = np_rel_error(np_dense(a), np_dense(other))
        assert tt_relative_error(a, other) == pytest.approx(expected, rel=tol * 100, abs=tol)
        assert relative_error(torch.from_numpy(np_dense(a)), other) == pytest.approx(
            expected, rel=tol * 100, abs=tol
        )
    assert tt_relative_error(a, a) <= tol
    with pytest.raises(ValueError, match="same"):
        tt_relative_error(a, random_tt((3, 2, 2), (3, 2, 2), (1, 2, 2, 1), gen, dtype))


def test_tt_relative_error_works_in_the_wider_dtype():
    # b is a rounded to float32: their distance, about 5e-8 of the norm, is below float32's
    # resolution, so a computation in the narrower dtype misses it (0, or 10x off). Reference:
    # numpy float64 on the two dense matrices; agreement to 1e-6 relative is float64 rounding
    # of sums of a few hundred terms with room to spare.
    a = random_tt((2, 2, 2), (3, 3, 3), (1, 3, 4, 1), torch.Generator().manual_seed(0))
    b = [core.float() for core in a]
    expected = np_rel_error(np_dense(a), np_dense(b))
    assert 1e-9 < expected < 1e-6
    assert tt_relative_error(a, b) == pytest.approx(expected, rel=1e-6)
    assert tt_relative_error(b, a) == pytest.approx(
        np_rel_error(np_dense(b), np_dense(a)), rel=1e-6
    )


def test_error_of_zero_reference():
    zero = [torch.zeros(1, 2, 2, 1), torch.zeros(1, 2, 2, 1)]
    one = [torch.ones(1, 2, 2, 1), torch.ones(1, 2, 2, 1)]
    assert tt_relative_error(zero, zero) == 0.0
    assert tt_relative_error(zero, one) == math.inf
    assert relative_error(torch.zeros(4, 4), zero) == 0.0


# --- devices --------------------------------------------------------------------------------


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cuda(dtype, gen):
    w = decaying_matrix(64, 48, 0.5, gen)
    cores = tt_svd(w.to("cuda", dtype), (4, 3, 4), (4, 4, 4), eps=0.2)
    assert all(c.device.type == "cuda" and c.dtype == dtype for c in cores)
    assert np_rel_error(w.numpy(), np_dense(cores)) <= 0.2 + 4 * torch.finfo(dtype).eps
    rounded = tt_round(cores, rank=3)
    assert all(c.device.type == "cuda" for c in rounded)
    layer = TTLinear.from_dense(nn.Linear(48, 64, device="cuda", dtype=dtype), rank=4)
    assert layer.cores[0].device.type == "cuda" and layer.bias is not None
    assert layer.bias.device.type == "cuda" and layer.conversion_error is not None


def test_docstring_examples():
    assert doctest.testmod(decomposition).failed == 0


def test_eps_below_the_working_precision_warns():
    # float32 cannot keep eps = 1e-8 (its SVDs round at about 1e-7); float64 can.
    weight = torch.randn(16, 12)
    with pytest.warns(UserWarning, match=r"eps=1e-08 is below what torch.float32 can resolve"):
        tt_svd(weight, (4, 3), (4, 4), eps=1e-8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cores = tt_svd(weight.double(), (4, 3), (4, 4), eps=1e-8)
    error = (tt_to_dense(cores) - weight.double()).norm() / weight.double().norm()
    assert error <= 1e-8


@pytest.mark.parametrize("scale", [1e-170, 1e160])
def test_the_eps_bound_holds_at_any_scale_of_the_weight(scale, gen):
    # Float64 squares underflow below ~1e-162 and overflow above ~1e154; the ranks eps picks,
    # and the errors reported, must not depend on the scale of W. Before, both scales gave
    # rank 1 and an error of 0.97 for eps = 0.1.
    w = decaying_matrix(24, 24, 0.1, gen)
    reference = tt_svd(w, (4, 6), (6, 4), eps=0.1)
    scaled = tt_svd(w * scale, (4, 6), (6, 4), eps=0.1)
    assert ranks_of(scaled) == ranks_of(reference)
    # Relative errors are scale-free: the same to rounding (1e-9 relative).
    error = relative_error(w * scale, scaled)
    assert error == pytest.approx(relative_error(w, reference), rel=1e-9)
    assert error <= 0.1
    rounded = tt_round(scaled, eps=0.3)
    assert ranks_of(rounded) == ranks_of(tt_round(reference, eps=0.3))
    assert tt_relative_error(scaled, rounded) <= 0.3


def test_eps_near_the_rounding_of_a_half_precision_result_warns(gen):
    # The cores come back in bfloat16, rounded by ~2**-8 per entry: eps = 1e-3 cannot hold
    # (the error lands near 3e-3) and says so; eps = 0.2 is far above that rounding.
    w = decaying_matrix(24, 24, 0.05, gen).to(torch.bfloat16)
    with pytest.warns(UserWarning, match="rounding the cores to torch.bfloat16"):
        tt_svd(w, (4, 6), (6, 4), eps=1e-3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tt_svd(w, (4, 6), (6, 4), eps=0.2)


def test_eps_bound_holds_for_a_bfloat16_result_with_tails_on_the_budget():
    # Found by a review (helper 69): eps set so that a bond's dropped tail sits right at its
    # tolerance; rounding the cores to bfloat16 then added ~3e-5 to the error, over eps
    # (0.118572 for eps = 0.118551), with no warning (eps is above 10 bfloat16 units). The
    # error is measured in float64 on the bfloat16 matrix given.
    torch.manual_seed(0)
    w = torch.randn(512, 512).to(torch.bfloat16)
    modes = (16, 32)
    w64 = w.double()
    grid = w64.reshape(*modes, *modes).permute(2, 0, 3, 1).reshape(256, -1)
    tails = torch.linalg.svdvals(grid).flip(0).square().cumsum(0).flip(0).sqrt()
    margin = 16 * torch.finfo(torch.float32).eps  # the float32 working margin, for d = 2
    for rank in (244, 246, 249):
        eps = float(tails[rank]) / float(w64.norm()) + margin + 1e-12
        cores = tt_svd(w, modes, modes, eps=eps)
        error = (w64 - tt_to_dense([c.double() for c in cores])).norm() / w64.norm()
        assert error <= eps, (rank, eps, float(error))
        assert relative_error(w, cores) <= eps


def test_a_bfloat16_weight_of_subnormal_entries_keeps_the_eps_bound():
    # The cores' norms for balancing them were float32 norms: squares of entries near 1e-40
    # underflowed to a norm of 0, the balancing was skipped, and the cores went into
    # bfloat16's subnormals (error 0.246 for eps = 0.1).
    torch.manual_seed(0)
    w = (torch.randn(64, 64, dtype=torch.float64) * 1e-40).to(torch.bfloat16)
    cores = tt_svd(w, (8, 8), (8, 8), eps=0.1)
    w64 = w.double()
    error = (w64 - tt_to_dense([c.double() for c in cores])).norm() / w64.norm()
    assert error <= 0.1


@pytest.mark.parametrize(
    ("matrix", "error", "match"),
    [
        (np.ones((4, 4)), TypeError, "matrix must be a tensor"),
        (torch.ones(4, 4, dtype=torch.long), TypeError, "floating-point"),
        (torch.ones(16), ValueError, "2-D"),
        (torch.ones(4, 4, device="meta"), ValueError, "meta"),
        (torch.ones(4, 5), ValueError, r"cores represent a matrix of shape \(4, 4\)"),
    ],
)
def test_relative_error_bad_matrix(matrix, error, match):
    cores = [torch.ones(1, 2, 2, 1), torch.ones(1, 2, 2, 1)]
    with pytest.raises(error, match=match):
        relative_error(matrix, cores)


def test_eps_bound_holds_when_a_tail_sits_exactly_on_the_budget():
    # Mutant D9 (no rounding margin in the bond tolerance). A two-core matrix whose bond
    # unfolding has singular values (4, 3): dropping 3 is a relative error of exactly 0.6.
    # In float32 the computed tail lands on either side of 0.6 ||W|| by ~1e-7, so without
    # the margin TT-SVD sometimes drops it and the error exceeds eps. The achieved error is
    # measured exactly (float64) on the float32 matrix the decomposition was given.
    in_modes, out_modes = (2, 3), (3, 2)
    exceeded = []
    for seed in range(100):
        gen = torch.Generator().manual_seed(seed)
        u, _ = torch.linalg.qr(torch.randn(6, 2, dtype=torch.float64, generator=gen))
        v, _ = torch.linalg.qr(torch.randn(6, 2, dtype=torch.float64, generator=gen))
        s = torch.tensor([4.0, 3.0], dtype=torch.float64)
        cores = [(u * s).reshape(1, 2, 3, 2), v.T.reshape(2, 3, 2, 1)]
        w = tt_to_dense(cores).float()
        approx = tt_svd(w, in_modes, out_modes, eps=0.6)
        w64 = w.double()
        err = (w64 - tt_to_dense([c.double() for c in approx])).norm() / w64.norm()
        if err.item() > 0.6:
            exceeded.append((seed, err.item()))
    assert not exceeded, exceeded[:3]


# --- from a mutation audit: tolerances, scales, dtypes, layout ------------------------------


def np_tt_svd_ranks(w, in_modes, out_modes, eps):
    """Oseledets' TT-SVD in numpy float64: the ranks for a per-bond tail of eps/sqrt(d-1)||W||.

    Also returns the smallest relative distance of a kept or dropped tail to the budget, so a
    test can make sure its matrix is not decided by rounding.
    """
    d = len(in_modes)
    delta = eps / math.sqrt(d - 1) * np.linalg.norm(w)
    rest = np_unfolding(w, in_modes, out_modes, d).reshape(1, -1)
    ranks, r, closest = [1], 1, math.inf
    for m, n in zip(in_modes[:-1], out_modes[:-1], strict=True):
        _, s, vt = np.linalg.svd(rest.reshape(r * m * n, -1), full_matrices=False)
        tails = np.sqrt(np.cumsum((s**2)[::-1])[::-1])  # tails[j] = ||s[j:]||
        within = np.nonzero(tails <= delta)[0]
        r = max(int(within[0]) if within.size else len(s), 1)
        closest = min(closest, *(abs(t - delta) / delta for t in tails[max(r - 1, 0) : r + 1]))
        ranks.append(r)
        rest = s[:r, None] * vt[:r]
    return (*ranks, 1), closest


def with_spectrum(in_modes, out_modes, singular_values, seed):
    """W whose bond-1 unfolding has exactly these singular values (float64)."""
    rows = in_modes[0] * out_modes[0]
    cols = math.prod(in_modes[1:]) * math.prod(out_modes[1:])
    rng = np.random.default_rng(seed)
    u, _ = np.linalg.qr(rng.standard_normal((rows, len(singular_values))))
    v, _ = np.linalg.qr(rng.standard_normal((cols, len(singular_values))))
    return np_fold((u * np.asarray(singular_values)) @ v.T, in_modes, out_modes)


# --- eps: the per-bond tolerance ------------------------------------------------------------


@pytest.mark.parametrize(
    ("in_modes", "out_modes"),
    [((2, 3, 4), (4, 3, 2)), ((2, 3, 2, 2), (2, 2, 3, 2)), ((2, 2, 2, 2, 2), (2, 2, 2, 2, 2))],
)
@pytest.mark.parametrize("eps", [0.1, 0.25])
def test_eps_ranks_are_those_of_a_per_bond_budget_of_eps_over_sqrt_d_minus_1(
    in_modes, out_modes, eps
):
    # A budget of eps/(d-1) per bond instead of eps/sqrt(d-1) would still meet the eps bound, only
    # with needlessly large ranks, and every existing rank check for eps used d = 2, where the
    # two agree. Reference: TT-SVD in numpy float64. The matrix is checked not to sit within
    # 1e-6 (relative) of a budget, far above both the library's rounding margin (~1e-14) and
    # float64 SVD rounding.
    w = decaying_matrix(
        math.prod(out_modes), math.prod(in_modes), 0.3, torch.Generator().manual_seed(1)
    )
    expected, closest = np_tt_svd_ranks(w.numpy(), in_modes, out_modes, eps)
    assert closest > 1e-6
    assert ranks_of(tt_svd(w, in_modes, out_modes, eps=eps)) == expected


@pytest.mark.parametrize(
    ("in_modes", "out_modes"),
    [((4, 6), (6, 4)), ((2, 3, 2, 2), (2, 2, 3, 2)), ((2, 2, 2, 2, 2), (2, 2, 2, 2, 2))],
)
@pytest.mark.parametrize("eps", [0.1, 0.25])
def test_round_eps_ranks_are_those_of_tt_svd_of_the_dense_matrix(in_modes, out_modes, eps):
    # Rounding an exact TT to eps must cut each bond where TT-SVD of the dense matrix does:
    # the eps bound alone (test_round_eps_bound) also holds for needlessly large ranks, as with
    # a tolerance computed from half the norm. Same reference and margin as the test above.
    w = decaying_matrix(
        math.prod(out_modes), math.prod(in_modes), 0.3, torch.Generator().manual_seed(1)
    )
    expected, closest = np_tt_svd_ranks(w.numpy(), in_modes, out_modes, eps)
    assert closest > 1e-6
    assert ranks_of(tt_round(tt_svd(w, in_modes, out_modes), eps=eps)) == expected


def test_rank_sequence_at_the_caps_is_not_clipped_and_does_not_warn(gen):
    # Caps (1, 8, 8, 1): a sequence equal to them is used as given; only one above warns.
    w = torch.randn(24, 24, generator=gen, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cores = tt_svd(w, (2, 3, 4), (4, 3, 2), rank=[8, 8])
        assert ranks_of(cores) == (1, 8, 8, 1)
        assert ranks_of(tt_round(cores, rank=[8, 8])) == (1, 8, 8, 1)
        layer = TTLinear.from_dense(w, [8, 8], in_modes=(2, 3, 4), out_modes=(4, 3, 2))
        assert layer.ranks == (1, 8, 8, 1)


def test_eps_bound_holds_when_many_small_singular_values_are_needed():
    # eps mode must not drop the "numerically zero" values (<= max(rows, cols) * finfo.eps *
    # s_max) as the exact mode does. For a 256 x 256 float32 unfolding that cut
    # is 3e-5 * s_max, while a user may ask for eps = 1.5e-4: here 255 singular values of
    # 2e-5 hold a relative tail of 3.2e-4, so dropping them all breaks the bound twice over.
    # The error is measured in numpy float64 against the float32 matrix actually decomposed;
    # the bound is checked with no slack (the library keeps a rounding margin for that).
    in_modes, out_modes = (16, 16), (16, 16)
    s = np.concatenate([[1.0], np.full(255, 2e-5)])
    w = torch.from_numpy(with_spectrum(in_modes, out_modes, s, seed=0)).float()
    cores = tt_svd(w, in_modes, out_modes, eps=1.5e-4)
    assert np_rel_error(w.double().numpy(), np_dense(cores)) <= 1.5e-4
    assert ranks_of(cores)[1] > 1


# --- exact mode: what counts as zero --------------------------------------------------------


@pytest.mark.parametrize(("sigma", "expected_rank"), [(1e-14, 1), (1e-12, 2)])
def test_exact_mode_zero_cut_uses_the_larger_side_of_the_unfolding(sigma, expected_rank):
    # The exact mode's zero cut is max(rows, cols) * finfo.eps * s_max, not min(...), as the
    # module docstring states. Bond-1 unfolding of 4 x 144 with singular values (1, sigma):
    # the documented cut is 144 * 2.2e-16 = 3.2e-14, so 1e-14 is zero and 1e-12 is not; the
    # min-side cut (8.9e-16) would keep 1e-14. Both sigmas are >= 30x from either cut and far
    # above float64 SVD rounding (~1e-16).
    in_modes, out_modes = (2, 12), (2, 12)
    w = torch.from_numpy(with_spectrum(in_modes, out_modes, [1.0, sigma], seed=3))
    cores = tt_svd(w, in_modes, out_modes)
    assert ranks_of(cores) == (1, expected_rank, 1)
    # Either way W is reproduced to working precision (dropping sigma costs sigma / ||W||,
    # Eckart-Young; 1e-13 covers that and the ~1e-15 rounding of the reconstruction).
    assert np_rel_error(w.numpy(), np_dense(cores)) <= 1e-13


# --- norms at any scale ---------------------------------------------------------------------


@pytest.mark.parametrize("scale", [1e-158, 1e-160])
def test_float64_weights_whose_squares_are_subnormal(scale):
    # The float64 norm is not to be trusted whenever it is nonzero and finite. The existing
    # scale test (1e-170) underflows every square to 0, which the rescaling catches anyway;
    # at 1e-158..1e-160 the squares are subnormal and the plain norm is off by ~1e-8..1e-3,
    # which moves the eps ranks and the reported errors. Reference: the same cores, rescaled
    # by 1/scale in numpy float64 (exact: a power-of-ten scale only rounds at 1e-16).
    w = decaying_matrix(24, 24, 0.1, torch.Generator().manual_seed(0))
    reference = tt_svd(w, (4, 6), (6, 4), eps=0.3)
    scaled = tt_svd(w * scale, (4, 6), (6, 4), eps=0.3)
    assert ranks_of(scaled) == ranks_of(reference)
    expected = np_rel_error(w.numpy(), np_dense(scaled) / scale)
    assert relative_error(w * scale, scaled) == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("scale", [1e-21, 1e-22])
def test_float32_weights_whose_float32_squares_are_subnormal(scale):
    # Norms accumulate in float64, not in the tensor's own dtype. Float32 entries
    # of 1e-22 are normal, but their float32 squares (1e-44) are subnormal: a float32 norm is
    # off by up to ~10% without being 0, so no rescaling kicks in. Reference: numpy float64
    # (where 1e-44 is an ordinary number). relative_error works in float32 here, so 1e-5
    # relative covers its rounding of an error of ~0.27.
    w = decaying_matrix(24, 24, 0.1, torch.Generator().manual_seed(0)).float()
    reference = tt_svd(w, (4, 6), (6, 4), eps=0.3)
    ws = w * scale
    scaled = tt_svd(ws, (4, 6), (6, 4), eps=0.3)
    assert ranks_of(scaled) == ranks_of(reference)
    expected = np_rel_error(ws.double().numpy(), np_dense(scaled))
    assert relative_error(ws, scaled) == pytest.approx(expected, rel=1e-5)


# --- error measures -------------------------------------------------------------------------


def test_tt_relative_error_of_single_cores():
    # The d = 1 branch of the TT difference (a sign there went unnoticed). Every
    # other test of tt_relative_error used d >= 2. Reference: numpy on the two 3 x 4 matrices.
    gen = torch.Generator().manual_seed(0)
    a = [torch.randn(1, 4, 3, 1, generator=gen, dtype=torch.float64)]
    b = [torch.randn(1, 4, 3, 1, generator=gen, dtype=torch.float64)]
    expected = np_rel_error(np_dense(a), np_dense(b))
    assert tt_relative_error(a, b) == pytest.approx(expected, rel=1e-12)
    assert tt_relative_error(a, a) == 0.0


def test_relative_error_works_in_the_wider_dtype_of_matrix_and_cores():
    # relative_error works in the wider dtype of matrix and cores. A float32 matrix against
    # float64 cores of (1 + 1e-9) W: the true error is 1e-9, which float32 (unit roundoff
    # 6e-8) cannot even represent. The reconstruction itself is exact to ~1e-15, so 1e-4
    # relative on 1e-9 is ample.
    w = decaying_matrix(6, 6, 0.5, torch.Generator().manual_seed(0)).float()
    cores = tt_svd(w.double(), (2, 3), (3, 2))
    cores[0] = cores[0] * (1 + 1e-9)
    assert relative_error(w, cores) == pytest.approx(1e-9, rel=1e-4)


@pytest.mark.parametrize(
    "call",
    [
        lambda cores: tt_round(cores),
        lambda cores: tt_relative_error(cores, cores),
        lambda cores: relative_error(torch.ones(6, 6), cores),
    ],
    ids=["tt_round", "tt_relative_error", "relative_error"],
)
def test_integer_cores_are_rejected(call):
    # Cores must be floating point: without the check, tt_round of these integer
    # cores works in float32 and casts back to int64: it silently returns cores of zeros.
    cores = [torch.ones(1, 2, 3, 2, dtype=torch.int64), torch.ones(2, 3, 2, 1, dtype=torch.int64)]
    with pytest.raises(TypeError, match=r"\[0\] must be a real floating-point tensor"):
        call(cores)


# --- rank caps, warnings, layout ------------------------------------------------------------


def test_tt_round_warns_about_eps_below_the_precision_too():
    # tt_round gives the precision warning tt_svd gives. Float32 cannot
    # keep eps = 1e-8; bfloat16 results round by ~4e-3 per entry, so eps = 1e-3 cannot hold.
    gen = torch.Generator().manual_seed(0)
    cores = [torch.randn(1, 4, 4, 3, generator=gen), torch.randn(3, 4, 4, 1, generator=gen)]
    with pytest.warns(UserWarning, match="eps=1e-08 is below what torch.float32 can resolve"):
        tt_round(cores, eps=1e-8)
    with pytest.warns(UserWarning, match="rounding the cores to torch.bfloat16"):
        tt_round([c.bfloat16() for c in cores], eps=1e-3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tt_round([c.double() for c in cores], eps=1e-8)


def test_precision_warning_thresholds():
    # The float32 threshold is 100 units of roundoff, the half-precision result's 10: advisory
    # thresholds, which the warnings themselves state ("about 1e-05" for float32). An eps of
    # half the threshold warns, ten times it does not.
    w = decaying_matrix(24, 24, 0.3, torch.Generator().manual_seed(0))
    with pytest.warns(UserWarning, match="below what torch.float32 can resolve"):
        tt_svd(w.float(), (4, 6), (6, 4), eps=6e-6)  # threshold 100 * 1.19e-7
    with pytest.warns(UserWarning, match="rounding the cores to torch.bfloat16"):
        tt_svd(w.bfloat16(), (4, 6), (6, 4), eps=0.04)  # threshold 10 * 7.8e-3
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tt_svd(w.float(), (4, 6), (6, 4), eps=1.2e-4)
        tt_svd(w.bfloat16(), (4, 6), (6, 4), eps=0.8)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_returned_cores_are_contiguous(dtype):
    # The cores come out contiguous: else they are slices of the SVD's
    # column-major factors, and e.g. core.view(-1) raises. (TTLinear copies them into fresh
    # parameters, so only direct callers of tt_svd / tt_round see it.)
    w = torch.randn(24, 24, generator=torch.Generator().manual_seed(0), dtype=dtype)
    cores = tt_svd(w, (2, 3, 4), (4, 3, 2), rank=3)
    for result in (cores, tt_svd(w, (2, 3, 4), (4, 3, 2)), tt_round(cores, rank=2)):
        assert all(c.is_contiguous() for c in result)
        for c in result:
            c.view(-1)
