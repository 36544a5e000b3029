"""Converting the linear layers of a trained model to ``TTLinear``, in place.

Modelled on torchao's ``quantize_`` and PEFT's ``inject_adapter``: select the targets with a
``filter_fn(module, qualified_name)``, convert every target first, and only then swap the
modules in via ``model.get_submodule(parent)`` and ``setattr``, so that an error never leaves
the model half converted.

Two options turn the plain TT-SVD of each weight into a conversion of the model:

- ``calibration=``: data-aware. The layers are converted one by one in forward order, each
  fitted (:func:`ttlayers.calibration.fit_tt`) to reproduce the original model's outputs of
  that layer from the inputs it receives with the layers before it already converted, so
  that errors do not compound unseen. Activations are captured with hooks
  (:mod:`ttlayers.capture`); one layer's statistics exist at a time.
- ``compression=`` / ``params=``: one budget for all the selected layers; each layer's
  shape (plain low rank or a TT of 2 or 3 cores) and ranks are chosen by
  :func:`ttlayers.budget.allocate` to minimize the summed squared relative errors (of the
  outputs on the calibration data when given, else of the weights).
"""

from __future__ import annotations

import functools
import math
import numbers
import sys
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn.modules.module import _IncompatibleKeys  # what load_state_dict returns
from torch.nn.utils import parametrize

from ttlayers import decomposition
from ttlayers.budget import (
    RankChoice,
    allocate,
    allocate_evenly,
    candidate_shapes,
    layer_options,
)
from ttlayers.calibration import DEFAULT_RIDGE, check_ridge, fit_tt
from ttlayers.capture import ActivationCapture
from ttlayers.contraction import core_shapes
from ttlayers.decomposition import check_eps
from ttlayers.linear import TTLinear, core_index, ordinary_tensors, zero_initialized
from ttlayers.shapes import (
    as_rank_argument,
    is_int,
    num_parameters,
    suggest_modes,
    validate_modes,
)

__all__ = ["LayerReport", "SkippedLayer", "TensorizeReport", "load_tensorized_", "tensorize_"]

FilterFn = Callable[[nn.Module, str], bool]


@dataclass(frozen=True)
class LayerReport:
    """What :func:`tensorize_` did to one ``nn.Linear``.

    Attributes:
        name: Qualified name of the layer in the model (the first, if it has several).
        in_features: Input size.
        out_features: Output size.
        in_modes: The ``d`` input modes of the TT form.
        out_modes: The ``d`` output modes.
        ranks: The ``d + 1`` bond ranks reached.
        params_before: Parameters of the ``nn.Linear`` (weight and bias).
        params_after: Parameters of the ``TTLinear`` (cores and bias).
        relative_error: ``||W - W_tt||_F / ||W||_F`` of the conversion.
        aliases: Further names of the same module (weight tying); the one ``TTLinear`` is
            installed under all of them.
        tt_svd_error: With calibration: the weight error of plain TT-SVD at the same ranks
            (``relative_error`` is then that of the data-aware fit). ``None`` otherwise.
        output_error: With calibration: the relative output error of the installed layer on
            the calibration data, ``||Y_tt - Y||_F / ||Y||_F``, where ``Y`` are the original
            model's outputs of this layer and ``Y_tt`` the new layer's outputs on the inputs
            it receives with the layers before it converted. ``None`` otherwise.
        tt_svd_output_error: The same for plain TT-SVD at the same ranks. ``None`` otherwise.
    """

    name: str
    in_features: int
    out_features: int
    in_modes: tuple[int, ...]
    out_modes: tuple[int, ...]
    ranks: tuple[int, ...]
    params_before: int
    params_after: int
    relative_error: float
    aliases: tuple[str, ...] = ()
    tt_svd_error: float | None = None
    output_error: float | None = None
    tt_svd_output_error: float | None = None

    @property
    def compression(self) -> float:
        """``params_before / params_after``."""
        return self.params_before / self.params_after if self.params_after else math.nan


@dataclass(frozen=True)
class SkippedLayer:
    """An ``nn.Linear`` that :func:`tensorize_` left as it was, and why.

    Attributes:
        name: The layer's qualified name in the model.
        reason: Why it was not converted, in words.
    """

    name: str
    reason: str


@dataclass(frozen=True)
class _Column:
    header: str
    cell: Callable[[LayerReport], str]
    total: Callable[[TensorizeReport], str] = lambda report: ""
    align: str = ">"


def _names(row: LayerReport) -> str:
    return " = ".join((row.name, *row.aliases))


# The table of ``print(report)``, one entry per column: a new column is one line here.
_COLUMNS: tuple[_Column, ...] = (
    _Column("layer", _names, lambda report: "total", align="<"),
    _Column("shape (out x in)", lambda row: f"{row.out_features} x {row.in_features}", align="<"),
    _Column("in_modes", lambda row: str(row.in_modes), align="<"),
    _Column("out_modes", lambda row: str(row.out_modes), align="<"),
    _Column("ranks", lambda row: str(row.ranks), align="<"),
    _Column("params", lambda row: f"{row.params_before:,}", lambda rep: f"{rep.params_before:,}"),
    _Column("TT params", lambda row: f"{row.params_after:,}", lambda rep: f"{rep.params_after:,}"),
    _Column(
        "compression", lambda row: f"{row.compression:.1f}x", lambda rep: f"{rep.compression:.1f}x"
    ),
    _Column(
        "rel. error",
        lambda row: f"{row.relative_error:.2e}",
        lambda rep: _format(_rms(rep, "relative_error")),
    ),
)

# Shown only for a calibrated conversion.
_CALIBRATED_COLUMNS: tuple[_Column, ...] = (
    _Column(
        "TT-SVD rel. error",
        lambda row: _format(row.tt_svd_error),
        lambda rep: _format(_rms(rep, "tt_svd_error")),
    ),
    _Column(
        "TT-SVD out. error",
        lambda row: _format(row.tt_svd_output_error),
        lambda rep: _format(_rms(rep, "tt_svd_output_error")),
    ),
    _Column(
        "out. error",
        lambda row: _format(row.output_error),
        lambda rep: _format(_rms(rep, "output_error")),
    ),
)


def _format(value: float | None) -> str:
    return "-" if value is None else f"{value:.2e}"


def _rms(report: TensorizeReport, attribute: str) -> float | None:
    """Root mean square of a per-layer error over the layers (``None`` if any is missing)."""
    values = [getattr(row, attribute) for row in report.layers]
    if not values or any(value is None for value in values):
        return None
    return math.sqrt(sum(value * value for value in values) / len(values))


