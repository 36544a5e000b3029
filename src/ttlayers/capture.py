"""Running calibration data through a model and capturing a layer's inputs, with hooks.

The model is never modified: converted layers are substituted during a pass by a forward
hook on the original module that returns the converted layer's output instead, and every
hook is removed, and every module's training flag restored, when the pass ends (also on
error). Passes run under ``torch.no_grad()`` in eval mode, so dropout is off and batch-norm
statistics are not updated; each gets its own copy of the batch's tensors (those in its
tuples, lists and dicts). State a model keeps in its forward pass itself, a call counter or
a cache, sees every pass. One that draws random numbers (a VAE's sampling) draws the same
ones in every pass over a batch: torch's generators are seeded per batch during a pass and
restored after it.

A pass for a layer that every batch calls once stops right after that call (by an exception
caught here), so capturing the inputs of an early layer costs only the front of the model. A
layer called several times (a shared or recurrent cell) sees the whole pass, and its inputs
are copied, as the model may change them in place after the call.
"""

from __future__ import annotations

import contextlib
import copy
import heapq
from collections import UserDict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from ttlayers.calibration import ActivationStatistics

__all__ = ["ActivationCapture", "check_calibration"]

_HOW = (
    "calibration is one tensor batch or a collection of batches (a list, a tuple, a "
    "DataLoader), on the model's device and dtype. A tensor batch is passed as "
    "model(batch), a tuple or list as model(*batch), a dict as model(**batch): one batch of "
    "several inputs is [(src, tgt)], one batch for a model that takes a dict or a list is "
    "[(batch,)]; for a loader of (input, target) pairs pass [x for x, _ in loader]."
)


