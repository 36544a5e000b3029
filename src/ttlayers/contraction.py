"""Contracting a TT matrix with an input, or with itself into the dense weight.

:func:`tt_linear` computes ``y = x W^T + b`` for the TT matrix ``W`` of a chain of cores, by
the plan that :mod:`ttlayers.planner` chooses for the input's shape, dtype and device (or one
given): contract the cores into ``W`` and multiply once (``"dense"``), contract them into two
blocks and multiply by each (``"twoblock"``, with the hand-written backward pass of
:mod:`ttlayers.autograd`), or replay opt_einsum's FLOP-optimal order as two-operand
``torch.einsum`` calls (``"chain"``). Every plan is a fixed sequence of tensor operations with
no search on the hot path and nothing for ``torch.compile`` to break the graph on.
"""

from __future__ import annotations

import math
import operator
import string
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import replace
from functools import partial
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import prune
from torch.utils.weak import WeakIdKeyDictionary

from ttlayers.autograd import (
    EagerTwoBlockProduct,
    TwoBlockLayout,
    TwoBlockProduct,
    guard_or_false,
    jit_tracing,
    plain_tensors,
    symbolic_size,
    two_block_forward,
)
from ttlayers.planner import Plan, cached_plan_table, check_plan, choose_plan

# The argument checks, the merge layouts, the chain runner and the plan cache defined here
# are shared with the other modules but are not API: tt_linear and the layer are.
__all__ = ["core_shapes", "merge_cores", "tt_linear", "tt_to_dense"]


def autocast_enabled(device_type: str) -> bool:
    """Whether ``torch.autocast`` is on for ``device_type``.

    ``False`` for device types that have no autocast (``meta``), where
    ``torch.is_autocast_enabled`` would raise.
    """
    # CPUs and CUDA always have autocast, and asking would break a Dynamo graph before torch
    # 2.12, which cannot trace torch.amp.is_autocast_available.
    if device_type in ("cpu", "cuda"):
        return torch.is_autocast_enabled(device_type)
    return torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type)


def check_real_floating(dtype: torch.dtype, name: str) -> None:
    """Raise ``TypeError`` unless ``dtype`` is a real floating-point dtype.

    Complex TT layers are not supported: the hand-written backward pass of
    :mod:`ttlayers.autograd` does not conjugate. ``name`` is the argument named in the message.
    """
    given: object = dtype  # checked as what a caller may pass, not as annotated
    if not isinstance(given, torch.dtype):
        raise TypeError(f"{name} must be a torch.dtype, such as torch.float32; got {dtype!r}.")
    if not dtype.is_floating_point:
        raise TypeError(
            f"{name} must be a real floating-point dtype (float16, bfloat16, float32, float64); "
            f"got {dtype}."
        )


def check_bias(bias: object, out_features: int) -> None:
    """Raise unless ``bias`` is ``None`` or a floating-point tensor of shape ``(out_features,)``.

    Raises:
        TypeError: If it is not a dense floating-point tensor.
        ValueError: If its shape is not ``(out_features,)``.
    """
    if bias is None:
        return
    if not isinstance(bias, torch.Tensor) or not bias.is_floating_point():
        raise TypeError(
            f"bias must be a floating-point tensor of shape ({out_features},) or None; got "
            f"{bias.dtype if isinstance(bias, torch.Tensor) else type(bias).__name__}."
        )
    if tuple(bias.shape) != (out_features,):
        raise ValueError(
            f"bias must be a tensor of shape ({out_features},) or None; got {tuple(bias.shape)}."
        )
    check_strided(bias, "bias")


def check_strided(tensor: torch.Tensor, name: str) -> None:
    """Raise a ``TypeError`` for a sparse (or other non-strided) ``tensor``."""
    if tensor.layout != torch.strided:
        hint = (
            " (make it dense with .to_dense())" if tensor.is_sparse or tensor.is_sparse_csr else ""
        )
        raise TypeError(f"{name} must be a dense tensor; got layout {tensor.layout}{hint}.")


def check_same_kind(cores: Sequence[torch.Tensor], name: str = "cores") -> None:
    """Raise a ``TypeError`` unless all ``cores`` share the first one's dtype and device.

    ``name`` is the argument named in the message.
    """
    first = cores[0]
    for k, core in enumerate(cores):
        if core.dtype != first.dtype or core.device != first.device:
            raise TypeError(
                f"{name} must share one dtype and device; got {name}[0] {first.dtype} on "
                f"{first.device} and {name}[{k}] {core.dtype} on {core.device}."
            )


def refuse_pruned(cores: object) -> None:
    """Raise a ``TypeError`` if ``cores`` is a module with a core pruned by ``nn.utils.prune``.

    Prune's hook recomputes the masked tensor before the module's forward pass, and an
    ``nn.ParameterList``'s forward is never called: the core would keep the value it had
    when pruned (or when a layer last read it), and a second backward pass through it fails.
    """
    if not isinstance(cores, nn.Module) or not cores._forward_pre_hooks:
        return
    for hook in cores._forward_pre_hooks.values():
        if isinstance(hook, prune.BasePruningMethod):
            name = hook._tensor_name
            raise TypeError(
                f"TTLinear's core {name} is pruned with torch.nn.utils.prune, whose mask an "
                "nn.ParameterList never reapplies (its forward pass is not called). Remove it "
                f"(prune.remove(layer.cores, {name!r})) and mask the core with a "
                "parametrization instead: torch.nn.utils.parametrize."
                f"register_parametrization(layer.cores, {name!r}, mask_module)."
            )


def core_list(cores: object, name: str = "cores") -> list[torch.Tensor]:
    """``cores`` as a list, each core a real floating-point tensor.

    Any iterable of tensors is taken but a tensor: a layer's ``nn.ParameterList`` too.
    ``name`` is the argument named in the messages. The chain itself (shapes, sizes of 0) is
    checked by :func:`core_shapes`.

    Raises:
        TypeError: If ``cores`` is a tensor, a set or not iterable, a core is not a dense real
            floating-point tensor, or a layer's core is pruned (see :func:`refuse_pruned`).
    """
    if isinstance(cores, torch.Tensor):
        raise TypeError(
            f"{name} must be a sequence of 4-D tensors (r_k, m_k, n_k, r_k+1); got one tensor "
            f"of shape {tuple(cores.shape)} (a chain of one core is [core])."
        )
    if not isinstance(cores, Iterable) or isinstance(cores, (set, frozenset)):
        raise TypeError(
            f"{name} must be a sequence of 4-D tensors (r_k, m_k, n_k, r_k+1), in chain "
            f"order; got {type(cores).__name__}."
        )
    refuse_pruned(cores)
    listed = list(cores)
    for k, core in enumerate(listed):
        if not isinstance(core, torch.Tensor):
            raise TypeError(f"{name}[{k}] must be a tensor; got {type(core).__name__}.")
        if not core.is_floating_point():
            raise TypeError(
                f"{name}[{k}] must be a real floating-point tensor (float16, bfloat16, float32, "
                f"float64); got {core.dtype}."
            )
        check_strided(core, f"{name}[{k}]")
    return listed


