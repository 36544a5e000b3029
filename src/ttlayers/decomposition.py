"""TT-SVD and TT-rounding (placeholder: being written)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["relative_error", "tt_relative_error", "tt_round", "tt_svd"]


def tt_svd(
    matrix: torch.Tensor,
    in_modes: Sequence[int],
    out_modes: Sequence[int],
    *,
    rank: int | Sequence[int] | None = None,
    eps: float | None = None,
) -> list[torch.Tensor]:
    raise NotImplementedError


def tt_round(
    cores: Sequence[torch.Tensor],
    *,
    rank: int | Sequence[int] | None = None,
    eps: float | None = None,
) -> list[torch.Tensor]:
    raise NotImplementedError


def relative_error(matrix: torch.Tensor, cores: Sequence[torch.Tensor]) -> float:
    raise NotImplementedError


def tt_relative_error(reference: Sequence[torch.Tensor], cores: Sequence[torch.Tensor]) -> float:
    raise NotImplementedError
