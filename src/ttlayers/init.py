"""Initializing TT cores so the matrix they represent has a chosen entry scale.

If every entry of core ``k`` is drawn with variance ``s^2`` independently, each entry of the
represented matrix is a sum of ``prod_{k=1}^{d-1} r_k`` products of ``d`` such entries, so

    Var(W[i, j]) = s^(2d) * prod_{k=1}^{d-1} r_k.

Solving for ``s`` gives the per-core scale for a target standard deviation of ``W`` (the
argument of t3f's ``glorot``-style initializers; Novikov et al. 2015). Several PyTorch TT
libraries scale every core by the target std instead, which shrinks or blows up ``W``
exponentially in ``d``.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import torch

from ttlayers.contraction import core_shapes

__all__ = ["core_std", "tt_normal_"]


def core_std(ranks: Sequence[int], std: float) -> float:
    """Per-core entry std that gives the represented matrix entries of std ``std``.

    Args:
        ranks: The ``d + 1`` bond ranks (``ranks[0] == ranks[-1] == 1``).
        std: Target standard deviation of the dense matrix entries, ``> 0``.

    Returns:
        ``(std^2 / prod_{k=1}^{d-1} r_k) ** (1 / (2 d))``, computed in log space.

    Raises:
        ValueError: If ``std`` is not a positive finite number, or ``ranks`` is not at least
            two positive ints.
    """
    given: object = std  # checked as what a caller may pass, not as annotated
    real = isinstance(given, numbers.Real) and not isinstance(given, bool)
    if not real or not 0 < float(given) < math.inf:  # type: ignore[arg-type]
        raise ValueError(f"std must be a positive finite number; got {std!r}.")
    given_ranks: Sequence[object] = ranks
    if len(ranks) < 2 or not all(
        isinstance(r, numbers.Integral) and int(r) >= 1 for r in given_ranks
    ):
        raise ValueError(
            f"ranks must be the d + 1 >= 2 bond ranks, positive ints; got {tuple(ranks)!r}."
        )
    d = len(ranks) - 1
    log_var = 2.0 * math.log(std) - sum(math.log(r) for r in ranks[1:-1])
    return math.exp(log_var / (2 * d))


@torch.no_grad()
def tt_normal_(cores: Sequence[torch.Tensor], std: float) -> None:
    """Fill TT cores in place so the represented matrix has entries of std ``std``.

    Each core is drawn from a normal distribution and then rescaled so that its mean square
    entry is exactly :func:`core_std` squared. The rescaling removes the sampling noise of
    small cores, so the std of the dense matrix is close to ``std`` even for rank 1 and many
    cores (for rank 1 the Frobenius norm of the matrix is exact).

    Args:
        cores: ``d`` tensors of shape ``(r_k, m_k, n_k, r_{k+1})``.
        std: Target standard deviation of the dense matrix entries, ``> 0``.

    Raises:
        TypeError: If ``cores`` is not a non-empty sequence of 4-D real floating-point
            tensors.
        ValueError: If ``std`` is not a positive finite number, or the cores do not chain
            (neighbouring ranks differ, or a boundary rank is not 1).
    """
    given: object = cores  # checked as what a caller may pass, not as annotated
    if (
        isinstance(given, torch.Tensor)
        or not isinstance(given, Sequence)
        or not given
        or not all(isinstance(core, torch.Tensor) and core.dim() == 4 for core in given)
    ):
        raise TypeError(
            "cores must be a non-empty sequence of 4-D tensors (r_k, m_k, n_k, r_{k+1}); got "
            f"{type(cores).__name__}."
        )
    for core in cores:
        if not core.is_floating_point():  # integers would round to 0, complex has no randn
            raise TypeError(f"cores must be real floating-point tensors; got {core.dtype}.")
    _, _, ranks = core_shapes(cores)
    scale = core_std(ranks, std)
    for core in cores:
        # Sample in float32 at least: float16 cannot hold the intermediate sums well.
        work = torch.randn(
            core.shape,
            device=core.device,
            dtype=torch.promote_types(core.dtype, torch.float32),
        )
        rms = work.pow(2).mean().sqrt().clamp_min(torch.finfo(work.dtype).tiny)
        core.copy_(work * (scale / rms))