def core_shapes(
    cores: Sequence[torch.Tensor], name: str = "cores"
) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """Read ``(in_modes, out_modes, ranks)`` off a chain of cores, checking that it chains.

    Args:
        cores: ``d >= 1`` tensors of shapes ``(r_k, m_k, n_k, r_{k+1})``, in chain order.
        name: The argument named in the messages.

    Returns:
        ``(in_modes, out_modes, ranks)``: ``d``, ``d`` and ``d + 1`` ints.

    Raises:
        TypeError: If ``cores`` is not a sequence, or a core is not a tensor.
        ValueError: If the chain is empty, a core is not 4-D or has a size of 0, or neighbouring
            ranks differ.
    """
    _check_links(cores, name)
    ranks = [cores[0].shape[0]] + [core.shape[3] for core in cores]
    if ranks[0] != 1 or ranks[-1] != 1:
        raise ValueError(f"the boundary ranks of {name} must be 1; got {ranks[0]} and {ranks[-1]}.")
    in_modes = tuple(int(core.shape[1]) for core in cores)
    out_modes = tuple(int(core.shape[2]) for core in cores)
    return in_modes, out_modes, tuple(int(r) for r in ranks)


def _check_links(cores: Sequence[torch.Tensor], name: str) -> None:
    """Check a run of neighbouring cores: 4-D tensors of positive sizes whose ranks chain."""
    given: object = cores  # checked as what a caller may pass, not as annotated
    if not isinstance(given, (list, tuple, Sequence, nn.ParameterList)):  # common ones first
        raise TypeError(
            f"{name} must be a sequence of 4-D tensors (r_k, m_k, n_k, r_k+1); got "
            f"{type(given).__name__}."
        )
    if len(cores) == 0:
        raise ValueError(f"{name} must hold at least one core; got none.")
    for k, core in enumerate(cores):
        if not isinstance(core, torch.Tensor):
            raise TypeError(f"{name}[{k}] must be a tensor; got {type(core).__name__}.")
        if core.dim() != 4:
            raise ValueError(
                f"{name}[{k}] must be 4-D (r_k, m_k, n_k, r_k+1); got shape {tuple(core.shape)}."
            )
        if core.numel() == 0:
            raise ValueError(
                f"{name}[{k}] has a size of 0 (shape {tuple(core.shape)}); the modes and ranks "
                "of a TT chain are positive."
            )
    for k in range(len(cores) - 1):
        if cores[k].shape[3] != cores[k + 1].shape[0]:
            raise ValueError(
                f"{name}[{k}] and {name}[{k + 1}] do not chain: shapes "
                f"{tuple(cores[k].shape)} and {tuple(cores[k + 1].shape)}."
            )


def merge_cores(cores: Sequence[torch.Tensor]) -> torch.Tensor:
    """Contract neighbouring cores into one block core.

    Args:
        cores: ``k >= 1`` cores of shapes ``(r_a, m_1, n_1, r_1)``, ...,
            ``(r_{k-1}, m_k, n_k, r_b)``, of one dtype and device.

    Returns:
        The block of shape ``(r_a, m_1 ... m_k, n_1 ... n_k, r_b)``, its modes merged in
        row-major order, so it is itself a core of the chain with the merged cores replaced.
        One core is returned as it is.

    Raises:
        TypeError: If ``cores`` is not a sequence of real floating-point tensors of one dtype
            and device.
        ValueError: If ``cores`` is empty, a core is not 4-D or has a size of 0, or
            neighbouring ranks differ.
    """
    listed = core_list(cores)
    _check_links(listed, "cores")
    check_same_kind(listed)
    return _merge_run(listed)


def _merge_run(cores: Sequence[torch.Tensor]) -> torch.Tensor:
    """:func:`merge_cores` without the checks: for the layer's own cores, on every step."""
    block = cores[0]
    for core in cores[1:]:
        block = _merge_pair(block, core, (0, 1, 3, 2, 4, 5), "core")
    return block


def _merge_pair(
    block: torch.Tensor, core: torch.Tensor, order: tuple[int, ...], layout: str
) -> torch.Tensor:
    """``block (ra, m, n, r)`` times ``core (r, p, q, rb)``, permuted and reshaped (one copy).

    ``order`` permutes the axes ``(ra, m, n, p, q, rb)`` of the product; ``layout`` names the
    result: ``"core"``, ``(ra, m p, n q, rb)``, or ``"rank-middle"``, ``(m p, ra rb, n q)``.
    """
    ra, m, n, r = block.shape
    _, p, q, rb = core.shape
    product = torch.mm(block.reshape(ra * m * n, r), core.reshape(r, p * q * rb))
    permuted = product.view(ra, m, n, p, q, rb).permute(order)
    if layout == "core":
        return permuted.reshape(ra, m * p, n * q, rb)
    return permuted.reshape(m * p, ra * rb, n * q)


def rank_middle_block(cores: Sequence[torch.Tensor]) -> torch.Tensor:
    """The block of the left or the right end of a chain, laid out ``(M, r, N)``.

    Args:
        cores: Neighbouring cores whose merged block has one boundary rank equal to 1 (the
            first ``s`` cores of a chain, or the last ``d - s``).

    Returns:
        ``B[m, a, n]``, the block's modes merged row-major and its one inner bond ``a`` in the
        middle; contiguous, from one copy.
    """
    if len(cores) == 1:
        ra, m, n, rb = cores[0].shape
        return cores[0].permute(1, 0, 3, 2).reshape(m, ra * rb, n)
    # Axes of the product (ra, m, n, p, q, rb) ordered (m, p, ra, rb, n, q): one of ra and
    # rb is 1, so this is (M, r, N) for a block at either end.
    block = _merge_run(cores[:-1])
    return _merge_pair(block, cores[-1], (1, 3, 0, 5, 2, 4), "rank-middle")


