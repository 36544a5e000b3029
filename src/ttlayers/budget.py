r"""One parameter budget for a whole model: choosing each layer's TT shape and ranks.

Given several layers and a total number of core parameters, pick for every layer its number
of cores, its modes (from a few candidates, plain low rank among them) and its bond ranks,
so that the sum of the layers' squared relative errors is as small as the budget allows.

Error model. For a TT matrix obtained by truncating a chain of SVDs, the squared error is the
sum over the bonds of the squared singular values dropped there (Oseledets 2011: an upper
bound for TT-SVD, and exact for one bond, i.e. for plain low rank). So each bond's rank
``r_k`` contributes ``sum_{i >= r_k} s_{k,i}^2``, with ``s_k`` the singular values of the
bond-``k`` unfolding of the layer's matrix. With calibration data that matrix is the
Kronecker-whitened optimum ``W* K`` of :mod:`ttlayers.calibration`, so the estimate is of the
*output* error (exact for plain low rank; an estimate from the Kronecker approximation of the
input covariance otherwise). Errors are relative to the layer's norm in the same metric, so
every layer counts equally whatever its scale.

Allocation. Per layer and candidate shape, a greedy path raises one bond rank at a time, the
bond whose next singular value removes the most error per added parameter. All the points of
all of a layer's candidates are reduced to their lower convex hull (error against
parameters); across layers, the hull segment with the steepest error decrease per parameter
is taken next, as long as it fits in the budget. On convex curves this greedy order is
optimal (it is the Lagrangian relaxation ``min sum_l e_l + λ p_l`` swept over ``λ``); the
result meets the budget to within one step of one layer. What it leaves over is then spent on
points off the hulls, the largest error drop that still fits first. Between the hull's steps
the result can fall short of the exact optimum, a multiple-choice knapsack problem.

Comparable errors are an assumption: equal relative errors in two layers need not hurt the
model equally (in a transformer, say, the feed-forward output projections matter more than
their relative output errors suggest). :func:`allocate_evenly` gives every layer its own
share of the budget instead, and chooses only its shape and ranks within it.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ttlayers.calibration import (
    DEFAULT_RIDGE,
    ActivationStatistics,
    check_statistics,
    weighted_problem,
)
from ttlayers.decomposition import check_matrix
from ttlayers.shapes import is_int, max_ranks, num_parameters, suggest_modes, validate_modes

__all__ = [
    "RankChoice",
    "allocate",
    "allocate_evenly",
    "bond_spectra",
    "candidate_shapes",
    "layer_options",
]


@dataclass(frozen=True)
class RankChoice:
    """One TT shape for one layer, with its parameter count and estimated error.

    Attributes:
        in_modes: The ``d`` input modes.
        out_modes: The ``d`` output modes.
        ranks: The ``d + 1`` bond ranks.
        parameters: Core parameters, ``sum_k r_k m_k n_k r_{k+1}``.
        error: Estimated relative error (see the module docstring).
    """

    in_modes: tuple[int, ...]
    out_modes: tuple[int, ...]
    ranks: tuple[int, ...]
    parameters: int
    error: float

    @property
    def num_cores(self) -> int:
        """The number of cores ``d``."""
        return len(self.in_modes)


def _core_counts(num_cores: int | Sequence[int]) -> tuple[int, ...]:
    """``num_cores`` as a tuple: one int is a tuple of one; any iterable of ints is taken."""
    given: object = num_cores  # checked as what a caller may pass, not as annotated
    if isinstance(given, np.ndarray) and given.ndim == 0:
        given = given.item()
    if is_int(given):
        return (int(given),)
    if isinstance(given, (str, bytes, torch.Tensor)) or not isinstance(given, Iterable):
        raise TypeError(
            f"num_cores must be an int or a sequence of ints; got {type(given).__name__}."
        )
    counts = tuple(given.tolist() if isinstance(given, np.ndarray) else given)
    if not counts:
        raise ValueError("num_cores must hold at least one number of cores; got none.")
    return counts


def candidate_shapes(
    in_features: int, out_features: int, num_cores: int | Sequence[int] = (2, 3)
) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """The ``(in_modes, out_modes)`` a layer may take: plain low rank, then balanced TT shapes.

    Args:
        in_features: Input size.
        out_features: Output size.
        num_cores: The ``d`` of the balanced candidates (:func:`ttlayers.suggest_modes`);
            one int or several.

    Returns:
        ``[((1, in_features), (out_features, 1)), ...]`` without duplicates: plain low rank
        ``W = A B`` is the 2-core TT whose first core holds all the outputs and the second all
        the inputs.

    Raises:
        TypeError: If a size or a number of cores is not an int.
        ValueError: If one is not positive, or ``num_cores`` is empty.

    Example:
        >>> candidate_shapes(784, 256, num_cores=(2, 3))
        [((1, 784), (256, 1)), ((28, 28), (16, 16)), ((7, 14, 8), (4, 8, 8))]
    """
    shapes: list[tuple[tuple[int, ...], tuple[int, ...]]] = [((1, in_features), (out_features, 1))]
    for d in _core_counts(num_cores):
        shape = suggest_modes(in_features, out_features, d)
        if shape not in shapes:
            shapes.append(shape)
    return shapes


def bond_spectra(
    matrix: torch.Tensor, in_modes: Sequence[int], out_modes: Sequence[int]
) -> list[torch.Tensor]:
    """Singular values of the ``d - 1`` bond unfoldings of a matrix, in TT layout.

    The unfolding at bond ``k`` has rows ``(j_1, i_1, ..., j_k, i_k)`` and columns the rest
    (the pairing of :func:`ttlayers.tt_svd`).

    Args:
        matrix: Shape ``(prod out_modes, prod in_modes)``.
        in_modes: The ``d`` input modes.
        out_modes: The ``d`` output modes.

    Returns:
        ``d - 1`` tensors of singular values, descending, in float64 on the matrix's device.

    Raises:
        TypeError: If ``matrix`` is not a dense floating-point tensor, or a mode is not an int.
        ValueError: If ``matrix`` is not 2-D, has a size of 0 or holds NaN or Inf, or the modes
            do not multiply to its sizes.
    """
    check_matrix(matrix, finite=True)
    out_features, in_features = matrix.shape
    in_modes, out_modes = validate_modes(in_features, out_features, in_modes, out_modes)
    d = len(in_modes)
    work = matrix.detach().to(torch.float64)
    pairs = [axis for k in range(d) for axis in (d + k, k)]
    grid = work.reshape(*out_modes, *in_modes).permute(pairs)
    spectra = []
    rows = 1
    for k in range(d - 1):
        rows *= in_modes[k] * out_modes[k]
        spectra.append(torch.linalg.svdvals(grid.reshape(rows, -1)))
    return spectra


def _rank_path(
    spectra: Sequence[torch.Tensor],
    in_modes: tuple[int, ...],
    out_modes: tuple[int, ...],
    total: float,
    limit: int,
) -> list[RankChoice]:
    """Greedy path over the bond ranks of one shape, fewest parameters first."""
    d = len(in_modes)
    caps = max_ranks(in_modes, out_modes)
    energy = [s.square().cpu().tolist() for s in spectra]
    caps = tuple(1 if k in (0, d) else min(caps[k], len(energy[k - 1])) for k in range(d + 1))
    tails = [sum(e) for e in energy]
    ranks = [1] * (d + 1)
    for k in range(1, d):
        tails[k - 1] -= energy[k - 1][0]
    sizes = [m * n for m, n in zip(in_modes, out_modes, strict=True)]

    def point() -> RankChoice:
        params = num_parameters(in_modes, out_modes, ranks)
        error = math.sqrt(max(sum(tails), 0.0) / total) if total > 0 else 0.0
        return RankChoice(in_modes, out_modes, tuple(ranks), params, error)

    path = [point()]
    while True:
        best, best_ratio, best_cost = 0, -1.0, 0
        for k in range(1, d):
            # A bond rank is at most its neighbours' ranks times their cores' sizes: more is
            # what TT-SVD cannot build (left) or redundant (right).
            if ranks[k] >= min(caps[k], ranks[k - 1] * sizes[k - 1], ranks[k + 1] * sizes[k]):
                continue
            gain = energy[k - 1][ranks[k]]
            cost = sizes[k - 1] * ranks[k - 1] + sizes[k] * ranks[k + 1]
            if gain / cost > best_ratio:
                best, best_ratio, best_cost = k, gain / cost, cost
        if best:
            raised = list(ranks)
            raised[best] += 1
        else:
            # Bonds that can only grow together, such as the two around a core with
            # m n = 1 (r_k <= r_{k+1} and r_{k+1} <= r_k), once no bond can grow alone.
            moves = [m for k in range(1, d) if (m := _joint_step(ranks, k, caps, sizes))]
            if not moves:
                break
            added = [num_parameters(in_modes, out_modes, m) - path[-1].parameters for m in moves]
            ratios = [_gain(energy, ranks, m) / a for m, a in zip(moves, added, strict=True)]
            pick = ratios.index(max(ratios))
            raised, best_cost = moves[pick], added[pick]
        # Never as many parameters as the dense layer: that would not compress it.
        if path[-1].parameters + best_cost >= limit:
            break
        for k in range(1, d):
            tails[k - 1] -= sum(energy[k - 1][ranks[k] : raised[k]])
        ranks[:] = raised
        path.append(point())
    return path


def _joint_step(
    ranks: Sequence[int], k: int, caps: Sequence[int], sizes: Sequence[int]
) -> list[int] | None:
    """``ranks`` with bond ``k`` one higher, and its neighbours as much higher as needed.

    A bond rank may be at most its neighbour's times the size of the core between them;
    None if the step takes a bond past its cap.
    """
    raised = list(ranks)
    raised[k] += 1
    for j in range(k, 0, -1):  # bond j - 1 must carry bond j through core j - 1
        need = -(-raised[j] // sizes[j - 1])
        if raised[j - 1] >= need:
            break
        raised[j - 1] = need
    for j in range(k, len(ranks) - 1):  # bond j + 1 must carry bond j through core j
        need = -(-raised[j] // sizes[j])
        if raised[j + 1] >= need:
            break
        raised[j + 1] = need
    return raised if all(r <= cap for r, cap in zip(raised, caps, strict=True)) else None


def _gain(energy: Sequence[Sequence[float]], ranks: Sequence[int], raised: Sequence[int]) -> float:
    """The squared error a step from ``ranks`` to ``raised`` removes (TT-SVD's estimate)."""
    return sum(sum(energy[k - 1][ranks[k] : raised[k]]) for k in range(1, len(ranks) - 1))


def layer_options(
    weight: torch.Tensor,
    *,
    statistics: ActivationStatistics | None = None,
    center: bool = True,
    ridge: float = DEFAULT_RIDGE,
    num_cores: int | Sequence[int] = (2, 3),
    shapes: Sequence[tuple[tuple[int, ...], tuple[int, ...]]] | None = None,
) -> list[RankChoice]:
    """Every (shape, ranks) point one layer may take, with its estimated error.

    Args:
        weight: ``W``, shape ``(out_features, in_features)``.
        statistics: The layer's input statistics; with them the errors are of the outputs
            on that data (see the module docstring), without them of the weight.
        center: Centered moments (a layer whose bias is refitted), as in
            :func:`ttlayers.calibration.fit_tt`.
        ridge: The relative ridge of :func:`ttlayers.calibration.weighted_problem`.
        num_cores: The ``d`` of the balanced candidate shapes; one int or several.
        shapes: The candidate ``(in_modes, out_modes)``; default :func:`candidate_shapes`.

    Returns:
        The points of every candidate's greedy path, each with fewer parameters than the
        dense layer. Only where no shape has such a point, the first points (all ranks 1),
        which have as many or more: the choices of a layer that cannot be made smaller.

    Raises:
        TypeError: If ``weight`` is not a floating-point tensor, ``statistics`` is not an
            :class:`~ttlayers.ActivationStatistics`, ``shapes`` is not a sequence of
            ``(in_modes, out_modes)`` pairs, or a number of cores or a mode is not an int.
        ValueError: If ``weight`` is not 2-D or holds NaN or Inf, ``shapes`` is empty, or a
            shape's modes do not multiply to its sizes.
    """
    check_matrix(weight, "weight", finite=True)
    if statistics is not None:
        check_statistics(statistics)
    out_features, in_features = (int(s) for s in weight.shape)
    if shapes is None:
        shapes = candidate_shapes(in_features, out_features, num_cores)
    shapes = [validate_modes(in_features, out_features, i, o) for i, o in _pairs(shapes)]
    limit = in_features * out_features
    options: list[RankChoice] = []
    for in_modes, out_modes in shapes:
        if statistics is None:
            target = weight.detach().to(torch.float64)
        else:
            problem = weighted_problem(weight, statistics, in_modes, center=center, ridge=ridge)
            target = problem.target
        total = float(target.square().sum())
        spectra = bond_spectra(target, in_modes, out_modes)
        options.extend(_rank_path(spectra, tuple(in_modes), tuple(out_modes), total, limit))
    # A shape whose every core but one has a mode product of 1 (prime sizes, or d above the
    # factors) starts at more parameters than the dense layer, with no error: an allocator
    # given room would choose it and make the layer larger.
    smaller = [option for option in options if option.parameters < limit]
    return smaller or options


def _pairs(shapes: object) -> list[tuple[Sequence[int], Sequence[int]]]:
    """``shapes`` checked to be a non-empty collection of ``(in_modes, out_modes)`` pairs."""
    if isinstance(shapes, (str, bytes, torch.Tensor)) or not isinstance(shapes, Iterable):
        raise TypeError(
            "shapes must be a sequence of (in_modes, out_modes) pairs; got "
            f"{type(shapes).__name__}."
        )
    listed = list(shapes)  # a generator or dict.items() too
    if not listed:
        raise ValueError("shapes must hold at least one (in_modes, out_modes) pair; got none.")
    for k, pair in enumerate(listed):
        if isinstance(pair, (str, bytes)) or not isinstance(pair, Sequence) or len(pair) != 2:
            raise TypeError(f"shapes[{k}] must be an (in_modes, out_modes) pair; got {pair!r}.")
    return [(pair[0], pair[1]) for pair in listed]


def _frontier(options: Sequence[RankChoice]) -> list[RankChoice]:
    """The options no other beats in both parameters and error, fewest parameters first."""
    frontier: list[RankChoice] = []
    for option in sorted(options, key=lambda o: (o.parameters, o.error)):
        if not frontier or option.error < frontier[-1].error:
            frontier.append(option)
    return frontier


def _hull(frontier: Sequence[RankChoice]) -> list[RankChoice]:
    """The lower convex hull of (parameters, squared error) of a frontier, in its order."""
    hull: list[RankChoice] = []
    for option in frontier:
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            # Drop b if it lies on or above the segment a -> option.
            cross = (b.parameters - a.parameters) * (option.error**2 - a.error**2) - (
                option.parameters - a.parameters
            ) * (b.error**2 - a.error**2)
            if cross <= 0:
                hull.pop()
            else:
                break
        hull.append(option)
    return hull


def _check_options(options: object) -> list[list[RankChoice]]:
    """``options`` as lists, checked to be a non-empty list of :class:`RankChoice` per layer."""
    if isinstance(options, (str, bytes)) or not isinstance(options, Iterable):
        raise TypeError(
            "options must be a sequence of one sequence of RankChoice per layer; got "
            f"{type(options).__name__}."
        )
    checked = []
    for k, layer in enumerate(options):
        if isinstance(layer, (str, bytes, RankChoice)) or not isinstance(layer, Iterable):
            raise TypeError(
                f"options[{k}] must be a sequence of RankChoice (one layer's layer_options); "
                f"got {type(layer).__name__}."
            )
        entries = list(layer)
        if not entries:
            raise ValueError(f"layer {k} has no options to choose from.")
        for option in entries:
            if not isinstance(option, RankChoice):
                raise TypeError(
                    f"options[{k}] must hold RankChoice entries; got {type(option).__name__}."
                )
        checked.append(entries)
    return checked


def allocate(options: Sequence[Sequence[RankChoice]], budget: int) -> list[RankChoice]:
    """Choose one option per layer to minimize the summed squared errors within a budget.

    A greedy on each layer's lower convex hull of (parameters, squared error), the steepest
    error drop per parameter first, which is optimal at the budgets its steps land on; the
    budget left over is then spent on the options off the hulls that still fit, the largest
    error drop first. Between hull steps the result can fall short of the optimum (the exact
    choice is a knapsack problem); on tiny layers with few options, by a large factor.

    Args:
        options: Per layer, its candidate points (:func:`layer_options`).
        budget: Total core parameters allowed over all layers.

    Returns:
        One :class:`RankChoice` per layer, in order; their ``parameters`` sum to at most
        ``budget``.

    Raises:
        TypeError: If ``options`` is not a sequence of sequences of :class:`RankChoice`, or
            ``budget`` is not an int.
        ValueError: If a layer has no option, or even the smallest options exceed the budget.

    Example:
        >>> w = torch.randn(64, 64)
        >>> choices = allocate([layer_options(w), layer_options(w)], budget=2048)
        >>> sum(c.parameters for c in choices) <= 2048
        True
    """
    given: object = budget  # checked as what a caller may pass (a NumPy int, say)
    if not is_int(given):
        raise TypeError(f"budget must be an int; got {type(budget).__name__}.")
    budget = int(given)
    frontiers = [_frontier(layer) for layer in _check_options(options)]
    hulls = [_hull(frontier) for frontier in frontiers]
    position = [0] * len(hulls)
    spent = sum(h[0].parameters for h in hulls)
    if spent > budget:
        raise ValueError(
            f"the parameter budget {budget:,} is below the smallest possible TT forms, "
            f"{spent:,} core parameters at rank 1; allow more parameters (a lower compression)."
        )

    def move(k: int) -> tuple[float, int, int] | None:
        here = position[k]
        if here + 1 >= len(hulls[k]):
            return None
        a, b = hulls[k][here], hulls[k][here + 1]
        cost = b.parameters - a.parameters
        slope = (a.error**2 - b.error**2) / max(cost, 1)
        return (-slope, k, cost)

    heap = [m for m in (move(k) for k in range(len(hulls))) if m is not None]
    heapq.heapify(heap)
    while heap:
        _, k, cost = heapq.heappop(heap)
        if spent + cost > budget:
            continue  # this layer cannot grow further; others still may
        spent += cost
        position[k] += 1
        following = move(k)
        if following is not None:
            heapq.heappush(heap, following)
    chosen = [hull[p] for hull, p in zip(hulls, position, strict=True)]
    while True:  # the leftover: each time, the largest drop of error that still fits
        best: tuple[float, int, RankChoice] | None = None
        for k, frontier in enumerate(frontiers):
            for option in frontier:
                extra = option.parameters - chosen[k].parameters
                drop = chosen[k].error ** 2 - option.error**2
                if extra > 0 and spent + extra <= budget and drop > 0:
                    if best is None or drop > best[0]:
                        best = (drop, k, option)
        if best is None:
            return chosen
        _, k, option = best
        spent += option.parameters - chosen[k].parameters
        chosen[k] = option


def allocate_evenly(
    options: Sequence[Sequence[RankChoice]], budgets: Sequence[int]
) -> list[RankChoice]:
    """Choose one option per layer, each within its own budget: the least error that fits.

    The alternative to :func:`allocate` when the layers' errors are not comparable (their
    effect on the model differs): every layer gets its share, for example the same
    compression, and only its shape and ranks within that share are chosen.

    Args:
        options: Per layer, its candidate points (:func:`layer_options`).
        budgets: Per layer, the core parameters it may use.

    Returns:
        One :class:`RankChoice` per layer, in order.

    Raises:
        TypeError: If ``options`` is not a sequence of sequences of :class:`RankChoice`, or a
            budget is not an int.
        ValueError: If the lengths differ, a layer has no options, or none within its budget.
    """
    layers = _check_options(options)
    given: object = budgets  # checked as what a caller may pass, not as annotated
    if isinstance(given, np.ndarray) and given.ndim == 1:
        budgets = given.tolist()
    elif isinstance(given, (str, bytes)) or not isinstance(given, Sequence):
        raise TypeError(f"budgets must be a sequence of ints; got {type(given).__name__}.")
    if len(layers) != len(budgets):
        raise ValueError(
            f"options and budgets must have one entry per layer; got {len(layers)} and "
            f"{len(budgets)}."
        )
    choices = []
    for k, (layer, given_budget) in enumerate(zip(layers, budgets, strict=True)):
        if not is_int(given_budget):  # checked as what a caller may pass, as in allocate
            raise TypeError(f"budgets[{k}] must be an int; got {type(given_budget).__name__}.")
        budget = int(given_budget)
        fitting = [option for option in layer if option.parameters <= budget]
        if not fitting:
            smallest = min(option.parameters for option in layer)
            raise ValueError(
                f"layer {k}'s budget of {budget:,} core parameters is below its smallest TT "
                f"form ({smallest:,}); allow more parameters (a lower compression)."
            )
        choices.append(min(fitting, key=lambda option: (option.error, option.parameters)))
    return choices
