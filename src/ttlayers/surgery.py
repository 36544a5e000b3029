"""Converting the linear layers of a trained model to ``TTLinear``, in place.

Modelled on torchao's ``quantize_`` and PEFT's ``inject_adapter``: select the targets with a
``filter_fn(module, qualified_name)``, convert every target first, and only then swap the
modules in via ``model.get_submodule(parent)`` and ``setattr``, so that an error never leaves
the model half converted.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from torch import nn

from ttlayers.decomposition import check_eps
from ttlayers.linear import TTLinear

__all__ = ["LayerReport", "SkippedLayer", "TensorizeReport", "tensorize_"]

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

    @property
    def compression(self) -> float:
        """``params_before / params_after``."""
        return self.params_before / self.params_after


@dataclass(frozen=True)
class SkippedLayer:
    """An ``nn.Linear`` that :func:`tensorize_` left as it was, and why."""

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
    _Column("rel. error", lambda row: f"{row.relative_error:.2e}"),
)


@dataclass
class TensorizeReport:
    """The result of :func:`tensorize_`: one row per converted layer, and the layers skipped.

    ``print(report)`` shows a table. The rows are plain dataclasses, so
    ``dataclasses.asdict(report)`` gives a JSON-ready dict.

    Attributes:
        layers: One :class:`LayerReport` per converted module, in model order.
        skipped: One :class:`SkippedLayer` per ``nn.Linear`` left dense, with the reason.
        model_params_before: Distinct parameters of the whole model before conversion.
        model_params_after: Distinct parameters of the whole model after conversion.
    """

    layers: list[LayerReport] = field(default_factory=list)
    skipped: list[SkippedLayer] = field(default_factory=list)
    model_params_before: int = 0
    model_params_after: int = 0

    @property
    def params_before(self) -> int:
        """Parameters of the converted layers before, summed (tied layers counted once)."""
        return sum(row.params_before for row in self.layers)

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
        table = [[column.header for column in _COLUMNS]]
        table += [[column.cell(row) for column in _COLUMNS] for row in self.layers]
        if len(self.layers) > 1:
            table.append([column.total(self) for column in _COLUMNS])
        widths = [max(len(line[i]) for line in table) for i in range(len(_COLUMNS))]
        lines = [header, ""]
        for line in table:
            cells = [
                f"{text:{column.align}{width}}"
                for text, column, width in zip(line, _COLUMNS, widths, strict=True)
            ]
            lines.append("  ".join(cells).rstrip())
        if self.skipped:
            lines += ["", "skipped:"]
            width = max(len(skip.name) for skip in self.skipped)
            lines += [f"  {skip.name:<{width}}  {skip.reason}" for skip in self.skipped]
        return "\n".join(lines)


def _count_parameters(model: nn.Module) -> int:
    return sum(param.numel() for param in model.parameters())


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
            or not isinstance(rank, (int, Sequence))
            or isinstance(rank, (str, bytes))
        ):
            raise TypeError(f"rank must be an int, a sequence of ints or None; got {rank!r}.")
        if isinstance(rank, int) and rank < 1:
            raise ValueError(f"rank must be a positive int; got {rank}.")
    if filter_fn is not None and not callable(filter_fn):
        raise TypeError(
            "filter_fn must be a callable (module, qualified_name) -> bool or None; got "
            f"{type(filter_fn).__name__}."
        )
    if num_cores is not None:
        if isinstance(num_cores, bool) or not isinstance(num_cores, int):
            raise TypeError(f"num_cores must be an int or None; got {num_cores!r}.")
        if num_cores < 1:
            raise ValueError(f"num_cores must be a positive int; got {num_cores}.")


def _structural_reason(model: nn.Module, linear: nn.Linear, names: list[str]) -> str | None:
    """Why a linear layer cannot be swapped at all, or ``None`` if it can."""
    if "" in names:
        return "the model itself cannot be replaced in place; use TTLinear.from_dense(model)"
    if isinstance(linear.weight, nn.parameter.UninitializedParameter):
        return "lazy layer not initialized yet; run a forward pass first"
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
) -> TensorizeReport:
    """Replace, in place, the ``nn.Linear`` layers of ``model`` by ``TTLinear`` (TT-SVD).

    Each selected layer ``L`` becomes ``TTLinear.from_dense(L, rank, eps=eps,
    num_cores=num_cores)``: same dtype, device, bias, training mode and ``requires_grad``
    flags, with trainable cores ready to fine-tune. Layers nested anywhere (``Sequential``,
    ``ModuleList``, ``ModuleDict``, custom modules) are found.

    Selection:
        - With ``filter_fn``, every ``nn.Linear`` for which ``filter_fn(module,
          qualified_name)`` is true (for a module under several names, true for any of them),
          whatever its compression.
        - Without it, every ``nn.Linear`` whose TT form at the requested ``rank``/``eps`` has
          fewer parameters than its dense weight, and whose weight is not shared with another
          module (converting would untie it; select it with ``filter_fn`` to do so anyway).
        - Never: layers that are already ``TTLinear``; the model itself; the ``out_proj`` of an
          ``nn.MultiheadAttention`` (which reads ``out_proj.weight`` directly); uninitialized
          lazy layers. Every ``nn.Linear`` not converted is listed in ``report.skipped``
          with the reason.

    Guarantees:
        - Atomic: all selected layers are converted and checked before the first swap; on any
          error the model is left exactly as it was, and the message names the layer.
        - Weight tying: an ``nn.Linear`` reachable under several names is converted once and
          the same ``TTLinear`` installed under every name.
        - Forward hooks registered on a replaced ``nn.Linear`` do not carry over.

    Args:
        model: The model to convert in place.
        rank: Cap on every bond rank (an int), or the ``d - 1`` inner ranks (every converted
            layer must then have ``d`` cores).
        eps: Relative Frobenius error bound in ``(0, 1)`` per layer:
            ``||W - W_tt||_F <= eps * ||W||_F``. With ``rank`` too, the smaller ranks win;
            with neither, each conversion is exact (and rarely smaller than the dense layer).
        filter_fn: ``(module, qualified_name) -> bool``, called on ``nn.Linear`` modules only.
        num_cores: Number of cores ``d`` per layer; default
            :func:`ttlayers.shapes.default_num_cores` of each layer's sizes.

    Returns:
        A :class:`TensorizeReport`; ``print(report)`` shows a table.

    Raises:
        TypeError: If an argument has the wrong type.
        ValueError: If ``eps``, ``rank`` or ``num_cores`` is invalid, a selected weight holds
            NaN or Inf (naming the layer), or no layer was selected (listing those that exist).

    Example:
        >>> model = nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 3))
        >>> report = tensorize_(model, rank=8)
        >>> type(model[0]).__name__, [row.name for row in report.layers]
        ('TTLinear', ['0'])
        >>> report.skipped[0].name, type(model[2]).__name__
        ('2', 'Linear')
        >>> print(report)  # doctest: +ELLIPSIS
        tensorize_: 1 layer(s) converted, 1 skipped; model parameters 66,563 -> ...
    """
    _check_arguments(model, rank, eps, filter_fn, num_cores)
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
    untying: list[tuple[str, list[str]]] = []
    for key, linear in linears.items():
        layer_names = names[key]
        reason = _structural_reason(model, linear, layer_names)
        own = {f"{name}.weight".lstrip(".") for name in layer_names}
        shared = [owner for owner in owners[id(linear.weight)] if owner not in own]
        if reason is None and filter_fn is not None:
            if not any(bool(filter_fn(linear, name)) for name in layer_names):
                reason = "not selected by filter_fn"
            elif shared:
                untying.append((layer_names[0], shared))
        elif reason is None and shared:
            reason = (
                f"weight is shared with {', '.join(map(repr, shared))}; converting would untie "
                "it (select it with filter_fn to convert anyway)"
            )
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
    converted: list[tuple[list[str], TTLinear, LayerReport]] = []
    for linear, layer_names in selected:
        try:
            layer = TTLinear.from_dense(linear, rank, eps=eps, num_cores=num_cores)
        except (ValueError, TypeError, RuntimeError) as error:
            # Same base type, so callers can catch what they would catch from from_dense.
            kind = next(k for k in (ValueError, TypeError, RuntimeError) if isinstance(error, k))
            raise kind(f"cannot tensorize layer '{layer_names[0]}': {error}") from error
        dense = linear.in_features * linear.out_features
        tt_cores = layer.num_parameters - (layer.out_features if layer.bias is not None else 0)
        if filter_fn is None and tt_cores >= dense:
            skipped.append(
                SkippedLayer(
                    layer_names[0],
                    f"TT form at ranks {layer.ranks} has {tt_cores:,} weight parameters, not "
                    f"fewer than the dense {dense:,}",
                )
            )
            continue
        layer.train(linear.training)
        for core in layer.cores:
            core.requires_grad_(linear.weight.requires_grad)
        if layer.bias is not None and linear.bias is not None:
            layer.bias.requires_grad_(linear.bias.requires_grad)
        assert layer.conversion_error is not None
        row = LayerReport(
            name=layer_names[0],
            in_features=layer.in_features,
            out_features=layer.out_features,
            in_modes=layer.in_modes,
            out_modes=layer.out_modes,
            ranks=layer.ranks,
            params_before=dense + (linear.out_features if linear.bias is not None else 0),
            params_after=layer.num_parameters,
            relative_error=layer.conversion_error,
            aliases=tuple(layer_names[1:]),
        )
        converted.append((layer_names, layer, row))
    if not converted:
        raise ValueError(
            "tensorize_ found no nn.Linear layer whose TT form is smaller than the dense one: "
            + "; ".join(f"'{skip.name}': {skip.reason}" for skip in skipped)
            + ". Pass a smaller rank or a larger eps, or a filter_fn to convert regardless."
        )

    # Swap. setattr on a registered child cannot fail in plain modules; undo if it ever does.
    swapped: list[tuple[nn.Module, str, nn.Module]] = []
    try:
        for layer_names, layer, _ in converted:
            for name in layer_names:
                parent_name, _, attribute = name.rpartition(".")
                parent = model.get_submodule(parent_name)
                swapped.append((parent, attribute, getattr(parent, attribute)))
                setattr(parent, attribute, layer)
    except BaseException:
        for parent, attribute, old in reversed(swapped):
            setattr(parent, attribute, old)
        raise

    for name, shared in untying:  # layers chosen by filter_fn are always converted
        warnings.warn(
            f"tensorize_ converted '{name}', whose weight is shared with "
            f"{', '.join(map(repr, shared))}; the two are no longer tied.",
            UserWarning,
            stacklevel=2,
        )
    order = {layer_names[0]: k for k, layer_names in enumerate(names.values())}
    return TensorizeReport(
        layers=[row for _, _, row in converted],
        skipped=sorted(skipped, key=lambda skip: order[skip.name]),
        model_params_before=model_params_before,
        model_params_after=_count_parameters(model),
    )