def _dense_block(cores: Sequence[torch.Tensor], split: int) -> torch.Tensor:
    """All cores merged, the left ``split`` and the rest first: ``(1, M, N, 1)``."""
    if 0 < split < len(cores):
        return _merge_run([_merge_run(cores[:split]), _merge_run(cores[split:])])
    return _merge_run(cores)


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
        ValueError: If the cores are not 4-D, have a size of 0, or their ranks do not chain.
        TypeError: If ``cores`` is not a sequence of real floating-point tensors of one dtype
            and device.
    """
    cores = core_list(cores)
    in_modes, out_modes, _ = core_shapes(cores)
    check_same_kind(cores)
    if len(cores) == 1:
        # With one input or output feature the core's transpose is already contiguous: W
        # would share the core's memory, and writing into W change it.
        w = cores[0].reshape(in_modes[0], out_modes[0]).t()
        return w.clone(memory_format=torch.contiguous_format)
    split = len(cores) // 2
    left, right = _merge_run(cores[:split]), _merge_run(cores[split:])
    _, m_left, n_left, rank = left.shape
    _, m_right, n_right, _ = right.shape
    # One product and one copy of W's size. The blocks are laid out (n, m) first, so that
    # the product's (n_left, m_left, n_right, m_right) needs only its middle axes swapped:
    # the copy moves runs of m_right contiguous entries. (The block (1, M, N, 1) of the dense
    # plan, transposed, took two copies of W's size: 2.7-5 times as long on the project's
    # CPU for the layers of benchmarks/bench_encoder.py.)
    a = left.reshape(m_left, n_left, rank).transpose(0, 1).reshape(n_left * m_left, rank)
    b = right.reshape(rank, m_right, n_right).transpose(1, 2).reshape(rank, n_right * m_right)
    product = torch.mm(a, b).view(n_left, m_left, n_right, m_right)
    return product.transpose(1, 2).contiguous().view(n_left * n_right, m_left * m_right)


def run_chain(plan: Plan, operands: Sequence[torch.Tensor]) -> torch.Tensor:
    """Execute a ``"chain"`` plan's pairwise einsums on the input and the cores."""
    current = list(operands)
    for i, j, equation in plan.steps:
        right, left = current.pop(j), current.pop(i)
        if not equation.isascii():  # 17 cores or more
            equation = _ascii_letters(equation)
        current.append(torch.einsum(equation, left, right))
    return current[0]


def _ascii_letters(equation: str) -> str:
    """``equation`` with its letters renamed to ``a-z, A-Z``, all ``torch.einsum`` accepts.

    A chain's letters come from ``opt_einsum.get_symbol``, which goes beyond ASCII from the
    53rd on (17 or more cores); the planner only makes chains whose steps use at most 52.
    """
    letters = dict.fromkeys(c for c in equation if c not in ",->")
    if len(letters) > len(string.ascii_letters):
        raise ValueError(f"a pairwise step of {len(letters)} indices exceeds einsum's 52 letters")
    names = dict(zip(letters, string.ascii_letters, strict=False))
    return "".join(names.get(c, c) for c in equation)


# --- the three kinds of plan --------------------------------------------------------------------


def _run_dense(
    x: torch.Tensor,
    cores: Sequence[torch.Tensor],
    bias: torch.Tensor | None,
    plan: Plan,
    batch: int,
) -> torch.Tensor:
    (block,) = _merged(lambda: (_dense_block(cores, plan.split),), cores, x.dtype)  # (1,M,N,1)
    weight = block.reshape(block.shape[1], block.shape[2])  # (M, N): W^T, no copy
    return F.linear(x, weight.t(), bias)


def _merged(
    merge: Callable[[], tuple[torch.Tensor, ...]], cores: Sequence[torch.Tensor], dtype: torch.dtype
) -> tuple[torch.Tensor, ...]:
    """``merge()``, blocks of ``cores``, in ``dtype``.

    Under autocast the cores keep their dtype until here: they are merged at their own
    precision and each block is rounded to ``dtype`` once, as autocast rounds an
    ``nn.Linear``'s weight once, instead of rounding every core and every partial product.
    """
    if cores[0].dtype == dtype:
        return merge()
    with torch.autocast(cores[0].device.type, enabled=False):
        merged = merge()
    return tuple(block.to(dtype) for block in merged)


def _needs_grad(x: torch.Tensor, cores: Sequence[torch.Tensor], bias: torch.Tensor | None) -> bool:
    """Whether autograd records this call: the plans for training apply."""
    return torch.is_grad_enabled() and (
        x.requires_grad
        or any(core.requires_grad for core in cores)
        or (bias is not None and bias.requires_grad)
    )


def _run_twoblock(
    x: torch.Tensor,
    cores: Sequence[torch.Tensor],
    bias: torch.Tensor | None,
    plan: Plan,
    batch: int,
) -> torch.Tensor:
    needs_grad = _needs_grad(x, cores, bias)
    # torch.jit.trace records ATen operations: no cache, no custom autograd.Function. So does
    # torch.export: Dynamo (strict) runs an autograd.Function's forward without gradients,
    # and the exported program's output would have none.
    tracing = jit_tracing() or _exporting()
    same_dtype = cores[0].dtype == x.dtype  # else autocast: blocks rounded to x's dtype
    if not needs_grad and not tracing and same_dtype and not torch.compiler.is_compiling():
        # Inference: the forward alone, without an autograd.Function around it.
        return _twoblock_inference(x, cores, bias, plan, _cached_entry(cores))
    # Where one plan serves every batch size, a Z kept for the example's size could be far
    # larger at others: not kept.
    keep = not _one_plan(batch) and _known_at_least(plan.save_max_batch, batch)
    if plan.batched_first:
        first, second = _merged(lambda: _core_blocks(cores, plan.split), cores, x.dtype)
        layout = _batched_layout(cores, plan, keep)
    else:
        left, right = _merged(lambda: _rank_middle_blocks(cores, plan.split), cores, x.dtype)
        m1, _, n1 = left.shape  # (M1, r, N1)
        m2, _, n2 = right.shape  # (M2, r, N2)
        first, second = (right, left) if plan.first == "right" else (left, right)
        layout = TwoBlockLayout(m1, m2, n1, n2, plan.first, keep, plan.chunks, plan.second_from_z)
    if not needs_grad or tracing:  # under torch.compile, or autograd through the trace's ops
        return two_block_forward(x, first, second, bias, layout._replace(keep=False))[0]
    # Dynamo cannot trace a custom jvp: compiled code gets the Function without one.
    product = TwoBlockProduct if torch.compiler.is_compiling() else EagerTwoBlockProduct
    y, _ = product.apply(x, first, second, bias, layout)  # type: ignore[no-untyped-call]
    return y  # type: ignore[no-any-return]


def _rank_middle_blocks(
    cores: Sequence[torch.Tensor], split: int
) -> tuple[torch.Tensor, torch.Tensor]:
    return rank_middle_block(cores[:split]), rank_middle_block(cores[split:])