@dataclass
class TensorizeReport:
    """The result of :func:`tensorize_`: one row per converted layer, and the layers skipped.

    ``print(report)`` shows a table. The rows are plain dataclasses, so
    ``dataclasses.asdict(report)`` gives a JSON-ready dict.

    Attributes:
        layers: One :class:`LayerReport` per converted module, in model order.
        skipped: One :class:`SkippedLayer` per ``nn.Linear`` left dense, with the reason.
        params_before: Distinct parameters of the converted layers before conversion (a
            weight shared by two converted layers counted once, unlike the rows' sum).
        model_params_before: Distinct parameters of the whole model before conversion.
        model_params_after: Distinct parameters of the whole model after conversion.
        budget: The parameter budget of the selected layers (cores and biases; the whole of
            a layer the budget kept dense) when one was given by ``compression=`` or
            ``params=``, else ``None``.
        calibration_samples: Rows of activations the first converted layer saw (tokens, for a
            sequence model), or 0 without calibration.

    The error totals of the table are root mean squares over the layers.
    """

    layers: list[LayerReport] = field(default_factory=list)
    skipped: list[SkippedLayer] = field(default_factory=list)
    params_before: int = 0
    model_params_before: int = 0
    model_params_after: int = 0
    budget: int | None = None
    calibration_samples: int = 0

    @property
    def params_after(self) -> int:
        """Parameters of the converted layers after, summed."""
        return sum(row.params_after for row in self.layers)

    @property
    def compression(self) -> float:
        """``params_before / params_after`` over the converted layers."""
        return self.params_before / self.params_after if self.params_after else math.nan

    def __str__(self) -> str:
        header = (
            f"tensorize_: {len(self.layers)} layer(s) converted, {len(self.skipped)} skipped; "
            f"model parameters {self.model_params_before:,} -> {self.model_params_after:,}"
        )
        if self.budget is not None:
            header += f"; budget {self.budget:,}"
        if self.calibration_samples:
            header += f"; calibrated on {self.calibration_samples:,} samples"
        columns = _COLUMNS
        if any(row.output_error is not None for row in self.layers):
            columns = _COLUMNS + _CALIBRATED_COLUMNS
        table = [[column.header for column in columns]]
        table += [[column.cell(row) for column in columns] for row in self.layers]
        if len(self.layers) > 1:
            table.append([column.total(self) for column in columns])
        widths = [max(len(line[i]) for line in table) for i in range(len(columns))]
        lines = [header, ""]
        for line in table:
            cells = [
                f"{text:{column.align}{width}}"
                for text, column, width in zip(line, columns, widths, strict=True)
            ]
            lines.append("  ".join(cells).rstrip())
        if self.skipped:
            lines += ["", "skipped:"]
            width = max(len(skip.name) for skip in self.skipped)
            lines += [f"  {skip.name:<{width}}  {skip.reason}" for skip in self.skipped]
        return "\n".join(lines)


def _count_parameters(*modules: nn.Module) -> int:
    """Parameters of ``modules``, each tensor counted once (tied weights are shared).

    A lazy layer's parameters have no size until its first forward pass: counted as 0.
    """
    sizes = {
        id(param): param.numel()
        for module in modules
        for param in module.parameters()
        if not isinstance(param, nn.parameter.UninitializedParameter)
    }
    return sum(sizes.values())


def _check_arguments(
    model: object,
    rank: object,
    eps: object,
    filter_fn: object,
    num_cores: object,
) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module; got {type(model).__name__}.")
    check_eps(eps)
    if rank is not None:
        if (
            isinstance(rank, bool)
            or not isinstance(rank, (numbers.Integral, Sequence))
            or isinstance(rank, (str, bytes))
        ):
            raise TypeError(f"rank must be an int, a sequence of ints or None; got {rank!r}.")
        if isinstance(rank, numbers.Integral) and rank < 1:
            raise ValueError(f"rank must be a positive int; got {rank}.")
    if filter_fn is not None and not callable(filter_fn):
        raise TypeError(
            "filter_fn must be a callable (module, qualified_name) -> bool or None; got "
            f"{type(filter_fn).__name__}."
        )
    if num_cores is not None:
        if not is_int(num_cores):
            raise TypeError(f"num_cores must be an int or None; got {num_cores!r}.")
        if num_cores < 1:
            raise ValueError(f"num_cores must be a positive int; got {num_cores}.")


def _check_budget(compression: object, params: object, rank: object, eps: object) -> None:
    if compression is not None:
        if isinstance(compression, bool) or not isinstance(compression, numbers.Real):
            raise TypeError(
                f"compression must be a number > 1 or None; got {type(compression).__name__}."
            )
        if not 1.0 < float(compression) < math.inf:
            raise ValueError(
                f"compression must be a finite ratio > 1 (dense parameters / TT parameters); "
                f"got {compression}."
            )
    if params is not None and not is_int(params):
        raise TypeError(f"params must be an int or None; got {type(params).__name__}.")
    if params is not None and params < 1:
        raise ValueError(f"params must be a positive number of parameters; got {params}.")
    if compression is not None and params is not None:
        raise ValueError("pass either compression= or params=, not both; they set one budget.")
    if (compression is not None or params is not None) and (rank is not None or eps is not None):
        raise ValueError(
            "a parameter budget (compression= or params=) chooses every layer's ranks; it "
            "cannot be combined with rank= or eps=. Pass one or the other."
        )


def _check_fit_options(
    allocation: object, ridge: object, sweeps: object, *, budgeted: bool, calibrated: bool
) -> tuple[str, float, int]:
    """``allocation``, ``ridge`` and ``sweeps`` checked, with their defaults filled in.

    Each applies to one kind of conversion only; given for another it would have no effect,
    so that is an error rather than silently ignored.
    """
    if allocation is not None and allocation not in ("errors", "even"):
        raise ValueError(f'allocation must be "errors" or "even"; got {allocation!r}.')
    if sweeps is not None:
        if not is_int(sweeps):
            raise TypeError(f"sweeps must be an int >= 0; got {type(sweeps).__name__} {sweeps!r}.")
        if sweeps < 0:
            raise ValueError(f"sweeps must be an int >= 0; got {sweeps!r}.")
    ridge_value = DEFAULT_RIDGE if ridge is None else check_ridge(ridge)
    if allocation is not None and not budgeted:
        raise ValueError(
            f"allocation={allocation!r} applies only to a budget (compression= or params=); "
            "none was given."
        )
    for name, value in (("ridge", ridge), ("sweeps", sweeps)):
        if value is not None and not calibrated:
            raise ValueError(
                f"{name}={value!r} applies only to a data-aware conversion; pass calibration= "
                f"or leave {name} out."
            )
    # NumPy scalars are accepted; Python numbers go on (int subclasses as plain ints).
    return (
        "errors" if allocation is None else str(allocation),
        ridge_value,
        2 if sweeps is None else int(sweeps),
    )


def _structural_reason(model: nn.Module, linear: nn.Linear, names: list[str]) -> str | None:
    """Why a linear layer cannot be swapped at all, or ``None`` if it can."""
    if "" in names:
        return "the model itself cannot be replaced in place; use TTLinear.from_dense(model)"
    if parametrize.is_parametrized(linear):
        return (
            "its weight is parametrized (torch.nn.utils.parametrize); remove the "
            "parametrization first (parametrize.remove_parametrizations)"
        )
    if isinstance(linear.weight, nn.parameter.UninitializedParameter):
        return "lazy layer not initialized yet; run a forward pass first"
    if linear.in_features == 0 or linear.out_features == 0:
        return (
            f"it maps {linear.in_features} to {linear.out_features} features: a weight of no "
            "numbers has nothing to factor"
        )
    if not isinstance(linear.weight, nn.Parameter):
        return (
            "its weight is computed by a hook (torch.nn.utils.prune, or the legacy weight_norm "
            "or spectral_norm); remove the hook first"
        )
    if not linear.weight.is_floating_point():
        return f"its weight is {linear.weight.dtype}; TT layers are real floating point"
    if type(linear).forward is not nn.Linear.forward:
        return f"{type(linear).__name__} overrides forward, which a TTLinear would drop"
    if "forward" in vars(linear):  # e.g. accelerate's hooks wrap an instance's forward
        return "its forward is replaced on the instance, which a TTLinear would drop"
    if any(key.startswith("__composable_api_state_key") for key in vars(linear)):
        # Its hooks read state kept on the module itself (torch.distributed._composable).
        return (
            "a torch.distributed composable API (checkpoint, fully_shard, replicate) is "
            "applied to it, whose state a TTLinear would not have; apply it after converting"
        )
    own = [
        name
        for name, _ in (
            *linear.named_parameters(recurse=False),
            *linear.named_buffers(recurse=False),
            *linear.named_children(),
        )
        if name not in ("weight", "bias")
    ]
    if own:  # a subclass's scale, or a module registered on the instance
        return (
            f"it holds {', '.join(map(repr, own))} besides its weight and bias, which a "
            "TTLinear would drop"
        )
    for name in names:
        parent = model.get_submodule(name.rpartition(".")[0])
        if isinstance(parent, nn.MultiheadAttention):
            return "nn.MultiheadAttention reads out_proj.weight directly"
    return None


