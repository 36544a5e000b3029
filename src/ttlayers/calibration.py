r"""Data-aware conversion: fitting TT cores to a layer's outputs on calibration inputs.

TT-SVD minimizes the weight error ``||W - W_tt||_F`` and so treats every input direction
alike. A trained layer sees inputs that fill few directions, and what must survive the
conversion is its *outputs* on them. Given calibration inputs, this module fits the cores to

.. math::

    f(W_{tt}, b_{tt}) = \frac{1}{N} \sum_s \| W_{tt} x_s + b_{tt} - (W x^\circ_s + b) \|^2,

where ``x_s`` is the layer's input in the partly converted model and ``x°_s`` its input in the
original model (the same when nothing before the layer was converted; fitting the converted
inputs to the original outputs lets a layer compensate the errors of those before it). For a
layer with a bias the optimal ``b_tt`` is ``b + W mean(x°) - W_tt mean(x)``, and what remains is
a quadratic in ``W_tt`` with the centered moments ``C = Cov(x)`` and ``T = W Cov(x°, x)``:

.. math::

    f(W_{tt}) = \operatorname{tr}(W_{tt} C W_{tt}^T) - 2 \operatorname{tr}(W_{tt} T^T)
        + \text{const},

which for ``x = x°`` is the covariance-weighted weight error
``tr((W - W_tt) C (W - W_tt)^T)``. (Without a bias the moments are not centered.)

Ridge. Activations are often rank-deficient (dead ReLUs, constant pixels), and then ``f``
does not pin ``W_tt`` down in the directions no input takes. The fit therefore minimizes
``f + δ ||W_tt - W||_F^2`` with ``δ = ridge * tr(C) / in_features``, i.e. uses ``C + δI`` and
``T + δW``: where the data say nothing, the weight error decides, so the layer still behaves
like the original on inputs unlike the calibration set.

Method (why it is fast). A dense weighting ``C`` couples all the cores, but a Kronecker one
does not: if ``C = C_1 ⊗ ... ⊗ C_d`` over the input modes, with ``C_k = L_k L_k^T``, then
substituting ``G~_k = G_k ×_in L_k`` (each core's input mode multiplied by its own ``L_k``)
keeps the TT structure and turns ``f`` into the plain Frobenius distance of ``W~_tt`` to
``W* (L_1 ⊗ ... ⊗ L_d)``, where ``W* = T C^{-1}`` is the unconstrained optimum. So:

1. Kronecker whitening: ``C_k`` is the partial trace of ``C`` over the other input modes
   (exact when ``C`` is a Kronecker product), and the whitened TT-SVD of ``W* K`` is the
   starting point. For plain low rank (all of the input in one core) the whitening is exact
   and this is the optimal weighted low-rank approximation (the classic result behind
   activation-aware SVD), computed in one SVD.
2. ALS on the exact objective, in whitened coordinates: one core at a time, the others fixed
   and orthonormalized (left of it left-orthonormal, right of it right-orthonormal), as in
   one-site DMRG. Each update is a linear least-squares problem in the core's entries that
   decouples over the core's output index ``n_k``: one symmetric ``(r_k m_k r_{k+1})``-square
   normal matrix, shared by ``n_k`` right-hand sides. It is solved exactly (Cholesky) when
   small, and otherwise by conjugate gradients warm-started at the current core, with
   matrix-free products. In whitened coordinates with orthonormal interfaces that matrix is
   the identity when ``C`` is Kronecker and near it otherwise, so CG needs few steps. Exact
   block minimization, and CG started at the current point, never increase the objective,
   so every sweep decreases it monotonically.
3. Keep the best: the plain TT-SVD, the whitened TT-SVD and the iterate after every
   half-sweep are scored by their output error on the calibration data (bias refitted), and
   the best is returned, so the fit never does worse than TT-SVD on that data, by
   construction.

All statistics and the fit run in float64 on the device of the statistics; only one layer's
``in_features``-square matrices exist at a time.
"""

from __future__ import annotations

import functools
import math
import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import opt_einsum
import torch

from ttlayers.contraction import check_bias, check_strided, core_list, core_shapes, tt_to_dense
from ttlayers.decomposition import cast_cores, check_matrix, tt_svd
from ttlayers.shapes import is_int, resolve_ranks, validate_modes

__all__ = ["ActivationStatistics", "TTFit", "WeightedProblem", "fit_tt", "weighted_problem"]

_FLOAT = torch.float64
DEFAULT_RIDGE = 1e-3