def _layer_input(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
    """The input of a linear layer's call, ``layer(x)`` or ``layer(input=x)``."""
    x = args[0] if args else kwargs.get("input")
    if not isinstance(x, torch.Tensor):
        raise TypeError("a layer to convert was called without a tensor input.")
    return x


class _StopForward(BaseException):
    """Raised by a capture hook once the layer of interest has seen its input.

    A ``BaseException``, as ``GeneratorExit`` is: a forward pass with a fallback under
    ``except Exception`` would otherwise catch it and call the layer again, whose rows were
    then counted twice.
    """


# Every pass over batch k draws its random numbers from a generator seeded with this plus k
# (see ActivationCapture._pass).
_SEED = 0x7E5


def check_calibration(calibration: object) -> Iterable[Any]:
    """Check the ``calibration`` argument and return something to iterate over many times.

    Args:
        calibration: A tensor (one batch), a list or tuple of batches, or a re-iterable such
            as a ``torch.utils.data.DataLoader``. A batch is a tensor, a tuple/list of
            positional arguments, or a dict of keyword arguments of the model.

    Returns:
        A re-iterable of batches.

    Raises:
        TypeError: For a one-shot iterator (a generator), which cannot be replayed for every
            layer, or an object that is not iterable.
        ValueError: For an empty collection.
    """
    if isinstance(calibration, torch.Tensor):
        return [calibration]
    if isinstance(calibration, np.ndarray):  # iterable, by rows: each row would be a batch
        raise TypeError(
            "calibration must be a tensor (one batch), a list of batches or a DataLoader; got "
            "a NumPy array. Convert it with torch.from_numpy."
        )
    if isinstance(calibration, Mapping):
        raise TypeError(
            "calibration must be a tensor (one batch), a list of batches or a DataLoader; got "
            f"a {type(calibration).__name__}. One batch of keyword arguments is [batch]."
        )
    if isinstance(calibration, (str, bytes)) or not isinstance(calibration, Iterable):
        raise TypeError(
            "calibration must be a tensor (one batch), a list of batches or a DataLoader; got "
            f"{type(calibration).__name__}."
        )
    if isinstance(calibration, Iterator):
        raise TypeError(
            "calibration must be re-iterable (a list, a tuple or a DataLoader): it is run once "
            f"per converted layer, and a one-shot {type(calibration).__name__} cannot be "
            "replayed. Wrap it in list(...)."
        )
    if isinstance(calibration, Sequence) and len(calibration) == 0:
        raise ValueError("calibration holds no batches; pass at least one batch of inputs.")
    return calibration


def _forward_order(
    before: Mapping[nn.Module, set[nn.Module]], first: Mapping[nn.Module, int]
) -> list[nn.Module]:
    """The modules, each after its predecessors in ``before``; else by ``first`` (first calls).

    Modules that precede one another, directly or through others (batches that call two of
    them in opposite orders), form one group, ordered by first call within; the groups are
    ordered so that each comes after those it depends on, the earliest first call first
    among those ready (Tarjan's strongly connected components, then Kahn's algorithm).
    """
    after: dict[nn.Module, list[nn.Module]] = {module: [] for module in before}
    for module, predecessors in before.items():
        for predecessor in predecessors:
            after[predecessor].append(module)
    # Tarjan's algorithm, iterative: hundreds of layers would pass Python's recursion limit.
    number: dict[nn.Module, int] = {}
    low: dict[nn.Module, int] = {}
    stack: list[nn.Module] = []
    on_stack: set[nn.Module] = set()
    group_of: dict[nn.Module, int] = {}
    groups: list[list[nn.Module]] = []
    for root in sorted(before, key=first.__getitem__):
        if root in number:
            continue
        work = [(root, iter(after[root]))]
        number[root] = low[root] = len(number)
        stack.append(root)
        on_stack.add(root)
        while work:
            module, successors = work[-1]
            successor = next(successors, None)
            if successor is None:
                work.pop()
                if work:
                    parent = work[-1][0]
                    low[parent] = min(low[parent], low[module])
                if low[module] == number[module]:
                    group: list[nn.Module] = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        group_of[member] = len(groups)
                        group.append(member)
                        if member is module:
                            break
                    groups.append(sorted(group, key=first.__getitem__))
            elif successor not in number:
                number[successor] = low[successor] = len(number)
                stack.append(successor)
                on_stack.add(successor)
                work.append((successor, iter(after[successor])))
            elif successor in on_stack:
                low[module] = min(low[module], number[successor])
    waiting = [0] * len(groups)
    later: list[set[int]] = [set() for _ in groups]
    for module, following in after.items():
        for successor in following:
            g, h = group_of[module], group_of[successor]
            if g != h and h not in later[g]:
                later[g].add(h)
                waiting[h] += 1
    ready = [(first[group[0]], g) for g, group in enumerate(groups) if not waiting[g]]
    heapq.heapify(ready)
    ordered: list[nn.Module] = []
    while ready:
        _, g = heapq.heappop(ready)
        ordered.extend(groups[g])
        for h in later[g]:
            waiting[h] -= 1
            if not waiting[h]:
                heapq.heappush(ready, (first[groups[h][0]], h))
    return ordered


def _copy(value: object, copies: dict[int, torch.Tensor]) -> object:
    """``value`` with every tensor in it cloned, in containers nested to any depth.

    Tuples, named tuples, lists, dicts and ``UserDict`` objects are copied; other
    containers are kept as they are. ``copies`` maps a tensor's id to its copy: a tensor
    passed twice (``model(x, x)``) stays one tensor, which a model may check
    (``query is key``).
    """
    if isinstance(value, torch.Tensor):
        clone = copies.get(id(value))
        if clone is None:
            clone = copies[id(value)] = value.clone()
        return clone
    kind: Any = type(value)
    if kind in (tuple, list):
        return kind(_copy(item, copies) for item in value)  # type: ignore[attr-defined]
    if isinstance(value, tuple) and hasattr(value, "_fields"):  # a named tuple
        return kind(*(_copy(item, copies) for item in value))
    if isinstance(value, (dict, UserDict)):  # OrderedDict, defaultdict, BatchEncoding, ...
        # copy.copy makes one of the same type whatever its constructor takes (a dict's and
        # a UserDict's own storage, not shared; other mappings may share theirs, and are
        # kept as they are). One that refuses to be copied or written is kept too.
        try:
            mapping = copy.copy(value)
            for key in list(mapping):
                mapping[key] = _copy(value[key], copies)
        except Exception:
            return value
        return mapping
    return value


def _call(model: nn.Module, batch: object) -> None:
    # Every pass gets its own copy of the batch's tensors: a model that changes its input in
    # place (x /= 255) would otherwise change the batch for the passes after, and the
    # caller's data with it.
    copies: dict[int, torch.Tensor] = {}
    if isinstance(batch, Mapping):
        model(**{key: _copy(value, copies) for key, value in batch.items()})
    elif isinstance(batch, (tuple, list)):
        model(*(_copy(value, copies) for value in batch))
    else:
        model(_copy(batch, copies))


@contextlib.contextmanager
def _calibrating(model: nn.Module) -> Iterator[None]:
    """No grad, eval mode, eager; restore every module's training flag afterwards.

    The flags are set directly, not through ``model.eval()``: a model's own ``train()`` may
    do more (freeze parameters, say), which could not be undone here. A model wrapped by
    ``torch.compile`` runs eagerly: its graphs would be compiled again for the hooks, and
    with ``fullgraph=True`` the exception that ends a pass early is an error.
    """
    flags = [(module, module.training) for module in model.modules()]
    set_stance = getattr(torch.compiler, "set_stance", None)  # torch >= 2.6
    try:
        # Called, set_stance takes effect at once: made where the with statement undoes it.
        with (
            torch.no_grad(),
            set_stance("force_eager") if set_stance is not None else contextlib.nullcontext(),
        ):
            for module, _ in flags:
                module.training = False
            yield
    finally:
        for module, flag in flags:
            module.training = flag


def _check_module(name: str, module: object) -> None:
    if not isinstance(module, nn.Module):
        raise TypeError(f"{name} must be an nn.Module; got {type(module).__name__}.")


class ActivationCapture:
    """Feeds calibration batches to a model and collects one layer's input statistics.

    Use the methods inside ``with capture.session():``, which puts the model in eval mode
    without gradients and restores every module's training flag at the end.

    Args:
        model: The model (left unmodified).
        calibration: See :func:`check_calibration`.

    Attributes:
        model: The model the batches are fed to.
        batches: The calibration batches, as checked by :func:`check_calibration`.
        substitutes: Original module -> converted layer; during a "converted" pass each
            original module's output is replaced by its substitute's output on the same input.

    Raises:
        TypeError: If ``model`` is not an ``nn.Module`` or ``calibration`` is not a batch or
            a collection of batches.
        ValueError: If ``calibration`` holds no batches.
    """

    def __init__(self, model: nn.Module, calibration: object) -> None:
        _check_module("model", model)
        self.model = model
        self.batches = check_calibration(calibration)
        self.substitutes: dict[nn.Module, nn.Module] = {}
        self._calls: dict[nn.Module, int] = {}
        self._batch_count = 0  # counted by order
        tensors = [*model.parameters(), *model.buffers()]
        self._cuda_devices = sorted(
            {t.device.index or 0 for t in tensors if t.device.type == "cuda"}
        )  # the devices whose generators _pass seeds and restores

    def calls(self, module: nn.Module) -> int:
        """How often ``module`` is called in one pass, at most (counted by :meth:`order`).

        Args:
            module: One of the modules given to :meth:`order`.

        Returns:
            The largest number of calls in the pass over one batch; 0 for a module
            :meth:`order` did not count.

        Raises:
            TypeError: If ``module`` is not an ``nn.Module``.
        """
        _check_module("module", module)
        return self._calls.get(module, 0)

    def session(self) -> contextlib.AbstractContextManager[None]:
        """The context in which passes run (no grad, eval mode, flags restored).

        Returns:
            A context manager; the model's training flags are restored when it exits.
        """
        return _calibrating(self.model)

    def _pass(self, index: int, batch: object, handles: list[Any]) -> None:
        """Run one batch with the given hooks installed; always remove them.

        Every pass over one batch draws the same random numbers: a model that samples in
        eval mode (a VAE's ``mu + eps * std``) would otherwise pair the converted model's
        inputs with the original model's inputs for other noise, and the fit would regress
        towards their mean. The caller's random state is restored afterwards. (Only
        torch's generators, of the CPU and of the CUDA devices the model is on; Python's
        and NumPy's are not reset.)
        """
        try:
            with torch.random.fork_rng(devices=self._cuda_devices):
                # Not torch.manual_seed: it seeds every CUDA device, and fork_rng restores
                # only those listed.
                torch.default_generator.manual_seed(_SEED + index)
                for device in self._cuda_devices:
                    with torch.cuda.device(device):
                        torch.cuda.manual_seed(_SEED + index)
                _call(self.model, batch)
        except _StopForward:
            pass
        except Exception as error:
            raise ValueError(
                f"calibration batch {index} failed in the model's forward pass: "
                f"{type(error).__name__}: {str(error).rstrip('.')}. {_HOW}"
            ) from error
        finally:
            for handle in handles:
                handle.remove()

    def order(self, modules: Sequence[nn.Module], names: Sequence[str]) -> list[int]:
        """The forward order of ``modules``; checks that the calibration data call each one.

        One pass over every batch. A module comes after every module called before it in
        some batch, so that each layer is fitted to the inputs the converted layers before
        it produce, even where batches take different paths (a text batch and an image
        batch through their own encoders into one head). Among modules so unordered, and
        among modules that precede one another, directly or through others (batches that
        disagree on their order), the earlier first call comes first. Each module's count
        of calls per batch is the largest over the batches (a layer may be called a
        different number of times, or not at all, depending on the batch).

        Args:
            modules: The layers to convert.
            names: Their names, for messages.

        Returns:
            Indices into ``modules``, in forward order.

        Raises:
            TypeError: If ``modules`` or ``names`` is not a sequence, or an entry of
                ``modules`` is not an ``nn.Module``.
            ValueError: If ``modules`` and ``names`` differ in length, a batch fails in the
                model, or a module is never called.
        """
        for argument, given in (("modules", modules), ("names", names)):
            # A ModuleList is iterable, one layer is not.
            if isinstance(given, str) or not isinstance(given, Iterable):
                raise TypeError(f"{argument} must be a sequence; got {type(given).__name__}.")
        modules, names = list(modules), list(names)
        if len(modules) != len(names):
            raise ValueError(
                f"modules and names must have the same length; got {len(modules)} modules "
                f"and {len(names)} names."
            )
        for k, module in enumerate(modules):
            _check_module(f"modules[{k}]", module)
        first: dict[nn.Module, int] = {}
        calls: dict[nn.Module, int] = dict.fromkeys(modules, 0)
        most: dict[nn.Module, int] = dict.fromkeys(modules, 0)
        # A module's predecessors: the module first called just before it in some batch (the
        # chains of these give every "called before it" without storing them all).
        before: dict[nn.Module, set[nn.Module]] = {module: set() for module in modules}
        previous: list[nn.Module] = []  # this batch's latest module first called

        def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            first.setdefault(module, len(first))
            if not calls[module]:
                if previous:
                    before[module].add(previous[0])
                previous[:] = [module]
            calls[module] += 1

        index = -1
        for index, batch in enumerate(self.batches):
            self._pass(index, batch, [module.register_forward_hook(hook) for module in modules])
            for module, count in calls.items():
                most[module] = max(most[module], count)
                calls[module] = 0
            previous.clear()
        if index < 0:
            raise ValueError("the calibration data hold no batches (an empty DataLoader?).")
        missing = [name for module, name in zip(modules, names, strict=True) if module not in first]
        if missing:
            raise ValueError(
                "calibration data never reached layer(s) "
                + ", ".join(repr(name) for name in missing)
                + "; exclude them with filter_fn, or pass inputs that use them. (The passes "
                "run in eval mode: a layer used only in training, such as an auxiliary head, "
                "is never reached.)"
            )
        self._calls = most
        self._batch_count = index + 1
        ordered = _forward_order(before, first)
        position = {module: k for k, module in enumerate(ordered)}
        return sorted(range(len(modules)), key=lambda k: position[modules[k]])

    def _inputs(
        self, index: int, batch: object, target: nn.Module, substitute: bool
    ) -> torch.Tensor | None:
        """The target's inputs on one batch, all its calls' rows stacked; ``None`` if not called."""
        seen: list[torch.Tensor] = []
        # One call in every batch: nothing after it matters. Otherwise the whole pass runs,
        # and an input kept past its call is copied: the model may change it in place later
        # (``h += cell(h)``).
        stop = self._calls.get(target, 0) == 1

        def grab(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            x = _layer_input(args, kwargs).detach()
            if stop:
                seen.append(x)
                raise _StopForward
            seen.append(x.clone())

        handles = []
        if substitute:
            for original, layer in self.substitutes.items():

                def swap(
                    module: nn.Module,
                    args: tuple[Any, ...],
                    kwargs: dict[str, Any],
                    output: Any,
                    layer: nn.Module = layer,
                ) -> Any:
                    return layer(_layer_input(args, kwargs))

                # First among the forward hooks: the module's own hooks then see the
                # substitute's output, as they will once it is installed in its place.
                handles.append(original.register_forward_hook(swap, with_kwargs=True, prepend=True))
        # A pre-hook: it sees the input even if this very module is substituted.
        handles.append(target.register_forward_pre_hook(grab, with_kwargs=True))
        self._pass(index, batch, handles)
        if not seen:
            return None
        # A nested tensor (nn.TransformerEncoder's packed batch) holds no padding rows.
        rows = [
            row.reshape(-1, row.shape[-1])
            for x in seen
            for row in (x.unbind() if x.is_nested else (x,))
        ]
        return torch.cat(rows) if len(rows) > 1 else rows[0]

    def statistics(
        self, target: nn.Module, in_features: int, device: torch.device, *, paired: bool
    ) -> ActivationStatistics:
        """Input statistics of ``target`` over all calibration batches.

        Args:
            target: The layer.
            in_features: Its input width.
            device: Where to accumulate (the layer's device).
            paired: If true, the inputs are taken with the substitutes in place and the
                original model's inputs to the same layer are the reference; if false, the
                original model's inputs only.

        Returns:
            The :class:`ActivationStatistics`.

        Raises:
            TypeError: If ``target`` is not an ``nn.Module``.
            ValueError: If a batch fails in the model, its activations hold NaN/Inf, or two
                passes over one batch disagree in shape.
        """
        _check_module("target", target)
        stats = ActivationStatistics(in_features, paired=paired, device=device)
        count = 0
        for index, batch in enumerate(self.batches):
            count = index + 1
            try:
                self._accumulate(stats, index, batch, target, paired)
            except ValueError as error:
                if str(error).startswith("calibration batch"):
                    raise
                raise ValueError(f"calibration batch {index}: {error}") from error
        if self._batch_count and count != self._batch_count:
            raise ValueError(
                f"calibration yielded {self._batch_count} batches in its first pass and "
                f"{count} in a later one: it is run once per layer and must yield the same "
                "batches every time (an iterable whose __iter__ hands out one generator "
                "cannot). Pass a list of batches."
            )
        return stats

    def _accumulate(
        self,
        stats: ActivationStatistics,
        index: int,
        batch: object,
        target: nn.Module,
        paired: bool,
    ) -> None:
        """Add one batch's inputs of ``target`` to ``stats``."""
        reference = self._inputs(index, batch, target, substitute=False)
        if not paired:
            if reference is not None:
                stats.update(reference)
            return
        x = self._inputs(index, batch, target, substitute=True)
        if (x is None) != (reference is None) or (
            x is not None and reference is not None and x.shape != reference.shape
        ):

            def rows(inputs: torch.Tensor | None) -> int:
                return 0 if inputs is None else int(inputs.shape[0])

            raise ValueError(
                f"the layer received {rows(reference)} input rows from the original model and "
                f"{rows(x)} with the layers before it converted. Which rows reach it depends "
                "on those layers' outputs (routing, as in a mixture of experts, or a "
                "data-dependent loop), or the forward pass is not deterministic. Convert it "
                "in a tensorize_ call of its own, after the layers before it (filter_fn), or "
                "leave it out."
            )
        if x is not None:
            stats.update(x, reference)