def tensorize_(
    model: nn.Module,
    *,
    rank: int | Sequence[int] | None = None,
    eps: float | None = None,
    filter_fn: FilterFn | None = None,
    num_cores: int | None = None,
    calibration: object = None,
    compression: float | None = None,
    params: int | None = None,
    allocation: str | None = None,
    ridge: float | None = None,
    sweeps: int | None = None,
    progress: bool = False,
) -> TensorizeReport:
    """Replace, in place, the ``nn.Linear`` layers of ``model`` by ``TTLinear``.

    Each selected layer ``L`` becomes a ``TTLinear`` with the same dtype, device, bias,
    training mode and ``requires_grad`` flags, with trainable cores ready to fine-tune. Layers
    nested anywhere (``Sequential``, ``ModuleList``, ``ModuleDict``, custom modules) are found.
    Without ``calibration`` the conversion is ``TTLinear.from_dense(L, rank, eps=eps,
    num_cores=num_cores)`` (TT-SVD, minimizing the weight error).

    Data-aware conversion (``calibration``):
        The layers are converted one at a time in the order the model calls them. For each,
        its inputs are captured with forward hooks on the calibration data, with the layers
        before it already replaced by their conversions, and the cores (and the bias) are
        fitted by :func:`ttlayers.calibration.fit_tt` to reproduce the *original* model's
        outputs of that layer, so each layer also compensates what the earlier conversions
        changed. The fit starts from TT-SVD at the same ranks and is never worse than it on
        the calibration data. Ranks come from ``rank``/``eps`` (as for TT-SVD) or from the
        budget. Passes run under ``torch.no_grad()`` in eval mode (training flags restored);
        every row of a layer's input is a sample: every token, padding included, except
        where the model packs a padded batch into a nested tensor (``nn.TransformerEncoder``
        in eval mode, given ``src_key_padding_mask``, where PyTorch's conditions for it hold:
        ``batch_first=True``, ``norm_first=False``, ...), which holds the real tokens only. The
        statistics are float64 sums on the layer's device; only one layer's exist at a time.
        A layer called several times in one forward pass (a number that may differ between
        batches) is fitted to the inputs of all its calls, those of its later calls coming
        from its own original earlier calls; it is then fitted once more to the inputs its
        converted earlier calls produce, and the report's output errors are measured on
        those (its error in the converted model can still differ a little: the second fit
        changes them again).

    One budget (``compression`` or ``params``):
        Every selected layer's shape, among plain low rank and balanced TT shapes of 2 and 3
        cores (only ``num_cores`` cores if given), and its ranks are chosen together by
        :func:`ttlayers.budget.allocate` to minimize the sum of the layers' squared relative
        errors (output errors on the calibration data when given, else weight errors)
        within the budget. Without ``filter_fn`` every eligible layer is selected.

    Selection:
        - With ``filter_fn``, every ``nn.Linear`` for which ``filter_fn(module,
          qualified_name)`` is true (for a module under several names, true for any of them),
          whatever its compression.
        - Without it, every ``nn.Linear`` whose weight and bias are not shared with another
          module (converting would untie them; select it with ``filter_fn`` to do so anyway) and,
          without a budget, whose TT form at the requested ``rank``/``eps`` has fewer
          parameters than its dense weight; with a budget, whose plain low rank and, with
          ``num_cores``, whose ``num_cores``-core shape have fewer at rank 1 (not a layer
          with one input or one output, or 2 x 2, or one whose sizes have too few factors
          for ``num_cores`` cores). No layer a budget selects comes out larger. A budget
          too small for every such layer's largest smaller form may keep some of them dense
          where that lowers the summed squared errors (a small classifier whose lossless
          forms are all larger than it); they are listed in ``report.skipped``. Not with
          ``allocation="even"``, and a layer ``filter_fn`` selects is always converted.
        - Never: layers that are already ``TTLinear``; the model itself; the ``out_proj`` of an
          ``nn.MultiheadAttention`` (which reads ``out_proj.weight`` directly); uninitialized
          lazy layers; layers with no inputs or no outputs; layers whose weight is
          parametrized (``torch.nn.utils.parametrize``) or computed by a hook
          (``torch.nn.utils.prune``, the legacy ``weight_norm`` and ``spectral_norm``);
          layers whose weight is not real floating point (complex, integer); subclasses of
          ``nn.Linear`` that override ``forward``, layers whose ``forward`` is replaced
          on the instance (as accelerate's hooks do), layers that hold parameters,
          buffers or modules besides their weight and bias, and layers under a composable
          ``torch.distributed`` API (``checkpoint``, ``fully_shard``, ``replicate``).
          Every ``nn.Linear`` not converted is listed in ``report.skipped`` with the reason.

    Guarantees:
        - Atomic: all selected layers are converted and checked before the first swap; on any
          error (a bad calibration batch, NaN activations, a bad weight) the model is left
          exactly as it was, hooks removed, and the message names the layer or the batch.
        - Weight tying: an ``nn.Linear`` reachable under several names is converted once and
          the same ``TTLinear`` installed under every name.
        - The forward and backward hooks of a replaced ``nn.Linear`` move to its
          ``TTLinear`` (the handles remove them from it), as ``torch.ao.quantization``'s
          module swap keeps them; a calibrated layer is fitted to its inputs after its
          pre-hooks.
        - A converted ``linear1`` or ``linear2`` of an ``nn.TransformerEncoderLayer`` gets a
          forward pre-hook that does nothing. A hook is what makes that layer, in eval mode
          without gradients, run its modules instead of PyTorch's fused kernel, which reads
          ``linear1.weight`` and ``linear2.weight``, the dense matrices rebuilt from the
          cores on every call (up to 7 times as long as running the modules, measured by
          ``benchmarks/bench_encoder.py``).

    Args:
        model: The model to convert in place.
        rank: Cap on every bond rank (an int), or the ``d - 1`` inner ranks (every converted
            layer must then have ``d`` cores).
        eps: Relative Frobenius error bound in ``(0, 1)`` per layer:
            ``||W - W_tt||_F <= eps * ||W||_F`` for TT-SVD. With ``rank`` too, the smaller
            ranks win; with neither, each conversion is exact (and rarely smaller than the
            dense layer). With calibration, ``eps`` picks the ranks and the fit then trades
            weight error for output error.
        filter_fn: ``(module, qualified_name) -> bool``, called on ``nn.Linear`` modules only.
        num_cores: Number of cores ``d`` per layer; default
            :func:`ttlayers.shapes.default_num_cores` of each layer's sizes.
        calibration: Real inputs of the model: a tensor (one batch), a list or tuple of
            batches, or a re-iterable such as a ``DataLoader`` (not a generator: it is replayed
            for every layer). A tensor batch is run as ``model(batch)``, a tuple or list as
            ``model(*batch)``, a dict as ``model(**batch)``: one batch of several inputs is
            ``[(src, tgt)]``; for a loader of ``(input, target)`` pairs pass
            ``[x for x, _ in loader]``. Batches must be on the model's
            device. A few hundred to a few thousand samples are typical.
        compression: Budget as a ratio > 1: the selected layers get at most their dense
            parameter count (weights and biases) divided by this (a layer the budget keeps
            dense counts in full).
        params: Budget as a count: the selected layers' parameters (cores and biases).
        allocation: How a budget is shared: ``"errors"`` minimizes the sum of the layers'
            squared relative errors (:func:`ttlayers.budget.allocate`); ``"even"`` gives every
            layer the same compression and chooses only its shape and ranks within it
            (:func:`ttlayers.budget.allocate_evenly`), for models whose layers' errors are not
            comparable. Default ``"errors"``; only with a budget.
        ridge: The relative ridge of the fit (:func:`ttlayers.calibration.fit_tt`), only with
            ``calibration``: it pulls the TT weight toward the original in input directions
            the calibration data do not excite. Small (the default, ``1e-3``) fits the
            calibration data closely but can stray far from ``W`` in the other directions;
            raise it where the model will see inputs unlike the calibration data.
        sweeps: ALS sweeps per layer, only with ``calibration``. Default 2.
        progress: Print one line per layer to stderr (layer k of n, errors, time).

    Returns:
        A :class:`TensorizeReport`; ``print(report)`` shows a table, with the output errors
        before (TT-SVD) and after the fit when calibrated.

    Raises:
        TypeError: If an argument has the wrong type, or ``calibration`` is a one-shot
            iterator.
        ValueError: If ``eps``, ``rank``, ``num_cores``, ``sweeps``, ``ridge``,
            ``allocation`` or the budget is invalid or they conflict (``allocation`` without a
            budget, ``ridge`` or ``sweeps`` without ``calibration``), a selected weight or
            activation holds NaN or Inf (naming the layer), a calibration batch fails in the
            model (naming the batch), the calibration data never reach a selected layer, the
            budget is too small, or no layer was selected (listing those that exist).

    Warns:
        UserWarning: Before any layer is swapped, for a layer ``filter_fn`` unties from
            another, and for a layer that received fewer calibration rows than it has
            inputs (its fit rests on that few dimensions).

    Example:
        >>> model = nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 3))
        >>> report = tensorize_(model, rank=8)
        >>> type(model[0]).__name__, [row.name for row in report.layers]
        ('TTLinear', ['0'])
        >>> report.skipped[0].name, type(model[2]).__name__
        ('2', 'Linear')
        >>> print(report)  # doctest: +ELLIPSIS
        tensorize_: 1 layer(s) converted, 1 skipped; model parameters 66,563 -> ...

        Data-aware, with one budget for both layers:

        >>> import torch
        >>> model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64))
        >>> report = tensorize_(model, calibration=torch.randn(256, 64), compression=4.0)
        >>> report.params_after <= report.params_before / 4
        True
        >>> all(r.output_error <= r.tt_svd_output_error for r in report.layers)
        True
    """
    rank = as_rank_argument(rank)  # type: ignore[assignment]
    _check_arguments(model, rank, eps, filter_fn, num_cores)
    _check_budget(compression, params, rank, eps)
    if num_cores == 1 and (compression is not None or params is not None):
        raise ValueError(
            "num_cores=1 keeps each weight whole, one core of all its numbers: no budget can "
            "make a layer smaller. Pass num_cores >= 2, or None to let the budget choose."
        )
    budgeted = compression is not None or params is not None
    allocation, ridge, sweeps = _check_fit_options(
        allocation, ridge, sweeps, budgeted=budgeted, calibrated=calibration is not None
    )
    rank = int(rank) if isinstance(rank, numbers.Integral) else rank
    num_cores = None if num_cores is None else int(num_cores)
    params = None if params is None else int(params)
    compression = None if compression is None else float(compression)
    capture = None if calibration is None else ActivationCapture(model, calibration)
    model_params_before = _count_parameters(model)

    # Every nn.Linear, each once, with all the names it is reachable under.
    names: dict[int, list[str]] = {}
    linears: dict[int, nn.Linear] = {}
    owners: dict[int, list[str]] = {}  # parameter id -> qualified names of its owners
    tt_names: list[str] = []
    for name, module in model.named_modules(remove_duplicate=False):
        if isinstance(module, nn.Linear):
            linears.setdefault(id(module), module)
            names.setdefault(id(module), []).append(name)
        elif isinstance(module, TTLinear):
            tt_names.append(name)
        for param_name, param in module.named_parameters(recurse=False):
            if param is not None:
                owners.setdefault(id(param), []).append(f"{name}.{param_name}".lstrip("."))
    if not linears:
        already = f" (already TTLinear: {', '.join(map(repr, tt_names))})" if tt_names else ""
        raise ValueError(f"tensorize_ found no nn.Linear layers in the model{already}.")

    skipped: list[SkippedLayer] = []
    selected: list[tuple[nn.Linear, list[str]]] = []
    untying: list[tuple[str, str]] = []  # (layer, what of it is shared with whom)
    for key, linear in linears.items():
        layer_names = names[key]
        reason = _structural_reason(model, linear, layer_names)
        own = {f"{name}.{kind}".lstrip(".") for name in layer_names for kind in ("weight", "bias")}
        shared_by = (
            {}
            if reason is not None  # e.g. a parametrized weight, computed on access
            else {
                kind: others
                for kind, param in (("weight", linear.weight), ("bias", linear.bias))
                if param is not None
                and (others := [owner for owner in owners[id(param)] if owner not in own])
            }
        )
        shared = [owner for others in shared_by.values() for owner in others]
        tie = (
            " and ".join(shared_by)
            + (" are" if len(shared_by) > 1 else " is")
            + f" shared with {', '.join(map(repr, shared))}"
        )
        if reason is None and filter_fn is not None:
            if not any(bool(filter_fn(linear, name)) for name in layer_names):
                reason = "not selected by filter_fn"
            elif shared:
                untying.append((layer_names[0], tie))
        elif reason is None and shared:
            reason = (
                f"{tie}; converting would untie them (select it with filter_fn to convert anyway)"
            )
        if reason is None and budgeted and filter_fn is None:
            reason = _cannot_shrink(linear, num_cores)
        if reason is None:
            selected.append((linear, layer_names))
        else:
            skipped.append(SkippedLayer(layer_names[0], reason))
    if not selected:
        raise ValueError(
            "tensorize_ selected no layer to convert. The nn.Linear layers are: "
            + "; ".join(f"'{skip.name}': {skip.reason}" for skip in skipped)
            + ". Pass a filter_fn that returns True for some of them."
        )

    # Convert and check everything before touching the model.
    converted = _convert(
        selected,
        capture=capture,
        rank=rank,
        eps=eps,
        num_cores=num_cores,
        compression=compression,
        params=params,
        allocation=allocation,
        ridge=ridge,
        sweeps=sweeps,
        progress=progress,
        skip_larger=filter_fn is None and not budgeted,
        keep_dense=filter_fn is None,
        skipped=skipped,
    )
    if not converted.layers:
        raise ValueError(
            "tensorize_ found no nn.Linear layer whose TT form is smaller than the dense one: "
            + "; ".join(f"'{skip.name}': {skip.reason}" for skip in skipped)
            + ". Pass a smaller rank or a larger eps, or a filter_fn to convert regardless."
        )

    # Warned before the swap: a warnings filter that raises must leave the model as it was.
    for name, count, inputs in converted.few_rows:
        warnings.warn(
            f"tensorize_: layer '{name}' received {count} calibration rows, fewer than its "
            f"{inputs} inputs. Its fit (and, under a budget, its share) rests on activations "
            f"of at most {count} dimensions, and its output error on them says little about "
            "other inputs; calibrate with more data.",
            UserWarning,
            stacklevel=2,
        )
    for name, tie in untying:  # layers chosen by filter_fn are always converted
        warnings.warn(
            f"tensorize_ converts '{name}', whose {tie}; they will no longer be tied.",
            UserWarning,
            stacklevel=2,
        )
    params_before = _count_parameters(
        *(model.get_submodule(layer_names[0]) for layer_names, _, _ in converted.layers)
    )
    _swap(model, [(name, layer) for names, layer, _ in converted.layers for name in names])
    order = {layer_names[0]: k for k, layer_names in enumerate(names.values())}
    rows = sorted((row for _, _, row in converted.layers), key=lambda row: order[row.name])
    return TensorizeReport(
        layers=rows,
        skipped=sorted(skipped, key=lambda skip: order[skip.name]),
        params_before=params_before,
        model_params_before=model_params_before,
        model_params_after=_count_parameters(model),
        budget=converted.budget,
        calibration_samples=converted.samples,
    )


