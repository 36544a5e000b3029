import itertools
import math
import warnings

import numpy as np
import pytest
import torch

from ttlayers import TTLinear, factorize, max_ranks, suggest_modes, tt_svd
from ttlayers.shapes import default_num_cores, num_parameters, resolve_ranks, validate_modes


def all_factorizations(n, d):
    """Every multiset of ``d`` factors of ``n``, as descending tuples (brute force)."""
    divisors = [k for k in range(1, n + 1) if n % k == 0]
    return {
        tuple(sorted(combo, reverse=True))
        for combo in itertools.combinations_with_replacement(divisors, d)
        if math.prod(combo) == n
    }


@pytest.mark.parametrize(
    ("n", "d"),
    [
        (1, 1),
        (1, 4),
        (7, 1),
        (1024, 4),
        (784, 3),
        (10, 3),
        (1021, 3),
        (360, 5),
        (72, 2),
        (720, 3),
        (4608, 3),
        (1152, 2),
        (13824, 2),
        (2310, 4),
    ],
)
def test_factorize_is_the_most_equal_factorization(n, d):
    # Reference: all factorizations, enumerated; the most equal has the lexicographically
    # smallest descending tuple (smallest largest factor, then second largest, ...).
    factors = factorize(n, d)
    assert len(factors) == d and math.prod(factors) == n
    assert tuple(sorted(factors, reverse=True)) == min(all_factorizations(n, d))


def test_factorize_is_the_most_equal_factorization_for_every_small_size():
    # The hand-picked sizes above miss tie-breaks between equal largest factors: a search that
    # compared the remaining factors the wrong way round gave (9, 5, 4) for 180 = 6 * 6 * 5.
    # Exhaustive against the brute force, n <= 400 and d = 2..5 (about a second).
    wrong = [
        (n, d, factorize(n, d))
        for n in range(1, 401)
        for d in range(2, 6)
        if tuple(sorted(factorize(n, d), reverse=True)) != min(all_factorizations(n, d))
    ]
    assert not wrong, wrong[:5]


def test_suggest_modes_is_factorize_of_each_side_in_its_order():
    # 10 and 12 in three factors are not palindromes, so a reversed side would show.
    assert (
        suggest_modes(10, 12, 3) == (factorize(10, 3), factorize(12, 3)) == ((1, 5, 2), (2, 3, 2))
    )
    assert suggest_modes(12, 10, 3) == ((2, 3, 2), (1, 5, 2))


def test_factorize_returns_ints_for_any_integer_and_many_cores():
    # NumPy sizes gave NumPy scalars among the factors; hundreds of cores overflowed the
    # recursion (beyond one factor per prime, the rest are 1s).
    factors = factorize(np.int64(4608), 3)
    assert sorted(factors) == [16, 16, 18] and all(type(f) is int for f in factors)
    many = factorize(4096, 600)
    assert len(many) == 600 and math.prod(many) == 4096
    assert sorted(f for f in many if f > 1) == [2] * 12


def test_factorize_balanced_and_mountain_ordered():
    assert factorize(1024, 4) == (4, 8, 8, 4)
    assert factorize(4096, 4) == (8, 8, 8, 8)
    assert sorted(factorize(784, 3)) == [7, 8, 14]
    assert factorize(72, 2) == (8, 9)  # not (6, 12), as handing out primes greedily gave
    # Too few prime factors: padded with 1s, which go to the ends.
    assert factorize(10, 3) == (1, 5, 2)
    assert factorize(13, 3) == (1, 13, 1)


@pytest.mark.parametrize(("n", "d"), [(0, 2), (-3, 2), (8, 0)])
def test_factorize_rejects_non_positive(n, d):
    with pytest.raises(ValueError, match="positive"):
        factorize(n, d)


def test_factorize_rejects_non_int():
    with pytest.raises(TypeError, match="n must be an int"):
        factorize(8.0, 2)  # type: ignore[arg-type]


def test_suggest_modes_default_num_cores():
    in_modes, out_modes = suggest_modes(784, 1024)
    assert len(in_modes) == len(out_modes) == default_num_cores(784, 1024)
    assert math.prod(in_modes) == 784 and math.prod(out_modes) == 1024
    assert 2 <= default_num_cores(2, 2) <= default_num_cores(2**30, 2) <= 6


@pytest.mark.parametrize(
    ("in_modes", "error", "match"),
    [
        ((0, 2), ValueError, "must hold positive ints"),
        ((), ValueError, "must hold at least one mode"),
        ((2.5, 2), TypeError, "must hold ints"),
    ],
)
def test_max_ranks_checks_the_modes(in_modes, error, match):
    # Before: ZeroDivisionError, (1, 1) for no modes, float ranks.
    out_modes = (2,) * len(in_modes)
    with pytest.raises(error, match=f"in_modes {match}"):
        max_ranks(in_modes, out_modes)
    with pytest.raises(error, match=f"in_modes {match}"):
        resolve_ranks(4, in_modes, out_modes)


def test_max_ranks_accepts_numpy_vectors_of_modes():
    assert max_ranks(np.array([4, 8]), np.array([8, 4])) == (1, 32, 1)
    with pytest.raises(TypeError, match="in_modes must be a sequence of ints"):
        max_ranks(np.ones((2, 2), dtype=int), (2, 2))


def test_max_ranks_are_unfolding_ranks():
    # Bond k: min(prod_{l<=k} m_l n_l, prod_{l>k} m_l n_l).
    assert max_ranks((4, 8, 8, 4), (4, 8, 8, 4)) == (1, 16, 1024, 16, 1)
    assert max_ranks((784, 1), (1, 10)) == (1, 10, 1)
    assert max_ranks((5,), (3,)) == (1, 1)


