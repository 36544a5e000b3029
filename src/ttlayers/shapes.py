"""Mode factorization and rank rules for TT matrices.

A TT matrix of shape ``(out_features, in_features)`` is described by ``d`` input modes
``m_1..m_d`` (their product is ``in_features``), ``d`` output modes ``n_1..n_d`` (product
``out_features``) and ``d + 1`` bond ranks ``r_0..r_d`` with ``r_0 = r_d = 1``. This module
holds the pure-Python rules that relate them; nothing here touches tensors.
"""

from __future__ import annotations

import functools
import math
import numbers
import operator
import warnings
from collections.abc import Sequence
from functools import reduce
from typing import TypeGuard

import numpy as np

__all__ = [
    "default_num_cores",
    "factorize",
    "max_ranks",
    "num_parameters",
    "resolve_ranks",
    "suggest_modes",
    "validate_modes",
]


def _prod(values: Sequence[int]) -> int:
    return reduce(operator.mul, values, 1)


def is_int(value: object) -> TypeGuard[numbers.Integral]:
    """Whether ``value`` is an integer as an argument may be one: NumPy's too, not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def as_rank_argument(rank: object) -> object:
    """A 1-D NumPy array of ranks as a tuple of Python ints, as modes are read; else ``rank``."""
    if isinstance(rank, np.ndarray) and rank.ndim == 1:
        return tuple(rank.tolist())
    return rank


def check_positive_int(name: str, value: object) -> int:
    """``value`` as an int, checked to be a positive one (a NumPy integer too, not a bool)."""
    if not is_int(value):
        raise TypeError(f"{name} must be an int; got {type(value).__name__} {value!r}.")
    number: int = operator.index(value)
    if number < 1:
        raise ValueError(f"{name} must be a positive int; got {number}.")
    return number


def _prime_factors(n: int) -> list[int]:
    factors: list[int] = []
    p = 2
    while p * p <= n:
        while n % p == 0:
            factors.append(p)
            n //= p
        p += 1
    if n > 1:
        factors.append(n)
    return factors


def _divisors(primes: list[int]) -> list[int]:
    """The divisors, ascending, of the product of ``primes`` (with repetitions)."""
    divisors = [1]
    for p in set(primes):
        divisors = [d * p**e for d in divisors for e in range(primes.count(p) + 1)]
    return sorted(divisors)


def _most_equal_factors(n: int, count: int) -> tuple[int, ...]:
    """``count`` factors of ``n``, ascending, whose descending order is smallest."""
    # Beyond one factor per prime the rest are 1s: a 1 beside a composite factor is never
    # most equal (splitting the composite one lowers it). So the search is at most as deep
    # as n has prime factors.
    primes = _prime_factors(n)
    if count > len(primes):
        ones = (1,) * (count - len(primes))
        return ones + (_most_equal_factors(n, len(primes)) if primes else ())
    divisors = _divisors(primes)

    @functools.cache
    def best(rest: int, k: int, low: int) -> tuple[int, ...] | None:
        # k ascending factors >= low with product rest; the first is at most rest^(1/k).
        if k == 1:
            return (rest,) if rest >= low else None
        found: tuple[int, ...] | None = None
        for factor in divisors:
            if factor < low or rest % factor:
                continue
            if factor**k > rest:
                break
            tail = best(rest // factor, k - 1, factor)
            if tail is not None and (found is None or tail[::-1] < found[1:][::-1]):
                found = (factor, *tail)
        return found

    result = best(n, count, 1)
    assert result is not None  # (1, ..., 1, n) always qualifies
    return result


def factorize(n: int, num_cores: int) -> tuple[int, ...]:
    """Split ``n`` into ``num_cores`` balanced integer factors.

    Of all the ways to write ``n`` as a product of ``num_cores`` factors, the most equal: the
    smallest largest factor, then the smallest second largest, and so on (``72`` in two is
    ``(8, 9)``, not ``(6, 12)``). Sizes with fewer prime factors than ``num_cores`` get
    factors of 1. The result is ordered small-large-small (the largest factors in the
    middle), because bonds near the ends of a TT chain are capped by the modes there and
    large end modes waste parameters.

    Args:
        n: The size to factorize, ``n >= 1``.
        num_cores: How many factors, ``num_cores >= 1``.

    Returns:
        A tuple of ``num_cores`` positive ints whose product is ``n``.

    Raises:
        TypeError: If an argument is not an int.
        ValueError: If an argument is not positive.

    Example:
        >>> factorize(1024, 4)
        (4, 8, 8, 4)
        >>> factorize(10, 3)
        (1, 5, 2)
    """
    n = check_positive_int("n", n)  # a NumPy integer becomes an int
    num_cores = check_positive_int("num_cores", num_cores)
    ordered = _most_equal_factors(n, num_cores)
    # Deal the sorted factors alternately to the two ends, so the largest land in the middle.
    left: list[int] = []
    right: list[int] = []
    for k, factor in enumerate(ordered):
        (left if k % 2 == 0 else right).append(factor)
    return tuple(left + right[::-1])


def default_num_cores(in_features: int, out_features: int) -> int:
    """The number of cores used when none is given: about 8 per mode, between 2 and 6.

    Args:
        in_features: Input size.
        out_features: Output size.

    Returns:
        ``clamp(round(log2(max(in_features, out_features)) / 3), 2, 6)``.

    Raises:
        TypeError: If a size is not an int.
        ValueError: If a size is not positive.
    """
    largest = max(
        check_positive_int("in_features", in_features),
        check_positive_int("out_features", out_features),
    )
    return min(6, max(2, round(math.log2(largest) / 3)))


def suggest_modes(
    in_features: int, out_features: int, num_cores: int | None = None
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Balanced input and output modes for a TT matrix of shape ``(out_features, in_features)``.

    Args:
        in_features: Input size, factorized into ``in_modes``.
        out_features: Output size, factorized into ``out_modes``.
        num_cores: Number of cores ``d``; defaults to :func:`default_num_cores`.

    Returns:
        ``(in_modes, out_modes)``, two tuples of ``d`` ints with products ``in_features`` and
        ``out_features``.

    Raises:
        TypeError: If an argument is not an int.
        ValueError: If an argument is not positive.

    Example:
        >>> suggest_modes(784, 1024, num_cores=3)
        ((7, 14, 8), (8, 16, 8))
    """
    check_positive_int("in_features", in_features)
    check_positive_int("out_features", out_features)
    if num_cores is None:
        num_cores = default_num_cores(in_features, out_features)
    check_positive_int("num_cores", num_cores)
    return factorize(in_features, num_cores), factorize(out_features, num_cores)