@dataclass
class _Converted:
    layers: list[tuple[list[str], TTLinear, LayerReport]]
    budget: int | None
    samples: int
    few_rows: list[tuple[str, int, int]] = field(default_factory=list)  # name, rows, inputs


def _wrap(names: list[str], error: Exception) -> Exception:
    """The same error, naming the layer (callers catch what from_dense raises).

    Of the same class where it takes a message (``torch.OutOfMemoryError``, which a caller
    may catch to retry, or ``LinAlgError``), else of the builtin class it derives from.
    """
    message = f"cannot tensorize layer '{names[0]}': {error}"
    try:
        wrapped = type(error)(message)
        if str(wrapped) == message:
            return wrapped
    except Exception:  # a constructor that takes other arguments
        pass
    kind = next(k for k in (ValueError, TypeError, RuntimeError) if isinstance(error, k))
    return kind(message)


def _cannot_shrink(linear: nn.Linear, num_cores: int | None) -> str | None:
    """Why a budget leaves ``linear`` dense, or ``None`` if it does not.

    A layer with one input or one output (or 2 x 2) is left dense: plain low rank has no
    fewer parameters than its weight. So is a layer whose ``num_cores``-core shape has none
    at rank 1: sizes with too few factors (a prime, say) put all of them in one core.
    """
    dense = linear.in_features * linear.out_features
    plain = linear.in_features + linear.out_features  # rank 1, plain low rank
    if plain >= dense:
        return (
            f"rank 1 already takes {plain:,} weight parameters, not fewer than the dense "
            f"{dense:,}: low rank cannot make it smaller (a budget leaves a layer with one "
            "input or one output, or 2 x 2, dense)"
        )
    smallest, (in_modes, out_modes) = min(
        (num_parameters(i, o, (1,) * (len(i) + 1)), (i, o)) for i, o in _shapes(linear, num_cores)
    )
    if smallest < dense:
        return None
    return (
        f"its shape of {num_cores} cores, {in_modes} x {out_modes}, takes {smallest:,} weight "
        f"parameters at rank 1, not fewer than the dense {dense:,}; num_cores=2 or None "
        "includes plain low rank"
    )