def test_resolve_ranks_int_is_a_cap():
    assert resolve_ranks(8, (4, 8, 8, 4), (4, 8, 8, 4)) == (1, 8, 8, 8, 1)
    assert resolve_ranks(50, (784, 1), (1, 10)) == (1, 10, 1)
    assert resolve_ranks(3, (2, 2), (1, 1)) == (1, 2, 1)


def test_resolve_ranks_sequence_is_used_as_given():
    assert resolve_ranks((3, 5, 2), (4, 8, 8, 4), (4, 8, 8, 4)) == (1, 3, 5, 2, 1)
    with pytest.warns(UserWarning, match="exceeds the largest useful ranks"):
        assert resolve_ranks((50,), (784, 1), (1, 10)) == (1, 50, 1)


@pytest.mark.parametrize(
    ("rank", "error", "match"),
    [
        (0, ValueError, "positive"),
        (-2, ValueError, "positive"),
        ((3,), ValueError, "3 inner bond ranks"),
        ((3, 3, 3, 3), ValueError, "3 inner bond ranks"),
        ((3, 0, 3), ValueError, "positive"),
        (2.5, TypeError, "int or a sequence"),
        (True, TypeError, "int or a sequence"),
        ("8", TypeError, "int or a sequence"),
    ],
)
def test_resolve_ranks_rejects_bad_rank(rank, error, match):
    with pytest.raises(error, match=match):
        resolve_ranks(rank, (4, 8, 8, 4), (4, 8, 8, 4))


def test_validate_modes_messages():
    with pytest.raises(
        ValueError, match=r"in_modes must multiply to in_features=784; got \(4, 7, 27\)"
    ):
        validate_modes(784, 10, (4, 7, 27), None)
    with pytest.raises(ValueError, match="out_modes must multiply to out_features=10"):
        validate_modes(784, 10, None, (3, 3))
    with pytest.raises(ValueError, match="same length"):
        validate_modes(784, 10, (28, 28), (1, 2, 5))
    with pytest.raises(ValueError, match="num_cores=3 disagrees"):
        validate_modes(784, 10, (28, 28), None, num_cores=3)
    with pytest.raises(TypeError, match="in_modes must hold ints"):
        validate_modes(784, 10, (28.0, 28), None)
    # One side given: the other is factorized to the same length.
    assert validate_modes(784, 10, (28, 28), None) == ((28, 28), (2, 5))


def test_max_ranks_rejects_modes_of_different_lengths():
    with pytest.raises(ValueError, match="same length"):
        max_ranks((2, 3), (2,))


def test_num_parameters():
    assert num_parameters((784, 1), (1, 10), (1, 50, 1)) == 784 * 50 + 50 * 10


def test_ranks_at_their_caps_do_not_warn():
    # Mutant S2 (bond k compared with cap k - 1): every valid rank sequence warned, and so
    # did from_cores / from_dense / round, which pass the ranks on as a sequence.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert resolve_ranks((4, 4), (2, 2, 2), (2, 2, 2)) == (1, 4, 4, 1)
        TTLinear.from_cores(list(TTLinear(8, 8, 4, in_modes=(2, 2, 2), out_modes=(2, 2, 2)).cores))
    with pytest.warns(UserWarning, match=r"at bonds \[2\]"):
        resolve_ranks((4, 5), (2, 2, 2), (2, 2, 2))


@pytest.mark.parametrize(
    ("sizes", "expected"),
    # round(log2(n) / 3), clamped to [2, 6]: 8/3, 11/3 and 17/3 round up, 10/3 down.
    [((256, 16), 3), ((2048, 7), 4), ((1024, 1024), 3), ((1 << 17, 2), 6), ((8, 8), 2)],
)
def test_default_num_cores_rounds_to_nearest(sizes, expected):
    # Mutant S4 (int() truncates instead of rounding).
    assert default_num_cores(*sizes) == expected
    assert TTLinear(*sizes, rank=2).num_cores == expected


# --- from a mutation audit ------------------------------------------------------------------------


def test_default_num_cores_looks_at_the_larger_side_either_way():
    # The larger side counts, whichever it is.
    assert default_num_cores(7, 2048) == default_num_cores(2048, 7) == 4
    assert len(validate_modes(16, 4096, None, None)[0]) == 4  # round(12 / 3)


@pytest.mark.parametrize(
    "call",
    [
        lambda: factorize(True, 2),
        lambda: factorize(8, True),
        lambda: max_ranks((True, 2), (2, 2)),
        lambda: validate_modes(2, 2, (True, 2), None),
        lambda: tt_svd(torch.eye(2), (True, 2), (2, 1)),
    ],
    ids=["n", "num_cores", "max_ranks", "validate_modes", "tt_svd"],
)
def test_bools_are_not_sizes(call):
    # True would otherwise pass as a mode or size of 1.
    with pytest.raises(TypeError, match=r"got bool|must hold ints"):
        call()


@pytest.mark.parametrize(
    ("sizes", "error", "match"),
    [
        ((0, 0), ValueError, "in_features must be a positive int; got 0"),
        ((-4, 2), ValueError, "in_features must be a positive int; got -4"),
        ((8, -1), ValueError, "out_features must be a positive int; got -1"),
        ((8.5, 3), TypeError, "in_features must be an int; got float 8.5"),
    ],
)
def test_default_num_cores_checks_its_sizes(sizes, error, match):
    # It is public: a size of 0 was a "math domain error", -4 and 8.5 gave a number of cores.
    with pytest.raises(error, match=match):
        default_num_cores(*sizes)
