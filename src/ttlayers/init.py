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
import operator
from collections.abc import Sequence

import numpy as np
import torch

from ttlayers.contraction import core_list, core_shapes
from ttlayers.shapes import is_int

__all__ = ["core_std", "tt_normal_"]


def core_std(ranks: Sequence[int], std: float) -> float:
    """Per-core entry std that gives the represented matrix entries of std ``std``.

    Args:
        ranks: The ``d + 1`` bond ranks (``ranks[0] == ranks[-1] == 1``).
        std: Target standard deviation of the dense matrix entries, ``> 0``.

    Returns:
        ``(std^2 / prod_{k=1}^{d-1} r_k) ** (1 / (2 d))``, computed in log space.

    Raises:
        TypeError: If ``std`` is not a real number, or ``ranks`` is not a sequence of ints.
        ValueError: If ``std`` is not a positive finite number, or ``ranks`` is not at least
            two positive ranks, 1 at both ends.
    """
    given: object = std  # checked as what a caller may pass, not as annotated
    if isinstance(given, bool) or not isinstance(given, numbers.Real):
        raise TypeError(f"std must be a positive finite number; got {type(given).__name__}.")
    try:
        value = float(given)
    except OverflowError:
        raise ValueError(
            "std must be a positive finite number; got an int past float's range."
        ) from None
    if not 0 < value < math.inf:
        raise ValueError(f"std must be a positive finite number; got {std!r}.")
    given_ranks: object = ranks
    if isinstance(given_ranks, np.ndarray) and given_ranks.ndim == 1:
        ranks = given_ranks.tolist()
    elif isinstance(given_ranks, (str, bytes)) or not isinstance(given_ranks, Sequence):
        raise TypeError(
            f"ranks must be a sequence of the d + 1 bond ranks; got {type(given_ranks).__name__}."
        )
    entries: Sequence[object] = ranks
    if not all(is_int(r) for r in entries):
        raise TypeError(f"ranks must hold ints; got {tuple(ranks)!r}.")
    if (
        len(ranks) < 2
        or not all(operator.index(r) >= 1 for r in ranks)
        or ranks[0] != 1
        or ranks[-1] != 1
    ):
        raise ValueError(
            "ranks must be the d + 1 >= 2 bond ranks, positive ints, 1 at both ends; got "
            f"{tuple(ranks)!r}."
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
        TypeError: If ``cores`` is not a sequence (a layer's ``nn.ParameterList`` included) of
            real floating-point tensors, or ``std`` is not a real number.
        ValueError: If ``std`` is not a positive finite number or too large for the cores'
            dtype, or the cores are not a chain (none, not 4-D, a size of 0, neighbouring
            ranks that differ, or a boundary rank that is not 1).
    """
    cores = core_list(cores)  # integers would round to 0, complex has no randn
    _, _, ranks = core_shapes(cores)
    scale = core_std(ranks, std)
    # Normal samples reach about 6 standard deviations in a few million draws.
    narrowest = min((core.dtype for core in cores), key=lambda dtype: torch.finfo(dtype).max)
    if not 6 * scale < torch.finfo(narrowest).max:
        raise ValueError(
            f"std={std!r} is too large for {narrowest}: the cores' entries would overflow."
        )
    for core in cores:
        # Sample in float32 at least: float16 cannot hold the intermediate sums well.
        work = torch.randn(
            core.shape,
            device=core.device,
            dtype=torch.promote_types(core.dtype, torch.float32),
        )
        rms = work.pow(2).mean().sqrt().clamp_min(torch.finfo(work.dtype).tiny)
        core.copy_(work * (scale / rms))