class ActivationStatistics:
    r"""Running first and second moments of a linear layer's inputs, in float64.

    Holds ``N``, ``sum_s x_s`` and ``sum_s x_s x_s^T`` for the inputs ``x`` the layer will
    receive. With ``paired=True`` it also holds the moments of the *reference* inputs ``x°``
    (the same samples passed through the original model) and the cross moment
    ``sum_s x_s x°_s^T``, so that a fit can map converted inputs to the original outputs.
    Memory: one (unpaired) or three (paired) ``in_features``-square float64 matrices.

    Args:
        in_features: Width of the inputs.
        paired: Whether :meth:`update` takes reference inputs too.
        device: Where the sums live (use the model's device: the products are computed
            there). Default: the device of the first batch.

    Attributes:
        in_features (int): Width of the inputs.
        paired (bool): Whether the reference moments are kept too.
        count (int): Number of samples ``N`` so far (rows of all batches).
        input_sum (Tensor | None): ``sum x``, shape ``(in_features,)``.
        input_gram (Tensor | None): ``sum x x^T``, shape ``(in_features, in_features)``.
        reference_sum (Tensor | None): ``sum x°`` (paired only).
        reference_gram (Tensor | None): ``sum x° x°^T`` (paired only).
        cross_gram (Tensor | None): ``sum x x°^T`` (paired only).

    Raises:
        TypeError: If ``in_features`` is not an int or ``paired`` not a bool.
        ValueError: If ``in_features`` is not positive or ``device`` is the meta device.

    Example:
        >>> stats = ActivationStatistics(4)
        >>> stats.update(torch.randn(10, 4))
        >>> stats.update(torch.randn(2, 3, 4))  # leading dimensions are flattened
        >>> stats.count, tuple(stats.input_gram.shape)
        (16, (4, 4))
    """

    in_features: int
    paired: bool
    count: int
    input_sum: torch.Tensor | None
    input_gram: torch.Tensor | None
    reference_sum: torch.Tensor | None
    reference_gram: torch.Tensor | None
    cross_gram: torch.Tensor | None

    def __init__(
        self,
        in_features: int,
        *,
        paired: bool = False,
        device: torch.device | str | None = None,
    ) -> None:
        given: object = in_features  # checked as what a caller may pass, not as annotated
        if not is_int(given):
            raise TypeError(f"in_features must be an int; got {type(given).__name__}.")
        if in_features < 1:
            raise ValueError(f"in_features must be a positive int; got {in_features!r}.")
        self.in_features = int(in_features)
        given_paired: object = paired  # checked as what a caller may pass, not as annotated
        if not isinstance(given_paired, (bool, np.bool_)):
            raise TypeError(f"paired must be a bool; got {type(given_paired).__name__}.")
        self.paired = bool(paired)
        self.count = 0
        self._device = None if device is None else torch.device(device)
        if self._device is not None and self._device.type == "meta":
            raise ValueError("device must hold values; the meta device holds none.")
        self.input_sum = self.input_gram = None
        self.reference_sum = self.reference_gram = self.cross_gram = None

    @classmethod
    def from_inputs(
        cls, inputs: torch.Tensor, reference: torch.Tensor | None = None
    ) -> ActivationStatistics:
        """The statistics of one batch of inputs (and reference inputs).

        Args:
            inputs: Shape ``(*, in_features)``.
            reference: ``None``, or the reference inputs of the same shape.

        Returns:
            Statistics with ``paired = reference is not None``.

        Raises:
            TypeError: If ``inputs`` is not a tensor of at least one dimension, or either
                tensor is not floating point.
            ValueError: If ``reference`` has another shape, or a value is NaN/Inf.
        """
        if not isinstance(inputs, torch.Tensor) or inputs.dim() == 0:
            raise TypeError(
                "inputs must be a tensor of shape (*, in_features); got "
                f"{type(inputs).__name__}{'' if not isinstance(inputs, torch.Tensor) else ' 0-d'}."
            )
        if inputs.shape[-1] == 0:
            raise ValueError(
                f"inputs must have at least one feature; got shape {tuple(inputs.shape)}."
            )
        stats = cls(int(inputs.shape[-1]), paired=reference is not None)  # on inputs' device
        stats.update(inputs, reference)
        return stats

    def _check(self, name: str, batch: object) -> torch.Tensor:
        if not isinstance(batch, torch.Tensor):
            raise TypeError(f"{name} must be a tensor; got {type(batch).__name__}.")
        if batch.dim() == 0 or batch.shape[-1] != self.in_features:
            raise ValueError(
                f"{name} must have shape (*, in_features={self.in_features}); got shape "
                f"{tuple(batch.shape)}."
            )
        if not batch.is_floating_point():
            raise TypeError(f"{name} must be floating point; got {batch.dtype}.")
        check_strided(batch, name)
        if batch.device.type == "meta":
            raise ValueError(
                f"{name} is on the meta device, which holds no values; calibration needs real "
                "activations (load the model's weights first)."
            )
        rows = batch.detach().reshape(-1, self.in_features)
        if not bool(torch.isfinite(rows).all()):
            raise ValueError(
                f"{name} holds NaN or Inf values (shape {tuple(batch.shape)}); calibration "
                "needs finite activations. Check the calibration data and the layers before."
            )
        device = self._device if self._device is not None else rows.device
        return rows.to(device, _FLOAT)

    def update(self, inputs: torch.Tensor, reference: torch.Tensor | None = None) -> None:
        """Add a batch.

        Args:
            inputs: Shape ``(*, in_features)``; leading dimensions are flattened into samples.
            reference: For paired statistics, the reference inputs, same shape; else ``None``.

        Raises:
            TypeError: If a batch is not a dense floating-point tensor.
            ValueError: If a batch has the wrong width, holds NaN/Inf or is on the meta
                device, or ``reference`` is given to unpaired statistics or missing for
                paired ones, or has another shape, or the sums of squares overflow float64
                (values past about ``1e154 / sqrt(N)``).
        """
        x = self._check("inputs", inputs)
        if self.paired != (reference is not None):
            raise ValueError(
                "paired statistics need reference inputs for every batch, unpaired ones none; "
                f"paired={self.paired}, got reference="
                f"{'a tensor' if reference is not None else None}."
            )
        xr = None if reference is None else self._check("reference", reference)
        if reference is not None and tuple(reference.shape) != tuple(inputs.shape):
            raise ValueError(
                f"reference must have the shape of inputs {tuple(inputs.shape)}; got "
                f"{tuple(reference.shape)}."
            )
        if self._device is None:
            self._device = x.device
        if self.input_sum is None or self.input_gram is None:
            self.input_sum = x.new_zeros(self.in_features)
            self.input_gram = x.new_zeros(self.in_features, self.in_features)
        if xr is not None:
            if self.reference_sum is None or self.reference_gram is None or self.cross_gram is None:
                self.reference_sum = x.new_zeros(self.in_features)
                self.reference_gram = x.new_zeros(self.in_features, self.in_features)
                self.cross_gram = x.new_zeros(self.in_features, self.in_features)
            self.reference_sum += xr.sum(0)
            self.reference_gram.addmm_(xr.T, xr)
            self.cross_gram.addmm_(x.T, xr)
        self.input_sum += x.sum(0)
        self.input_gram.addmm_(x.T, x)
        self.count += int(x.shape[0])
        # Finite diagonals bound every other sum (Cauchy-Schwarz); an infinite one would send
        # the fit's search for a positive-definite ridge into an endless loop.
        grams = [self.input_gram] if reference is None else [self.input_gram, self.reference_gram]
        if not all(bool(torch.isfinite(torch.diagonal(g)).all()) for g in grams if g is not None):
            what, largest = "inputs", float(x.abs().max())
            if xr is not None:
                what, largest = "inputs or the reference", max(largest, float(xr.abs().max()))
            raise ValueError(
                f"the sums of squares of the {what} overflow float64 (largest |value| "
                f"{largest:.3g}); scale the calibration data down. These statistics are "
                "unusable now."
            )

    def _raw(self) -> tuple[torch.Tensor, ...]:
        """``(sum x, sum x°, sum x x^T, sum x x°^T, sum x° x°^T)``; ``x° = x`` if unpaired."""
        if self.count == 0 or self.input_sum is None or self.input_gram is None:
            raise ValueError(
                "the activation statistics hold no samples; the layer received no calibration "
                "inputs: it was not called, or called with 0 rows (is it used in the model's "
                "forward pass? are the batches empty?)."
            )
        if self.paired:
            assert self.reference_sum is not None and self.reference_gram is not None
            assert self.cross_gram is not None
            return (
                self.input_sum,
                self.reference_sum,
                self.input_gram,
                self.cross_gram,
                self.reference_gram,
            )
        return self.input_sum, self.input_sum, self.input_gram, self.input_gram, self.input_gram


