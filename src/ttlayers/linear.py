"""TTLinear: a drop-in ``nn.Linear`` whose weight is a Tensor-Train matrix."""

from __future__ import annotations

import contextlib
import contextvars
import math
import os
import sys
import warnings
from collections.abc import Iterator, Sequence
from typing import Any, TypeVar, cast

import torch
from torch import nn
from torch.nn.utils import parametrize

from ttlayers import decomposition
from ttlayers.autograd import jit_tracing
from ttlayers.calibration import DEFAULT_RIDGE, ActivationStatistics, fit_tt
from ttlayers.contraction import (
    autocast_enabled,
    check_bias,
    check_real_floating,
    check_same_kind,
    core_list,
    core_shapes,
    refuse_pruned,
    tt_linear,
    tt_to_dense,
)
from ttlayers.init import tt_normal_
from ttlayers.shapes import num_parameters, resolve_ranks, validate_modes

__all__ = ["TTLinear"]

# The keys of the first cores in their nn.ParameterList, made once (see _core_list).
_CORE_NAMES = tuple(str(k) for k in range(64))


def _caller_stacklevel() -> int:
    """The ``stacklevel`` that points a warning of ``_load_from_state_dict`` at its caller.

    ``load_state_dict`` reaches a layer through one recursive call of ``nn.Module``'s code
    per level of nesting: a fixed ``stacklevel`` pointed into ``torch/nn/modules/module.py``.
    This skips those frames (and ttlayers' own) to the first frame of the caller's code.
    """
    skipped = (os.path.dirname(nn.modules.module.__file__), os.path.dirname(__file__))
    frame = sys._getframe(2)  # the frame that called _load_from_state_dict: stacklevel 2
    level = 2
    while frame.f_back is not None and os.path.dirname(frame.f_code.co_filename) in skipped:
        frame = frame.f_back
        level += 1
    return level


_Layer = TypeVar("_Layer", bound="TTLinear")

# The layer `zero_initialized` is building. Per thread (a context variable), as threads may
# build layers at once.
_OVERWRITTEN: contextvars.ContextVar[object] = contextvars.ContextVar(
    "ttlayers_overwritten", default=None
)


@contextlib.contextmanager
def ordinary_tensors() -> Iterator[None]:
    """Tensors made inside are ordinary ones, also under ``torch.inference_mode()``.

    Layers a conversion or a load makes are meant to be trained, and an optimizer step on
    inference tensors raises. Grad mode stays off, as inference mode had it (leaving
    inference mode alone would turn it on); outside inference mode nothing changes.
    """
    if not torch.is_inference_mode_enabled():
        yield
        return
    with torch.inference_mode(False), torch.no_grad():
        yield


def zero_initialized(cls: type[_Layer], *args: Any, **kwargs: Any) -> _Layer:
    """``cls(*args, **kwargs)`` with its cores and bias set to 0 instead of drawn.

    For a layer whose cores and bias are overwritten next: it draws no initial values, so
    the global random number generators are left alone (putting their state back
    afterwards, as ``torch.random.fork_rng`` does, would also rewind what other threads
    drew meanwhile), and whatever is not overwritten, by a path not foreseen, is 0 rather
    than uninitialized memory. Only this layer's initialization is replaced, and only
    ``TTLinear.reset_parameters``: a subclass's own still runs, as does that of any other
    layer its ``__init__`` builds.
    """
    layer = cls.__new__(cls, *args, **kwargs)
    if not isinstance(layer, cls):  # as type.__call__: another class's object, as made
        return layer
    token = _OVERWRITTEN.set(layer)
    try:
        layer.__init__(*args, **kwargs)  # type: ignore[misc]
    finally:
        _OVERWRITTEN.reset(token)
    return layer


def core_index(name: str) -> int | None:
    """The index a core's name in its ``nn.ParameterList`` gives: ``"0"``, ``"1"``, ...

    ``None`` for any other name ("00" and "²" name no core, though ``str.isdigit`` holds).
    """
    if name.isascii() and name.isdigit() and name == str(int(name)):
        return int(name)
    return None


_WEIGHT_IS_COMPUTED = (
    "TTLinear.weight is computed from the cores and cannot be assigned; build a layer from the "
    "new matrix with TTLinear.from_dense, or change the cores."
)


