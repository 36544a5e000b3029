"""ttlayers: Tensor-Train (TT / MPO) layers for PyTorch."""

from ttlayers.calibration import ActivationStatistics, TTFit, fit_tt
from ttlayers.contraction import tt_to_dense
from ttlayers.decomposition import tt_round, tt_svd
from ttlayers.init import tt_normal_
from ttlayers.linear import TTLinear
from ttlayers.shapes import factorize, max_ranks, suggest_modes
from ttlayers.surgery import (
    LayerReport,
    SkippedLayer,
    TensorizeReport,
    load_tensorized_,
    tensorize_,
)

__version__ = "0.1.0"

__all__ = [
    "ActivationStatistics",
    "LayerReport",
    "SkippedLayer",
    "TTFit",
    "TTLinear",
    "TensorizeReport",
    "__version__",
    "factorize",
    "fit_tt",
    "load_tensorized_",
    "max_ranks",
    "suggest_modes",
    "tensorize_",
    "tt_normal_",
    "tt_round",
    "tt_svd",
    "tt_to_dense",
]