# --- the weighted problem ------------------------------------------------------------------


@dataclass(frozen=True)
class WeightedProblem:
    r"""One layer's data-aware objective, in Kronecker-whitened coordinates.

    In whitened coordinates ``W~ = W K`` with ``K = L_1 ⊗ ... ⊗ L_d`` the objective reads
    ``f = <W~ C~, W~> - 2 <W~, T~> + const`` with ``C~ = K^{-1} C K^{-T}`` and
    ``T~ = T K^{-T}``; ``C~ = I`` exactly when ``C`` is a Kronecker product over the modes.

    Attributes:
        in_modes: The ``d`` input modes the whitening follows.
        whitening: ``L_k``, shape ``(m_k, m_k)``, with ``C_k = L_k L_k^T``.
        unwhitening: ``L_k^{-1}``.
        target: ``W* K``, the whitened unconstrained optimum, ``(out_features, in_features)``.
        exact: Whether the whitening is exact (at most one input mode above 1), so that
            ``C~`` is a multiple of the identity.
        regularized: ``C + δI``, the (unwhitened) weighting, ``(in_features, in_features)``.
        regularized_cross: ``T + δW``, ``(out_features, in_features)``.

    ``covariance`` (``C~``) and ``cross`` (``T~``) are computed on first use: the ALS needs
    them, the spectra of :mod:`ttlayers.budget` and the exact low-rank case do not.
    """

    in_modes: tuple[int, ...]
    whitening: tuple[torch.Tensor, ...]
    unwhitening: tuple[torch.Tensor, ...]
    target: torch.Tensor
    exact: bool
    regularized: torch.Tensor
    regularized_cross: torch.Tensor

    @functools.cached_property
    def covariance(self) -> torch.Tensor:
        """``C~ = K^{-1} (C + δI) K^{-T}``, shape ``(in_features, in_features)``."""
        d, size = len(self.in_modes), self.regularized.shape[0]
        c = _mode_multiply(
            self.regularized.reshape(*self.in_modes, *self.in_modes), self.unwhitening, 0
        )
        c = _mode_multiply(c, self.unwhitening, d).reshape(size, size)
        return 0.5 * (c + c.T)

    @functools.cached_property
    def cross(self) -> torch.Tensor:
        """``T~ = (T + δW) K^{-T}``, shape ``(out_features, in_features)``."""
        out_features = self.regularized_cross.shape[0]
        t = self.regularized_cross.reshape(out_features, *self.in_modes)
        return _mode_multiply(t, self.unwhitening, 1).reshape(out_features, -1)

    def whiten_cores(self, cores: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """``G~_k[a, c, n, b] = sum_j G_k[a, j, n, b] L_k[j, c]``, in float64.

        Args:
            cores: ``d`` cores ``(r_k, m_k, n_k, r_{k+1})`` whose input modes are
                ``in_modes``.

        Returns:
            The whitened cores, same shapes, float64, on the problem's device.

        Raises:
            TypeError: If a core is not a real floating-point tensor.
            ValueError: If the cores do not chain, their input modes are not ``in_modes``, or
                a core is on the meta device.
        """
        return [
            torch.einsum("ajnb,jc->acnb", core, factor)
            for core, factor in zip(self._check_cores(cores), self.whitening, strict=True)
        ]

    def unwhiten_cores(self, cores: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """``G_k[a, j, n, b] = sum_c G~_k[a, c, n, b] L_k^{-1}[c, j]``, in float64.

        The inverse of :meth:`whiten_cores`.

        Args:
            cores: ``d`` whitened cores ``(r_k, m_k, n_k, r_{k+1})`` whose input modes are
                ``in_modes``.

        Returns:
            The cores in the original coordinates, same shapes, float64, on the problem's device.

        Raises:
            TypeError: If a core is not a real floating-point tensor.
            ValueError: If the cores do not chain, their input modes are not ``in_modes``, or
                a core is on the meta device.
        """
        return [
            torch.einsum("acnb,cj->ajnb", core, factor)
            for core, factor in zip(self._check_cores(cores), self.unwhitening, strict=True)
        ]

    def _check_cores(self, cores: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """The cores in float64 on the problem's device, checked."""
        listed = core_list(cores)
        in_modes, _, _ = core_shapes(listed)
        if in_modes != self.in_modes:
            raise ValueError(
                f"cores must have the input modes {self.in_modes} of the problem; got {in_modes}."
            )
        # torch.einsum of a meta core and a CPU factor returns uninitialized CPU memory.
        if any(core.device.type == "meta" for core in listed):
            raise ValueError("cores are on the meta device, which holds no values to transform.")
        device = self.whitening[0].device
        return [core.to(device, _FLOAT) for core in listed]


def check_statistics(statistics: object) -> None:
    """Raise ``TypeError`` unless ``statistics`` is an :class:`ActivationStatistics`."""
    if not isinstance(statistics, ActivationStatistics):
        raise TypeError(
            "statistics must be an ActivationStatistics (ActivationStatistics.from_inputs(x)); "
            f"got {type(statistics).__name__}."
        )


def check_ridge(ridge: object) -> float:
    """``ridge`` as a float, checked to be finite and non-negative."""
    if isinstance(ridge, bool) or not isinstance(ridge, numbers.Real):
        raise TypeError(f"ridge must be a non-negative float; got {type(ridge).__name__}.")
    if not 0.0 <= float(ridge) < math.inf:
        raise ValueError(f"ridge must be a finite non-negative float; got {ridge}.")
    return float(ridge)


def _mode_multiply(
    tensor: torch.Tensor, matrices: Sequence[torch.Tensor], first: int
) -> torch.Tensor:
    """Apply ``M_k`` to axis ``first + k``: ``out[.., c, ..] = sum_j M_k[c, j] t[.., j, ..]``."""
    for k, matrix in enumerate(matrices):
        if matrix.shape[0] == 1:
            tensor = tensor * matrix[0, 0]
            continue
        tensor = torch.tensordot(matrix, tensor, dims=([1], [first + k])).movedim(0, first + k)
    return tensor


def _kronecker_factors(covariance: torch.Tensor, in_modes: tuple[int, ...]) -> list[torch.Tensor]:
    """Partial traces of ``C`` onto each input mode, scaled to mean eigenvalue 1."""
    d = len(in_modes)
    grid = covariance.reshape(*in_modes, *in_modes)
    letters = [opt_einsum.get_symbol(i) for i in range(2 * d)]
    factors = []
    for k in range(d):
        rows = letters[:d]
        cols = [letters[d + k] if j == k else letters[j] for j in range(d)]
        factor = torch.einsum(f"{''.join(rows)}{''.join(cols)}->{letters[k]}{letters[d + k]}", grid)
        factor = 0.5 * (factor + factor.T)
        scale = float(torch.diagonal(factor).mean())
        factors.append(
            factor / scale
            if scale > 0
            else torch.eye(in_modes[k], dtype=_FLOAT, device=covariance.device)
        )
    return factors


def _sqrt_and_inverse(factor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``L`` with ``L L^T = factor`` and ``L^{-1}``: Cholesky, or eigh if not positive definite."""
    identity = torch.eye(factor.shape[0], dtype=factor.dtype, device=factor.device)
    chol, info = torch.linalg.cholesky_ex(factor)
    if int(info) == 0:
        inverse = torch.linalg.solve_triangular(chol, identity, upper=False)
        if bool(torch.isfinite(inverse).all()):
            return chol, inverse
    values, vectors = torch.linalg.eigh(factor)
    floor = float(values.max().clamp_min(0.0)) * 1e-12 + torch.finfo(_FLOAT).tiny
    root = values.clamp_min(floor).sqrt()
    return vectors * root, vectors.T / root[:, None]


def _moments(
    statistics: ActivationStatistics, center: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(mean x, mean x°, E[x x^T], E[x x°^T], E[x° x°^T])``, centered when ``center``."""
    s_x, s_r, g_xx, g_xr, g_rr = statistics._raw()
    n = statistics.count
    mu_x, mu_r = s_x / n, s_r / n
    c_xx, c_xr, c_rr = g_xx / n, g_xr / n, g_rr / n
    if center:
        c_xx = c_xx - torch.outer(mu_x, mu_x)
        c_xr = c_xr - torch.outer(mu_x, mu_r)
        c_rr = c_rr - torch.outer(mu_r, mu_r)
    return mu_x, mu_r, c_xx, c_xr, c_rr


def weighted_problem(
    weight: torch.Tensor,
    statistics: ActivationStatistics,
    in_modes: Sequence[int],
    *,
    center: bool = True,
    ridge: float = DEFAULT_RIDGE,
) -> WeightedProblem:
    """Set up a layer's data-aware objective in Kronecker-whitened coordinates.

    Args:
        weight: ``W``, shape ``(out_features, in_features)``.
        statistics: The layer's input statistics.
        in_modes: The ``d`` input modes of the TT form.
        center: Use centered moments (for a layer whose bias is refitted).
        ridge: Relative ridge ``ridge * tr(C) / in_features`` (see the module docstring).

    Returns:
        The :class:`WeightedProblem`, in float64 on the statistics' device.

    Raises:
        TypeError: If ``weight`` is not a floating-point tensor, ``statistics`` is not an
            :class:`ActivationStatistics`, or ``in_modes`` is not a sequence of ints.
        ValueError: If ``weight`` is not 2-D or holds NaN/Inf, the statistics are empty or
            their width is not ``in_features``, the modes do not multiply to it, or ``ridge``
            is negative.
    """
    ridge = check_ridge(ridge)
    check_matrix(weight, "weight", finite=True)
    check_statistics(statistics)
    out_features, in_features = (int(s) for s in weight.shape)
    if statistics.in_features != in_features:
        raise ValueError(
            f"the statistics are of inputs of width {statistics.in_features}, but the weight "
            f"has in_features={in_features}."
        )
    modes, _ = validate_modes(in_features, out_features, in_modes, None)
    _, _, c_xx, c_xr, _ = _moments(statistics, center)
    device = c_xx.device
    w = weight.detach().to(device, _FLOAT)
    # Scale-free ridge; the floor keeps an all-zero input layer well-posed.
    mean_square = max(float(torch.diagonal(c_xx).mean()), 0.0)
    delta = ridge * mean_square
    largest = float(w.abs().max())
    # Past about 10 the ridge is what is too large; below, the data or the weight are.
    remedy = (
        "lower ridge (useful values lie between 0 and about 10)"
        if ridge > 10
        else "scale the calibration data or the weight down"
    )
    if not math.isfinite(delta) or not math.isfinite(delta * largest):
        raise ValueError(
            f"the ridge term overflows float64: ridge={ridge:g} times the inputs' mean square "
            f"({mean_square:.3g}) times the weight's largest entry ({largest:.3g}); {remedy}."
        )
    delta = max(delta, torch.finfo(_FLOAT).eps * float(torch.diagonal(c_xx).abs().max()), 1e-300)
    eye = torch.eye(in_features, dtype=_FLOAT, device=device)
    covariance = c_xx + delta * eye
    chol, info = torch.linalg.cholesky_ex(covariance)
    # Centered moments of (nearly) constant inputs cancel to rounding noise, which can be
    # indefinite: raise the ridge until the covariance is positive definite, on the scale of
    # the uncentered moments whose rounding that noise is.
    if int(info) != 0:
        raw_scale = float(torch.diagonal(statistics._raw()[2]).abs().max()) / statistics.count
        while int(info) != 0:
            delta = max(10.0 * delta, torch.finfo(_FLOAT).eps * raw_scale, 1e-300)
            if not math.isfinite(delta):
                raise ValueError(
                    "the input covariance cannot be made positive definite in float64 (its "
                    "entries are too large); scale the calibration data down."
                )
            covariance = c_xx + delta * eye
            chol, info = torch.linalg.cholesky_ex(covariance)
    cross = w @ c_xr.T + delta * w  # T = W E[x° x^T] + δ W, (out, in)
    if statistics.paired:
        optimum = torch.cholesky_solve(cross.T, chol).T  # W* = T C^{-1}
    else:
        optimum = w  # T = W (C + δI) exactly, so W* = W
    factors = _kronecker_factors(covariance, modes)
    roots = [_sqrt_and_inverse(f) for f in factors]
    whitening = tuple(root for root, _ in roots)
    unwhitening = tuple(inverse for _, inverse in roots)
    target = _mode_multiply(optimum.reshape(out_features, *modes), [f.T for f in whitening], 1)
    if not bool(torch.isfinite(target).all()):
        raise ValueError(
            f"the weighted fit overflows float64 (ridge={ridge:g}, the inputs' mean square "
            f"{mean_square:.3g}, the weight's largest entry {largest:.3g}); {remedy}."
        )
    return WeightedProblem(
        in_modes=modes,
        whitening=whitening,
        unwhitening=unwhitening,
        target=target.reshape(out_features, in_features),
        exact=sum(m > 1 for m in modes) <= 1,
        regularized=covariance,
        regularized_cross=cross,
    )


# --- errors on the calibration data ----------------------------------------------------------


class _Scorer:
    """Output errors on the calibration data from the moments, constants computed once.

    ``error(dense, biases)`` gives ``sum_s ||W_tt x_s + b_tt - W x°_s - b||^2`` for each
    candidate bias with one ``(out, in) @ (in, in)`` product; ``reference`` is
    ``sum_s ||W x°_s + b||^2``.
    """

    def __init__(
        self, weight: torch.Tensor, bias: torch.Tensor | None, statistics: ActivationStatistics
    ) -> None:
        s_x, s_r, g_xx, g_xr, g_rr = statistics._raw()
        self.weight, self.n, self.s_x, self.g_xx = weight, statistics.count, s_x, g_xx
        self.paired = statistics.paired
        self.bias = torch.zeros((), dtype=_FLOAT, device=weight.device) if bias is None else bias
        w_sr = weight @ s_r
        self.w_sr = w_sr
        constant = float((weight @ g_rr * weight).sum())
        self.reference = (
            constant + 2 * float((self.bias * w_sr).sum()) + self.n * float((self.bias**2).sum())
        )
        if self.paired:
            self.cross = weight @ g_xr.T  # tr(W_tt g_xr W^T) = <W_tt, W g_xr^T>
            self.constant = constant

    def error(self, dense: torch.Tensor, biases: Sequence[torch.Tensor | None]) -> list[float]:
        """The summed squared output error of ``dense`` with each bias in ``biases``."""
        if self.paired:
            quadratic = float(
                (dense @ self.g_xx * dense).sum() - 2 * (dense * self.cross).sum() + self.constant
            )
            mean_gap = dense @ self.s_x - self.w_sr
        else:  # the same inputs: expand in the difference, which does not cancel
            diff = dense - self.weight
            quadratic = float((diff @ self.g_xx * diff).sum())
            mean_gap = diff @ self.s_x
        errors = []
        for tt_bias in biases:
            db = (self.bias if tt_bias is None else tt_bias) - self.bias
            value = quadratic + 2 * float((db * mean_gap).sum()) + self.n * float((db * db).sum())
            errors.append(max(value, 0.0))
        return errors


def _ratio(error_sq: float, reference_sq: float) -> float:
    if reference_sq <= 0.0:
        return 0.0 if error_sq <= 0.0 else math.inf
    return math.sqrt(error_sq / reference_sq)


# --- ALS -----------------------------------------------------------------------------------


def _left_interface(previous: torch.Tensor, core: torch.Tensor) -> torch.Tensor:
    """Extend ``Lf (N<, M<, r)`` by one core to ``(N< n, M< m, r')``."""
    x, y, _ = previous.shape
    _, m, n, r = core.shape
    out = torch.einsum("xya,acnb->xnycb", previous, core)
    return out.reshape(x * n, y * m, r)


def _right_interface(core: torch.Tensor, following: torch.Tensor) -> torch.Tensor:
    """Extend ``Rf (r, N>, M>)`` by one core to the left: ``(r', n N>, m M>)``."""
    r, m, n, _ = core.shape
    _, p, q = following.shape
    out = torch.einsum("acnb,bpq->anpcq", core, following)
    return out.reshape(r, n * p, m * q)


class _LocalProblem:
    """The least-squares problem of one core (whitened), its others fixed and orthonormal."""

    def __init__(
        self,
        left: torch.Tensor,
        right: torch.Tensor,
        problem: WeightedProblem,
        shape: tuple[int, int, int, int],
    ) -> None:
        self.left, self.right = left, right  # (N<, M<, r_k), (r_{k+1}, N>, M>)
        self.shape = shape  # (r_k, m_k, n_k, r_{k+1})
        n_lo, m_lo, _ = left.shape
        _, n_hi, m_hi = right.shape
        r0, m, n, r1 = shape
        self.grid = (m_lo, m, m_hi)
        self.out_grid = (n_lo, n, n_hi)
        self.covariance = problem.covariance
        cross = problem.cross.reshape(n_lo, n, n_hi, m_lo, m, m_hi)
        # Right-hand sides: b[a, c, b', z], shared normal matrix over the output index z.
        self.rhs = torch.einsum("xya,xzpycq,bpq->acbz", left, cross, right).reshape(r0 * m * r1, n)

    def apply(self, g: torch.Tensor) -> torch.Tensor:
        """``H g`` for ``g`` of shape ``(r_k m_k r_{k+1}, n_k)``, matrix-free."""
        r0, m, n, r1 = self.shape
        dense = torch.einsum("xya,acbz,bpq->xzpycq", self.left, g.reshape(r0, m, r1, n), self.right)
        dense = dense.reshape(-1, self.covariance.shape[0]) @ self.covariance
        dense = dense.reshape(*self.out_grid, *self.grid)
        return torch.einsum("xya,xzpycq,bpq->acbz", self.left, dense, self.right).reshape(-1, n)

    def matrix(self) -> torch.Tensor:
        """The normal matrix ``H``, shape ``(r_k m_k r_{k+1},) * 2``."""
        r0, m, _, r1 = self.shape
        c6 = self.covariance.reshape(*self.grid, *self.grid)
        h: torch.Tensor = opt_einsum.contract(
            "xya,xud,ycqueg,bpq,fpg->acbdef", self.left, self.left, c6, self.right, self.right
        )
        size = r0 * m * r1
        h = h.reshape(size, size)
        return 0.5 * (h + h.T)

    def solve(self, current: torch.Tensor, max_direct: int, cg_steps: int) -> torch.Tensor:
        """Minimize ``<g, H g> - 2 <g, rhs>`` per column, from ``current``."""
        size = current.shape[0]
        if size <= max_direct:
            h = self.matrix()
            chol, info = torch.linalg.cholesky_ex(h)
            if int(info) == 0:
                solution = torch.cholesky_solve(self.rhs, chol)
                if bool(torch.isfinite(solution).all()):
                    return solution
        return _conjugate_gradients(self.apply, self.rhs, current, cg_steps)


def _conjugate_gradients(
    apply: Callable[[torch.Tensor], torch.Tensor],
    rhs: torch.Tensor,
    start: torch.Tensor,
    steps: int,
) -> torch.Tensor:
    """Column-wise CG for ``H X = B``, warm-started; each step lowers every column's objective."""
    x = start.clone()
    residual = rhs - apply(x)
    direction = residual.clone()
    rho = (residual * residual).sum(0)
    stop = 1e-24 * (rhs * rhs).sum(0).clamp_min(1e-300)
    for _ in range(steps):
        if bool((rho <= stop).all()):
            break
        hd = apply(direction)
        curvature = (direction * hd).sum(0)
        alpha = torch.where(curvature > 0, rho / curvature.clamp_min(1e-300), torch.zeros_like(rho))
        x = x + alpha * direction
        residual = residual - alpha * hd
        rho_next = (residual * residual).sum(0)
        beta = torch.where(rho > 0, rho_next / rho.clamp_min(1e-300), torch.zeros_like(rho))
        direction = residual + beta * direction
        rho = rho_next
    return x


def _to_core(g: torch.Tensor, shape: tuple[int, int, int, int]) -> torch.Tensor:
    r0, m, n, r1 = shape
    return g.reshape(r0, m, r1, n).permute(0, 1, 3, 2).contiguous()


def _from_core(core: torch.Tensor) -> torch.Tensor:
    r0, m, n, r1 = core.shape
    return core.permute(0, 1, 3, 2).reshape(r0 * m * r1, n)


def _orthonormalize_right(cores: list[torch.Tensor]) -> None:
    """Make cores ``1..d-1`` right-orthonormal (QR from the right), in place."""
    for k in range(len(cores) - 1, 0, -1):
        r0, m, n, r1 = cores[k].shape
        q, r = torch.linalg.qr(cores[k].reshape(r0, m * n * r1).T)
        cores[k] = q.T.reshape(q.shape[1], m, n, r1)
        cores[k - 1] = torch.tensordot(cores[k - 1], r.T, dims=([3], [0]))


def _sweeps(
    start: list[torch.Tensor],
    problem: WeightedProblem,
    sweeps: int,
    max_direct: int,
    cg_steps: int,
) -> list[list[torch.Tensor]]:
    """ALS half-sweeps from ``start`` (whitened cores); the cores after each half-sweep."""
    cores = [core.clone() for core in start]
    d = len(cores)
    dtype, device = cores[0].dtype, cores[0].device
    edge = torch.ones(1, 1, 1, dtype=dtype, device=device)
    iterates: list[list[torch.Tensor]] = []
    # QR sweeps keep the ranks only if no bond exceeds what its neighbours can carry
    # (r_{k+1} <= r_k m_k n_k and back); a chain that is not minimal is left to the starts.
    for r0, m, n, r1 in (tuple(core.shape) for core in cores):
        if r1 > r0 * m * n or r0 > m * n * r1:
            return iterates
    if d < 2:
        return iterates
    _orthonormalize_right(cores)
    for _ in range(sweeps):
        # Left to right: update core k, then move the non-orthonormal part into core k + 1.
        rights = [edge] * d
        for k in range(d - 1, 0, -1):
            rights[k - 1] = _right_interface(cores[k], rights[k])
        left = edge
        for k in range(d - 1):
            shape = tuple(cores[k].shape)
            local = _LocalProblem(left, rights[k], problem, shape)  # type: ignore[arg-type]
            g = local.solve(_from_core(cores[k]), max_direct, cg_steps)
            core = _to_core(g, shape)  # type: ignore[arg-type]
            r0, m, n, r1 = core.shape
            q, r = torch.linalg.qr(core.reshape(r0 * m * n, r1))
            cores[k] = q.reshape(r0, m, n, q.shape[1])
            cores[k + 1] = torch.tensordot(r, cores[k + 1], dims=([1], [0]))
            left = _left_interface(left, cores[k])
        iterates.append([core.clone() for core in cores])
        # Right to left.
        lefts = [edge] * d
        for k in range(d - 1):
            lefts[k + 1] = _left_interface(lefts[k], cores[k])
        right = edge
        for k in range(d - 1, 0, -1):
            shape = tuple(cores[k].shape)
            local = _LocalProblem(lefts[k], right, problem, shape)  # type: ignore[arg-type]
            g = local.solve(_from_core(cores[k]), max_direct, cg_steps)
            core = _to_core(g, shape)  # type: ignore[arg-type]
            r0, m, n, r1 = core.shape
            q, r = torch.linalg.qr(core.reshape(r0, m * n * r1).T)
            cores[k] = q.T.reshape(q.shape[1], m, n, r1)
            cores[k - 1] = torch.tensordot(cores[k - 1], r.T, dims=([3], [0]))
            right = _right_interface(cores[k], right)
        iterates.append([core.clone() for core in cores])
    return iterates


# --- the fit -------------------------------------------------------------------------------


@dataclass(frozen=True)
class TTFit:
    """The result of :func:`fit_tt`.

    Attributes:
        cores: The fitted cores, in the weight's dtype and on its device.
        bias: The refitted bias (``None`` for a layer without one).
        weight_error_start: ``||W - W_tt||_F / ||W||_F`` of plain TT-SVD at the same ranks.
        weight_error: The same for the fitted cores as returned, rounded to the weight's dtype
            (so are all four errors).
        output_error_start: Relative output error of plain TT-SVD (original bias) on the
            calibration data, ``||Y_tt - Y||_F / ||Y||_F``, ``Y`` the original layer's outputs.
        output_error: The same for the fit; never above ``output_error_start``.
        chosen: Which iterate won: ``"tt-svd"``, ``"whitened tt-svd"`` or ``"als k"`` (after
            ``k`` half-sweeps).
    """

    cores: list[torch.Tensor]
    bias: torch.Tensor | None
    weight_error_start: float
    weight_error: float
    output_error_start: float
    output_error: float
    chosen: str


def fit_tt(
    weight: torch.Tensor,
    statistics: ActivationStatistics,
    in_modes: Sequence[int],
    out_modes: Sequence[int],
    *,
    rank: int | Sequence[int],
    bias: torch.Tensor | None = None,
    ridge: float = DEFAULT_RIDGE,
    sweeps: int = 2,
    max_direct: int = 2048,
    cg_steps: int = 25,
) -> TTFit:
    r"""Fit TT cores to a layer's outputs on calibration inputs (see the module docstring).

    Minimizes ``sum_s ||W_tt x_s + b_tt - (W x°_s + b)||^2 + δ ||W_tt - W||_F^2`` over TT
    matrices of the given modes and ranks (and over ``b_tt`` when there is a bias), starting
    from TT-SVD. The result is never worse on the calibration data than plain TT-SVD at the
    same ranks: the best of TT-SVD, the Kronecker-whitened TT-SVD and every ALS half-sweep is
    returned.

    Args:
        weight: ``W``, shape ``(out_features, in_features)``, finite.
        statistics: The layer's input statistics (paired: inputs of the converted model and
            of the original one).
        in_modes: ``d`` factors of ``in_features``.
        out_modes: ``d`` factors of ``out_features``.
        rank: Cap on every bond rank (an int), or the ``d - 1`` inner ranks.
        bias: ``b``, shape ``(out_features,)``, or ``None``. With a bias it is refitted (the
            optimal ``b_tt`` for the fitted ``W_tt``) and the moments are centered.
        ridge: Relative ridge ``δ = ridge * tr(C) / in_features`` pulling ``W_tt`` toward ``W``
            in the input directions the data leave undetermined; ``0`` leaves only a floor at
            the level of rounding (raised as far as the covariance needs to be positive
            definite).
        sweeps: Number of ALS sweeps (each a left-to-right and a right-to-left pass).
        max_direct: Largest core subproblem ``r_k m_k r_{k+1}`` solved by Cholesky; larger
            ones use ``cg_steps`` steps of conjugate gradients.
        cg_steps: Conjugate-gradient steps per core update when not solved directly.

    Returns:
        A :class:`TTFit` with the cores, the bias and the errors before and after the fit.

    Raises:
        TypeError: If ``weight`` or ``bias`` is not a floating-point tensor,
            ``statistics`` not an :class:`ActivationStatistics`, or an option not an int.
        ValueError: If ``weight`` is not 2-D, ``weight`` or ``bias`` is on the meta device,
            shapes disagree, a value is NaN/Inf, the statistics are empty, or an option is out
            of range.

    Example:
        Inputs in a 3-dimensional subspace: rank 3 reproduces the outputs, TT-SVD cannot.

        >>> w = torch.randn(16, 12, dtype=torch.float64)
        >>> x = torch.randn(200, 3, dtype=torch.float64) @ torch.randn(3, 12, dtype=torch.float64)
        >>> stats = ActivationStatistics.from_inputs(x)
        >>> fit = fit_tt(w, stats, (3, 4), (4, 4), rank=3, ridge=1e-9)
        >>> fit.output_error < 1e-5 < 0.1 < fit.output_error_start
        True
    """
    check_matrix(weight, "weight", finite=True)
    check_statistics(statistics)
    out_features, in_features = (int(s) for s in weight.shape)
    check_bias(bias, out_features)
    if bias is not None:
        if bias.device.type == "meta":
            raise ValueError("bias is on the meta device, which holds no values to fit.")
        if not bool(torch.isfinite(bias).all()):
            raise ValueError("bias holds NaN or Inf values; a TT fit needs finite entries.")
    options: tuple[tuple[str, object], ...] = (
        ("sweeps", sweeps),
        ("max_direct", max_direct),
        ("cg_steps", cg_steps),
    )
    for name, value in options:  # checked as what a caller may pass, not as annotated
        if not is_int(value):
            raise TypeError(f"{name} must be an int >= 0; got {type(value).__name__} {value!r}.")
        if value < 0:
            raise ValueError(f"{name} must be an int >= 0; got {value!r}.")
    sweeps, max_direct, cg_steps = int(sweeps), int(max_direct), int(cg_steps)
    in_t, out_t = validate_modes(in_features, out_features, in_modes, out_modes)
    resolve_ranks(rank, in_t, out_t)  # validates the rank argument

    problem = weighted_problem(weight, statistics, in_t, center=bias is not None, ridge=ridge)
    device = problem.covariance.device
    w = weight.detach().to(device, _FLOAT)
    b = None if bias is None else bias.detach().to(device, _FLOAT)
    mu_x, mu_r, *_ = _moments(statistics, center=False)

    def refit_bias(dense: torch.Tensor) -> torch.Tensor | None:
        return None if b is None else b + w @ mu_r - dense @ mu_x

    scorer = _Scorer(w, b, statistics)
    reference_sq = scorer.reference
    plain = [core.to(_FLOAT) for core in tt_svd(w, in_t, out_t, rank=rank)]
    plain_dense = tt_to_dense(plain)
    candidates: list[tuple[str, list[torch.Tensor]]] = [("tt-svd", plain)]
    whitened_start = [core.to(_FLOAT) for core in tt_svd(problem.target, in_t, out_t, rank=rank)]
    if [c.shape for c in whitened_start] != [c.shape for c in plain]:
        whitened_start = problem.whiten_cores(plain)  # pragma: no cover - ranks always agree
    candidates.append(("whitened tt-svd", problem.unwhiten_cores(whitened_start)))
    if not (problem.exact and len(in_t) <= 2):
        # Start ALS from the better of the two starts (in whitened coordinates).
        first = min(
            (problem.whiten_cores(plain), whitened_start),
            key=lambda cores: _objective(cores, problem),
        )
        for k, iterate in enumerate(_sweeps(first, problem, sweeps, max_direct, cg_steps)):
            candidates.append((f"als {k + 1}", problem.unwhiten_cores(iterate)))

    # Candidates are scored as they will be returned, rounded to the layer's dtype, so the
    # report gives the installed layer's errors: for a half-precision layer, the cores with
    # their norms evened out and rounded (about 1e-3 relative, as large as the smaller fits'
    # errors), and a candidate that overflows there drops out.
    rounded = weight.dtype != _FLOAT

    def returned(cores: list[torch.Tensor]) -> list[torch.Tensor]:
        return [core.to(_FLOAT) for core in cast_cores(cores, weight.dtype)] if rounded else cores

    def returned_bias(tensor: torch.Tensor | None) -> torch.Tensor | None:
        return tensor.to(weight.dtype).to(_FLOAT) if rounded and tensor is not None else tensor

    # The plain TT-SVD competes with its original bias: "never worse than TT-SVD" is then
    # true by construction, not only up to rounding.
    if rounded:
        plain = returned(plain)
        plain_dense = tt_to_dense(plain)
    # (TT-SVD cores of a finite weight, given equal norms, stay finite in every dtype: the
    # start is always scored.)
    best_name, best_cores, best_dense, best_bias = "tt-svd", plain, plain_dense, b
    start_sq = best_sq = math.inf
    for name, cores in candidates:
        if name == "tt-svd":  # scored as installed: rounded above
            cores, dense = plain, plain_dense
        else:
            cores = returned(cores)
            dense = tt_to_dense(cores)
        if not bool(torch.isfinite(dense).all()):
            continue
        biases = [returned_bias(refit_bias(dense))]
        if name == "tt-svd":
            biases.insert(0, b)
        errors = scorer.error(dense, biases)
        if name == "tt-svd":
            start_sq = best_sq = errors[0]
        for tt_bias, error_sq in zip(biases, errors, strict=True):
            if error_sq < best_sq and (tt_bias is None or bool(torch.isfinite(tt_bias).all())):
                best_name, best_cores, best_sq, best_dense, best_bias = (
                    name,
                    cores,
                    error_sq,
                    dense,
                    tt_bias,
                )
    norm = float(torch.linalg.vector_norm(w))

    def weight_error(dense: torch.Tensor) -> float:
        return _ratio(float(torch.linalg.vector_norm(w - dense)) ** 2, norm**2)

    return TTFit(
        # Already what is returned (rounded to the layer's dtype): this cast is exact.
        cores=[core.to(weight.device, weight.dtype).contiguous() for core in best_cores],
        bias=None if best_bias is None else best_bias.to(weight.device, weight.dtype),
        weight_error_start=weight_error(plain_dense),
        weight_error=weight_error(best_dense),
        output_error_start=_ratio(start_sq, reference_sq),
        output_error=_ratio(best_sq, reference_sq),
        chosen=best_name,
    )


def _objective(cores: Sequence[torch.Tensor], problem: WeightedProblem) -> float:
    """``<W~ C~, W~> - 2 <W~, T~>`` for whitened cores (the fit's objective, less a constant)."""
    dense = tt_to_dense(list(cores))
    return float((dense @ problem.covariance * dense).sum() - 2 * (dense * problem.cross).sum())