def _shapes(
    linear: nn.Linear, num_cores: int | None
) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """The candidate (in_modes, out_modes) of a layer under a budget."""
    if num_cores is None:
        return candidate_shapes(linear.in_features, linear.out_features, (2, 3))
    if num_cores == 2:  # plain low rank is a 2-core shape too
        return candidate_shapes(linear.in_features, linear.out_features, (2,))
    return [suggest_modes(linear.in_features, linear.out_features, num_cores)]


def _convert(
    selected: list[tuple[nn.Linear, list[str]]],
    *,
    capture: ActivationCapture | None,
    rank: int | Sequence[int] | None,
    eps: float | None,
    num_cores: int | None,
    compression: float | None,
    params: int | None,
    allocation: str,
    ridge: float,
    sweeps: int,
    progress: bool,
    skip_larger: bool,
    keep_dense: bool,
    skipped: list[SkippedLayer],
) -> _Converted:
    """Convert the selected layers (forward order when calibrated), touching nothing.

    ``keep_dense``: a binding budget may keep a layer dense (the default selection's layers;
    a layer ``filter_fn`` selects is always converted).
    """
    budget: int | None = None
    samples = 0
    if capture is None:
        return _convert_without_data(
            selected,
            rank,
            eps,
            num_cores,
            compression,
            params,
            allocation,
            skip_larger,
            keep_dense,
            skipped,
            progress,
        )
    # The session below puts every module in eval mode: read the layers' own flags first.
    training = {id(linear): linear.training for linear, _ in selected}
    with capture.session():
        order = capture.order([linear for linear, _ in selected], [n[0] for _, n in selected])
        selected = [selected[k] for k in order]
        choices: list[RankChoice | None] = [None] * len(selected)
        if compression is not None or params is not None:
            options = []
            for k, (linear, layer_names) in enumerate(selected):
                try:
                    stats = capture.statistics(
                        linear, linear.in_features, linear.weight.device, paired=False
                    )
                    options.append(
                        layer_options(
                            linear.weight.detach(),
                            statistics=stats,
                            center=linear.bias is not None,
                            ridge=ridge,
                            shapes=_shapes(linear, num_cores),
                        )
                    )
                except (ValueError, TypeError, RuntimeError) as error:
                    raise _wrap(layer_names, error) from error
                del stats
                if progress:
                    _say(f"[{k + 1}/{len(selected)}] {layer_names[0]}: options from activations")
            budget, allocated = _budget(
                selected, compression, params, allocation, options, keep_dense
            )
            choices = list(allocated)
        converted: list[tuple[list[str], TTLinear, LayerReport]] = []
        few_rows: list[tuple[str, int, int]] = []
        started = time.perf_counter()
        for k, (linear, layer_names) in enumerate(selected):
            try:
                weight = linear.weight.detach()
                bias = None if linear.bias is None else linear.bias.detach()
                choice = choices[k]
                if choice is not None and choice.num_cores == 1:
                    skipped.append(_kept_dense(layer_names[0], linear))
                    if progress:
                        _say(f"[{k + 1}/{len(selected)}] {layer_names[0]}: {skipped[-1].reason}")
                    continue
                if choice is None:
                    # Named here: tt_svd's own check would call the weight "matrix".
                    decomposition.check_matrix(weight, "weight", finite=True)
                    in_modes, out_modes = validate_modes(
                        linear.in_features, linear.out_features, None, None, num_cores
                    )
                    ranks = tuple(
                        int(core.shape[3])
                        for core in decomposition.tt_svd(
                            weight, in_modes, out_modes, rank=rank, eps=eps
                        )[:-1]
                    )
                else:
                    in_modes, out_modes, ranks = (
                        choice.in_modes,
                        choice.out_modes,
                        choice.ranks[1:-1],
                    )
                dense = linear.in_features * linear.out_features
                cores = num_parameters(in_modes, out_modes, (1, *ranks, 1))
                if skip_larger and cores >= dense:  # decided before spending passes on it
                    skipped.append(
                        SkippedLayer(
                            layer_names[0],
                            f"TT form at ranks {(1, *ranks, 1)} has {cores:,} weight "
                            f"parameters, not fewer than the dense {dense:,}",
                        )
                    )
                    if progress:
                        _say(
                            f"[{k + 1}/{len(selected)}] {layer_names[0]}: kept dense, "
                            f"{skipped[-1].reason}"
                        )
                    continue

                fit_to = functools.partial(
                    fit_tt,
                    weight,
                    in_modes=in_modes,
                    out_modes=out_modes,
                    rank=list(ranks),
                    bias=bias,
                    ridge=ridge,
                    sweeps=sweeps,
                )
                stats = capture.statistics(
                    linear,
                    linear.in_features,
                    linear.weight.device,
                    paired=bool(capture.substitutes),
                )
                fit = fit_to(stats)
                if samples == 0:  # the first layer converted (earlier ones may be skipped)
                    samples = stats.count
                if stats.count < linear.in_features:
                    few_rows.append((layer_names[0], stats.count, linear.in_features))
                del stats
                layer = TTLinear.from_cores(fit.cores, fit.bias)
                if capture.calls(linear) > 1:
                    # The inputs of its later calls came from its own original earlier calls:
                    # fit once more to the inputs the converted layer gives them (one step
                    # towards the fixed point), and report the errors on those inputs.
                    capture.substitutes[linear] = layer
                    fit = fit_to(
                        capture.statistics(
                            linear, linear.in_features, linear.weight.device, paired=True
                        )
                    )
                    layer = TTLinear.from_cores(fit.cores, fit.bias)
                layer.conversion_error = fit.weight_error
            except (ValueError, TypeError, RuntimeError) as error:
                raise _wrap(layer_names, error) from error
            _match_flags(layer, linear, training[id(linear)])
            capture.substitutes[linear] = layer
            row = _row(
                layer_names,
                linear,
                layer,
                fit.weight_error,
                tt_svd_error=fit.weight_error_start,
                output_error=fit.output_error,
                tt_svd_output_error=fit.output_error_start,
            )
            converted.append((layer_names, layer, row))
            if progress:
                so_far = math.sqrt(
                    sum((r.output_error or 0.0) ** 2 for _, _, r in converted) / len(converted)
                )
                _say(
                    f"[{k + 1}/{len(selected)}] {layer_names[0]}: ranks {layer.ranks}, output "
                    f"error {fit.output_error:.3g} (TT-SVD {fit.output_error_start:.3g}), "
                    f"RMS so far {so_far:.3g}, {time.perf_counter() - started:.1f} s"
                )
    return _Converted(converted, budget, samples, few_rows)


