"""Property-based tests (hypothesis) of TTLinear, from_dense, round and argument checking.

Shapes are drawn over d = 1..6 cores with modes 1..7, each side's product capped at
``MAX_FEATURES`` so that dense references stay small; ranks as an int cap or a sequence of
inner ranks. The reference for a TT matrix is independent of the library's contraction code:
one numpy einsum over the cores in float64. The profiles (example counts, derandomization in
CI) are set in conftest.py.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from ttlayers import TTLinear, max_ranks, tensorize_

# Ranks above a bond's cap are legal but warned about; these tests look at results and
# exceptions only (the warnings have their own tests in test_shapes.py).
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

MAX_FEATURES = 96
seeds = st.integers(0, 2**31 - 1)


@st.composite
def modes(draw: st.DrawFn, d: int) -> tuple[int, ...]:
    """``d`` modes in 1..7 whose product stays within MAX_FEATURES."""
    values: list[int] = []
    product = 1
    for _ in range(d):
        mode = draw(st.integers(1, min(7, MAX_FEATURES // product)))
        values.append(mode)
        product *= mode
    return tuple(values)


@st.composite
def tt_shapes(draw: st.DrawFn) -> tuple[tuple[int, ...], tuple[int, ...]]:
    d = draw(st.integers(1, 6))
    return draw(modes(d)), draw(modes(d))


def rank_arguments(d: int) -> st.SearchStrategy[int | tuple[int, ...]]:
    """An int cap, or the d - 1 inner ranks (which may exceed the caps)."""
    inner = st.lists(st.integers(1, 6), min_size=d - 1, max_size=d - 1).map(tuple)
    return st.one_of(st.integers(1, 8), inner)


def dense_reference(cores: list[torch.Tensor] | nn.ParameterList) -> np.ndarray:
    """``W[n_1..n_d, m_1..m_d] = sum_r G_1[r_0, m_1, n_1, r_1] ... G_d`` by numpy einsum."""
    d = len(cores)
    rank, inp, out = range(d + 1), range(d + 1, 2 * d + 1), range(2 * d + 1, 3 * d + 1)
    operands: list[object] = []
    for k, core in enumerate(cores):
        operands += [core.detach().double().numpy(), [rank[k], inp[k], out[k], rank[k + 1]]]
    w = np.einsum(*operands, [*out, *inp], optimize=True)
    out_features = math.prod(int(core.shape[2]) for core in cores)
    return w.reshape(out_features, -1)


def relative_error(reference: np.ndarray, approximation: np.ndarray) -> float:
    return float(np.linalg.norm(reference - approximation) / np.linalg.norm(reference))


def random_tt_matrix(
    in_modes: tuple[int, ...], out_modes: tuple[int, ...], rank: int, noise: float, seed: int
) -> torch.Tensor:
    """A TT matrix of the given rank plus relative Gaussian noise: spectra of every kind."""
    torch.manual_seed(seed)
    tt = TTLinear(
        math.prod(in_modes),
        math.prod(out_modes),
        rank,
        in_modes=in_modes,
        out_modes=out_modes,
        dtype=torch.float64,
    )
    w = tt.to_dense().detach()
    rms = w.norm() / math.sqrt(w.numel())
    return w + noise * rms * torch.randn_like(w)


# Float64 tolerances: every reference here sums at most MAX_FEATURES * 8^2 products of values of
# order 1, and SVD-based steps are backward stable, so errors stay below 1e-13; 1e-10 leaves room
# while still failing on any real mistake (which shows up at order 1e-2 or more).
TIGHT = 1e-10


# --- TTLinear against the dense reference ---------------------------------------------------


@given(
    shape=tt_shapes(),
    data=st.data(),
    bias=st.booleans(),
    batch_shape=st.lists(st.integers(0, 3), max_size=2),
    seed=seeds,
)
def test_forward_equals_dense_reference(shape, data, bias, batch_shape, seed):
    in_modes, out_modes = shape
    rank = data.draw(rank_arguments(len(in_modes)), label="rank")
    in_features, out_features = math.prod(in_modes), math.prod(out_modes)
    torch.manual_seed(seed)
    layer = TTLinear(
        in_features,
        out_features,
        rank,
        in_modes=in_modes,
        out_modes=out_modes,
        bias=bias,
        dtype=torch.float64,
    )
    caps = max_ranks(in_modes, out_modes)
    if isinstance(rank, int):
        assert layer.ranks == tuple(min(rank, cap) for cap in caps)
    else:
        assert layer.ranks == (1, *rank, 1)

    x = torch.randn(*batch_shape, in_features, dtype=torch.float64)
    y = layer(x)
    assert y.shape == (*batch_shape, out_features)
    expected = x.numpy() @ dense_reference(layer.cores).T
    if bias:
        expected = expected + layer.bias.detach().numpy()
    np.testing.assert_allclose(y.detach().numpy(), expected, rtol=TIGHT, atol=TIGHT)


# --- from_dense, eps and round --------------------------------------------------------------


@given(shape=tt_shapes(), as_linear=st.booleans(), seed=seeds)
def test_from_dense_at_full_rank_is_exact(shape, as_linear, seed):
    in_modes, out_modes = shape
    torch.manual_seed(seed)
    linear = nn.Linear(math.prod(in_modes), math.prod(out_modes), dtype=torch.float64)
    source = linear if as_linear else linear.weight.detach()
    layer = TTLinear.from_dense(source, in_modes=in_modes, out_modes=out_modes)
    assert layer.in_modes == in_modes and layer.out_modes == out_modes
    assert all(r <= cap for r, cap in zip(layer.ranks, max_ranks(in_modes, out_modes), strict=True))
    w = linear.weight.detach().numpy()
    assert relative_error(w, dense_reference(layer.cores)) <= TIGHT
    assert 0.0 <= layer.conversion_error <= TIGHT
    if as_linear:
        assert torch.equal(layer.bias, linear.bias)
    else:
        assert layer.bias is None


@given(
    shape=tt_shapes(),
    eps=st.floats(0.01, 0.95),
    structure_rank=st.integers(1, 4),
    noise=st.sampled_from([0.0, 1e-3, 0.1, 1.0]),
    seed=seeds,
)
def test_from_dense_eps_bound_holds(shape, eps, structure_rank, noise, seed):
    in_modes, out_modes = shape
    w = random_tt_matrix(in_modes, out_modes, structure_rank, noise, seed)
    layer = TTLinear.from_dense(w, eps=eps, in_modes=in_modes, out_modes=out_modes)
    error = relative_error(w.numpy(), dense_reference(layer.cores))
    assert error <= eps * (1 + TIGHT) + TIGHT
    assert layer.conversion_error == pytest.approx(error, rel=1e-6, abs=TIGHT)
    # The truncation never keeps more rank than the exact decomposition has.
    exact = TTLinear.from_dense(w, in_modes=in_modes, out_modes=out_modes)
    assert all(r <= r_exact for r, r_exact in zip(layer.ranks, exact.ranks, strict=True))


@given(shape=tt_shapes(), cap=st.integers(1, 5), eps=st.floats(0.01, 0.95), seed=seeds)
def test_from_dense_with_rank_and_eps_respects_the_cap(shape, cap, eps, seed):
    in_modes, out_modes = shape
    w = random_tt_matrix(in_modes, out_modes, 4, 0.1, seed)
    layer = TTLinear.from_dense(w, cap, eps=eps, in_modes=in_modes, out_modes=out_modes)
    assert max(layer.ranks) <= cap
    error = relative_error(w.numpy(), dense_reference(layer.cores))
    assert layer.conversion_error == pytest.approx(error, rel=1e-6, abs=TIGHT)


@given(shape=tt_shapes(), data=st.data(), eps=st.floats(0.01, 0.95), seed=seeds)
def test_round_keeps_the_error_bound_it_promises(shape, data, eps, seed):
    in_modes, out_modes = shape
    rank = data.draw(rank_arguments(len(in_modes)), label="rank")
    torch.manual_seed(seed)
    layer = TTLinear(
        math.prod(in_modes),
        math.prod(out_modes),
        rank,
        in_modes=in_modes,
        out_modes=out_modes,
        dtype=torch.float64,
    )
    w = dense_reference(layer.cores)
    caps = max_ranks(in_modes, out_modes)

    # No argument: only redundant rank goes, so the matrix stays the same to rounding.
    exact = layer.round()
    assert relative_error(w, dense_reference(exact.cores)) <= TIGHT
    assert all(
        r <= min(r_before, cap)
        for r, r_before, cap in zip(exact.ranks, layer.ranks, caps, strict=True)
    )

    rounded = layer.round(eps=eps)
    error = relative_error(w, dense_reference(rounded.cores))
    assert error <= eps * (1 + TIGHT) + TIGHT
    assert rounded.conversion_error == pytest.approx(error, rel=1e-6, abs=TIGHT)
    assert all(r <= r_before for r, r_before in zip(rounded.ranks, layer.ranks, strict=True))
    assert torch.equal(rounded.bias, layer.bias)

    cap = data.draw(st.integers(1, 4), label="cap")
    assert max(layer.round(cap).ranks) <= cap


# --- bad arguments: ValueError or TypeError, never anything else -----------------------------

junk = st.one_of(
    st.none(),
    st.booleans(),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=3),
    st.just(object()),
    st.just(np.int64(4)),
    st.just(torch.tensor(4)),
)
int_lists = st.lists(st.integers(-1, 8), max_size=7)
sequences = st.one_of(
    int_lists,
    int_lists.map(tuple),
    st.lists(st.one_of(st.integers(1, 4), st.floats(1, 4), st.booleans(), st.none()), max_size=4),
)
sizes = st.one_of(st.integers(-2, 40), junk)
rank_values = st.one_of(st.integers(-2, 12), sequences, junk)
mode_values = st.one_of(st.none(), sequences, junk)
core_counts = st.one_of(st.none(), st.integers(-1, 7), junk)
eps_values = st.one_of(
    st.none(), st.floats(-1.0, 2.0), st.sampled_from([0.0, 1.0, 0.5, math.nan, math.inf]), junk
)
ARGUMENT_ERRORS = (ValueError, TypeError)


def _check_layer(layer: TTLinear, in_features: int, out_features: int) -> None:
    """A layer that was built must be consistent and compute the right shape."""
    assert (layer.in_features, layer.out_features) == (in_features, out_features)
    assert math.prod(layer.in_modes) == in_features
    assert math.prod(layer.out_modes) == out_features
    assert len(layer.ranks) == layer.num_cores + 1 and layer.ranks[0] == layer.ranks[-1] == 1
    dtype = layer.cores[0].dtype
    y = layer(torch.randn(3, in_features, dtype=dtype))
    assert y.shape == (3, out_features) and torch.isfinite(y).all()


@settings(max_examples=150)
@given(
    in_features=sizes,
    out_features=sizes,
    rank=rank_values,
    in_modes=mode_values,
    out_modes=mode_values,
    num_cores=core_counts,
)
def test_constructor_rejects_bad_arguments_with_value_or_type_error(
    in_features, out_features, rank, in_modes, out_modes, num_cores
):
    try:
        layer = TTLinear(
            in_features,
            out_features,
            rank,
            in_modes=in_modes,
            out_modes=out_modes,
            num_cores=num_cores,
        )
    except ARGUMENT_ERRORS:
        return
    _check_layer(layer, in_features, out_features)


@settings(max_examples=100)
@given(
    shape=st.lists(st.integers(0, 3), max_size=3),
    last=st.one_of(st.just(12), st.integers(0, 20)),
    dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16, torch.int64, torch.bool]),
)
def test_forward_rejects_bad_inputs_with_value_or_type_error(shape, last, dtype):
    layer = TTLinear(12, 8, rank=3, in_modes=(3, 4), out_modes=(2, 4))
    x = torch.zeros(*shape, last, dtype=dtype)
    try:
        y = layer(x)
    except ARGUMENT_ERRORS:
        assert x.shape[-1] != 12 or x.dtype != torch.float32
        return
    assert y.shape == (*x.shape[:-1], 8)


@pytest.mark.parametrize("value", [None, [1.0] * 12, np.zeros(12), 3.0], ids=str)
def test_forward_rejects_non_tensors_with_type_error(value):
    with pytest.raises(TypeError, match="tensor"):
        TTLinear(12, 8, rank=3, in_modes=(3, 4), out_modes=(2, 4))(value)


def test_forward_rejects_a_zero_dimensional_input_with_value_error():
    with pytest.raises(ValueError, match="in_features=12"):
        TTLinear(12, 8, rank=3, in_modes=(3, 4), out_modes=(2, 4))(torch.tensor(1.0))


sources = st.one_of(
    st.builds(
        lambda i, o, bias: nn.Linear(i, o, bias=bias),
        st.integers(1, 30),
        st.integers(1, 30),
        st.booleans(),
    ),
    st.builds(
        lambda shape, dtype: torch.randn(tuple(shape)).to(dtype),
        st.lists(st.integers(0, 12), min_size=0, max_size=3),
        st.sampled_from(
            [
                torch.float32,
                torch.float64,
                torch.float16,
                torch.bfloat16,
                torch.int64,
                torch.complex64,
            ]
        ),
    ),
    st.builds(
        lambda value: torch.full((4, 6), value),
        st.sampled_from([math.nan, math.inf, -math.inf, 0.0]),
    ),
    junk,
    st.just(np.zeros((4, 6))),
    st.just([[1.0, 2.0]]),
)


@settings(max_examples=150)
@given(
    source=sources,
    rank=st.one_of(st.none(), rank_values),
    eps=eps_values,
    in_modes=mode_values,
    out_modes=mode_values,
    num_cores=core_counts,
)
def test_from_dense_rejects_bad_arguments_with_value_or_type_error(
    source, rank, eps, in_modes, out_modes, num_cores
):
    try:
        layer = TTLinear.from_dense(
            source, rank, eps=eps, in_modes=in_modes, out_modes=out_modes, num_cores=num_cores
        )
    except ARGUMENT_ERRORS:
        return
    weight = source.weight if isinstance(source, nn.Linear) else source
    out_features, in_features = weight.shape
    _check_layer(layer, in_features, out_features)
    assert layer.cores[0].dtype == weight.dtype
    assert math.isfinite(layer.conversion_error) and layer.conversion_error >= 0.0


@settings(max_examples=100)
@given(rank=st.one_of(st.none(), rank_values), eps=eps_values)
def test_round_rejects_bad_arguments_with_value_or_type_error(rank, eps):
    layer = TTLinear(64, 48, rank=5, in_modes=(4, 4, 4), out_modes=(4, 4, 3))
    try:
        rounded = layer.round(rank, eps=eps)
    except ARGUMENT_ERRORS:
        return
    _check_layer(rounded, 64, 48)
    assert all(r <= r0 for r, r0 in zip(rounded.ranks, layer.ranks, strict=True))


@settings(max_examples=60)
@given(
    rank=st.one_of(st.none(), rank_values),
    eps=eps_values,
    num_cores=core_counts,
    filter_fn=st.one_of(
        st.none(), st.just(lambda module, name: True), st.just(lambda module, name: False), junk
    ),
)
def test_tensorize_rejects_bad_arguments_and_leaves_the_model_alone(
    rank, eps, num_cores, filter_fn
):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 8))
    before = list(model)
    x = torch.randn(2, 16)
    y_before = model(x)
    try:
        tensorize_(model, rank=rank, eps=eps, num_cores=num_cores, filter_fn=filter_fn)
    except ARGUMENT_ERRORS:
        # Atomic: on error the model keeps its very modules and computes what it did.
        assert all(a is b for a, b in zip(model, before, strict=True))
        assert torch.equal(model(x), y_before)
        return
    assert model(x).shape == (2, 8)


# The rejection tests above return early on any ValueError/TypeError, so on their own they
# would pass if valid arguments were refused too. Here every argument is valid: nothing may
# raise.
@given(
    shape=tt_shapes(),
    data=st.data(),
    eps=st.one_of(st.none(), st.floats(0.01, 0.99)),
    seed=seeds,
)
def test_valid_arguments_are_accepted(shape, data, eps, seed):
    in_modes, out_modes = shape
    in_features, out_features = math.prod(in_modes), math.prod(out_modes)
    rank = data.draw(rank_arguments(len(in_modes)))
    layer = TTLinear(in_features, out_features, rank, in_modes=in_modes, out_modes=out_modes)
    _check_layer(layer, in_features, out_features)
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(out_features, in_features, dtype=torch.float64, generator=generator)
    converted = TTLinear.from_dense(weight, rank, eps=eps, in_modes=in_modes, out_modes=out_modes)
    _check_layer(converted, in_features, out_features)
    _check_layer(layer.round(rank, eps=eps), in_features, out_features)
    model = nn.Sequential(nn.Linear(in_features, out_features), nn.ReLU())
    report = tensorize_(
        model, rank=rank, eps=eps, num_cores=len(in_modes), filter_fn=lambda m, n: True
    )
    assert [row.name for row in report.layers] == ["0"] and isinstance(model[0], TTLinear)