def validate_modes(
    in_features: int,
    out_features: int,
    in_modes: Sequence[int] | None,
    out_modes: Sequence[int] | None,
    num_cores: int | None = None,
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Check given modes, or fill in the missing ones, for a TT matrix.

    Args:
        in_features: Input size.
        out_features: Output size.
        in_modes: Factors of ``in_features``, or ``None`` to choose them.
        out_modes: Factors of ``out_features``, or ``None`` to choose them.
        num_cores: Number of cores when both modes are omitted; when one is given, its length
            wins and ``num_cores``, if given too, must agree with it.

    Returns:
        ``(in_modes, out_modes)`` as tuples of equal length ``d``.

    Raises:
        TypeError: If a size or a mode is not an int, or modes are not a sequence.
        ValueError: If a product is wrong, a mode is not positive, the lengths differ, or
            ``num_cores`` disagrees with the given modes.
    """
    in_features = check_positive_int("in_features", in_features)
    out_features = check_positive_int("out_features", out_features)
    if num_cores is not None:
        num_cores = check_positive_int("num_cores", num_cores)
    given = {
        name: _as_int_tuple(name, modes)
        for name, modes in (("in_modes", in_modes), ("out_modes", out_modes))
        if modes is not None
    }
    if given:
        lengths = {len(modes) for modes in given.values()}
        if len(lengths) > 1:
            raise ValueError(
                f"in_modes and out_modes must have the same length (one per core); got "
                f"in_modes={given['in_modes']} and out_modes={given['out_modes']}."
            )
        d = lengths.pop()
        if num_cores is not None and num_cores != d:
            raise ValueError(
                f"num_cores={num_cores} disagrees with the {d} modes given; omit num_cores "
                "or pass modes of that length."
            )
        num_cores = d
    if num_cores is None:
        num_cores = default_num_cores(in_features, out_features)
    resolved: list[tuple[int, ...]] = []
    for name, features, modes in (
        ("in", in_features, in_modes),
        ("out", out_features, out_modes),
    ):
        if modes is None:
            resolved.append(factorize(features, num_cores))
            continue
        modes_t = given[f"{name}_modes"]
        if _prod(modes_t) != features:
            raise ValueError(
                f"{name}_modes must multiply to {name}_features={features}; got {modes_t} "
                f"with product {_prod(modes_t)}. Omit {name}_modes to factorize automatically."
            )
        resolved.append(modes_t)
    return resolved[0], resolved[1]


def _as_int_tuple(name: str, values: Sequence[int]) -> tuple[int, ...]:
    given: object = values  # checked as what a caller may pass, not as annotated
    if isinstance(given, np.ndarray) and given.ndim == 1:  # a NumPy vector of modes
        values = given.tolist()
    elif isinstance(given, (str, bytes)) or not isinstance(given, Sequence):
        raise TypeError(f"{name} must be a sequence of ints; got {type(values).__name__}.")
    if len(values) == 0:
        what = "rank" if name.startswith("rank") else "mode"
        raise ValueError(f"{name} must hold at least one {what}; got an empty sequence.")
    for value in values:
        if not is_int(value):
            raise TypeError(f"{name} must hold ints; got {tuple(values)!r}.")
        if value < 1:
            raise ValueError(f"{name} must hold positive ints; got {tuple(values)}.")
    return tuple(int(v) for v in values)


def max_ranks(in_modes: Sequence[int], out_modes: Sequence[int]) -> tuple[int, ...]:
    """The largest useful bond ranks of a TT matrix with these modes.

    Bond ``k`` separates cores ``1..k`` from ``k+1..d``; its rank can never usefully exceed
    the smaller of ``prod_{l<=k} m_l n_l`` and ``prod_{l>k} m_l n_l`` (the ranks of the
    matrix unfolding there).

    Args:
        in_modes: The ``d`` input modes.
        out_modes: The ``d`` output modes.

    Returns:
        A tuple of ``d + 1`` ints, 1 at both ends.

    Raises:
        TypeError: If a mode is not an int.
        ValueError: If a mode is not positive, or the two sequences differ in length or are
            empty.
    """
    in_modes = _as_int_tuple("in_modes", in_modes)
    out_modes = _as_int_tuple("out_modes", out_modes)
    if len(in_modes) != len(out_modes):
        raise ValueError(
            f"in_modes and out_modes must have the same length; got {tuple(in_modes)} and "
            f"{tuple(out_modes)}."
        )
    sizes = [m * n for m, n in zip(in_modes, out_modes, strict=True)]
    total = _prod(sizes)
    caps = [1]
    left = 1
    for size in sizes[:-1]:
        left *= size
        caps.append(min(left, total // left))
    caps.append(1)
    return tuple(caps)


def resolve_ranks(
    rank: int | Sequence[int], in_modes: Sequence[int], out_modes: Sequence[int]
) -> tuple[int, ...]:
    """Turn a rank argument into the ``d + 1`` bond ranks of a TT matrix.

    Args:
        rank: An int, the largest bond rank (each bond is further capped by
            :func:`max_ranks`), or a sequence of the ``d - 1`` inner ranks, used as given. An
            inner rank above the cap is legal but wasteful, so it triggers a ``UserWarning``.
        in_modes: The ``d`` input modes.
        out_modes: The ``d`` output modes.

    Returns:
        ``(1, r_1, ..., r_{d-1}, 1)``.

    Raises:
        TypeError: If ``rank`` is not an int or a sequence of ints.
        ValueError: If a rank is not positive or the sequence has the wrong length.
    """
    caps = max_ranks(in_modes, out_modes)
    d = len(caps) - 1
    rank = as_rank_argument(rank)  # type: ignore[assignment]
    if isinstance(rank, bool):
        raise TypeError(f"rank must be an int or a sequence of ints; got {rank!r}.")
    if is_int(rank):
        cap_all = operator.index(rank)
        if cap_all < 1:
            raise ValueError(f"rank must be a positive int; got {cap_all}.")
        return tuple(min(cap_all, cap) for cap in caps)
    if isinstance(rank, (str, bytes)) or not isinstance(rank, Sequence):
        raise TypeError(
            f"rank must be an int or a sequence of ints; got {type(rank).__name__} {rank!r}."
        )
    if len(rank) != d - 1:
        raise ValueError(
            f"rank as a sequence must give the {d - 1} inner bond ranks of a {d}-core chain; "
            f"got {len(rank)} values {tuple(rank)}."
        )
    inner = _as_int_tuple("rank", rank) if d > 1 else ()
    over = [k + 1 for k, r in enumerate(inner) if r > caps[k + 1]]
    if over:
        warnings.warn(
            f"rank {inner} exceeds the largest useful ranks {caps[1:-1]} at bonds {over}; "
            "the extra rank adds parameters but cannot add expressiveness.",
            UserWarning,
            stacklevel=3,
        )
    return (1, *inner, 1)


def num_parameters(in_modes: Sequence[int], out_modes: Sequence[int], ranks: Sequence[int]) -> int:
    """Number of entries of the cores: ``sum_k r_k m_k n_k r_{k+1}``.

    Args:
        in_modes: The ``d`` input modes.
        out_modes: The ``d`` output modes.
        ranks: The ``d + 1`` bond ranks, ``(1, r_1, ..., r_{d-1}, 1)``.

    Returns:
        The number of weight parameters of the TT form (the bias not included).

    Raises:
        TypeError: If a mode or a rank is not an int.
        ValueError: If one is not positive, the lengths are not ``d``, ``d`` and ``d + 1``, or
            the ranks are not 1 at both ends.
    """
    in_modes = _as_int_tuple("in_modes", in_modes)
    out_modes = _as_int_tuple("out_modes", out_modes)
    ranks = _as_int_tuple("ranks", ranks)
    if len(out_modes) != len(in_modes) or len(ranks) != len(in_modes) + 1:
        raise ValueError(
            "in_modes, out_modes and ranks must have lengths d, d and d + 1; got "
            f"{in_modes}, {out_modes} and {ranks}."
        )
    if ranks[0] != 1 or ranks[-1] != 1:
        raise ValueError(f"ranks must be 1 at both ends; got {ranks}.")
    return sum(
        ranks[k] * m * n * ranks[k + 1]
        for k, (m, n) in enumerate(zip(in_modes, out_modes, strict=True))
    )
