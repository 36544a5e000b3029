"""Contracting a TT matrix with an input, or with itself into the dense weight.

The forward pass of a TT layer is one einsum network over the input and all the cores.
Its cost depends heavily on the order of the pairwise contractions, so the order is planned
once per input shape with opt_einsum and then replayed as a fixed list of two-operand
``torch.einsum`` calls: no path search on the hot path (``torch.einsum`` with more than
two operands searches a path on every call), and nothing for ``torch.compile`` to trip on.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import opt_einsum
import torch

__all__ = ["ContractionPlan", "core_shapes", "plan_dense", "plan_forward", "run_plan", "tt_to_dense"]


@dataclass(frozen=True)
class ContractionPlan:
    """A fixed order of pairwise contractions for one einsum network.

    Attributes:
        steps: One ``(i, j, equation)`` per contraction: operands ``i < j`` of the current
            list are removed, contracted by ``torch.einsum(equation, a, b)``, and the result is
            appended, as in opt_einsum's path format.
        flops: opt_einsum's estimate of the floating-point operations of this order.
        equation: The whole network as one einsum string, for reference and tests.
    """

    steps: tuple[tuple[int, int, str], ...]
    flops: int
    equation: str


def _symbols(d: int) -> tuple[str, list[str], list[str], list[str]]:
    """Einsum letters: batch, d input modes, d output modes, d + 1 ranks."""
    letters = [opt_einsum.get_symbol(k) for k in range(3 * d + 2)]
    return letters[0], letters[1 : d + 1], letters[d + 1 : 2 * d + 1], letters[2 * d + 1 :]


def _core_terms(inp: list[str], out: list[str], rank: list[str]) -> list[str]:
    return [rank[k] + inp[k] + out[k] + rank[k + 1] for k in range(len(inp))]


def _build_plan(terms: list[str], output: str, shapes: list[tuple[int, ...]]) -> ContractionPlan:
    equation = ",".join(terms) + "->" + output
    strategy = "optimal" if len(terms) <= 7 else "dp"
    path, info = opt_einsum.contract_path(equation, *shapes, shapes=True, optimize=strategy)
    current = list(terms)
    steps: list[tuple[int, int, str]] = []
    for position in path:
        if len(position) == 1:
            # A lone operand (d = 1 without an input): einsum sums its size-1 ranks on the way.
            (i,) = position
            term = current.pop(i)
            current.append(term)
            continue
        i, j = sorted(position)
        right, left = current.pop(j), current.pop(i)
        if current:
            keep = set(output).union(*current)
            result = "".join(dict.fromkeys(c for c in left + right if c in keep))
        else:
            result = output
        steps.append((i, j, f"{left},{right}->{result}"))
        current.append(result)
    assert current == [output] or not steps, (current, output)
    return ContractionPlan(tuple(steps), int(info.opt_cost), equation)


@lru_cache(maxsize=256)
def plan_forward(
    batch: int, in_modes: tuple[int, ...], out_modes: tuple[int, ...], ranks: tuple[int, ...]
) -> ContractionPlan:
    """Plan ``y[b, n_1..n_d] = sum x[b, m_1..m_d] G_1[r_0, m_1, n_1, r_1] ... G_d[...]``.

    Operand 0 is the input reshaped to ``(batch, *in_modes)``; operands ``1..d`` are the
    cores. The result has shape ``(batch, *out_modes)``. Cached per argument tuple.
    """
    d = len(in_modes)
    b, inp, out, rank = _symbols(d)
    terms = [b + "".join(inp), *_core_terms(inp, out, rank)]
    shapes = [(batch, *in_modes)] + [
        (ranks[k], in_modes[k], out_modes[k], ranks[k + 1]) for k in range(d)
    ]
    return _build_plan(terms, b + "".join(out), shapes)


@lru_cache(maxsize=256)
def plan_dense(
    in_modes: tuple[int, ...], out_modes: tuple[int, ...], ranks: tuple[int, ...]
) -> ContractionPlan:
    """Plan the contraction of the cores alone into ``W[n_1..n_d, m_1..m_d]``."""
    d = len(in_modes)
    _, inp, out, rank = _symbols(d)
    terms = _core_terms(inp, out, rank)
    shapes = [(ranks[k], in_modes[k], out_modes[k], ranks[k + 1]) for k in range(d)]
    return _build_plan(terms, "".join(out) + "".join(inp), shapes)


def run_plan(plan: ContractionPlan, operands: Sequence[torch.Tensor]) -> torch.Tensor:
    """Execute ``plan`` on ``operands``; differentiable, compile-friendly."""
    current = list(operands)
    if not plan.steps:
        # One operand and nothing to pair it with: let einsum apply the whole equation.
        return torch.einsum(plan.equation, current[0])
    for i, j, equation in plan.steps:
        right, left = current.pop(j), current.pop(i)
        current.append(torch.einsum(equation, left, right))
    return current[0]


def tt_to_dense(cores: Sequence[torch.Tensor]) -> torch.Tensor:
    """Contract TT-matrix cores into the dense matrix they represent.

    Args:
        cores: ``d`` tensors, core ``k`` of shape ``(r_k, m_k, n_k, r_{k+1})`` with
            ``r_0 = r_d = 1``.

    Returns:
        ``W`` of shape ``(prod n_k, prod m_k)`` with
        ``W[i, j] = G_1[:, j_1, i_1, :] G_2[:, j_2, i_2, :] ... G_d[:, j_d, i_d, :]``, where
        ``i`` and ``j`` are the row-major multi-indices of the output and input positions.

    Raises:
        ValueError: If the cores are not 4-D or their ranks do not chain.
    """
    in_modes, out_modes, ranks = core_shapes(cores)
    plan = plan_dense(in_modes, out_modes, ranks)
    out_features = 1
    for n in out_modes:
        out_features *= n
    return run_plan(plan, cores).reshape(out_features, -1)


def core_shapes(
    cores: Sequence[torch.Tensor],
) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """Read ``(in_modes, out_modes, ranks)`` off a chain of cores, checking that it chains.

    Raises:
        ValueError: If the chain is empty, a core is not 4-D, or neighbouring ranks differ.
    """
    if len(cores) == 0:
        raise ValueError("cores must hold at least one core; got none.")
    for k, core in enumerate(cores):
        if core.dim() != 4:
            raise ValueError(
                f"core {k} must be 4-D (r_k, m_k, n_k, r_k+1); got shape {tuple(core.shape)}."
            )
    ranks = [cores[0].shape[0]] + [core.shape[3] for core in cores]
    for k in range(len(cores) - 1):
        if cores[k].shape[3] != cores[k + 1].shape[0]:
            raise ValueError(
                f"cores {k} and {k + 1} do not chain: shapes {tuple(cores[k].shape)} and "
                f"{tuple(cores[k + 1].shape)}."
            )
    if ranks[0] != 1 or ranks[-1] != 1:
        raise ValueError(f"the boundary ranks must be 1; got {ranks[0]} and {ranks[-1]}.")
    in_modes = tuple(int(core.shape[1]) for core in cores)
    out_modes = tuple(int(core.shape[2]) for core in cores)
    return in_modes, out_modes, tuple(int(r) for r in ranks)