def _say(message: str) -> None:
    print(f"tensorize_: {message}", file=sys.stderr, flush=True)


def _row(
    names: Sequence[str],
    linear: nn.Linear,
    layer: TTLinear,
    relative_error: float,
    **errors: float | None,
) -> LayerReport:
    """The report row of ``linear`` (known under ``names``) converted into ``layer``."""
    return LayerReport(
        name=names[0],
        in_features=layer.in_features,
        out_features=layer.out_features,
        in_modes=layer.in_modes,
        out_modes=layer.out_modes,
        ranks=layer.ranks,
        params_before=linear.weight.numel() + (0 if linear.bias is None else linear.out_features),
        params_after=layer.num_parameters,
        relative_error=relative_error,
        aliases=tuple(names[1:]),
        **errors,
    )


def _bias_count(layer: TTLinear) -> int:
    return layer.out_features if layer.bias is not None else 0


def _larger(name: str, layer: TTLinear, dense: int) -> SkippedLayer:
    return SkippedLayer(
        name,
        f"TT form at ranks {layer.ranks} has {layer.num_parameters - _bias_count(layer):,} "
        f"weight parameters, not fewer than the dense {dense:,}",
    )


def _match_flags(layer: TTLinear, linear: nn.Linear | TTLinear, training: bool) -> None:
    """Give ``layer`` the mode ``training`` and the ``requires_grad`` flags of ``linear``."""
    # Not TTLinear.weight, which would build the dense matrix to read one flag.
    weight = linear.cores[0] if isinstance(linear, TTLinear) else linear.weight
    layer.train(training)
    for core in layer.cores:
        core.requires_grad_(weight.requires_grad)
    if layer.bias is not None and linear.bias is not None:
        layer.bias.requires_grad_(linear.bias.requires_grad)


def _swap(model: nn.Module, layers: Sequence[tuple[str, nn.Module]]) -> Callable[[], None]:
    """Install each module under its qualified name; return what puts the old ones back.

    Each takes the hooks of the module it replaces (:func:`_carry_hooks`), then goes through
    :func:`_skip_fused_kernel`. The undo restores the old modules and their hooks as they
    were.

    ``setattr`` on a registered child cannot fail in plain modules; if it ever does, what was
    swapped is put back before the error propagates.
    """
    swapped: list[tuple[nn.Module, str, nn.Module]] = []
    restores: list[Callable[[], None]] = []

    def undo() -> None:
        for restore in reversed(restores):
            restore()
        for parent, attribute, old in reversed(swapped):
            setattr(parent, attribute, old)

    try:
        for name, _ in layers:
            parent_name, _, attribute = name.rpartition(".")
            parent = model.get_submodule(parent_name)
            swapped.append((parent, attribute, getattr(parent, attribute)))
        for (parent, attribute, _), (_, layer) in zip(swapped, layers, strict=True):
            setattr(parent, attribute, layer)
        # A replaced module still in the model (under a name the swap left alone) keeps its
        # hooks, and the new layer gets copies; one no longer in it gives its hooks away.
        remaining = {id(module) for module in model.modules()}
        for (parent, attribute, old), (_, layer) in zip(swapped, layers, strict=True):
            restores.append(_carry_hooks(old, layer, move=id(old) not in remaining))
            _skip_fused_kernel(parent, attribute, layer)
    except BaseException:
        undo()
        raise
    return undo


# The forward and backward hooks an nn.Module keeps, each dict of hooks with the dicts of
# flags keyed like it (the state-dict hooks are left: the keys they see differ).
_HOOK_DICTS = {
    "_forward_pre_hooks": ("_forward_pre_hooks_with_kwargs",),
    "_forward_hooks": ("_forward_hooks_with_kwargs", "_forward_hooks_always_called"),
    "_backward_pre_hooks": (),
    "_backward_hooks": (),
}


def _carry_hooks(old: nn.Module, new: nn.Module, *, move: bool) -> Callable[[], None]:
    """Give ``new`` the forward and backward hooks of ``old``, the module it replaces.

    As ``torch.ao.quantization``'s module swap keeps a swapped module's forward hooks: a
    hook that logs or changes a layer's input or output applies to the layer that takes its
    place (and a calibrated fit, whose inputs passed the pre-hooks, is measured with them).
    With ``move``, the hooks leave ``old`` in the dicts that hold them, so that the handles
    the caller holds remove them from ``new``. Otherwise, or where ``old`` holds hooks that
    are its own methods (a lazy layer's, which stay), ``new`` gets copies of the others.
    Returns what puts ``old``'s hooks back as they were, and leaves ``new`` without them.
    """
    state = vars(old)
    attributes = [a for name, flags in _HOOK_DICTS.items() for a in (name, *flags) if a in state]
    if (
        old is new
        or not any(state.get(name) for name in _HOOK_DICTS)
        or any(vars(new).get(name) for name in _HOOK_DICTS)  # moved under another name
    ):
        return lambda: None
    own = {
        key
        for name in _HOOK_DICTS
        for key, hook in state.get(name, {}).items()
        if getattr(hook, "__self__", None) is old
    }
    if all(key in own for name in _HOOK_DICTS for key in state.get(name, {})):
        return lambda: None  # only its own (a lazy layer's), which stay
    # A module's own hooks hold handles to the dicts they are in (a lazy layer's removes
    # itself once it has run): those dicts stay, and the others' hooks are copied.
    move = move and not own
    originals = {a: state[a] for a in attributes}
    contents = {a: list(hooks.items()) for a, hooks in originals.items()}
    for a, hooks in originals.items():
        if move:
            setattr(new, a, hooks)
            setattr(old, a, type(hooks)())
        else:
            setattr(new, a, type(hooks)((k, v) for k, v in contents[a] if k not in own))
    if "_is_full_backward_hook" in state:
        new._is_full_backward_hook = state["_is_full_backward_hook"]

    def restore() -> None:
        for a, hooks in originals.items():
            hooks.clear()
            hooks.update(contents[a])
            setattr(old, a, hooks)
            setattr(new, a, type(hooks)())

    return restore


def _skip_fused_kernel(parent: nn.Module, attribute: str, layer: nn.Module) -> None:
    """Give a ``TTLinear`` installed as an encoder layer's ``linear1`` or ``linear2`` the hook.

    ``parent`` holds ``layer`` as ``attribute``. The hook, :func:`_runs_its_own_forward`, is
    registered once; any other module or place is left alone.
    """
    if (
        isinstance(layer, TTLinear)
        and isinstance(parent, nn.TransformerEncoderLayer)
        and attribute in ("linear1", "linear2")
        and _runs_its_own_forward not in layer._forward_pre_hooks.values()
    ):
        layer.register_forward_pre_hook(_runs_its_own_forward)


