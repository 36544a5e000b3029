"""TT-SVD and TT-rounding of TT matrices (Oseledets 2011), and their achieved errors.

Both algorithms truncate a chain of SVDs, one per bond. Bond ``k`` separates cores ``1..k``
from ``k+1..d``; with the cores on one side orthonormal, the Frobenius error made by dropping
singular values there is exactly the norm of the dropped tail, and the errors of the ``d - 1``
bonds add in squares (Oseledets 2011, Theorem 2.2). So a per-bond tolerance of
``eps / sqrt(d - 1) * ||W||_F`` guarantees ``||W - W_tt||_F <= eps * ||W||_F``.

Truncation rule at each bond, shared by :func:`tt_svd` and :func:`tt_round`:

- ``eps`` given: the smallest rank whose dropped tail has norm at most the bond tolerance.
- ``rank`` given: at most that rank (an int caps every bond, a sequence gives each inner bond
  its own cap). With ``eps`` too, the smaller rank wins, and the ``eps`` bound then holds only
  where the cap did not bind.
- Neither: exact; only singular values that are zero to working precision
  (``<= max(rows, cols) * finfo.eps * s_max``) are dropped.
- Always: at least rank 1, and never more than the unfolding allows, so no bond exceeds
  :func:`ttlayers.max_ranks`.

With a ``rank`` cap and no ``eps``, zero singular values are kept up to the cap: the
requested ranks are what a user fine-tunes with, even when the source is low-rank.
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Sequence

import torch

from ttlayers.contraction import (
    check_same_kind,
    check_strided,
    core_list,
    core_shapes,
    tt_to_dense,
)
from ttlayers.shapes import max_ranks, resolve_ranks, validate_modes

__all__ = ["relative_error", "tt_relative_error", "tt_round", "tt_svd"]


# --- argument checks -----------------------------------------------------------------------


def check_eps(eps: object) -> None:
    """Check a relative error bound: ``None`` or a real number in ``(0, 1)``.

    Raises:
        TypeError: If ``eps`` is not a real number.
        ValueError: If ``eps`` is not in ``(0, 1)`` (NaN included).
    """
    if eps is None:
        return
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real):
        raise TypeError(f"eps must be a float in (0, 1) or None; got {type(eps).__name__}.")
    if not 0.0 < float(eps) < 1.0:
        raise ValueError(
            f"eps must be a relative Frobenius error bound in (0, 1); got {eps}. For a fixed "
            "rank pass rank= instead; for an exact decomposition pass neither."
        )


def _bond_caps(
    rank: int | Sequence[int] | None, in_modes: Sequence[int], out_modes: Sequence[int]
) -> tuple[int, ...]:
    """The ``d + 1`` largest ranks allowed at each bond: the request, clipped to the feasible."""
    feasible = max_ranks(in_modes, out_modes)
    if rank is None:
        return feasible
    with warnings.catch_warnings():
        # resolve_ranks warns about wasted parameters; here an excess is clipped instead.
        warnings.simplefilter("ignore", UserWarning)
        requested = resolve_ranks(rank, in_modes, out_modes)
    over = [k for k in range(1, len(feasible) - 1) if requested[k] > feasible[k]]
    if over and not isinstance(rank, int):
        warnings.warn(
            f"rank {tuple(requested[1:-1])} exceeds the largest useful ranks "
            f"{feasible[1:-1]} at bonds {over}; clipped there.",
            UserWarning,
            stacklevel=3,
        )
    return tuple(min(r, cap) for r, cap in zip(requested, feasible, strict=True))


def _check_finite(name: str, tensor: torch.Tensor) -> None:
    if tensor.device.type == "meta":
        raise ValueError(
            f"{name} is on the meta device, which holds no values to decompose; load the "
            "weights first (for a model built on the meta device, its state_dict)."
        )
    if not bool(torch.isfinite(tensor).all()):
        raise ValueError(
            f"{name} holds NaN or Inf values (shape {tuple(tensor.shape)}); a TT decomposition "
            "needs finite entries. Check the weights for divergence before converting."
        )


def _working_dtype(dtype: torch.dtype) -> torch.dtype:
    # LAPACK / cuSOLVER have no half-precision SVD, and half precision cannot hold the sums.
    return torch.promote_types(dtype, torch.float32)


def _warn_below_precision(eps: float | None, dtype: torch.dtype, result: torch.dtype) -> None:
    # The bound is kept in the working precision; below a few hundred units of its roundoff
    # the SVDs' own rounding can exceed it (float32: eps = 1e-8 ends near 1e-6). Cores
    # returned in half precision are rounded once more, by about sqrt(d) units of it.
    # The result's rounding first: a half-precision result's floor is far above the working
    # precision's, and decomposing in float64 cannot lower it.
    resolution = 100 * torch.finfo(dtype).eps
    if eps is not None and result != dtype and eps < 10 * torch.finfo(result).eps:
        warnings.warn(
            f"eps={eps:g} is close to the rounding of the {result} result (about "
            f"{torch.finfo(result).eps:.0e} per entry); rounding the cores to {result} can "
            "exceed the bound. Convert the weight to float32 first for a tighter eps.",
            UserWarning,
            stacklevel=3,
        )
    elif eps is not None and eps < resolution:
        warnings.warn(
            f"eps={eps:g} is below what {dtype} can resolve (about {resolution:.0e}); the "
            "error bound cannot be kept that tight. Decompose in float64 for a smaller eps.",
            UserWarning,
            stacklevel=3,
        )


def _check_cores(
    name: str, cores: object
) -> tuple[list[torch.Tensor], tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
    """``(cores as a list, (in_modes, out_modes, ranks))``, checked as a chain.

    The cores must be finite real floating-point tensors of one dtype and device.
    """
    listed = core_list(cores, name)
    shapes = core_shapes(listed, name)
    check_same_kind(listed, name)
    for k, core in enumerate(listed):
        _check_finite(f"{name}[{k}]", core)
    return listed, shapes


def check_matrix(matrix: object, name: str = "matrix", *, finite: bool = False) -> None:
    """Check a weight matrix: a 2-D floating-point tensor, with finite values if ``finite``.

    Raises:
        TypeError: If it is not a dense floating-point tensor.
        ValueError: If it is not 2-D or has a size of 0, or (``finite``) is on the meta device
            or holds NaN/Inf.
    """
    if not isinstance(matrix, torch.Tensor):
        raise TypeError(f"{name} must be a tensor; got {type(matrix).__name__}.")
    if matrix.dim() != 2:
        raise ValueError(
            f"{name} must be 2-D (out_features, in_features); got shape {tuple(matrix.shape)}."
        )
    if not matrix.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor; got {matrix.dtype}.")
    check_strided(matrix, name)
    if matrix.numel() == 0:  # else named as the out_features or in_features it is not
        raise ValueError(
            f"{name} has a size of 0 (shape {tuple(matrix.shape)}); a TT matrix has at least "
            "one row and one column."
        )
    if finite:
        _check_finite(name, matrix)


def _safe_range(dtype: torch.dtype) -> tuple[float, float]:
    """The norms at which SVDs and rebuilt products of a matrix go right unscaled.

    Near ``dtype``'s overflow, singular values and ``S Vh`` overflow; low enough, products of
    the entries lose their bits in subnormals.
    """
    info = torch.finfo(dtype)
    return info.tiny / info.eps, info.max / 1024


def _outside_safe_range(norm: float, dtype: torch.dtype) -> bool:
    """Whether a matrix of this norm needs scaling (:func:`_safe_range`)."""
    low, high = _safe_range(dtype)
    return not low <= norm <= high


def _norm(tensor: torch.Tensor) -> float:
    """Frobenius norm accumulated in float64, at any scale of the entries.

    Float32 squares overflow past about 1e19; float64 squares overflow past 1e154 and
    underflow below 1e-162, where a norm of 0 or inf would make every error bound hold. Out
    of a safe range the entries are scaled by the largest first.
    """
    norm = float(torch.linalg.vector_norm(tensor, dtype=torch.float64))
    if 1e-100 < norm < 1e100:  # no square overflowed, and underflowed ones are negligible
        return norm
    scale = float(tensor.detach().abs().max()) if tensor.numel() else 0.0
    if scale == 0.0 or not math.isfinite(scale):
        return scale
    return scale * float(torch.linalg.vector_norm(tensor / scale, dtype=torch.float64))


# --- truncation ----------------------------------------------------------------------------


def _bond_tolerance(
    eps: float | None, d: int, norm: float, dtype: torch.dtype, result: torch.dtype
) -> float | None:
    """Per-bond tail tolerance ``eps / sqrt(d - 1) * ||W||_F``, less rounding margins.

    The first margin (a few units of working precision per core) keeps the guarantee true
    for the error as measured in that precision, not only in exact arithmetic. Cores
    returned in half precision (``result``) are rounded once more, by about
    ``sqrt(d / 3)`` units of roundoff of ``W`` in all: an error that, unrelated to the
    truncation's, adds to it in quadrature. The truncation gets what is left of ``eps`` after
    ``sqrt(d)`` units of ``result``'s precision (3.5 times that rounding); without this, a
    bfloat16 weight truncated right at ``eps`` came out up to 3e-5 over it.
    """
    if eps is None or d < 2:
        return None
    allowed = max(float(eps) - 8 * d * torch.finfo(dtype).eps, 0.0)
    if result in (torch.float16, torch.bfloat16):
        rounding = math.sqrt(d) * torch.finfo(result).eps
        allowed = math.sqrt(max(allowed**2 - rounding**2, 0.0))
    return allowed / math.sqrt(d - 1) * norm


def _truncation_rank(
    singular_values: torch.Tensor, cap: int, tolerance: float | None, zero_scale: int | None
) -> int:
    """The rank to keep at one bond, given its singular values in descending order.

    Args:
        singular_values: ``s``, descending.
        cap: Largest rank allowed.
        tolerance: Largest norm the dropped tail ``s[r:]`` may have, or ``None``.
        zero_scale: If given, values ``<= zero_scale * finfo.eps * s[0]`` count as zero and are
            dropped (the unfolding's larger side, as in ``numpy.linalg.matrix_rank``).
    """
    s = singular_values.detach().to("cpu", torch.float64)
    rank = min(cap, s.numel())
    if tolerance is not None:
        # tails[r] = ||s[r:]||, the error of keeping r values; the smallest r within budget.
        # Relative to s[0], so that no square overflows or underflows at any scale of W.
        top = float(s[0]) if s.numel() and float(s[0]) > 0.0 else 1.0
        tails = (s / top).flip(0).square().cumsum(0).flip(0).sqrt()
        within = (tails <= tolerance / top).nonzero()
        rank = min(rank, int(within[0]) if within.numel() else s.numel())
    if zero_scale is not None and s.numel():
        # The small factors first: s[0] * zero_scale alone overflowed to inf for float64
        # weights near 1e306, which made every value "zero" and the rank 1.
        zero = float(s[0]) * (zero_scale * torch.finfo(singular_values.dtype).eps)
        rank = min(rank, int((s > zero).sum()))
    return max(rank, 1)


def _truncated_svd(
    unfolding: torch.Tensor, cap: int, tolerance: float | None, exact: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Split ``A ≈ U (S Vh)`` at the truncation rank ``r``: returns ``U (rows, r)``, ``S Vh``."""
    u, s, vh = torch.linalg.svd(unfolding, full_matrices=False)
    r = _truncation_rank(s, cap, tolerance, max(unfolding.shape) if exact else None)
    return u[:, :r], s[:r, None] * vh[:r]


# --- TT-SVD and rounding -------------------------------------------------------------------


def tt_svd(
    matrix: torch.Tensor,
    in_modes: Sequence[int],
    out_modes: Sequence[int],
    *,
    rank: int | Sequence[int] | None = None,
    eps: float | None = None,
) -> list[torch.Tensor]:
    r"""Decompose a dense matrix into TT-matrix cores by TT-SVD (Oseledets 2011, Algorithm 1).

    The matrix is reshaped to ``(n_1, ..., n_d, m_1, ..., m_d)`` and its modes paired as
    ``(m_1, n_1, ..., m_d, n_d)``, so the unfolding at bond ``k`` has rows
    ``(j_1, i_1, ..., j_k, i_k)``. A left-to-right sweep of truncated SVDs then peels off one
    core per pair. See the module docstring for the truncation rule.

    Args:
        matrix: ``W`` of shape ``(out_features, in_features)``, finite, floating point.
        in_modes: ``d`` factors ``m_k`` of ``in_features``.
        out_modes: ``d`` factors ``n_k`` of ``out_features``.
        rank: Cap on every bond rank (an int), or the ``d - 1`` inner caps.
        eps: Relative Frobenius error bound in ``(0, 1)``:
            ``||W - tt_to_dense(cores)||_F <= eps * ||W||_F`` is guaranteed (in the working
            precision; a float16/bfloat16 result adds its own rounding) unless a ``rank`` cap
            binds first.

    Returns:
        ``d`` cores, core ``k`` of shape ``(r_k, m_k, n_k, r_{k+1})`` with ``r_0 = r_d = 1``,
        on the matrix's device and in its dtype, such that ``tt_to_dense(cores) ≈ W``. Float16
        and bfloat16 matrices are decomposed in float32.

    Raises:
        TypeError: If ``matrix`` is not a dense floating-point tensor, or an argument has a
            bad type.
        ValueError: If ``matrix`` is not 2-D, has a size of 0 or holds NaN/Inf, the modes do
            not multiply to its sizes, ``eps`` is outside ``(0, 1)``, or a rank is not
            positive.

    Example:
        >>> w = torch.randn(6, 4, dtype=torch.float64)
        >>> cores = tt_svd(w, in_modes=(2, 2), out_modes=(3, 2))
        >>> [tuple(c.shape) for c in cores]
        [(1, 2, 3, 4), (4, 2, 2, 1)]
        >>> torch.allclose(tt_to_dense(cores), w)
        True
    """
    check_matrix(matrix)
    out_features, in_features = (int(size) for size in matrix.shape)
    in_modes_t, out_modes_t = validate_modes(in_features, out_features, in_modes, out_modes)
    check_eps(eps)
    caps = _bond_caps(rank, in_modes_t, out_modes_t)
    _check_finite("matrix", matrix)

    d = len(in_modes_t)
    work = matrix.detach().to(_working_dtype(matrix.dtype))
    _warn_below_precision(eps, work.dtype, matrix.dtype)
    # A finite float32 weight whose norm passes float32's largest value made infinite singular
    # values (Inf cores, or a LAPACK error); subnormal ones lost bits in the products. Such a
    # weight is decomposed divided by a power of two near its largest entry (exactly), which
    # every core then gets about a d-th of, by exponent shifts (exactly).
    exponent = _exponent_of(work) if _outside_safe_range(_norm(work), work.dtype) else 0
    work = _shift(work, -exponent) if exponent else work
    norm = _norm(work)  # after scaling: a norm past float64's range was inf before it
    # (n_1..n_d, m_1..m_d) -> (m_1, n_1, m_2, n_2, ..., m_d, n_d): core k's middle dims.
    pairs = [axis for k in range(d) for axis in (d + k, k)]
    rest = work.reshape(*out_modes_t, *in_modes_t).permute(pairs).reshape(1, -1)
    tolerance = _bond_tolerance(eps, d, norm, work.dtype, matrix.dtype)
    exact = rank is None and eps is None

    cores: list[torch.Tensor] = []
    r = 1
    for k in range(d - 1):
        m, n = in_modes_t[k], out_modes_t[k]
        unfolding = rest.reshape(r * m * n, -1)  # (r_k m_k n_k, prod_{l>k} m_l n_l)
        u, rest = _truncated_svd(unfolding, caps[k + 1], tolerance, exact)
        cores.append(u.reshape(r, m, n, u.shape[1]))
        r = u.shape[1]
    cores.append(rest.reshape(r, in_modes_t[-1], out_modes_t[-1], 1))
    if exponent:
        shares = _shares(exponent, d)
        cores = [_shift(core, share) for core, share in zip(cores, shares, strict=True)]
    return cast_cores(cores, matrix.dtype)


def _shares(exponent: int, d: int) -> list[int]:
    """``d`` integers that differ by at most 1 and add up to ``exponent``."""
    return [exponent // d + (1 if k < exponent % d else 0) for k in range(d)]


def _exponent_of(tensor: torch.Tensor) -> int:
    """``e`` with the largest magnitude in ``[2**e, 2**(e + 1))``; 0 if it is 0 or not finite.

    Dividing by ``2**e`` is exact, and brings the largest entry into ``[1, 2)``.
    """
    peak = float(tensor.detach().abs().max()) if tensor.numel() else 0.0
    return math.frexp(peak)[1] - 1 if 0.0 < peak < math.inf else 0


def _shift(tensor: torch.Tensor, exponent: int) -> torch.Tensor:
    """``tensor * 2**exponent``, exact but for over- or underflow of the result.

    In steps, each a factor the dtype holds, all of one sign, the remainder first: every step
    but the last lands on a normal number, so a subnormal result is rounded once.
    """
    step = math.frexp(torch.finfo(tensor.dtype).max)[1] - 2
    part = exponent - step * int(exponent / step)  # the remainder, of the exponent's sign
    while exponent:
        tensor = tensor * math.ldexp(1.0, part)
        exponent -= part
        part = max(-step, min(step, exponent))
    return tensor


def cast_cores(cores: list[torch.Tensor], dtype: torch.dtype) -> list[torch.Tensor]:
    """The working-precision cores in ``dtype``; into a low-precision one with equal norms.

    The decompositions leave the whole norm of ``W`` in one core; float16 overflows past
    65504, at entries of ``W`` far below that. Scaling every core to the geometric mean of
    their norms (the product, hence ``W``, unchanged) keeps each core's entries near those of
    ``W`` to the power ``1/d``.
    """
    if dtype in (torch.float16, torch.bfloat16):
        # _norm: in float32 the squares of entries below 1e-19 underflow, to a norm of 0
        # that skipped the scaling (a weight of such entries then lost most of its bits
        # in bfloat16's subnormals).
        norms = [_norm(core) for core in cores]
        if all(0.0 < norm < math.inf for norm in norms):
            mean = math.exp(sum(math.log(norm) for norm in norms) / len(norms))
            cores = [core * (mean / norm) for core, norm in zip(cores, norms, strict=True)]
    return [core.to(dtype).contiguous() for core in cores]


def _orthogonalize_right(cores: list[torch.Tensor]) -> list[torch.Tensor]:
    """Make cores ``2..d`` right-orthonormal by QR, right to left; same TT, new list.

    Core ``k`` unfolded as ``(r_k, m_k n_k r_{k+1})`` becomes ``R^T Q^T`` with ``Q``
    orthonormal; ``Q^T`` replaces it and ``R^T`` is absorbed into core ``k - 1``. Afterwards
    the whole TT's Frobenius norm is that of the first core. Cost ``O(d m n r^3)``.
    """
    cores = list(cores)
    for k in range(len(cores) - 1, 0, -1):
        r_left, m, n, r_right = cores[k].shape
        q, r = torch.linalg.qr(cores[k].reshape(r_left, m * n * r_right).mT)
        cores[k] = q.mT.reshape(q.shape[1], m, n, r_right)  # (r_k', m_k, n_k, r_{k+1})
        cores[k - 1] = torch.tensordot(cores[k - 1], r.mT, dims=([3], [0]))
    return cores


def tt_round(
    cores: Sequence[torch.Tensor],
    *,
    rank: int | Sequence[int] | None = None,
    eps: float | None = None,
) -> list[torch.Tensor]:
    """Lower the ranks of a TT matrix without forming it (Oseledets 2011, Algorithm 2).

    Orthogonalizes the chain right to left with QR, then truncates left to right with SVD,
    in ``O(d m n r^3)`` for modes ``m, n`` and ranks ``r``. The truncation rule and the
    ``eps`` guarantee, ``||W - W_rounded||_F <= eps * ||W||_F``, are those of :func:`tt_svd`
    (see the module docstring); with neither ``rank`` nor ``eps`` only numerically redundant
    rank is removed, which also brings every bond within :func:`ttlayers.max_ranks`.

    Args:
        cores: ``d`` tensors, core ``k`` of shape ``(r_k, m_k, n_k, r_{k+1})``, one dtype and
            device, finite.
        rank: Cap on every bond rank (an int), or the ``d - 1`` inner caps.
        eps: Relative Frobenius error bound in ``(0, 1)``.

    Returns:
        New cores with the same modes and ranks no larger than before, in the input dtype
        (float16/bfloat16 are processed in float32) and on its device.

    Raises:
        TypeError: If ``cores`` is not a sequence of floating-point tensors of one dtype
            and device.
        ValueError: If the cores do not chain, hold NaN/Inf, or ``eps``/``rank`` are
            invalid.

    Example:
        >>> w = torch.randn(8, 8, dtype=torch.float64)
        >>> cores = tt_svd(w, (2, 4), (4, 2))
        >>> doubled = [torch.cat([cores[0], cores[0]], dim=3), torch.cat([cores[1]] * 2) / 2]
        >>> [c.shape[3] for c in tt_round(doubled)][:-1]
        [8]
    """
    cores, (in_modes, out_modes, _) = _check_cores("cores", cores)
    check_eps(eps)
    caps = _bond_caps(rank, in_modes, out_modes)
    dtype = cores[0].dtype
    d = len(cores)
    _warn_below_precision(eps, _working_dtype(dtype), dtype)
    work = [core.detach().to(_working_dtype(dtype)) for core in cores]
    # As in tt_svd: cores whose products' norms may pass the working dtype's range (the QR
    # sweep gathers them) are rounded divided by their largest entries.
    exponents = _core_exponents(work)
    if exponents is not None:
        work = [_shift(core, -e) for core, e in zip(work, exponents, strict=True)]
    work = _orthogonalize_right(work)
    norm = _norm(work[0])
    tolerance = _bond_tolerance(eps, d, norm, work[0].dtype, dtype)
    exact = rank is None and eps is None
    for k in range(d - 1):
        # Cores < k are left-orthonormal, cores > k right-orthonormal: the SVD of core k is
        # that of the whole bond-k unfolding, so its dropped tail is exactly the error made.
        r_left, m, n, r_right = work[k].shape
        u, rest = _truncated_svd(
            work[k].reshape(r_left * m * n, r_right), caps[k + 1], tolerance, exact
        )
        work[k] = u.reshape(r_left, m, n, u.shape[1])
        work[k + 1] = torch.tensordot(rest, work[k + 1], dims=([1], [0]))
    if exponents is not None:
        log2_norm = sum(_log2_norm(core) for core in work) + sum(exponents)
        work = _give_back(work, sum(exponents))
        if not all(bool(torch.isfinite(core).all()) for core in work):
            raise ValueError(
                f"cores: the rounded TT overflows {work[0].dtype} once its scale is given "
                f"back spread evenly over the cores (a norm of about 2**{log2_norm:.0f}); "
                "scale the cores down first."
            )
    return cast_cores(work, dtype)


def _log2_norm(tensor: torch.Tensor) -> float:
    """``log2 ||tensor||_F`` at any scale (``-inf`` for zeros; a float64 norm may be inf)."""
    peak = float(tensor.detach().abs().max()) if tensor.numel() else 0.0
    if peak == 0.0 or not math.isfinite(peak):
        return -math.inf if peak == 0.0 else math.inf
    return math.log2(peak) + math.log2(_norm(tensor / peak))


def _core_exponents(cores: Sequence[torch.Tensor]) -> list[int] | None:
    """Each core's :func:`_exponent_of` where the cores need scaling, else ``None``.

    They do where a core's norm, or a product of the norms of cores ``k..d`` (a bound on what
    the right-to-left QR sweep gathers into core ``k - 1``, and, for ``k = 1``, on the TT's
    norm, which the truncation sweep carries), is outside the safe range of their dtype
    (:func:`_outside_safe_range`); a zero core counts as outside, as its neighbours may be.
    """
    logs = [_log2_norm(core) for core in cores]
    low, high = (math.log2(limit) for limit in _safe_range(cores[0].dtype))
    suffix = 0.0
    for value in reversed(logs):
        suffix += value
        if not (low <= value <= high and low <= suffix <= high):
            return [_exponent_of(core) for core in cores]
    return None


def _give_back(cores: list[torch.Tensor], exponent: int) -> list[torch.Tensor]:
    """Cores times ``2**exponent``, by exponent shifts that leave their norms about equal.

    All of it in one core overflowed float32 where the TT itself was representable (its
    norm gathered in the last core after the truncation sweep). Shifts keep it exact.
    """
    logs = [_log2_norm(core) for core in cores]
    if not all(math.isfinite(value) for value in logs):
        return cores  # a zero TT: any factor leaves it zero
    target = (sum(logs) + exponent) / len(cores)
    shifts = [round(target - value) for value in logs]
    shifts[-1] += exponent - sum(shifts)
    return [_shift(core, shift) for core, shift in zip(cores, shifts, strict=True)]


def _tt_norm(cores: list[torch.Tensor]) -> tuple[float, int | None]:
    """``(n, e)`` with ``||TT||_F = n * 2**e``: ``e`` is ``None`` where no scaling was needed."""
    exponents = _core_exponents(cores)
    if exponents is not None:
        cores = [_shift(core, -e) for core, e in zip(cores, exponents, strict=True)]
    norm = _norm(_orthogonalize_right(cores)[0])
    return norm, None if exponents is None else sum(exponents)


# --- achieved errors -----------------------------------------------------------------------


def _ratio(difference: float, reference: float) -> float:
    if reference == 0.0:
        return 0.0 if difference == 0.0 else math.inf
    return difference / reference


def relative_error(matrix: torch.Tensor, cores: Sequence[torch.Tensor]) -> float:
    """The achieved ``||W - tt_to_dense(cores)||_F / ||W||_F`` of a decomposition.

    Computed in the wider of the two dtypes and at least float32, on the matrix's device.

    Args:
        matrix: ``W`` of shape ``(out_features, in_features)``.
        cores: A TT matrix of the same shape.

    Returns:
        The relative Frobenius error as a float; ``0.0`` when both are zero, ``inf`` when only
        ``W`` is, NaN when ``W`` holds NaN.

    Raises:
        TypeError: If ``matrix`` is not a dense floating-point tensor, or the cores are not
            dense floating-point tensors.
        ValueError: If ``matrix`` is not 2-D or has a size of 0, the shapes disagree, the
            cores do not chain or hold NaN or Inf, or a tensor is on the meta device.
    """
    check_matrix(matrix)
    if matrix.device.type == "meta":
        raise ValueError("matrix is on the meta device, which holds no values to compare.")
    cores, _ = _check_cores("cores", cores)
    with torch.no_grad():
        dtype = _working_dtype(torch.promote_types(matrix.dtype, cores[0].dtype))
        exponent = 0
        if _outside_safe_range(_norm(matrix), dtype):  # the rebuilt products under- or overflow
            # In float64, and both sides divided by a power of two near W's largest entry: a
            # norm past float64's range is inf, which made the ratio 0 or NaN.
            dtype, exponent = torch.float64, _exponent_of(matrix)
        reference = _shift(matrix.detach().to(dtype), -exponent)
        # The cores shifted before the rebuild, as tt_svd shares the exponent out: rebuilt
        # first, products of subnormal-sized entries lost their bits.
        shares = _shares(-exponent, len(cores))
        dense = tt_to_dense(
            [
                _shift(core.detach().to(matrix.device, dtype), share)
                for core, share in zip(cores, shares, strict=True)
            ]
        )
        if dense.shape != reference.shape:
            raise ValueError(
                f"cores represent a matrix of shape {tuple(dense.shape)}, but matrix has shape "
                f"{tuple(reference.shape)}."
            )
        difference = _norm(reference - dense)
        return _ratio(difference, _norm(reference))


def _tt_difference(a: list[torch.Tensor], b: list[torch.Tensor]) -> list[torch.Tensor]:
    """Cores of the TT matrix ``A - B``, of ranks ``r_A + r_B`` (block-diagonal cores)."""
    d = len(a)
    if d == 1:
        return [a[0] - b[0]]
    cores = [torch.cat([a[0], -b[0]], dim=3)]
    for k in range(1, d - 1):
        ra0, m, n, ra1 = a[k].shape
        rb0, _, _, rb1 = b[k].shape
        block = a[k].new_zeros(ra0 + rb0, m, n, ra1 + rb1)
        block[:ra0, :, :, :ra1] = a[k]
        block[ra0:, :, :, ra1:] = b[k]
        cores.append(block)
    cores.append(torch.cat([a[-1], b[-1]], dim=0))
    return cores


def tt_relative_error(reference: Sequence[torch.Tensor], cores: Sequence[torch.Tensor]) -> float:
    """The relative Frobenius distance ``||A - B||_F / ||A||_F`` of two TT matrices.

    Never forms the dense matrices: ``A - B`` is itself a TT of ranks ``r_A + r_B``, and the
    norm of a TT is that of its first core once the others are orthonormalized by QR (the
    stable way; expanding ``<A, A> - 2 <A, B> + <B, B>`` would cancel catastrophically for
    small errors). Cost ``O(d m n (r_A + r_B)^3)``, in the wider dtype and at least float32.

    Args:
        reference: The cores of ``A``.
        cores: The cores of ``B``, with the same modes.

    Returns:
        The relative error as a float; ``0.0`` when both are zero, ``inf`` when only ``A`` is.

    Raises:
        TypeError: If either chain is not a sequence of floating-point tensors.
        ValueError: If a chain does not chain or holds NaN or Inf, or the modes disagree.
    """
    reference, ref_shapes = _check_cores("reference", reference)
    cores, shapes = _check_cores("cores", cores)
    ref_modes, modes = ref_shapes[:2], shapes[:2]
    if ref_modes != modes:
        raise ValueError(
            f"reference and cores must have the same (in_modes, out_modes); got {ref_modes} "
            f"and {modes}."
        )
    with torch.no_grad():
        dtype = _working_dtype(torch.promote_types(reference[0].dtype, cores[0].dtype))
        device = reference[0].device
        a = [core.detach().to(device, dtype) for core in reference]
        b = [core.detach().to(device, dtype) for core in cores]
        # Each norm at its own scale: cores far from their dtype's range on either side gave
        # NaN. Where neither needed scaling, the plain ratio, as before.
        difference, d_exponent = _tt_norm(_tt_difference(a, b))
        norm, n_exponent = _tt_norm(a)
        if (d_exponent is None and n_exponent is None) or norm == 0.0 or difference == 0.0:
            return _ratio(difference, norm)
        log2 = math.log2(difference) - math.log2(norm) + (d_exponent or 0) - (n_exponent or 0)
        return 2.0**log2 if log2 < 1024 else math.inf