class TTLinear(nn.Module):
    r"""A linear layer ``y = x W^T + b`` whose weight ``W`` is a Tensor-Train (TT) matrix.

    ``W`` of shape ``(out_features, in_features)`` is never stored. It is the chain of ``d``
    cores ``G_k`` of shape ``(r_{k-1}, m_k, n_k, r_k)`` (Novikov et al. 2015, "Tensorizing
    Neural Networks"):

    .. math::

        W[i, j] = G_1[:, j_1, i_1, :]\, G_2[:, j_2, i_2, :] \cdots G_d[:, j_d, i_d, :],

    where ``j = (j_1, ..., j_d)`` is the row-major (C-order) multi-index of input position
    ``j`` over ``in_modes = (m_1, ..., m_d)`` and ``i = (i_1, ..., i_d)`` that of output
    position ``i`` over ``out_modes = (n_1, ..., n_d)``; ``r_0 = r_d = 1``. So
    ``x.reshape(*batch, *in_modes)`` splits an input correctly. The layer stores
    ``sum_k r_{k-1} m_k n_k r_k`` numbers instead of ``prod_k m_k n_k``. (``cores[k]``,
    counted from 0, has shape ``(r_k, m_{k+1}, n_{k+1}, r_{k+1})``.)

    The forward pass is :func:`ttlayers.contraction.tt_linear`: a plan chosen once per input
    shape, dtype and device by the cost model of :mod:`ttlayers.planner` (rebuild ``W`` and
    multiply once, multiply by two merged blocks of cores, or a pairwise einsum chain).

    Args:
        in_features: Size of each input sample.
        out_features: Size of each output sample.
        rank: An int, the largest bond rank (each bond is also capped at the largest rank that
            can matter there, see :func:`ttlayers.max_ranks`), or a sequence of the ``d - 1``
            inner ranks, used as given. Default: 8.
        in_modes: ``d`` factors of ``in_features``; chosen by :func:`ttlayers.suggest_modes`
            when omitted. Factors of 1 are allowed.
        out_modes: ``d`` factors of ``out_features``; chosen likewise when omitted.
        num_cores: ``d`` when both modes are omitted; default
            :func:`ttlayers.shapes.default_num_cores`.
        bias: If ``False``, the layer learns no additive bias. Default: ``True``.
        device: Device of the parameters.
        dtype: Dtype of the parameters.

    Shape:
        - Input: ``(*, in_features)``, any number of leading dimensions, including none.
        - Output: ``(*, out_features)``.

    Attributes:
        in_features (int): Size of each input row, ``prod(in_modes)``.
        out_features (int): Size of each output row, ``prod(out_modes)``.
        in_modes (tuple[int, ...]): The ``d`` input modes.
        out_modes (tuple[int, ...]): The ``d`` output modes.
        ranks (tuple[int, ...]): The ``d + 1`` bond ranks, 1 at both ends; read off the cores.
        cores (nn.ParameterList): Core ``k`` of shape
            ``(ranks[k], in_modes[k], out_modes[k], ranks[k + 1])``. Initialized by
            :func:`ttlayers.tt_normal_` so that the entries of ``W`` have the std of
            ``nn.Linear``'s default init, ``1 / sqrt(3 * in_features)``.
        bias (Parameter | None): Shape ``(out_features,)``, drawn from
            ``U(-1/sqrt(in_features), 1/sqrt(in_features))`` as in ``nn.Linear``.
        conversion_error (float | None): For a layer made by :meth:`from_dense` or
            :meth:`round`, the relative Frobenius error ``||W_source - W||_F / ||W_source||_F``
            of the conversion; ``None`` otherwise.

    Raises:
        TypeError: If a size, ``rank`` or a mode is not an int (or a sequence of ints), or
            ``dtype`` is not a real floating-point dtype.
        ValueError: If a size, rank, mode or ``num_cores`` is not positive, the modes do not
            multiply to the sizes or differ in length, or a rank sequence has another
            length than ``d - 1``.

    Warns:
        UserWarning: If a rank given as a sequence exceeds the largest rank that can matter
            at its bond (it is kept; an int ``rank`` is capped instead).

    Example:
        >>> layer = TTLinear(1024, 512, rank=8, in_modes=(4, 8, 8, 4), out_modes=(4, 8, 4, 4))
        >>> layer(torch.randn(32, 1024)).shape
        torch.Size([32, 512])
        >>> layer.ranks
        (1, 8, 8, 8, 1)
    """

    in_features: int
    out_features: int
    in_modes: tuple[int, ...]
    out_modes: tuple[int, ...]
    conversion_error: float | None

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int | Sequence[int] = 8,
        *,
        in_modes: Sequence[int] | None = None,
        out_modes: Sequence[int] | None = None,
        num_cores: int | None = None,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if isinstance(rank, bool):  # nn.Linear(in, out, False), moved over as it was
            raise TypeError(
                f"rank must be an int or a sequence of ints; got {rank!r}. TTLinear's third "
                "positional argument is rank; bias is keyword-only (bias=False)."
            )
        self.in_modes, self.out_modes = validate_modes(
            in_features, out_features, in_modes, out_modes, num_cores
        )
        self.in_features = math.prod(self.in_modes)  # a Python int, even from a NumPy one
        self.out_features = math.prod(self.out_modes)
        ranks = resolve_ranks(rank, self.in_modes, self.out_modes)
        given: object = dtype  # checked as what a caller may pass, not as annotated
        if given is float:  # as torch's factories (and so nn.Linear) read it
            dtype = torch.float64
        if dtype is not None:
            check_real_floating(dtype, "dtype")
        factory: dict[str, Any] = {"device": device, "dtype": dtype}
        self.cores = nn.ParameterList(
            nn.Parameter(torch.empty(ranks[k], m, n, ranks[k + 1], **factory))
            for k, (m, n) in enumerate(zip(self.in_modes, self.out_modes, strict=True))
        )
        if bias:
            self.bias = nn.Parameter(torch.empty(self.out_features, **factory))
        else:
            self.register_parameter("bias", None)
        self.conversion_error = None
        # Zeros only for the layer zero_initialized builds, and only if reset_parameters is
        # this class's: a subclass's own may initialize more than the cores and the bias.
        if _OVERWRITTEN.get() is self and type(self).reset_parameters is TTLinear.reset_parameters:
            with torch.no_grad():
                for core in self.cores:
                    core.zero_()
                if self.bias is not None:
                    self.bias.zero_()
        else:
            self.reset_parameters()

    @property
    def ranks(self) -> tuple[int, ...]:
        """The ``d + 1`` bond ranks, read off the cores' shapes."""
        return (1, *(int(core.shape[3]) for core in self.cores))

    @property
    def num_cores(self) -> int:
        """The number of cores ``d``."""
        return len(self.in_modes)

    def reset_parameters(self) -> None:
        """Re-draw the cores and the bias with the default scheme (see the class docstring)."""
        tt_normal_(list(self.cores), std=1.0 / math.sqrt(3 * self.in_features))
        if self.bias is not None:
            bound = 1.0 / math.sqrt(self.in_features)
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        """Apply ``y = x W^T + b``.

        Args:
            input: Shape ``(*, in_features)``, or a nested tensor of such tensors (as
                ``nn.TransformerEncoder`` makes of a padded batch).

        Returns:
            Shape ``(*, out_features)``; nested for a nested input.

        Raises:
            ValueError: If the last dimension of ``input`` is not ``in_features``, or the
                input is on another device than the layer.
            TypeError: If ``input`` is not a tensor, or has another dtype than the cores outside
                ``torch.autocast`` (inside, autocast chooses the dtype, as for ``nn.Linear``),
                or a core is pruned with ``torch.nn.utils.prune`` (use a parametrization).
        """
        if jit_tracing():
            # The checks and the plan choice read sizes as Python values, which
            # torch.jit.trace warns may not generalize. They do: a trace runs one plan for
            # every batch size with the example's number of dimensions (docs/quickstart.md).
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", torch.jit.TracerWarning)  # type: ignore[attr-defined]
                return self._forward(input)
        return self._forward(input)

    def _forward(self, input: torch.Tensor) -> torch.Tensor:
        given: object = input  # checked as what a caller may pass, not as annotated
        if not isinstance(given, torch.Tensor):
            if isinstance(given, torch.fx.Proxy):
                raise TypeError(
                    "TTLinear cannot be traced by torch.fx.symbolic_trace (its plan depends on "
                    "the input's shape). Keep it a leaf module: a custom Tracer whose "
                    "is_leaf_module returns True for it, or for FX quantization "
                    "PrepareCustomConfig().set_non_traceable_module_classes([TTLinear]); or "
                    "use torch.export."
                )
            raise TypeError(f"TTLinear expected a tensor input; got {type(given).__name__}.")
        # A nested tensor's tensors are checked one by one (tt_linear).
        if not input.is_nested and (input.dim() == 0 or input.shape[-1] != self.in_features):
            raise ValueError(
                f"TTLinear expected input of shape (*, in_features={self.in_features}); got "
                f"shape {tuple(input.shape)} with last dimension "
                f"{input.shape[-1] if input.dim() else 'none (0-d tensor)'}."
            )
        cores = self._core_list()
        dtype = cores[0].dtype
        if input.dtype != dtype and not autocast_enabled(input.device.type):
            if not input.is_floating_point():  # complex too: TT layers here are real
                raise TypeError(
                    f"TTLinear expected a real floating-point input of dtype {dtype}, the dtype "
                    f"of its cores; got {input.dtype}. Convert it with .to({dtype})."
                )
            # Autocast leaves float64 alone: no advice that would fail again.
            autocast = "" if input.dtype == torch.float64 else ", or run under torch.autocast"
            raise TypeError(
                f"TTLinear expected input of dtype {dtype}, the dtype of its cores; got "
                f"{input.dtype}. Convert the input with .to({dtype}) or the layer with "
                f".to({input.dtype}){autocast}."
            )
        # The contraction order is planned per input shape, dtype and device by
        # ttlayers.planner; under autocast, input, cores and bias all take the autocast dtype,
        # so the output keeps it, as nn.Linear's does.
        return tt_linear(input, cores, self.bias)

    def __prepare_scriptable__(self) -> TTLinear:
        # torch.jit.script calls this on every module it compiles: a clear refusal instead of
        # an error about the first annotation it cannot parse.
        raise TypeError(
            "TTLinear does not support torch.jit.script (its plans are Python); use "
            "torch.jit.trace, torch.export or torch.compile."
        )

    def _core_list(self) -> list[torch.Tensor]:
        # Reading the ParameterList's dict directly costs a fraction of iterating over it, and
        # self._modules a fraction of self.cores (nn.Module.__getattr__, Python): at batch 1,
        # 7 % of a layer's call in a stack of layers. By key, not in dict order: removing a
        # parametrization re-inserts its core last. A parametrized core is not in that dict:
        # then iterate.
        cores = cast(nn.ParameterList, self._modules["cores"])
        params = cores._parameters
        d = len(cores)
        names = _CORE_NAMES[:d] if d <= len(_CORE_NAMES) else [str(k) for k in range(d)]
        try:
            return [params[name] for name in names]  # type: ignore[misc]
        except KeyError:
            refuse_pruned(cores)
            return list(cores)

    def to_dense(self) -> torch.Tensor:
        """The weight ``W`` the cores represent.

        Returns:
            ``W``, shape ``(out_features, in_features)``, in the cores' dtype and on their
            device; differentiable with respect to the cores.
        """
        return tt_to_dense(self._core_list())

    @property
    def weight(self) -> torch.Tensor:
        """``W``, shape ``(out_features, in_features)``, computed from the cores on each access.

        For code written against ``nn.Linear`` that reads ``.weight``, such as the fused
        kernel of ``nn.TransformerEncoderLayer`` in eval mode, or a check of its dtype or
        device. The same as :meth:`to_dense`: differentiable with respect to the cores, the
        size of the dense weight, not a parameter: writing into it in place
        (``nn.init.zeros_``, ``mul_``) changes a copy and is lost; change the cores to change
        the layer. So tools that rewrite a weight parameter (``torch.nn.utils.prune``,
        ``weight_norm``) do not apply to it; parametrize a core instead
        (``parametrize.register_parametrization(layer.cores, "0", module)``,
        ``weight_norm(layer.cores, "0")``). It warns (once per place that reads it, under
        Python's default filter): code that reads it in every forward pass spends the dense
        layer's time and memory on it. (That kernel is skipped where a module of the layer
        has a hook: :func:`ttlayers.tensorize_` gives the layers it converts there a forward
        pre-hook that does nothing.) ``dir()`` does not list it, so that tools which read
        every listed attribute (``torch.jit.trace``) do not build ``W``.
        """
        if not torch.compiler.is_compiling():  # Dynamo cannot trace warnings.warn
            warnings.warn(
                f"TTLinear.weight computes the dense {self.out_features} x {self.in_features} "
                "matrix from the cores on each access; code that reads it in every forward "
                "pass pays the dense layer's cost (call to_dense() where that is intended).",
                UserWarning,
                stacklevel=2,
            )
        return self.to_dense()

    @weight.setter
    def weight(self, value: object) -> None:
        raise AttributeError(_WEIGHT_IS_COMPUTED)

    def __setattr__(self, name: str, value: Any) -> None:
        # nn.Module routes a Parameter to register_parameter before any property setter, which
        # would build W (its hasattr check) and then raise a KeyError.
        if name == "weight":
            raise AttributeError(_WEIGHT_IS_COMPUTED)
        super().__setattr__(name, value)

    def register_parameter(self, name: str, param: nn.Parameter | None) -> None:
        """As ``nn.Module.register_parameter``; ``weight`` is computed, not registrable.

        Args:
            name: The parameter's name.
            param: The parameter, or ``None``.

        Raises:
            AttributeError: If ``name`` is ``"weight"``.
        """
        if name == "weight":
            raise AttributeError(_WEIGHT_IS_COMPUTED)
        super().register_parameter(name, param)

    def __dir__(self) -> list[str]:
        # Code that reads every attribute dir() lists (torch.jit.trace does, twice per trace)
        # would build the dense W, which may not fit in memory: weight is left out of the
        # listing, still there for code that asks for it by name.
        return [name for name in super().__dir__() if name != "weight"]  # type: ignore[no-untyped-call]

    def to_linear(self) -> nn.Linear:
        """The ``nn.Linear`` this layer computes.

        Returns:
            A new ``nn.Linear(in_features, out_features)`` whose weight is :meth:`to_dense`:
            same dtype, device, bias and training mode; its weight is trainable if any core
            is, its bias if this layer's is.
        """
        core = self.cores[0]
        # Ordinary tensors under inference_mode too, as from_dense and round make: the layer
        # is meant to be trained, and an optimizer step on an inference tensor raises.
        with ordinary_tensors(), torch.no_grad():
            linear = nn.Linear(  # on meta, then empty storage: no initial values to draw
                self.in_features,
                self.out_features,
                bias=self.bias is not None,
                device="meta",
                dtype=core.dtype,
            ).to_empty(device=core.device)
            linear.weight.copy_(self.to_dense())
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        linear.weight.requires_grad_(any(c.requires_grad for c in self.cores))
        if self.bias is not None:
            linear.bias.requires_grad_(self.bias.requires_grad)
        return linear.train(self.training)

    @property
    def num_parameters(self) -> int:
        """Number of entries in the cores and the bias."""
        cores = num_parameters(self.in_modes, self.out_modes, self.ranks)
        return cores + (self.out_features if self.bias is not None else 0)

    @property
    def compression(self) -> float:
        """Parameters of the dense ``nn.Linear`` divided by this layer's."""
        dense = self.in_features * self.out_features
        dense += self.out_features if self.bias is not None else 0
        return dense / self.num_parameters

    def extra_repr(self) -> str:
        """Features, modes, ranks, parameter count and compression against ``nn.Linear``.

        Returns:
            The text ``repr`` shows between the parentheses.
        """
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"in_modes={self.in_modes}, out_modes={self.out_modes}, ranks={self.ranks}, "
            f"bias={self.bias is not None}, params={self.num_parameters}, "
            f"compression={self.compression:.1f}x"
        )

    @classmethod
    def from_cores(
        cls, cores: Sequence[torch.Tensor], bias: torch.Tensor | None = None
    ) -> TTLinear:
        """Build a layer whose parameters are copies of the given cores (and bias).

        Args:
            cores: ``d`` tensors, core ``k`` of shape ``(r_k, m_k, n_k, r_{k+1})``,
                ``r_0 = r_d = 1``, all of one dtype and device.
            bias: Shape ``(prod n_k,)``, or ``None`` for no bias.

        Returns:
            A ``TTLinear`` on the cores' device and dtype.

        Raises:
            ValueError: If the cores do not chain or have a size of 0, or the bias has the
                wrong shape or is on the meta device while the cores are not.
            TypeError: If ``cores`` is not a sequence of real floating-point tensors, the
                cores differ in dtype or device, or the bias is not a floating-point tensor.
        """
        cores = core_list(cores)  # a layer's own nn.ParameterList too (not a Sequence)
        in_modes, out_modes, ranks = core_shapes(cores)
        check_same_kind(cores)
        out_features = math.prod(out_modes)
        check_bias(bias, out_features)
        if bias is not None and bias.device.type == "meta" and cores[0].device.type != "meta":
            raise ValueError(
                "bias is on the meta device, which holds no values to copy; the cores are "
                f"on {cores[0].device}."
            )
        with ordinary_tensors():
            # The cores and bias are overwritten below, so the layer draws no initial values:
            # a conversion leaves the dropout masks and initial weights that come after it as
            # they were. (Not built on the meta device: a subclass's own parameters and
            # buffers need the values its __init__ gives them.)
            layer = zero_initialized(
                cls,
                math.prod(in_modes),
                out_features,
                rank=ranks[1:-1],
                in_modes=in_modes,
                out_modes=out_modes,
                bias=bias is not None,
                device=cores[0].device,
                dtype=cores[0].dtype,
            )
            with torch.no_grad():
                for param, core in zip(layer.cores, cores, strict=True):
                    param.copy_(core)
                if bias is not None:
                    assert layer.bias is not None
                    layer.bias.copy_(bias)
        return layer

    @classmethod
    def from_dense(
        cls,
        source: nn.Linear | torch.Tensor,
        rank: int | Sequence[int] | None = None,
        *,
        eps: float | None = None,
        in_modes: Sequence[int] | None = None,
        out_modes: Sequence[int] | None = None,
        num_cores: int | None = None,
        inputs: torch.Tensor | ActivationStatistics | None = None,
        ridge: float | None = None,
    ) -> TTLinear:
        """Convert a dense layer or weight matrix by TT-SVD (Oseledets 2011), or fit it to data.

        With ``inputs``, the conversion is data-aware: the ranks are those TT-SVD would use
        (from ``rank``/``eps``), and the cores (and the bias) are then fitted to reproduce the
        layer's outputs on those inputs by :func:`ttlayers.calibration.fit_tt`, starting from
        TT-SVD and never worse than it on them.

        Args:
            source: An ``nn.Linear`` (its bias, dtype and device are carried over) or a weight
                tensor of shape ``(out_features, in_features)`` (the layer gets no bias).
            rank: Cap on every bond rank (an int), or the ``d - 1`` inner ranks.
            eps: Relative Frobenius error bound in ``(0, 1)``:
                ``||W - W_tt||_F <= eps * ||W||_F`` is guaranteed (a float16/bfloat16
                layer adds the rounding of its cores, and warns where that matters). With
                ``rank`` too, the smaller ranks win. With neither, the decomposition is exact
                to working precision: at each bond only singular values at most
                ``max(rows, cols) * finfo.eps * s_max`` are dropped (NumPy's ``matrix_rank``
                rule), which in float32 on a 1024-wide unfolding is ``1.2e-4 * s_max`` each;
                pass ``eps`` to bound the error they add up to.
            in_modes: ``d`` factors of ``in_features``; chosen automatically when omitted.
            out_modes: ``d`` factors of ``out_features``; chosen automatically when omitted.
            num_cores: ``d`` when the modes are omitted.
            inputs: Sample inputs of the layer, shape ``(*, in_features)``, or their
                :class:`~ttlayers.calibration.ActivationStatistics` (to stream many batches);
                ``None`` for plain TT-SVD. The ``eps`` guarantee is TT-SVD's and no longer
                holds for the fitted weight.
            ridge: The relative ridge of the fit, only with ``inputs`` (default ``1e-3``):
                it pulls the weight toward the original in input directions the data do not
                excite.

        Returns:
            A new ``TTLinear`` with trainable cores; the achieved relative weight error is in
            its ``conversion_error`` attribute.

        Raises:
            TypeError: If ``source`` is neither an ``nn.Linear`` nor a 2-D tensor, its weight
                is not floating point, ``rank``, ``eps`` or ``ridge`` is not a number of the
                right kind, or ``inputs`` is not a floating-point tensor.
            ValueError: If ``source`` is a lazy layer not initialized yet, the weight is on
                the meta device or holds NaN or Inf (or the bias does), ``eps`` is outside
                ``(0, 1)``, a rank is not positive, the modes do not multiply to the sizes,
                ``inputs`` have another width than ``in_features`` or hold NaN/Inf, or
                ``ridge`` is negative or given without ``inputs``.
        """
        if isinstance(source, nn.Linear):
            if isinstance(source.weight, nn.parameter.UninitializedParameter):
                raise ValueError(
                    "source is a lazy layer not initialized yet; run a forward pass first."
                )
            weight = source.weight.detach()
            bias = None if source.bias is None else source.bias.detach()
        elif isinstance(source, torch.Tensor):
            if source.dim() != 2:
                raise TypeError(
                    "source must be an nn.Linear or a 2-D weight tensor (out_features, "
                    f"in_features); got a {source.dim()}-D tensor of shape {tuple(source.shape)}."
                )
            weight, bias = source.detach(), None
        else:
            raise TypeError(
                "source must be an nn.Linear or a 2-D weight tensor (out_features, in_features); "
                f"got {type(source).__name__}."
            )
        if ridge is not None and inputs is None:
            raise ValueError(
                f"ridge={ridge!r} applies only to a data-aware conversion; pass inputs= or "
                "leave ridge out."
            )
        # Named as the caller passed it (tt_svd would say "matrix").
        decomposition.check_matrix(
            weight, "source.weight" if isinstance(source, nn.Linear) else "source", finite=True
        )
        if bias is not None and bias.device.type != "meta" and not bool(bias.isfinite().all()):
            raise ValueError(
                "source.bias holds NaN or Inf values; a conversion needs finite entries. Check "
                "the weights for divergence before converting."
            )
        out_features, in_features = weight.shape
        in_modes_t, out_modes_t = validate_modes(
            in_features, out_features, in_modes, out_modes, num_cores
        )
        cores = decomposition.tt_svd(weight, in_modes_t, out_modes_t, rank=rank, eps=eps)
        if inputs is not None:
            statistics = (
                inputs
                if isinstance(inputs, ActivationStatistics)
                else ActivationStatistics.from_inputs(inputs)
            )
            fit = fit_tt(
                weight,
                statistics,
                in_modes_t,
                out_modes_t,
                rank=[int(core.shape[3]) for core in cores[:-1]],
                bias=bias,
                ridge=DEFAULT_RIDGE if ridge is None else ridge,
            )
            layer = cls.from_cores(fit.cores, fit.bias)
            layer.conversion_error = fit.weight_error
            return layer
        layer = cls.from_cores(cores, bias)
        layer.conversion_error = decomposition.relative_error(weight, cores)
        return layer

    def round(
        self, rank: int | Sequence[int] | None = None, *, eps: float | None = None
    ) -> TTLinear:
        """TT-rounding: a new layer with lower ranks, without forming the dense weight.

        Orthogonalizes the chain right to left with QR, then truncates left to right with SVD
        (Oseledets 2011, Algorithm 2), in ``O(d m n r^3)``.

        Args:
            rank: Cap on every bond rank (an int), or the ``d - 1`` inner ranks.
            eps: Relative Frobenius error bound in ``(0, 1)``, guaranteed as in
                :meth:`from_dense`. With neither argument, only rank that is redundant to
                working precision is removed (the zero cut of :meth:`from_dense`).

        Returns:
            A new ``TTLinear`` (bias copied) with this layer's training mode and
            ``requires_grad`` flags; its ``conversion_error`` is the relative error against
            this layer's weight.

        Raises:
            TypeError: If ``rank`` is not an int or a sequence of ints, or ``eps`` not a
                number.
            ValueError: If ``eps`` is outside ``(0, 1)``, a rank is not positive, or a rank
                sequence does not have ``d - 1`` entries.
        """
        with torch.no_grad():
            cores = [core.detach() for core in self._core_list()]
            rounded = decomposition.tt_round(cores, rank=rank, eps=eps)
            bias = None if self.bias is None else self.bias.detach()
            layer = type(self).from_cores(rounded, bias)
            layer.conversion_error = decomposition.tt_relative_error(cores, rounded)
        for new, old in zip(layer.cores, self.cores, strict=True):
            new.requires_grad_(old.requires_grad)
        if layer.bias is not None and self.bias is not None:
            layer.bias.requires_grad_(self.bias.requires_grad)
        return layer.train(self.training)

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        # The cores' shapes record the ranks: a checkpoint of the same modes but other ranks
        # (say, converted with eps) is adopted by resizing the cores before the copy. The
        # checks of the cores come first, so cores that do not fit leave this layer untouched
        # (what the default loading then finds, such as a bias of another shape, it reports
        # after copying what fits, as for any module).
        name = prefix.rstrip(".") or "<root>"
        core_prefix = f"{prefix}cores."
        indices = {
            index
            for key in state_dict
            if key.startswith(core_prefix)
            and (index := core_index(key[len(core_prefix) :])) is not None
        }
        count = max(indices, default=-1) + 1
        dense = state_dict.get(f"{prefix}weight")
        if not count and isinstance(dense, torch.Tensor):
            # A warning, not an error: torch passes strict=True here whatever the caller gave,
            # and with strict=False the load goes on without this layer's weight.
            warnings.warn(
                f"TTLinear '{name}' keeps its cores: the checkpoint has a dense "
                f"'{prefix}weight' of shape {tuple(dense.shape)} for it and no cores. To use "
                "that weight, load the checkpoint into the dense model, then convert it "
                "(ttlayers.tensorize_ or TTLinear.from_dense).",
                stacklevel=_caller_stacklevel(),
            )
        found = [state_dict.get(f"{core_prefix}{k}") for k in range(count)]
        tensors = [t for t in found if isinstance(t, torch.Tensor)]
        chain = None
        if count and len(tensors) == count:
            try:
                chain = core_shapes(tensors)
            except ValueError as error:
                # Not a chain, and fewer cores than this layer has: keys are missing, which
                # the default loading reports (strict) or leaves alone (strict=False).
                if not indices < set(range(self.num_cores)):
                    raise ValueError(f"cannot load TTLinear '{name}': {error}") from None
        if chain is not None:
            in_modes, out_modes, _ = chain
            if (in_modes, out_modes) != (self.in_modes, self.out_modes):
                raise ValueError(
                    f"cannot load TTLinear '{name}': the checkpoint has {count} cores with "
                    f"in_modes={in_modes}, out_modes={out_modes}; this layer has "
                    f"{self.num_cores} with in_modes={self.in_modes}, "
                    f"out_modes={self.out_modes}. Build the layer with the checkpoint's modes."
                )
            other_ranks = any(
                core.shape != tensor.shape for core, tensor in zip(self.cores, tensors, strict=True)
            )
            if other_ranks and parametrize.is_parametrized(self.cores):
                # Resizing would have to go through the parametrizations' originals, and
                # rebuilding the container below would drop them.
                raise ValueError(
                    f"cannot load TTLinear '{name}': the checkpoint's ranks "
                    f"{(1, *(int(t.shape[3]) for t in tensors))} differ from this layer's "
                    f"{self.ranks}, and its cores are parametrized. Remove the "
                    "parametrizations first (torch.nn.utils.parametrize."
                    "remove_parametrizations), or build the layer with the checkpoint's ranks."
                )
            assign = local_metadata.get("assign_to_params_buffers", False)
            meta = any(t.is_meta for t in tensors) and not self.cores[0].is_meta
            if other_ranks and meta and not assign:
                # Meta tensors hold no values to copy: the copy would fail after the resize
                # and leave the new shapes filled with zeros. Unresized, the load reports
                # the shapes that differ and leaves the layer as it was.
                other_ranks = False
            if other_ranks:
                for param, tensor in zip(self.cores, tensors, strict=True):
                    # In place: the Parameter objects stay, so an optimizer built before the
                    # load still holds them (its per-parameter state, such as Adam's moments,
                    # keeps the old shapes: load the optimizer's state_dict too, or reset it).
                    # A gradient of the old shape goes: the next backward pass would fail
                    # to accumulate into it.
                    if param.shape != tensor.shape:
                        # Trainable after a load inside inference mode, as a parameter
                        # loaded in place is.
                        with ordinary_tensors():
                            param.data = torch.zeros(
                                tensor.shape, dtype=param.dtype, device=param.device
                            )
                        param.grad = None
                # A new container around the same Parameters, so torch.compile notices the new
                # shapes: Dynamo before pytorch/pytorch#177525 (torch 2.11 for one) skips the
                # shape guards of tensors whose module dicts are unchanged, and would replay a
                # graph planned for the old ranks.
                # It keeps the old one's train/eval mode (hooks on the old container stay there).
                self.cores = nn.ParameterList(list(self.cores)).train(self.cores.training)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