def _runs_its_own_forward(module: nn.Module, args: tuple[Any, ...]) -> None:
    """A forward pre-hook that changes nothing.

    ``nn.TransformerEncoderLayer`` skips its fused inference kernel when any of its modules
    has a hook. That kernel would take the dense weights of a converted ``linear1`` and
    ``linear2`` (``TTLinear.weight``), rebuilt from the cores on every call. A module-level
    function, so that a pickled model keeps it.
    """


def _budget(
    selected: list[tuple[nn.Linear, list[str]]],
    compression: float | None,
    params: int | None,
    allocation: str,
    options: list[list[RankChoice]],
    keep_dense: bool,
) -> tuple[int, list[RankChoice]]:
    """The budget of the selected layers (cores and biases), and each layer's choice."""
    sizes = [
        lin.weight.numel() + (0 if lin.bias is None else lin.bias.numel()) for lin, _ in selected
    ]
    biases = [0 if lin.bias is None else lin.bias.numel() for lin, _ in selected]
    # The model loses each tied weight once, but gets one TT layer per module that used it.
    dense = _count_parameters(*(lin for lin, _ in selected))
    budget = int(dense / compression) if compression is not None else int(params or 0)
    if budget <= sum(biases):
        short = (
            f"does not even cover the {sum(biases):,} bias parameters of"
            if sum(biases)
            else "leaves no parameters for the cores of"
        )
        given = (
            f"compression={compression:g} of their {dense:,} parameters"
            if compression is not None
            else f"params={params}"
        )
        remedy = "a lower compression" if compression is not None else "a larger params"
        raise ValueError(
            f"the parameter budget {budget:,} ({given}) {short} the {len(selected)} selected "
            f"layers; allow more parameters ({remedy})."
        )
    if allocation == "even":
        shares = [int(budget * size / sum(sizes)) for size in sizes]
        for (_, layer_names), share, bias, layer in zip(
            selected, shares, biases, options, strict=True
        ):
            smallest = min((option.parameters for option in layer), default=0)
            if share - bias < smallest:
                raise ValueError(
                    f"the share of the budget for layer '{layer_names[0]}', {share:,} parameters, "
                    f"is below its smallest TT form ({smallest:,} core parameters"
                    + (f" and {bias:,} bias parameters" if bias else "")
                    + "); allow more parameters (a lower compression)."
                )
        cores = [share - bias for share, bias in zip(shares, biases, strict=True)]
        return budget, allocate_evenly(options, cores)
    smallest = sum(min((option.parameters for option in layer), default=0) for layer in options)
    if budget - sum(biases) < smallest:
        after = (
            f", {budget - sum(biases):,} after the {sum(biases):,} bias parameters,"
            if any(biases)
            else ""
        )
        raise ValueError(
            f"the parameter budget {budget:,}{after} is below the smallest TT forms of the "
            f"{len(selected)} selected layer{'s' if len(selected) > 1 else ''}, {smallest:,} "
            "core parameters at rank 1; allow more parameters (a lower compression)."
        )
    # A budget too small for every layer's largest smaller form may keep a layer dense (a
    # one-core choice: its weight, no error) where that is worth more than the parameters
    # its TT forms would free. Without it, a layer whose every lossless TT form is larger
    # than its weight (a 256 -> 10 classifier: rank 10 takes 2,660 parameters against 2,560)
    # was truncated at any budget: at 6x over a Fashion-MNIST MLP, to rank 9, which cost 11
    # points of test accuracy. A budget that covers every layer's largest smaller form
    # converts every layer, as before; so does one filter_fn selected.
    if keep_dense and budget - sum(biases) < sum(
        max(option.parameters for option in layer) for layer in options
    ):
        with_dense = [
            [*layer, _dense_choice(linear)]
            if min(option.parameters for option in layer) < _dense_choice(linear).parameters
            else layer
            for layer, (linear, _) in zip(options, selected, strict=True)
        ]
        # The allocator's greedy runs on each layer's convex hull, which a dense point (no
        # error, many parameters) can strip of the steps between: with it, the result was
        # worse in 159 of 2,534 random cases (by up to 1.31x). Both are run; the smaller sum
        # of squared errors wins, the allocation without dense layers on a tie.
        plain = allocate(options, budget - sum(biases))
        kept = allocate(with_dense, budget - sum(biases))
        return budget, min((plain, kept), key=lambda c: sum(x.error**2 for x in c))
    return budget, allocate(options, budget - sum(biases))


def _dense_choice(linear: nn.Linear) -> RankChoice:
    """The budget's option of keeping ``linear`` dense: one core, its weight, no error."""
    size = linear.in_features * linear.out_features
    return RankChoice((linear.in_features,), (linear.out_features,), (1, 1), size, 0.0)


def _kept_dense(name: str, linear: nn.Linear) -> SkippedLayer:
    size = linear.in_features * linear.out_features
    return SkippedLayer(
        name,
        f"kept dense by the budget: its {size:,} weight parameters, with no error, gave a "
        "smaller summed error than any smaller TT form with the parameters it would free",
    )


def _convert_without_data(
    selected: list[tuple[nn.Linear, list[str]]],
    rank: int | Sequence[int] | None,
    eps: float | None,
    num_cores: int | None,
    compression: float | None,
    params: int | None,
    allocation: str,
    skip_larger: bool,
    keep_dense: bool,
    skipped: list[SkippedLayer],
    progress: bool,
) -> _Converted:
    """TT-SVD of each selected layer, with ranks from rank/eps or from the budget."""
    budget: int | None = None
    plans: list[tuple[Sequence[int] | None, Sequence[int] | None, int | Sequence[int] | None]]
    plans = [(None, None, rank)] * len(selected)
    keep = [False] * len(selected)  # kept dense by the budget
    if compression is not None or params is not None:
        options = []
        for linear, layer_names in selected:
            try:
                options.append(
                    layer_options(linear.weight.detach(), shapes=_shapes(linear, num_cores))
                )
            except (ValueError, TypeError, RuntimeError) as error:
                raise _wrap(layer_names, error) from error
        budget, allocated = _budget(selected, compression, params, allocation, options, keep_dense)
        plans = [
            (choice.in_modes, choice.out_modes, list(choice.ranks[1:-1])) for choice in allocated
        ]
        keep = [choice.num_cores == 1 for choice in allocated]
    converted: list[tuple[list[str], TTLinear, LayerReport]] = []
    started = time.perf_counter()
    for k, ((linear, layer_names), (in_modes, out_modes, layer_rank)) in enumerate(
        zip(selected, plans, strict=True)
    ):
        if keep[k]:
            skipped.append(_kept_dense(layer_names[0], linear))
            if progress:
                _say(f"[{k + 1}/{len(selected)}] {layer_names[0]}: {skipped[-1].reason}")
            continue
        try:
            layer = TTLinear.from_dense(
                linear,
                layer_rank,
                eps=eps,
                in_modes=in_modes,
                out_modes=out_modes,
                num_cores=None if in_modes is not None else num_cores,
            )
        except (ValueError, TypeError, RuntimeError) as error:
            raise _wrap(layer_names, error) from error
        dense = linear.in_features * linear.out_features
        assert layer.conversion_error is not None
        if skip_larger and layer.num_parameters - _bias_count(layer) >= dense:
            skipped.append(_larger(layer_names[0], layer, dense))
            if progress:
                _say(
                    f"[{k + 1}/{len(selected)}] {layer_names[0]}: kept dense, {skipped[-1].reason}"
                )
            continue
        if progress:
            _say(
                f"[{k + 1}/{len(selected)}] {layer_names[0]}: ranks {layer.ranks}, weight error "
                f"{layer.conversion_error:.3g}, {time.perf_counter() - started:.1f} s"
            )
        _match_flags(layer, linear, linear.training)
        row = _row(layer_names, linear, layer, layer.conversion_error)
        converted.append((layer_names, layer, row))
    return _Converted(converted, budget, 0)