def _core_blocks(cores: Sequence[torch.Tensor], split: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The blocks in the cores' own layout: ``(M_1, N_1 r)`` and ``(r M_2, N_2)``."""
    _, m1, n1, r = (left := _merge_run(cores[:split])).shape
    _, m2, n2, _ = (right := _merge_run(cores[split:])).shape
    return left.reshape(m1, n1 * r), right.reshape(r * m2, n2)


def _modes(cores: Sequence[torch.Tensor]) -> tuple[list[int], list[int]]:
    """The cores' input and output modes, unchecked (lists of ints: Dynamo traces them)."""
    return [int(core.shape[1]) for core in cores], [int(core.shape[2]) for core in cores]


def _split_sizes(
    in_modes: Sequence[int], out_modes: Sequence[int], split: int
) -> tuple[int, int, int, int]:
    """``(M_1, M_2, N_1, N_2)``: the input and output sizes of the blocks of a split."""
    return (
        math.prod(in_modes[:split]),
        math.prod(in_modes[split:]),
        math.prod(out_modes[:split]),
        math.prod(out_modes[split:]),
    )


def _batched_layout(cores: Sequence[torch.Tensor], plan: Plan, keep: bool) -> TwoBlockLayout:
    """The :class:`TwoBlockLayout` of a ``batched_first`` plan."""
    m1, m2, n1, n2 = _split_sizes(*_modes(cores), plan.split)
    return TwoBlockLayout(m1, m2, n1, n2, "left", keep, plan.chunks, batched=True)


# Inference on the CPU reuses the blocks while the cores are unchanged: at small batches,
# merging the cores costs more than the product itself. An entry holds copies of all cores;
# it is used only if every core still equals its copy (torch.equal: exact, and cheap next to
# a merge), so no change made to the cores, in place, through .data or by reassignment, can
# go unseen. It also holds the chain's shapes, so a call that finds it skips the checks of
# core_shapes. Entries are keyed weakly by the first core's storage (they go with the layer)
# and its place in it (cores that are views of one flat buffer each get their own), not by
# the core itself: a weak reference to a Parameter would stop torch.utils.swap_tensors, and
# with it Module.to() under torch.__future__.set_swap_module_params_on_conversion(True).
class _InferenceEntry:
    __slots__ = (
        "bias_shape",
        "blocks",
        "dtype",
        "in_features",
        "out_features",
        "runners",
        "saved",
        "shapes",
    )

    def __init__(self, cores: Sequence[torch.Tensor]) -> None:
        self.saved = [c.detach().clone() for c in cores]
        self.shapes = core_shapes(cores)
        self.in_features = math.prod(self.shapes[0])
        self.out_features = math.prod(self.shapes[1])
        self.bias_shape = torch.Size([self.out_features])
        self.dtype = cores[0].dtype
        # One pair of blocks per split and layout, shared by the plans that use it.
        self.blocks: dict[tuple[int, bool], tuple[torch.Tensor, torch.Tensor]] = {}
        # Keyed by what inference depends on, not by the Plan (hashing all its fields each
        # call costs more than this lookup).
        self.runners: dict[tuple[int, str, bool, int], _Inference] = {}

    def matches(self, cores: Sequence[torch.Tensor]) -> bool:
        return len(cores) == len(self.saved) and all(
            c.dtype == saved.dtype and torch.equal(c, saved)
            for c, saved in zip(cores, self.saved, strict=True)
        )

    def inference(self, plan: Plan) -> _Inference:
        """The inference of the two-block ``plan``, from blocks merged once."""
        key = (plan.split, plan.first, plan.batched_first, plan.chunks)
        runner = self.runners.get(key)
        if runner is None:
            layout = (plan.split, plan.batched_first)
            if layout not in self.blocks:
                merge = _core_blocks if plan.batched_first else _rank_middle_blocks
                self.blocks[layout] = merge(self.saved, plan.split)
            in_modes, out_modes, _ = self.shapes
            runner = _inference_runner(plan, self.blocks[layout], in_modes, out_modes)
            self.runners[key] = runner
        return runner


_block_cache: WeakIdKeyDictionary = WeakIdKeyDictionary()  # storage -> {place: entry}
_cache_lock = threading.Lock()
_Place = tuple["int | torch.SymInt", torch.Size, tuple[int, ...]]


def _cache_slot(core: torch.Tensor) -> tuple[dict[_Place, _InferenceEntry], _Place] | None:
    """The entries kept for ``core``'s storage and the key of its place there, if any."""
    try:
        storage = core.untyped_storage()
    except (RuntimeError, NotImplementedError):  # a tensor subclass without one: no cache
        return None
    slots: dict[_Place, _InferenceEntry] | None = _block_cache.get(storage)  # type: ignore[no-untyped-call]
    if slots is None:
        with _cache_lock:  # two threads' first calls must not each make one
            slots = _block_cache.get(storage)  # type: ignore[no-untyped-call]
            if slots is None:
                slots = _block_cache[storage] = {}
    return slots, (core.storage_offset(), core.shape, core.stride())


def _inference_entry(cores: Sequence[torch.Tensor]) -> _InferenceEntry | None:
    """The cache entry of ``cores`` if they are unchanged since it was made, else ``None``."""
    slot = _cache_slot(cores[0])
    entry = None if slot is None else slot[0].get(slot[1])
    return entry if entry is not None and entry.matches(cores) else None


def _cached_entry(cores: Sequence[torch.Tensor]) -> _InferenceEntry | None:
    """The cache entry of ``cores``, made anew if they changed; ``None`` where none is kept."""
    # Not on devices, where a comparison would wait for the device; not for tensors that carry
    # tangents or are wrapped by torch.func, whose blocks must be computed from them.
    if cores[0].device.type != "cpu" or not plain_tensors(*cores):
        return None
    slot = _cache_slot(cores[0])
    if slot is None:
        return None
    slots, place = slot
    entry = slots.get(place)
    if entry is None or not entry.matches(cores):
        entry = _InferenceEntry(cores)
        # Threads calling layers at once (a model server) share these dicts: a lookup is
        # atomic, but dropping the oldest entries is a read and a delete.
        with _cache_lock:
            if place not in slots:
                _make_room(slots, place)
            slots[place] = entry
    return entry


# A storage keeps entries for up to _PLACES_PER_STORAGE places, and for more while the first
# cores at those places do not overlap: each is then a layer of its own (the parameters of a
# model made views of one flat buffer by vector_to_parameters, a bank of layers), and there
# can be no more of them than the buffer holds. Views made afresh at ever new, overlapping
# places of one long-lived buffer would otherwise keep an entry per place for as long as the
# buffer lives. (A bound on the count alone made the 33rd layer of a flat buffer evict the
# first, so that every call merged its blocks again: 2.3x the time at batch 1.)
_PLACES_PER_STORAGE = 32


def _span(place: _Place) -> tuple[int, int]:
    """The elements ``[start, end)`` of its storage that a tensor at ``place`` can touch."""
    offset, shape, stride = place
    start = int(offset)
    if 0 in shape:
        return start, start
    return start, start + 1 + sum((n - 1) * s for n, s in zip(shape, stride, strict=True))


def _make_room(slots: dict[_Place, _InferenceEntry], place: _Place) -> None:
    """Under the lock: drop a storage's oldest entries if ``place`` overlaps a held one."""
    if len(slots) < _PLACES_PER_STORAGE:
        return
    start, end = _span(place)
    if all(end <= lo or hi <= start for lo, hi in map(_span, slots)):
        return  # a layer of its own
    while len(slots) >= _PLACES_PER_STORAGE:
        del slots[next(iter(slots))]


def _operands(
    left: torch.Tensor, right: torch.Tensor, side: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """``F`` as ``(M_f, r N_f)`` and ``S^T`` as ``(N_s, M_s r)``: views of the blocks."""
    first, second = (right, left) if side == "right" else (left, right)
    mf, r, nf = first.shape
    ms, _, ns = second.shape
    return first.reshape(mf, r * nf), second.reshape(ms * r, ns).t()


def _twoblock_prepared(
    first: torch.Tensor,
    second_t: torch.Tensor,
    side: str,
    x: torch.Tensor,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """Unchunked inference from the operands of :func:`_operands`: ``(B, M)`` to ``(B, N)``.

    The steps of :func:`ttlayers.autograd.two_block_forward`, with as few operator calls as
    possible: at small batches their overhead is most of the time.
    """
    batch = x.shape[0]
    mf, rnf = first.shape
    ns, msr = second_t.shape
    ms = x.shape[1] // mf
    nf = rnf // (msr // ms)
    if side == "right":
        xs = x.reshape(batch * ms, mf)  # a view unless the input is not laid out by rows
    elif batch == 1:  # the row as an (M_f, M_s) matrix, transposed: a view
        xs = x.reshape(mf, ms).t()
    else:  # the rows of x as (M_f, M_s) matrices: transposed
        xs = x.reshape(batch, mf, ms).transpose(1, 2).reshape(batch * ms, mf)
    z = torch.mm(xs, first)  # (B Ms, r Nf)
    if batch == 1:  # one product for the output, in the layout of the output
        z1 = z.view(msr, nf)
        if side == "right":  # y (N_s, N_f) = S^T Z
            a, b, shape = second_t, z1, (ns, nf)
        else:  # y (N_f, N_s) = Z^T S
            a, b, shape = z1.t(), second_t.t(), (nf, ns)
        y = torch.mm(a, b) if bias is None else torch.addmm(bias.reshape(shape), a, b)
        return y.view(1, ns * nf)
    s_t = second_t.unsqueeze(0).expand(batch, ns, msr)
    z3 = z.view(batch, msr, nf)
    if bias is None:
        y = torch.bmm(s_t, z3)  # (B, Ns, Nf)
    else:  # the bias as the product's (N_s, N_f), added by the batched product
        bias_sf = bias.reshape(ns, nf) if side == "right" else bias.reshape(nf, ns).t()
        y = torch.baddbmm(bias_sf.unsqueeze(0).expand(batch, ns, nf), s_t, z3)
    if side == "left":
        y = y.transpose(1, 2)
    return y.reshape(batch, ns * nf)


def _batched_prepared(
    a: torch.Tensor, s: torch.Tensor, x: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """Unchunked inference of a ``batched_first`` plan, ``(B, M)`` to ``(B, N)``.

    The steps of :func:`ttlayers.autograd.two_block_forward` for that layout, from the blocks
    of :func:`_core_blocks`, in as few operator calls as possible (as
    :func:`_twoblock_prepared`).
    """
    batch = x.shape[0]
    m1, n1r = a.shape
    rm2, n2 = s.shape
    m2 = x.shape[1] // m1
    n1 = n1r * m2 // rm2
    if batch == 1:  # Z = A^T x, then y = Z S (+ bias) in the layout of the output
        z = torch.mm(a.t(), x.reshape(m1, m2)).view(n1, rm2)
        y = torch.mm(z, s) if bias is None else torch.addmm(bias.reshape(n1, n2), z, s)
        return y.view(1, n1 * n2)
    z = torch.bmm(a.t().unsqueeze(0).expand(batch, n1r, m1), x.reshape(batch, m1, m2))
    z2 = z.view(batch * n1, rm2)
    if bias is None:
        return torch.mm(z2, s).view(batch, n1 * n2)
    if x.dtype in (torch.float16, torch.bfloat16):  # one rounding, as in F.linear
        return torch.addmm(bias.reshape(n1, n2).repeat(batch, 1), z2, s).view(batch, n1 * n2)
    y = torch.mm(z2, s).view(batch, n1, n2)
    # In place for plain tensors: no second output-sized allocation.
    y = y.add_(bias.reshape(n1, n2)) if plain_tensors(y, bias) else y + bias.reshape(n1, n2)
    return y.view(batch, n1 * n2)


def _chunked_inference(
    first: torch.Tensor,
    second: torch.Tensor,
    layout: TwoBlockLayout,
    x: torch.Tensor,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    return two_block_forward(x, first, second, bias, layout)[0]


_Inference = Callable[[torch.Tensor, "torch.Tensor | None"], torch.Tensor]


def _inference_runner(
    plan: Plan,
    blocks: tuple[torch.Tensor, torch.Tensor],
    in_modes: Sequence[int],
    out_modes: Sequence[int],
) -> _Inference:
    """``(x, bias) -> y``: inference by the two-block ``plan`` from ``blocks``, ``(B, M)`` rows.

    ``blocks``: those of :func:`_core_blocks` for a ``batched_first`` plan, else of
    :func:`_rank_middle_blocks`. Everything but the input and the bias is bound here, once.
    """
    m1, m2, n1, n2 = _split_sizes(in_modes, out_modes, plan.split)
    if plan.batched_first:
        a, s = blocks
        if plan.chunks == 1:
            return partial(_batched_prepared, a, s)
        layout = TwoBlockLayout(m1, m2, n1, n2, "left", False, plan.chunks, batched=True)
        return partial(_chunked_inference, a, s, layout)
    left, right = blocks
    if plan.chunks == 1:
        return partial(_twoblock_prepared, *_operands(left, right, plan.first), plan.first)
    first, second = (right, left) if plan.first == "right" else (left, right)
    layout = TwoBlockLayout(m1, m2, n1, n2, plan.first, False, plan.chunks)
    return partial(_chunked_inference, first, second, layout)


def _twoblock_inference(
    x: torch.Tensor,
    cores: Sequence[torch.Tensor],
    bias: torch.Tensor | None,
    plan: Plan,
    entry: _InferenceEntry | None,
) -> torch.Tensor:
    """Inference by a two-block plan, from the cached blocks of ``entry`` when there is one."""
    if entry is not None:
        return entry.inference(plan)(x, bias)
    merge = _core_blocks if plan.batched_first else _rank_middle_blocks
    return _inference_runner(plan, merge(cores, plan.split), *_modes(cores))(x, bias)


def _run_chain(
    x: torch.Tensor,
    cores: Sequence[torch.Tensor],
    bias: torch.Tensor | None,
    plan: Plan,
    batch: int,
) -> torch.Tensor:
    in_modes, out_modes = _modes(cores)
    out_features = math.prod(out_modes)
    cores = [core.to(x.dtype) for core in cores]  # under autocast; no copy otherwise
    y = run_chain(plan, [x.reshape(batch, *in_modes), *cores])  # (B, n_1, ..., n_d)
    y = y.reshape(batch, out_features)
    return y if bias is None else y + bias


_Runner = Callable[
    [torch.Tensor, Sequence[torch.Tensor], "torch.Tensor | None", Plan, int], torch.Tensor
]
_RUNNERS: dict[str, _Runner] = {
    "dense": _run_dense,
    "twoblock": _run_twoblock,
    "chain": _run_chain,
}


# --- choosing and running -----------------------------------------------------------------------


_F = TypeVar("_F", bound=Callable[..., object])


def _assume_constant_result(fn: _F) -> _F:
    """Mark ``fn`` as ``torch.compiler.assume_constant_result`` does, without importing Dynamo.

    That decorator imports ``torch._dynamo`` (about 2 s, as long as importing torch itself)
    only to set this attribute; ``import ttlayers`` should not pay that when nothing is
    compiled. tests/test_ecosystem.py checks that the attribute is all the decorator sets.
    """
    fn._dynamo_marked_constant = True  # type: ignore[attr-defined]
    return fn


@_assume_constant_result
def _plan_table_constant(
    in_modes: tuple[int, ...],
    out_modes: tuple[int, ...],
    ranks: tuple[int, ...],
    dtype: torch.dtype,
    device_type: str,
    training: bool,
) -> tuple[tuple[int, Plan], ...]:
    # Under torch.compile the table is computed while tracing and kept as a constant of the
    # graph: it depends only on these arguments, which come from shapes and flags that Dynamo
    # guards on, and on the CPU thread count, read here because Dynamo cannot trace
    # torch.get_num_threads. (The mark sits on a plain function: Dynamo looks through
    # lru_cache.)
    return cached_plan_table(
        in_modes, out_modes, ranks, dtype, device_type, _threads(device_type), training
    )


def _graph_plan(
    batch: int | torch.SymInt,
    in_modes: tuple[int, ...],
    out_modes: tuple[int, ...],
    ranks: tuple[int, ...],
    dtype: torch.dtype,
    device_type: str,
    training: bool,
) -> Plan:
    """The plan of a graph that serves many batch sizes (see :func:`_one_plan`).

    One of up to three ranges of batch sizes holds the size the graph is traced at (see
    :func:`_graph_bounds`). Below the first bound, the best plan without chunks for that
    size; from a bound up to the next, eager code's plan for that size with at most half as
    many chunks as the bound, so that every chunk has two rows or more. (A chunk's products
    guard on its size being neither 0 nor 1, the sizes Dynamo specializes: a batch that
    made a chunk of one row or none would compile a graph, traced at that small size, that
    replaced the chunked one for every later size of the range.) A compiled graph guards on
    the bounds: at most three graphs per layer shape. An exported graph (dynamic or strict;
    a static non-strict export runs eager code's plan), which must take every size without a
    guard, and a size known only from the data, take the plans without chunks. Plans differ
    in speed and memory, and in their results only by rounding.
    """
    example = _example_size(batch)
    table = _plan_table_constant(in_modes, out_modes, ranks, dtype, device_type, training)
    cap = 1
    if not _exporting():
        for bound in _graph_bounds(table):
            if not _known_at_least(batch, bound):
                break
            cap = bound // 2
    return _one_plan_constant(
        example, in_modes, out_modes, ranks, dtype, device_type, training, cap
    )


def _graph_bounds(table: tuple[tuple[int, Plan], ...]) -> list[int]:
    """The lowest batch sizes of a compiled graph's chunked ranges: none, one or two.

    The first is the table's first chunked size, rounded up to a power of two (at least 4,
    so that its range may chunk), where the first bounds of a model's other layer shapes
    tend to fall too (each distinct bound is one more graph Dynamo may compile, and it
    compiles at most 8 per frame, batch 1 and the first static graph included). The second,
    only where the first is below it and the table chunks more than the first, is
    ``_GRAPH_TOP_BOUND``, one for every layer shape.

    With the first range alone, capped at its lowest size, a training step of 4096 x 4096
    (8, 8, 8, 8) at rank 16 and 256 rows compiled to a plan of at most 8 chunks (the table
    chunks from 6 rows): unchunked, which took 1.5 times eager code's 32 chunks (142 ms
    against 93 ms on the project's 2-core CPU). A second bound per layer shape at the
    table's first size of more chunks than the first bound let three layer shapes that chunk
    early give 7 ranges, and a run of small batch sizes reached Dynamo's limit.
    """
    first = next((lowest for lowest, plan in table if plan.chunks > 1), None)
    if first is None:
        return []
    first = max(4, 1 << (first - 1).bit_length())  # the range's plans get up to first // 2
    if first < _GRAPH_TOP_BOUND and any(plan.chunks > first for _, plan in table):
        return [first, _GRAPH_TOP_BOUND]
    return [first]


# From this batch size up, a compiled graph may chunk 64 times, half the chunks a cost model
# makes for its cache by default (CostModel.max_chunks).
_GRAPH_TOP_BOUND = 128


@_assume_constant_result
def _one_plan_constant(
    example_size: int,
    in_modes: tuple[int, ...],
    out_modes: tuple[int, ...],
    ranks: tuple[int, ...],
    dtype: torch.dtype,
    device_type: str,
    training: bool,
    max_chunks: int,
) -> Plan:
    # A constant of the graph for Dynamo, as the plan table is above. Chunked: eager code's
    # plan for the example's size, with at most max_chunks chunks. Not the cost model's best
    # plan of at most max_chunks: it ranks larger chunks, past the cache, too slow and an
    # unchunked plan's page faults not at all. For a training step of 4096 x 4096
    # (8, 8, 8, 8) at rank 16 and 96 rows, capped at 4 chunks, that plan is unchunked: at one
    # thread 1.56 times the fastest chunk count, where 4 chunks took 1.11 times
    # (benchmarks/bench_chunks.py). Capped, a plan chunked for the memory bound may exceed it
    # (by up to 1.2 times, at 2^16 rows and more). Unchunked: the best plan without chunks.
    if max_chunks > 1:
        plan = select_plan(example_size, in_modes, out_modes, ranks, dtype, device_type, training)
        return replace(plan, chunks=min(plan.chunks, max_chunks))
    return choose_plan(
        example_size,
        in_modes,
        out_modes,
        ranks,
        dtype=dtype,
        device_type=device_type,
        threads=_threads(device_type),
        training=training,
        max_chunks=1,
    )


def _threads(device_type: str) -> int:
    """The thread count plans depend on: ``torch.get_num_threads()`` on CPUs, else 1."""
    return torch.get_num_threads() if device_type == "cpu" else 1


def _one_plan(batch: int | torch.SymInt) -> bool:
    """Whether one plan, chosen without a guard on ``batch``, must serve every batch size.

    So it is for a graph that Dynamo traces (``torch.compile``, strict ``torch.export``) and
    for ``torch.export`` with a dynamic batch dimension. Compared with the plan table's
    bounds, a symbolic batch size gives guards: ``torch.export`` rejects them for a dimension
    declared dynamic, and ``torch.compile`` compiles a graph for every range they bound, so
    that a model fed many batch sizes reached Dynamo's recompilation limit (a hard error with
    ``fullgraph=True``). Dynamo shows a symbolic size as an int, so under Dynamo every batch
    size counts as dynamic: a static graph gets the plan of its own size.
    """
    if torch.compiler.is_dynamo_compiling():
        return True
    return _exporting() and isinstance(batch, torch.SymInt)


def _exporting() -> bool:
    """Whether ``torch.export`` is tracing (``torch.compiler.is_exporting``; false without it)."""
    exporting = getattr(torch.compiler, "is_exporting", None)
    return exporting is not None and bool(exporting())


def _example_size(batch: int | torch.SymInt) -> int:
    """The example's value of a symbolic size, read without adding a guard.

    A size known only from the data (unbacked: the rows of ``x[mask]``) has no example value:
    1 (moved into the range ``torch._check`` gave the size, if any), whose plan suits small
    batches, which such sizes often are (PyTorch's own fallback, 8,192 rows, would give a
    plan of 128 chunks, nearly all empty for a few hundred rows).
    """
    from torch.fx.experimental import symbolic_shapes

    hint = getattr(symbolic_shapes, "optimization_hint", None)
    if hint is not None:
        return int(hint(batch, fallback=1))
    old_hint = getattr(symbolic_shapes, "hint_int", None)
    # Without either (an older torch), int() specializes the size: export reports the guard.
    return int(old_hint(batch, fallback=1)) if old_hint is not None else int(batch)


def select_plan(
    batch: int | torch.SymInt,
    in_modes: tuple[int, ...],
    out_modes: tuple[int, ...],
    ranks: tuple[int, ...],
    dtype: torch.dtype,
    device_type: str,
    training: bool,
) -> Plan:
    """The planner's choice for this batch size, read off the cached plan table.

    On CPUs the plan also depends on ``torch.get_num_threads()``. A symbolic batch size (a
    graph traced with symbolic shapes outside Dynamo and ``torch.export``) is only compared
    with the table's bounds, which become guards. Under ``torch.compile`` and
    ``torch.export``, :func:`tt_linear` chooses one plan for every batch size instead.
    """
    table = _plan_table_constant(in_modes, out_modes, ranks, dtype, device_type, training)
    plan: Plan = table[0][1]
    at_least = _known_at_least if symbolic_size(batch) else operator.ge  # decided once
    for lowest, candidate in table[1:]:
        if at_least(batch, lowest):
            plan = candidate
    return plan


def _known_at_least(size: int | torch.SymInt, bound: int | torch.SymInt) -> bool:
    """``size >= bound``, with a guard on a symbolic size; false where no guard can decide.

    Under ``torch.compile`` a size computed from data (unbacked: the rows of ``x[mask]``)
    cannot be compared; the smaller plan, or not keeping the intermediate, is right for any
    size. (Dynamo shows symbolic sizes as ints.)
    """
    if not symbolic_size(size, bound):
        return size >= bound
    return guard_or_false(size >= bound)


def _autocast(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # As autocast casts the arguments of F.linear: float64 tensors keep their dtype.
    return tensor if tensor.dtype == torch.float64 else tensor.to(dtype)


def tt_linear(
    input: torch.Tensor,
    cores: Sequence[torch.Tensor],
    bias: torch.Tensor | None = None,
    *,
    plan: Plan | None = None,
) -> torch.Tensor:
    """``y = input W^T + bias`` for the TT matrix ``W`` of ``cores``, as ``F.linear`` does.

    Under ``torch.autocast`` the input, the cores and the bias are cast to the autocast dtype,
    except float64 ones, and the products run in it (accumulating in float32), as ``F.linear``
    does. The cores of a dense or two-block plan are merged into their blocks at their own
    precision first, so each block is rounded once, as ``nn.Linear``'s weight is.

    Args:
        input: Shape ``(*, prod m_k)``; or a nested tensor of such tensors (the result is
            nested too, of the same layout).
        cores: ``d`` tensors, core ``k`` of shape ``(r_k, m_k, n_k, r_{k+1})``, ``r_0 = r_d = 1``.
        bias: Shape ``(prod n_k,)``, or ``None``.
        plan: How to contract (one of :func:`ttlayers.planner.candidate_plans`); by default
            the planner's choice for this input.

    Returns:
        Shape ``(*, prod n_k)``.

    Raises:
        TypeError: If the input, the cores or the bias are not real floating-point tensors of
            one dtype, the cores are not all on one device, or ``plan`` is not a
            :class:`~ttlayers.planner.Plan` (or a field of it has the wrong type).
        ValueError: If the cores do not chain, the input's last dimension is not
            ``prod m_k``, the bias's shape is not ``(prod n_k,)``, the input or the bias
            is on another device than the cores, or ``plan`` does not fit the chain.
    """
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"tt_linear expected input to be a tensor; got {type(input).__name__}.")
    if input.layout not in (torch.strided, torch.jagged):  # nested tensors are one of these
        raise TypeError(
            f"tt_linear expected a dense or nested input; got layout {input.layout} (a sparse "
            "input can be made dense with input.to_dense())."
        )
    if not isinstance(cores, (list, tuple)):  # a ParameterList, a generator; or one tensor
        cores = core_list(cores)
    if input.is_nested:
        # F.linear takes nested tensors, and nn.TransformerEncoder packs a padded batch into
        # one in eval mode. Jagged: the rows are one tensor, and the result keeps the
        # input's offsets, so its ragged size is the input's (x + layer(x) works) and
        # torch.compile traces it. Strided: the rows of all its tensors, in one call.
        if input.layout == torch.jagged:
            jagged: Any = input  # a NestedTensor, whose offsets() and lengths() Tensor lacks
            # The sequence lengths the input has cached, as F.linear's result keeps them: a
            # compiled backward expects its gradient to carry the same ones.
            cached = {
                key: value
                for key in ("min_seqlen", "max_seqlen")
                if (value := getattr(jagged, f"_maybe_{key}", None)) is not None
            }
            return torch.nested.nested_tensor_from_jagged(
                tt_linear(jagged.values(), cores, bias, plan=plan),
                offsets=jagged.offsets(),
                lengths=jagged.lengths(),
                jagged_dim=getattr(jagged, "_ragged_idx", 1),
                **cached,
            )
        tensors = input.unbind()
        width = math.prod(core_shapes(cores)[0])  # which also checks the cores
        if not tensors:
            # No tensor to take the result's dtype from: an empty call checks the input's
            # dtype and device against the cores' and gives both.
            empty = torch.empty(0, width, dtype=input.dtype, device=input.device)
            y = tt_linear(empty, cores, bias, plan=plan)
            return torch.nested.nested_tensor([], dtype=y.dtype, device=y.device)
        if any(t.dim() == 0 or t.shape[-1] != width for t in tensors):
            # Each through the layer, whose checks name what is wrong (and the tensor).
            parts = [tt_linear(part, cores, bias, plan=plan) for part in tensors]
            return torch.nested.as_nested_tensor(parts, layout=input.layout)
        # One call on all the rows: per tensor, the call's fixed costs (merging the cores,
        # choosing the plan, checking the cores are unchanged) were paid once per sequence.
        counts = [math.prod(t.shape[:-1]) for t in tensors]
        rows = torch.cat(
            [t.reshape(count, t.shape[-1]) for t, count in zip(tensors, counts, strict=True)]
        )
        y = tt_linear(rows, cores, bias, plan=plan)
        parts = [
            part.view(*t.shape[:-1], y.shape[-1])
            for part, t in zip(torch.split(y, counts), tensors, strict=True)
        ]
        return torch.nested.as_nested_tensor(parts, layout=input.layout)
    device_type = input.device.type
    if (
        plan is None
        and device_type == "cpu"
        and not torch.is_grad_enabled()
        and not autocast_enabled(device_type)
        and plain_tensors(input, *cores)
    ):
        # The fast path of inference: unchanged cores, their blocks at hand (see above).
        entry = _inference_entry(cores)
        if (
            entry is not None
            and input.dim() > 0
            and input.shape[-1] == entry.in_features
            and input.dtype == entry.dtype
            and (
                bias is None
                or (
                    isinstance(bias, torch.Tensor)
                    and bias.shape == entry.bias_shape
                    and bias.dtype == entry.dtype
                    and bias.device.type == "cpu"
                )
            )
        ):  # else the general path, whose checks name what is wrong
            # At batch 1 the Python of this path is a good part of the call: it does no more
            # than it must (a 2-D input, already (B, M), is not reshaped).
            two_d = input.dim() == 2
            batch = input.shape[0] if two_d else math.prod(input.shape[:-1])
            chosen = select_plan(batch, *entry.shapes, input.dtype, "cpu", False)
            if chosen.kind == "twoblock":  # else: the general path
                run = entry.inference(chosen)
                if two_d:
                    return run(input, bias)
                y = run(input.reshape(batch, entry.in_features), bias)
                return y.reshape(*input.shape[:-1], entry.out_features)
    in_modes, out_modes, ranks = core_shapes(cores)
    check_real_floating(cores[0].dtype, "the cores' dtype")
    # All of them: a core of another dtype failed inside a product, and a meta core among
    # CPU ones gave uninitialized memory (a checkpoint loaded with assign=True that lacks it).
    check_same_kind(cores)
    check_real_floating(input.dtype, "input's dtype")
    m, n = math.prod(in_modes), math.prod(out_modes)
    if input.dim() == 0 or input.shape[-1] != m:
        raise ValueError(
            f"tt_linear expected input of shape (*, {m}), the product of the cores' input modes "
            f"{in_modes}; got shape {tuple(input.shape)}."
        )
    check_bias(bias, n)
    # Products of meta and CPU tensors do not check devices: without this, a meta input to a
    # CPU layer gave uninitialized memory, and a CPU input to a meta layer a meta result.
    device = cores[0].device
    if input.device != device or (bias is not None and bias.device != device):
        raise ValueError(
            f"tt_linear expected the input and the bias on the cores' device, {device}; got "
            f"input on {input.device}" + ("" if bias is None else f", bias on {bias.device}") + "."
        )
    if plan is not None:
        check_plan(plan, len(cores))
    batch_shape = input.shape[:-1]
    batch = math.prod(batch_shape)
    x = input.reshape(batch, m)  # (B, M)
    cores_dtype = cores[0].dtype  # what the products run in
    if autocast_enabled(device_type):
        # The cores are rounded where they are merged, at the runners (see _merged).
        dtype = torch.get_autocast_dtype(device_type)
        x = _autocast(x, dtype)
        cores_dtype = cores_dtype if cores_dtype == torch.float64 else dtype
        bias = None if bias is None else _autocast(bias, dtype)
    if x.dtype != cores_dtype or (bias is not None and bias.dtype != x.dtype):
        raise TypeError(
            "tt_linear expected the input, the cores and the bias in one dtype; got input "
            f"{x.dtype}, cores {cores_dtype}"
            + ("" if bias is None else f", bias {bias.dtype}")
            + (
                " (under torch.autocast, which casts float32 tensors, not float64 ones)."
                if autocast_enabled(device_type)
                else "."
            )
        )
    if plan is None:
        # A trace gets the inference plan whatever the grad mode: torch.jit.trace checks its
        # graph by tracing again, without gradients, and a traced model is for deployment.
        training = not jit_tracing() and _needs_grad(x, cores, bias)
        if _one_plan(batch):
            plan = _graph_plan(batch, in_modes, out_modes, ranks, x.dtype, device_type, training)
        else:
            plan = select_plan(batch, in_modes, out_modes, ranks, x.dtype, device_type, training)
    y = _RUNNERS[plan.kind](x, cores, bias, plan, batch)  # (B, N)
    return y.reshape(*batch_shape, n)