def load_tensorized_(
    model: nn.Module,
    state_dict: Mapping[str, Any],
    *,
    strict: bool = True,
    assign: bool = False,
) -> _IncompatibleKeys:
    """Load a checkpoint of a converted model into the unconverted ``model``, in place.

    Every ``nn.Linear`` of ``model`` that ``state_dict`` stores as a ``TTLinear`` (keys
    ``<name>.cores.<k>``) becomes one with the stored modes and ranks, whatever conversion
    made it (a budget, a filter, ``eps``), with the bias, ``requires_grad`` flags and training
    mode of the layer it replaces; a ``TTLinear`` of other modes is rebuilt the same way, one
    of the same modes is kept (it takes the stored ranks itself). A module reachable under
    several names becomes one layer, under every name the checkpoint stores its cores for
    and every name it has no keys for (a checkpoint that keeps shared tensors once, as
    safetensors does; load it with ``strict=False``). Then ``state_dict`` is
    loaded as by ``model.load_state_dict``, which reports any key that matches nothing. As
    with :func:`tensorize_`, a replaced layer's forward and backward hooks move to the
    ``TTLinear``, and each of these layers that is ``linear1`` or ``linear2`` of an
    ``nn.TransformerEncoderLayer`` gets a forward pre-hook that does nothing.

    Args:
        model: The model to convert and load into.
        state_dict: A ``state_dict()`` of the converted model (for example
            ``torch.load(path, weights_only=True)``).
        strict: As for ``load_state_dict``: every key must match.
        assign: As for ``load_state_dict``: take the checkpoint's tensors instead of copying
            them (for a model built on the meta device).

    Returns:
        What ``model.load_state_dict`` returns: a named tuple of ``missing_keys`` and
        ``unexpected_keys``.

    Raises:
        TypeError: If ``model`` is not a module or ``state_dict`` not a mapping.
        ValueError: If stored cores do not chain or do not fit the sizes of the layer they
            belong to, or the model itself is a stored ``TTLinear``; the model is then left
            as it was.
        RuntimeError: What ``load_state_dict`` raises (with ``strict``, keys that match
            nothing; a tensor of the wrong shape). As with ``load_state_dict``, the other
            modules may already hold the checkpoint's values; the converted layers are put
            back.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from ttlayers import load_tensorized_, tensorize_
        >>> model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64))
        >>> _ = tensorize_(model, compression=4.0)
        >>> fresh = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64))
        >>> _ = load_tensorized_(fresh, model.state_dict())
        >>> x = torch.randn(2, 64)
        >>> torch.equal(fresh(x), model(x))
        True
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module; got {type(model).__name__}.")
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"state_dict must be a mapping; got {type(state_dict).__name__}.")
    cores: dict[str, dict[int, Any]] = {}
    for key, value in state_dict.items():
        if not isinstance(key, str):
            raise TypeError(f"state_dict's keys must be strings; got {key!r}.")
        prefix, _, index = key.rpartition(".")
        layer_name, _, attribute = prefix.rpartition(".")
        core = core_index(index)
        if attribute == "cores" and core is not None:
            cores.setdefault(layer_name, {})[core] = value

    # Build every layer first: an error leaves the model as it was. A module reachable under
    # several names gets one layer (see below for the names the checkpoint has no cores
    # for). Keys of anything but a linear layer (a module of the model's own with a list
    # called "cores", a layer the model lacks) are left to load_state_dict.
    built: dict[str, TTLinear] = {}
    by_module: dict[int, TTLinear] = {}
    kept: list[str] = []
    # Names as load_state_dict reads them, through the modules' own dicts (get_submodule
    # would also follow properties and __getattr__, as a compiled model's to its original:
    # a layer found so would be installed, and its keys never loaded).
    modules = dict(model.named_modules(remove_duplicate=False))
    for name, found in cores.items():
        module = modules.get(name)
        if not isinstance(module, (nn.Linear, TTLinear)):
            continue
        shown = name or "<root>"
        count = max(found) + 1
        tensors = [found[k] for k in range(count) if isinstance(found.get(k), torch.Tensor)]
        if len(tensors) != count:
            missing = [k for k in range(count) if k not in found]
            raise ValueError(
                f"the cores of '{shown}' in state_dict are not tensors 0..d-1"
                + (f" ({name}.cores.{missing[0]} is missing)." if missing else ".")
            )
        try:
            in_modes, out_modes, ranks = core_shapes(tensors)
        except ValueError as error:
            raise ValueError(f"cannot load TTLinear '{shown}': {error}") from None
        if isinstance(module, TTLinear) and (module.in_modes, module.out_modes) == (
            in_modes,
            out_modes,
        ):
            kept.append(name)
            continue
        sizes = (math.prod(in_modes), math.prod(out_modes))
        lazy = isinstance(module, nn.modules.lazy.LazyModuleMixin) and (
            module.has_uninitialized_params()
        )
        if sizes[1] != module.out_features or (not lazy and sizes[0] != module.in_features):
            raise ValueError(
                f"state_dict's TTLinear '{shown}' maps {sizes[0]} to {sizes[1]} features; the "
                f"model's layer maps {module.in_features} to {module.out_features}."
            )
        if id(module) in by_module:
            built[name] = by_module[id(module)]
            continue
        reference = module.cores[0] if isinstance(module, TTLinear) else module.weight
        # The checkpoint holds every core (their shapes are read off it), and the bias comes
        # from the layer replaced: nothing to draw, and the random number generators are
        # left as load_state_dict leaves them.
        with ordinary_tensors():
            layer = zero_initialized(
                TTLinear,
                sizes[0],
                sizes[1],
                rank=ranks[1:-1],
                in_modes=in_modes,
                out_modes=out_modes,
                bias=module.bias is not None,
                device=reference.device,
                dtype=reference.dtype,
            )
        _match_flags(layer, module, module.training)
        if layer.bias is not None and module.bias is not None and not lazy:
            # A checkpoint without the bias (strict=False) keeps the layer's own, as
            # load_state_dict keeps every value the checkpoint lacks; a lazy layer's own is
            # not made yet, and the bias stays 0, as zero_initialized made it.
            with torch.no_grad():
                layer.bias.copy_(module.bias)
        built[name] = by_module[id(module)] = layer

    # A shared module's names without a key in the checkpoint get its layer too: a checkpoint
    # that stores shared tensors once (safetensors' save_model, save_pretrained) has the
    # cores under one name only, and keeping the old module under the others split the
    # module in two, with the dense one's random weight in the model. A name with keys of its
    # own (a dense weight) keeps the old module.
    for name, module in modules.items():
        shared = by_module.get(id(module))
        if shared is not None and name not in built:
            prefix = f"{name}."
            if not any(key.startswith(prefix) for key in state_dict):
                built[name] = shared
    if "" in built:  # the model itself is the layer
        raise ValueError("the model itself is a stored TTLinear; use TTLinear.load_state_dict.")
    undo = _swap(model, list(built.items()))
    try:
        loaded: _IncompatibleKeys = model.load_state_dict(state_dict, strict=strict, assign=assign)
    except BaseException:
        undo()
        raise
    for name in filter(None, kept):  # as the layers built above got it from _swap
        parent_name, _, attribute = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        _skip_fused_kernel(parent, attribute, getattr(parent, attribute))
    return loaded
