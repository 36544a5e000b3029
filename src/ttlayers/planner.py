"""Choosing how to multiply an input by a TT matrix: candidate plans and a cost model.

``y = x W^T`` with ``W`` a TT matrix can be computed in many orders, and their costs differ by
orders of magnitude. The cheapest order by floating-point operations (opt_einsum's optimal
path) is often not the fastest: small, badly shaped contractions run far below the speed of
one large matrix product, every permutation of a large intermediate costs memory traffic, and
every operator call costs a fixed overhead. This module enumerates a few kinds of plan, each
a sequence of large matrix products, and picks one per input shape with a cost model of the
device:

- ``"dense"``: contract the cores into ``W`` (cheap: it does not depend on the batch), then one
  matrix product. Best when the ranks are high or the batch is large compared with ``W``.
- ``"twoblock"``: contract cores ``0..split-1`` into a left block and the rest into a right
  block, then multiply the input by the two blocks, one after the other, in two large matrix
  products (see :mod:`ttlayers.autograd`). This is the cheapest order for moderate ranks.
- ``"chain"``: opt_einsum's FLOP-optimal pairwise order, run as two-operand einsums. Best
  for very low ranks, where the blocks themselves would be large.

The cost model counts, for each matrix product, ``2 m k n`` operations at a speed that drops
when the smallest of ``m, k, n`` is small (``speed = peak * d / (d + half_dim)``), plus the
time to move its operands (a fraction of it where they are in the cache); every copy at the
memory bandwidth; a fixed overhead per operator call; and on CPUs, per training step, a few
dozen calls' worth more for the Python around a two-block plan or a chain, and the page
faults of fresh tensors of 32 MiB or more. The constants are per device type: the CPU
defaults are measurements made with :func:`calibrate`, the CUDA ones are read off an H100's
data sheet (see ``DEFAULT_COST_MODELS``); :func:`calibrate` measures your own.

A plan is chosen per (batch size, modes, ranks, dtype, device type, training or not). Plans
are tabulated over batch sizes ``1, 2, 4, ...`` (in training ``1, 2, 3, 4, 6, 8, ...``) once
per layer shape, so choosing one is a few integer comparisons. A traced graph
(``torch.compile``, ``torch.export``) runs one plan at every batch size instead, chosen for
the size it is traced at (see
:func:`ttlayers.contraction.tt_linear` and the performance guide).
"""

from __future__ import annotations

import itertools
import math
import numbers
import operator
import string
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from functools import lru_cache

import opt_einsum
import torch

from ttlayers.shapes import as_rank_argument, check_positive_int, is_int, max_ranks

__all__ = [
    "DEFAULT_COST_MODELS",
    "CostModel",
    "Plan",
    "calibrate",
    "candidate_plans",
    "chain_equation",
    "check_plan",
    "choose_plan",
    "estimate_time",
    "memory_budget",
    "pairwise_steps",
    "plan_memory",
    "plan_table",
    "set_cost_model",
]

_KINDS = ("dense", "twoblock", "chain")


@dataclass(frozen=True)
class Plan:
    """How the forward pass contracts the input with the cores.

    Attributes:
        kind: ``"dense"``, ``"twoblock"`` or ``"chain"`` (see the module docstring).
        split: For ``"dense"`` and ``"twoblock"``: cores ``0..split-1`` form the left block,
            ``split..d-1`` the right block (``0 < split < d``). For ``"dense"``, ``0`` merges
            all the cores left to right (the only split when ``d == 1``).
        first: For ``"twoblock"``: which block meets the input first, ``"left"`` or
            ``"right"``.
        save_max_batch: For ``"twoblock"`` unchunked: the largest batch size for which the
            intermediate product is kept for the backward pass; above it, it is not kept
            (the backward pass does without it, see :mod:`ttlayers.autograd`), so that the
            layer never keeps more memory for training than ``nn.Linear`` (its input, weight
            and weight gradient) and, where :func:`plan_memory` counts the kept
            intermediate, stays within :func:`memory_budget`.
        chunks: For ``"twoblock"``: the rows are processed in this many chunks, so that each
            chunk's intermediate fits in the cache (``CostModel.cache_bytes``) or the plan
            within :func:`memory_budget`; chunked, the intermediate is never kept.
        second_from_z: For ``"twoblock"``: the backward pass forms the gradient of the
            block that meets the input second from the intermediate (kept, or recomputed
            chunk by chunk) instead of from the output gradient pushed back through the
            first block; far cheaper where the first block has few outputs and the second
            few inputs (see :mod:`ttlayers.autograd`).
        batched_first: For ``"twoblock"`` with ``first == "left"``: the left block meets
            each input row, an ``(M_1, M_2)`` matrix, in one batched product, and the right
            block all rows at once, so that no row of the input, the output or their
            gradients is transposed (see :mod:`ttlayers.autograd`); ``second_from_z`` is
            then ``False``, as the right block's gradient always comes from the
            intermediate.
        steps: For ``"chain"``: one ``(i, j, equation)`` per pairwise contraction, in
            opt_einsum's linear path format (operands ``i < j`` are removed and the result
            appended).
        equation: For ``"chain"``: the whole network as one einsum string.
    """

    kind: str
    split: int = 0
    first: str = "right"
    save_max_batch: int = 0
    chunks: int = 1
    steps: tuple[tuple[int, int, str], ...] = ()
    equation: str = ""
    second_from_z: bool = False
    batched_first: bool = False


@dataclass(frozen=True)
class CostModel:
    """Speed constants of one device type, for float32; other dtypes scale ``flops``.

    On CPUs ``flops`` and ``cache_bytes`` are per thread and scale with
    ``torch.get_num_threads()``; on other devices the thread count is 1.

    Attributes:
        flops: Floating-point operations per second of a large matrix product in float32.
        half_dim: A matrix product whose smallest dimension is ``half_dim`` runs at half of
            ``flops``.
        bandwidth: Bytes per second read plus written by a copy or a memory-bound product.
        overhead: Seconds of fixed cost per operator call (dispatch, kernel launch).
        cache_bytes: Size of the intermediate of a two-block product that still runs from the
            cache; larger ones are split into chunks of rows. 0: never split for the cache
            (GPUs, where more kernel launches cost more than the memory traffic they save);
            :func:`memory_budget` may still call for chunks.
        max_chunks: At most this many chunks: each costs a dozen operator calls.
        matrix_overhead: Seconds of fixed cost per matrix of a batched product.
        dtype_speedup: ``(dtype name, factor)`` pairs: the peak of a dtype relative to float32.
        cache_traffic: The fraction of its memory traffic that a product whose operands are
            in the cache still pays (0: none).
    """

    flops: float
    half_dim: float
    bandwidth: float
    overhead: float
    cache_bytes: int = 0
    max_chunks: int = 128
    matrix_overhead: float = 0.0
    dtype_speedup: tuple[tuple[str, float], ...] = ()
    cache_traffic: float = 0.0

    def speedup(self, dtype: torch.dtype) -> float:
        """The peak of ``dtype`` relative to float32.

        Args:
            dtype: A floating-point dtype.

        Returns:
            Its factor from ``dtype_speedup``; 1.0 when not listed.

        Raises:
            TypeError: If ``dtype`` is not a floating-point ``torch.dtype``.
        """
        _check_dtype(dtype)
        name = str(dtype).removeprefix("torch.")
        return dict(self.dtype_speedup).get(name, 1.0)


# "cpu": one thread of a Xeon (Sapphire Rapids, AVX-512, 2 MiB L2 per core), torch 2.13, from
# calibrate() and from timing every plan of the benchmark's layers (bench_linear.py); the
# overhead is that of an operator call with its Python around it, not of a bare matmul.
# "cuda": an H100 (float32 without TF32, PyTorch's default) by its data sheet, launch-bound
# eager calls.
DEFAULT_COST_MODELS: dict[str, CostModel] = {
    "cpu": CostModel(
        flops=1.0e11,
        half_dim=6.0,
        bandwidth=2.0e10,
        overhead=1.5e-5,
        cache_bytes=2**20,
        matrix_overhead=3e-7,
        dtype_speedup=(("float64", 0.5), ("bfloat16", 2.0), ("float16", 0.5)),
        cache_traffic=0.3,
    ),
    "cuda": CostModel(
        flops=4.0e13,
        half_dim=64.0,
        bandwidth=2.5e12,
        overhead=8e-6,
        dtype_speedup=(("float64", 1.0), ("bfloat16", 12.0), ("float16", 12.0)),
    ),
}

_cost_models: dict[str, CostModel] = dict(DEFAULT_COST_MODELS)


def set_cost_model(device_type: str, model: CostModel | None) -> None:
    """Use ``model`` for plans on ``device_type`` from now on (``None``: the default).

    Plans already compiled into a ``torch.compile`` graph keep their choice until Dynamo
    recompiles (``torch._dynamo.reset()``).

    Args:
        device_type: ``"cpu"``, ``"cuda"``, ...: the device type the model is for.
        model: The cost model (from :func:`calibrate`, or edited from
            ``DEFAULT_COST_MODELS``), or ``None`` to go back to the default.

    Raises:
        TypeError: If ``device_type`` is not a string, ``model`` is neither a
            :class:`CostModel` nor ``None``, or a field of it has the wrong type.
        ValueError: If a speed, bandwidth, cost or ``dtype_speedup`` factor of ``model`` is
            not positive and finite (or, for the costs, not ``>= 0``), or ``cache_traffic``
            is not in ``[0, 1]``.
    """
    _check_device_type(device_type)
    given: object = model  # checked as what a caller may pass, not as annotated
    if given is not None and not isinstance(given, CostModel):
        raise TypeError(f"model must be a CostModel or None; got {type(given).__name__}.")
    if model is not None:
        for name in ("flops", "half_dim", "bandwidth", "overhead", "matrix_overhead"):
            if not _is_number(getattr(model, name)):
                raise TypeError(f"model.{name} must be a number; got {getattr(model, name)!r}.")
        if not _is_number(model.cache_traffic):
            raise TypeError(f"model.cache_traffic must be a number; got {model.cache_traffic!r}.")
        for name in ("flops", "half_dim", "bandwidth"):
            if not 0 < getattr(model, name) < math.inf:
                raise ValueError(
                    f"model.{name} must be positive and finite; got {getattr(model, name)!r}."
                )
        for name in ("overhead", "matrix_overhead"):
            if not 0 <= getattr(model, name) < math.inf:
                raise ValueError(
                    f"model.{name} must be >= 0 and finite; got {getattr(model, name)!r}."
                )
        for name in ("cache_bytes", "max_chunks"):
            value: object = getattr(model, name)
            if not is_int(value):
                # A float (cache_bytes=1e6) failed later, in the products of a chunked plan.
                raise TypeError(f"model.{name} must be an int; got {type(value).__name__}.")
        if model.cache_bytes < 0 or model.max_chunks < 1:
            raise ValueError("model.cache_bytes must be >= 0 and model.max_chunks >= 1.")
        if not 0 <= model.cache_traffic <= 1:
            raise ValueError(f"model.cache_traffic must be in [0, 1]; got {model.cache_traffic!r}.")
        _check_speedups(model.dtype_speedup)
        if isinstance(model.dtype_speedup, Mapping):  # kept as pairs: hashable, not shared
            model = replace(model, dtype_speedup=tuple(model.dtype_speedup.items()))
    if model is None and device_type in DEFAULT_COST_MODELS:
        # Replaced, not removed and put back: a thread planning meanwhile finds one.
        _cost_models[device_type] = DEFAULT_COST_MODELS[device_type]
    elif model is None:
        _cost_models.pop(device_type, None)
    else:
        _cost_models[device_type] = model
    cached_plan_table.cache_clear()


def _check_dtype(dtype: object) -> None:
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating-point torch.dtype; got {dtype!r}.")


def _check_chain(
    batch: object,
    in_modes: object,
    out_modes: object,
    ranks: object,
    plan: object = ...,
    dtype: object = torch.float32,
    *,
    device_type: object = "cpu",
    threads: object = 1,
    largest: object = 0,
) -> None:
    """Check the arguments of the public planning functions (private callers skip it).

    Without it, a rank of 0 was a ZeroDivisionError deep in the cost model, and a mode of 0
    or a negative one gave a plan.
    """
    caps = _check_modes(batch, in_modes, out_modes)
    ranks = as_rank_argument(ranks)  # a NumPy vector, as for the modes
    if isinstance(ranks, (str, bytes)) or not isinstance(ranks, Sequence):
        raise TypeError(f"ranks must be a sequence of ints; got {type(ranks).__name__}.")
    if not all(is_int(r) for r in ranks):
        raise TypeError(f"ranks must hold ints; got {tuple(ranks)!r}.")
    if len(ranks) != len(caps) or ranks[0] != 1 or ranks[-1] != 1 or min(ranks) < 1:
        raise ValueError(
            f"ranks must be the {len(caps)} positive bond ranks (1, r_1, ..., 1) of a "
            f"{len(caps) - 1}-core chain; got {tuple(ranks)}."
        )
    if plan is not ...:  # a plan to check: estimate_time's and plan_memory's
        check_plan(plan, len(caps) - 1)
    _check_dtype(dtype)
    _check_device_type(device_type)
    check_positive_int("threads", threads)
    if not is_int(largest) or largest < 0:
        raise (ValueError if is_int(largest) else TypeError)(
            f"largest must be an int >= 0; got {largest!r}."
        )


def _check_device_type(device_type: object) -> None:
    if not isinstance(device_type, str):
        raise TypeError(f'device_type must be a device type such as "cpu"; got {device_type!r}.')
    if not device_type or ":" in device_type:  # "cuda:0" would miss the cost model of "cuda"
        raise ValueError(
            f'device_type must be a device type such as "cpu" or "cuda" (no index); got '
            f"{device_type!r}."
        )


def _check_modes(batch: object, in_modes: object, out_modes: object) -> tuple[int, ...]:
    """Check a batch size and the modes of a chain; its largest useful ranks."""
    if not is_int(batch) or batch < 0:
        raise (ValueError if is_int(batch) else TypeError)(
            f"batch must be an int >= 0; got {batch!r}."
        )
    return max_ranks(in_modes, out_modes)  # type: ignore[arg-type]  # checks the modes


def check_plan(plan: object, num_cores: int) -> None:
    """Check that ``plan`` is a :class:`Plan` for a chain of ``num_cores`` cores.

    Args:
        plan: What to check.
        num_cores: ``d``, the number of cores of the chain.

    Raises:
        TypeError: If ``num_cores`` is not an int, ``plan`` is not a :class:`Plan`, or a
            field of it is not of its type (an int, or a bool for the flags).
        ValueError: If ``num_cores`` is not positive, or the plan's kind is unknown or it
            does not fit the chain (a split outside the chain, fewer than one chunk, steps
            that do not contract this chain).
    """
    num_cores = check_positive_int("num_cores", num_cores)
    if not isinstance(plan, Plan):
        raise TypeError(f"plan must be a Plan; got {type(plan).__name__} {plan!r}.")
    if plan.kind not in _KINDS:
        raise ValueError(
            f"plan must be a Plan of kind {', '.join(map(repr, _KINDS))}; got {plan!r}."
        )
    for field in ("split", "save_max_batch", "chunks"):
        value = getattr(plan, field)
        if not is_int(value):  # a float failed in a product, or only in training
            raise TypeError(f"plan.{field} must be an int; got {value!r} in {plan}.")
    for field in ("second_from_z", "batched_first"):
        if not isinstance(getattr(plan, field), bool):
            raise TypeError(f"plan.{field} must be a bool; got {getattr(plan, field)!r}.")
    if plan.kind == "dense":
        fits = 0 <= plan.split < num_cores  # 0: all cores merged left to right
    elif plan.kind == "twoblock":
        fits = (
            0 < plan.split < num_cores
            and plan.first in ("left", "right")
            # The batched form applies the left block first, and forms dS from Z always.
            and (not plan.batched_first or (plan.first == "left" and not plan.second_from_z))
        )
    else:
        fits = _chain_fits(plan, num_cores)
    if not fits or plan.chunks < 1:
        raise ValueError(
            f"plan {plan} does not fit a chain of {num_cores} cores (see "
            "ttlayers.planner.candidate_plans for the plans of a layer)."
        )


def _chain_fits(plan: Plan, num_cores: int) -> bool:
    """Whether a chain plan contracts the input and ``num_cores`` cores into the output.

    Its equation must be the chain's (estimate_time and plan_memory read the operands'
    sizes off it). Its steps are replayed on the terms of :func:`chain_equation`: each must
    take two current operands ``i < j`` as they are, keep only their letters, sum out only
    letters no other operand (nor the output) still has, and the last must leave the output
    term. (Not cached: only a plan a caller passes is checked, and Dynamo warns at an
    ``lru_cache``.)
    """
    current, output = chain_equation(num_cores)
    steps: object = plan.steps  # checked as what a caller may pass, not as annotated
    if plan.equation != ",".join(current) + "->" + output:
        return False
    if not isinstance(steps, (list, tuple)) or len(steps) != num_cores:
        return False  # one step per core: the input meets them all
    for step in steps:
        if not isinstance(step, (list, tuple)) or len(step) != 3:
            return False
        first, second, equation = step
        if not (is_int(first) and is_int(second) and isinstance(equation, str)):
            return False
        i, j = operator.index(first), operator.index(second)
        if not 0 <= i < j < len(current) or equation.count("->") != 1:
            return False
        inputs, result = equation.split("->")
        if inputs != f"{current[i]},{current[j]}" or len(set(result)) != len(result):
            return False
        right, left = current.pop(j), current.pop(i)
        letters, needed = set(left + right), set(output).union(*current)
        if not (set(result) <= letters and (needed & letters) <= set(result)):
            return False
        current.append(result)
    return current == [output]


def _is_number(value: object) -> bool:
    """Whether ``value`` is a real number as a field may be one: NumPy's too, not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _check_speedups(pairs: object) -> None:
    # A bad factor failed only at the next plan choice (a ZeroDivisionError for 0), or never
    # (a negative or NaN factor ranked plans at random).
    message = "model.dtype_speedup must be (dtype name, positive finite factor) pairs"
    if isinstance(pairs, Mapping):  # read with dict(), so a dict serves as well
        pairs = tuple(pairs.items())
    if not isinstance(pairs, (tuple, list)):
        raise TypeError(f"{message}; got {type(pairs).__name__}.")
    for pair in pairs:
        if not (isinstance(pair, (tuple, list)) and len(pair) == 2 and isinstance(pair[0], str)):
            raise TypeError(f"{message}; got {pair!r}.")
        if not _is_number(pair[1]):
            raise TypeError(f"{message}; got {pair!r}.")
        if not 0 < float(pair[1]) < math.inf:
            raise ValueError(f"{message}; got {pair!r}.")


def _cost_model(device_type: str) -> CostModel:
    # Devices without a model of their own (meta, mps, xpu) are planned like the CPU.
    return _cost_models.get(device_type, _cost_models["cpu"])


# --- the cost of elementary operations --------------------------------------------------------


@dataclass(frozen=True)
class _Costing:
    model: CostModel
    itemsize: int
    speedup: float  # of the dtype, times the threads
    cache_bytes: int
    # On CPUs inference reuses merged blocks (ttlayers.contraction), the Python around the
    # products adds to the time (a GPU runs its kernels meanwhile; see
    # _TWOBLOCK_TRAINING_CALLS), and so do the page faults of large temporaries (see
    # _fault_time).
    on_cpu: bool = False

    def gemm(
        self, batch: int, m: int, k: int, n: int, calls: int = 1, in_cache: bool = False
    ) -> float:
        """``batch`` products ``(m, k) @ (k, n)`` in ``calls`` operator calls.

        Plus the memory traffic of the operands (``cache_traffic`` of it where they are in
        cache): a product with a small inner dimension and a large result spends as long
        writing it as computing it.
        """
        if min(batch, m, k, n) == 0:
            return calls * self.model.overhead
        smallest = min(m, k, n)
        speed = self.model.flops * self.speedup * smallest / (smallest + self.model.half_dim)
        compute = 2.0 * batch * m * k * n / speed
        # The result is written back, which costs reading it first (write-allocate).
        traffic = self.itemsize * batch * (m * k + k * n + 2 * m * n) / self.model.bandwidth
        if in_cache:
            traffic *= self.model.cache_traffic
        fixed = calls * self.model.overhead + (batch - 1) * self.model.matrix_overhead
        return compute + traffic + fixed

    def copy(self, elements: int, calls: int = 1) -> float:
        """A copy (permutation, cast, elementwise op) writing ``elements`` values."""
        return 2.0 * self.itemsize * elements / self.model.bandwidth + calls * self.model.overhead


def _merge_cost(c: _Costing, shapes: Sequence[tuple[int, int, int, int]]) -> float:
    """Forward cost of contracting neighbouring cores into one block, left to right."""
    ra, m, n, r = shapes[0]
    total = 0.0
    for _, p, q, rb in shapes[1:]:
        total += c.gemm(1, ra * m * n, r, p * q * rb) + c.copy(ra * m * p * n * q * rb)
        m, n, r = m * p, n * q, rb
    return total


def _core_shapes(
    in_modes: Sequence[int], out_modes: Sequence[int], ranks: Sequence[int]
) -> list[tuple[int, int, int, int]]:
    return [(ranks[k], in_modes[k], out_modes[k], ranks[k + 1]) for k in range(len(in_modes))]


# --- the cost of each kind of plan ------------------------------------------------------------


def _blocks(
    plan: Plan, in_modes: Sequence[int], out_modes: Sequence[int], ranks: Sequence[int]
) -> tuple[int, int, int, int, int]:
    s = plan.split
    return (
        math.prod(in_modes[:s]),
        math.prod(in_modes[s:]),
        math.prod(out_modes[:s]),
        math.prod(out_modes[s:]),
        ranks[s],
    )


def _twoblock_time(
    c: _Costing,
    plan: Plan,
    batch: int,
    in_modes: Sequence[int],
    out_modes: Sequence[int],
    ranks: Sequence[int],
    training: bool,
) -> float:
    """The steps of :class:`ttlayers.autograd.TwoBlockProduct`, chunk by chunk."""
    m1, m2, n1, n2, r = _blocks(plan, in_modes, out_modes, ranks)
    ms, mf, ns, nf = (m1, m2, n1, n2) if plan.first == "right" else (m2, m1, n2, n1)
    shapes = _core_shapes(in_modes, out_modes, ranks)
    merge = _merge_cost(c, shapes[: plan.split]) + _merge_cost(c, shapes[plan.split :])
    if c.on_cpu and not training:  # reusing the blocks, checking the cores are unchanged
        merge = c.copy(sum(math.prod(shape) for shape in shapes), calls=len(shapes))
    chunks = plan.chunks
    rows = -(-batch // chunks)
    # A chunk's intermediate that fits in the cache costs only cache_traffic of its memory
    # traffic. An unchunked plan in training gets one thread's cache, whatever the threads:
    # each step makes three tensors of Z's size afresh (Z, its per-row products or Q, and
    # dZ), and glibc's malloc hands their pages back to the system at the end of the step
    # and faults them in again on the next (benchmarks/bench_chunks.py: 1,200-2,400 page
    # faults a step and 1.2-1.5 times the fastest chunk count's time, 1024 x 1024 at rank
    # 8, batch 96-127, Z 3-4 MB; in a stack of four such layers, 2 chunks took 0.85-0.99
    # times its time from Z = 1.25 MB, and 0.90-0.95 in a stack of 4096 x 4096 layers from
    # 1.5 MB).
    allowance = c.model.cache_bytes if training and chunks == 1 else 2 * c.cache_bytes
    cached = rows * ms * r * nf * c.itemsize <= allowance
    rows_in, rows_out = batch * m1 * m2, batch * n1 * n2
    glue = c.model.overhead * _TWOBLOCK_TRAINING_CALLS if c.on_cpu and training else 0.0
    if plan.batched_first:
        return (
            glue
            + merge * (3 if training else 1)
            + _batched_time(c, plan, batch, (m1, m2, n1, n2, r), cached, training)
        )
    transposes = plan.first == "left"
    first_product = chunks * c.gemm(1, rows * ms, mf, r * nf, in_cache=cached)
    forward = (
        glue
        + merge
        + first_product
        + chunks * c.gemm(rows, ns, ms * r, nf, in_cache=cached)
        + (c.copy(rows_in) + c.copy(rows_out) if transposes else 0.0)
        + (c.copy(rows_out) if chunks > 1 else 0.0)  # the chunks concatenated
    )
    if not training:
        return forward
    kept = chunks == 1 and batch <= plan.save_max_batch
    if plan.second_from_z:  # Z (again, unless kept), Z and g transposed, one product
        again = 0.0 if kept else c.gemm(1, rows * ms, mf, r * nf, in_cache=cached)
        # Each row of g transposed: measured at 4 times a plain copy, twice c.copy. With the
        # left block first the rows are laid out so already.
        g_rows = 0.0 if transposes else 2 * c.copy(rows * ns * nf)
        # The product reads Z's and g's copies: in the cache only if both fit.
        both = rows * (ms * r * nf + ns * nf) * c.itemsize <= allowance
        grad_second = chunks * (
            again
            + c.copy(rows * ms * r * nf)
            + g_rows
            + c.gemm(1, ms * r, rows * nf, ns, in_cache=both)
        )
    elif kept:  # Z kept: per row, then summed
        grad_second = c.gemm(batch, ms * r, nf, ns, in_cache=cached) + c.copy(batch * ms * r * ns)
    else:  # Q[b] = F g[b]^T per row, then one product with the transposed rows of x
        grad_second = chunks * (
            c.gemm(rows, mf * r, nf, ns, in_cache=cached)
            + c.copy(rows * ms * mf)
            + c.gemm(1, ms, rows * mf, r * ns, in_cache=cached)
        )
    backward = (
        2 * merge
        + grad_second
        + chunks * c.gemm(rows, ms * r, ns, nf, in_cache=cached)  # dZ
        + chunks * c.gemm(1, rows * ms, r * nf, mf, in_cache=cached)  # dx
        + chunks * c.gemm(1, mf, rows * ms, r * nf, in_cache=cached)  # dF
        + (c.copy(rows_in) if transposes else 0.0)
        + (c.copy(rows_out) if transposes and not plan.second_from_z else 0.0)
        + (c.copy(rows_in) if chunks > 1 else 0.0)
        + c.copy(rows_out)  # bias gradient
    )
    return forward + backward


# Operator calls' worth of fixed cost that a training step pays on CPUs beyond the products
# and copies counted (on GPUs, unmeasured: none): for a two-block plan, the Python of its
# autograd.Function (forward, setup_context, backward, and torch's binding of
# Function.apply's arguments) and the views between the products; for a chain, einsum's
# planning and permutes and their backward nodes. At 1 and 2 rows on the project's 2-core
# CPU (1024 -> 1024, 784 -> 1024, 784 -> 256 and 512 -> 512 layers), a two-block training
# step took up to 1.2 ms more than its estimate beyond the dense plan's excess, 0.6 ms
# on average, and a chain 0.04-0.4 ms. Inference showed no excess that changed a choice.
_TWOBLOCK_TRAINING_CALLS = 40
_CHAIN_TRAINING_CALLS = 25


def _batched_time(
    c: _Costing,
    plan: Plan,
    batch: int,
    sizes: tuple[int, int, int, int, int],
    cached: bool,
    training: bool,
) -> float:
    """The products of a ``batched_first`` plan (the autograd module's batched layout)."""
    m1, m2, n1, n2, r = sizes
    chunks = plan.chunks
    rows = -(-batch // chunks)
    z = c.gemm(rows, n1 * r, m1, m2, in_cache=cached)  # Z[b] = A^T x[b]
    bias = c.copy(batch * n1 * n2)  # added to the output, then summed for its gradient
    forward = chunks * (z + c.gemm(1, rows * n1, r * m2, n2, in_cache=cached)) + bias
    if not training:
        return forward
    kept = chunks == 1 and batch <= plan.save_max_batch
    backward = bias + chunks * (
        (0.0 if kept else z)
        + c.gemm(1, r * m2, rows * n1, n2, in_cache=cached)  # dS = Z^T g
        + c.gemm(1, rows * n1, n2, r * m2, in_cache=cached)  # dZ = g S^T
        + c.gemm(rows, m1, n1 * r, m2, in_cache=cached)  # dx[b] = A dZ[b]
        + c.gemm(rows, m1, m2, n1 * r, in_cache=cached)  # x[b] dZ[b]^T, then summed
        + c.copy(rows * m1 * n1 * r)
    )
    return forward + backward


def _dense_time(
    c: _Costing,
    plan: Plan,
    batch: int,
    in_modes: Sequence[int],
    out_modes: Sequence[int],
    ranks: Sequence[int],
    training: bool,
) -> float:
    m, n = math.prod(in_modes), math.prod(out_modes)
    shapes = _core_shapes(in_modes, out_modes, ranks)
    s = plan.split
    if s == 0:
        merge = 0.0
    else:
        m1, m2, n1, n2, r = _blocks(plan, in_modes, out_modes, ranks)
        merge = _merge_cost(c, shapes[:s]) + _merge_cost(c, shapes[s:])
        merge += c.gemm(1, m1 * n1, r, m2 * n2) + c.copy(m * n)
    # Tensors of the size of W made afresh: the merged blocks' product and its copy in the
    # layer's layout; in training also W's gradient and its copy in the blocks' layout. (A
    # single core is W: only its gradient.)
    if len(shapes) == 1:
        fresh = 1 if training else 0
    else:
        fresh = 4 if training else 2
    forward = merge + c.gemm(1, batch, m, n) + fresh * _fault_time(c, m * n)
    if not training:
        return forward
    # Input gradient, weight gradient, and the merge backward (about twice its forward).
    return forward + 2 * c.gemm(1, batch, m, n) + 2 * merge


def _chain_time(
    c: _Costing,
    plan: Plan,
    batch: int,
    in_modes: Sequence[int],
    out_modes: Sequence[int],
    ranks: Sequence[int],
    training: bool,
) -> float:
    shapes = _chain_operand_shapes(batch, in_modes, out_modes, ranks)
    sizes: dict[str, int] = {}
    terms = plan.equation.split("->")[0].split(",")
    for term, shape in zip(terms, shapes, strict=True):
        sizes.update(zip(term, shape, strict=True))
    current = list(terms)
    forward = backward = 0.0
    for i, j, equation in plan.steps:
        inputs, result = equation.split("->")
        left, right = inputs.split(",")
        current.pop(j)
        current.pop(i)
        current.append(result)
        shared = set(left) & set(right)
        batch_dims = shared & set(result)
        contracted = shared - batch_dims
        dims = [
            math.prod(sizes[a] for a in group)
            for group in (batch_dims, set(left) - shared, contracted, set(right) - shared)
        ]
        left_size, right_size = (math.prod(sizes[a] for a in term) for term in (left, right))
        operands = left_size + right_size
        out_size = math.prod(sizes[a] for a in result)
        # torch.einsum permutes both operands into a batched product and the result back,
        # and its backward does so for two products: copies of everything, at least twice.
        # The step's result is fresh, and so are its operands' gradients.
        product = c.gemm(dims[0], dims[1], dims[2], dims[3])
        forward += product + c.copy(operands + out_size, calls=4) + _fault_time(c, out_size)
        backward += 2 * product + c.copy(2 * (operands + out_size), calls=8)
        backward += _fault_time(c, left_size) + _fault_time(c, right_size)
    if not training:
        return forward
    glue = c.model.overhead * _CHAIN_TRAINING_CALLS if c.on_cpu else 0.0
    return forward + backward + glue


def _fault_time(c: _Costing, elements: int) -> float:
    """The page faults of a fresh tensor of ``elements`` on a CPU, where glibc maps it afresh.

    glibc's ``malloc`` serves blocks above its largest mmap threshold (32 MiB on 64-bit
    systems) from fresh mappings and unmaps them when they are freed, so every allocation
    faults in all their pages. A tensor of exactly 32 MiB is one of them: PyTorch's aligned
    allocation asks for a little more. Measured on the project's 2-core CPU: a fresh 64 MiB tensor
    filled in 32 ms, the same tensor refilled in 4 ms (16,385 faults: 1.7 us a page). The
    dense plan of a 4096 x 4096 layer at rank 64 and 128 rows in inference, which makes two
    such tensors a call, took 115 ms against an estimate of 52 ms without them.
    """
    nbytes = elements * c.itemsize
    if not c.on_cpu or nbytes < _MMAP_THRESHOLD_MAX:
        return 0.0
    return nbytes * _FAULT_SECONDS_PER_BYTE


_MMAP_THRESHOLD_MAX = 32 * 2**20
_FAULT_SECONDS_PER_BYTE = 28e-3 / 2**26  # 28 ms for 64 MiB


_TIMERS = {"dense": _dense_time, "twoblock": _twoblock_time, "chain": _chain_time}


def estimate_time(
    plan: Plan,
    batch: int,
    in_modes: Sequence[int],
    out_modes: Sequence[int],
    ranks: Sequence[int],
    *,
    dtype: torch.dtype = torch.float32,
    device_type: str = "cpu",
    threads: int = 1,
    training: bool = True,
) -> float:
    """The cost model's estimate, in seconds, of one forward (and backward) pass of ``plan``.

    Args:
        plan: A plan for these modes and ranks.
        batch: Number of input rows.
        in_modes: The ``d`` input modes.
        out_modes: The ``d`` output modes.
        ranks: The ``d + 1`` bond ranks.
        dtype: The dtype the products run in.
        device_type: ``"cpu"``, ``"cuda"``, ...: selects the :class:`CostModel`.
        threads: CPU threads (``torch.get_num_threads()``); ignored on other devices.
        training: Include the backward pass.

    Returns:
        Estimated seconds.

    Raises:
        TypeError: If the batch, a mode, a rank or ``threads`` is not an int, ``plan`` is
            not a :class:`Plan` (or a field of it has the wrong type), ``dtype`` is not a
            floating-point dtype, or ``device_type`` not a string.
        ValueError: If they are not a batch size (``>= 0``) and the modes and ranks of a
            chain, ``plan`` does not fit that chain, ``threads`` is below 1, or
            ``device_type`` is empty or names a device (``"cuda:0"``).
    """
    _check_chain(
        batch, in_modes, out_modes, ranks, plan, dtype, device_type=device_type, threads=threads
    )
    return _estimate_time(
        plan,
        batch,
        in_modes,
        out_modes,
        ranks,
        dtype=dtype,
        device_type=device_type,
        threads=threads,
        training=training,
    )


def _estimate_time(
    plan: Plan,
    batch: int,
    in_modes: Sequence[int],
    out_modes: Sequence[int],
    ranks: Sequence[int],
    *,
    dtype: torch.dtype,
    device_type: str,
    threads: int,
    training: bool,
) -> float:
    costing = _costing(dtype, device_type, threads)
    return _TIMERS[plan.kind](costing, plan, batch, in_modes, out_modes, ranks, training)


def memory_budget(batch: int, in_modes: Sequence[int], out_modes: Sequence[int]) -> int:
    """Elements of working memory a plan may use: about what ``nn.Linear`` takes to train.

    Its weight and weight gradient (``2 M N``), its output and its input gradient
    (``B (M + N)``), and one more weight-sized buffer (a dense plan's two half-blocks):
    ``3 M N + B (M + N)``. A plan that needs more than this is never chosen while another
    fits: it bounds the intermediates that grow with the batch, such as an unchunked
    two-block product's (``B M_s r N_f``, often several times the input).

    Args:
        batch: Number of input rows (``>= 0``).
        in_modes: The ``d`` input modes.
        out_modes: The ``d`` output modes.

    Returns:
        The bound, in elements.

    Raises:
        TypeError: If the batch or a mode is not an int.
        ValueError: If the batch is negative, or the modes are not those of a chain.
    """
    _check_modes(batch, in_modes, out_modes)
    return _memory_budget(batch, in_modes, out_modes)


def _memory_budget(batch: int, in_modes: Sequence[int], out_modes: Sequence[int]) -> int:
    m, n = math.prod(in_modes), math.prod(out_modes)
    return 3 * m * n + batch * (m + n)


def plan_memory(
    plan: Plan,
    batch: int,
    in_modes: Sequence[int],
    out_modes: Sequence[int],
    ranks: Sequence[int],
    *,
    training: bool = True,
) -> int:
    """Elements of working memory ``plan`` holds at once (an estimate, to bound).

    Every plan counts the layer's output (``B N``) and, in training, its input gradient
    (``B M``), as :func:`memory_budget` does for ``nn.Linear``. On top:

    - ``"dense"``: ``W`` and the blocks it is merged from (a block of one core is that core,
      no new memory); in training also the gradient of ``W`` and the partial merges of the
      cores, which autograd keeps.
    - ``"twoblock"``: the blocks and a chunk's intermediate; in training also the blocks'
      gradients, the partial merges, and the backward pass's products of the
      intermediate's size with a chunk's transposed input rows (or the kept intermediate
      with its per-row products and its gradient; or, with ``second_from_z``, a chunk's
      intermediate, its transposed copy and the output gradient's; or, with
      ``batched_first``, a chunk's intermediate, its gradient and the per-row products of
      the left block's gradient). With the left block first, unbatched, the transposed
      copies of the input and output (in training also of the output gradient).
    - ``"chain"``: in training every intermediate, which autograd keeps for the backward
      pass, and the largest step's operands and result once more, but for the layer's input
      and output (the gradients and copies of its backward pass); in inference the largest
      step with its operand (the input included).

    Args:
        plan: A plan for these modes and ranks.
        batch: Number of input rows.
        in_modes: The ``d`` input modes.
        out_modes: The ``d`` output modes.
        ranks: The ``d + 1`` bond ranks.
        training: Count the backward pass's memory too.

    Returns:
        The number of elements (multiply by the element size for bytes).

    Raises:
        TypeError: If the batch, a mode or a rank is not an int, or ``plan`` is not a
            :class:`Plan` (or a field of it has the wrong type).
        ValueError: If they are not a batch size (``>= 0``) and the modes and ranks of a
            chain, or ``plan`` does not fit that chain.
    """
    _check_chain(batch, in_modes, out_modes, ranks, plan)
    return _plan_memory(plan, batch, in_modes, out_modes, ranks, training=training)


def _plan_memory(
    plan: Plan,
    batch: int,
    in_modes: Sequence[int],
    out_modes: Sequence[int],
    ranks: Sequence[int],
    *,
    training: bool = True,
) -> int:
    m, n = math.prod(in_modes), math.prod(out_modes)
    # The layer's output and, in training, its input gradient, as memory_budget counts them.
    own = batch * (m + n) if training else batch * n
    shapes = _core_shapes(in_modes, out_modes, ranks)
    if plan.kind == "twoblock" and not 0 < plan.split < len(shapes):
        raise ValueError(f"a twoblock plan needs 0 < split < {len(shapes)}; got {plan}.")
    if plan.kind in ("dense", "twoblock"):
        s = plan.split
        if s:
            m1, m2, n1, n2, r = _blocks(plan, in_modes, out_modes, ranks)
            blocks, made, merges = _block_sizes(shapes, s)
        else:  # d == 1: the one core
            blocks = made = sum(math.prod(shape) for shape in shapes)
            merges = 0
    if plan.kind == "dense":
        return own + (2 * m * n + made + merges if training else m * n + made)
    if plan.kind == "twoblock":
        ms, mf, ns, nf = (m1, m2, n1, n2) if plan.first == "right" else (m2, m1, n2, n1)
        rows = -(-batch // plan.chunks)
        transposes = plan.first == "left" and not plan.batched_first
        copies = _transposed_copies(transposes, batch, m, n, training)
        if not training:
            return own + copies + made + rows * ms * r * nf
        grads = made + blocks + merges  # the blocks made, their gradients and the merges
        if plan.batched_first:  # a chunk's (or the kept) Z, its dZ, and x[b] dZ[b]^T per row
            return own + grads + rows * r * nf * (2 * ms + mf)
        if plan.second_from_z:
            # A chunk's Z (or the kept one), then its dZ; Z transposed, and g (with the left
            # block first, the output gradient's rows are laid out as that product wants).
            g_copy = n if plan.first == "right" else 0
            return own + copies + grads + rows * (2 * ms * r * nf + g_copy)
        if plan.chunks == 1 and batch <= plan.save_max_batch:  # Z kept, Z g^T per row, dZ
            return own + copies + grads + batch * ms * r * (2 * nf + ns)
        # A chunk's dZ and Q (or Z) and its input rows transposed.
        return own + copies + grads + rows * (2 * r * max(ms * nf, mf * ns) + ms * mf)
    operands = _chain_operand_shapes(batch, in_modes, out_modes, ranks)
    sizes: dict[str, int] = {}
    for term, shape in zip(plan.equation.split("->")[0].split(","), operands, strict=True):
        sizes.update(zip(term, shape, strict=True))
    # The last result is the layer's output.
    results = [math.prod(sizes[a] for a in step.split("->")[1]) for _, _, step in plan.steps]
    if training:
        # The backward pass of a step makes the gradients of its operands and result (and
        # copies of their size); those of the layer's input and output are counted already.
        ends = {plan.equation.split(",")[0], plan.equation.split("->")[1]}
        largest = max(
            sum(
                math.prod(sizes[a] for a in term)
                for term in step.replace("->", ",").split(",")
                if term not in ends
            )
            for _, _, step in plan.steps
        )
        return sum(results) + batch * m + largest
    return max(a + b for a, b in itertools.pairwise([batch * m, *results]))


def _block_sizes(shapes: Sequence[tuple[int, int, int, int]], split: int) -> tuple[int, int, int]:
    """Elements of the two blocks at ``split``, of the new ones, and of the partial merges.

    A block of one core is that core, no new memory; autograd keeps the partial merges.
    """
    left = math.prod(m * n for _, m, n, _ in shapes[:split]) * shapes[split][0]
    right = shapes[split][0] * math.prod(m * n for _, m, n, _ in shapes[split:])
    made = (left if split > 1 else 0) + (right if len(shapes) - split > 1 else 0)
    return left + right, made, _partial_merges(shapes[:split]) + _partial_merges(shapes[split:])


def _transposed_copies(transposes: bool, batch: int, m: int, n: int, training: bool) -> int:
    """Elements a two-block plan copies to transpose rows (the left block first, unbatched).

    The input and the output. In training the input's copy is kept for the backward pass,
    which also transposes the input gradient back; of the output's copy (forward) and the
    output gradient's (backward; none when ``dS`` comes from ``Z``), one ``B N`` at a time.
    """
    if not transposes:
        return 0
    return batch * (2 * m + n) if training else batch * (m + n)


def _partial_merges(shapes: Sequence[tuple[int, int, int, int]]) -> int:
    """Elements of the partial products of merging ``shapes`` left to right (not the last)."""
    total, (ra, m, n, _) = 0, shapes[0]
    for _, p, q, rb in shapes[1:-1]:
        m, n = m * p, n * q
        total += ra * m * n * rb
    return total


def _costing(dtype: torch.dtype, device_type: str, threads: int) -> _Costing:
    model = _cost_model(device_type)
    units = max(1, threads) if device_type == "cpu" else 1
    itemsize = torch.empty((), dtype=dtype).element_size()
    speedup = model.speedup(dtype) * units
    on_cpu = device_type == "cpu"
    return _Costing(model, itemsize, speedup, model.cache_bytes * units, on_cpu=on_cpu)


# --- candidates and the choice ----------------------------------------------------------------


def _chain_operand_shapes(
    batch: int, in_modes: Sequence[int], out_modes: Sequence[int], ranks: Sequence[int]
) -> list[tuple[int, ...]]:
    return [(batch, *in_modes), *_core_shapes(in_modes, out_modes, ranks)]


def chain_equation(d: int) -> tuple[list[str], str]:
    """Einsum terms of the input and the ``d`` cores, and the output term.

    The input is ``b m_1..m_d``, core ``k`` is ``r_k m_k n_k r_{k+1}``, the output
    ``b n_1..n_d``; letters come from ``opt_einsum.get_symbol``.

    Args:
        d: The number of cores, ``>= 1``.

    Returns:
        ``([input term, core terms...], output term)``.

    Raises:
        TypeError: If ``d`` is not an int.
        ValueError: If ``d`` is not positive.
    """
    d = check_positive_int("d", d)
    letters = [opt_einsum.get_symbol(k) for k in range(3 * d + 2)]
    b, inp, out = letters[0], letters[1 : d + 1], letters[d + 1 : 2 * d + 1]
    rank = letters[2 * d + 1 :]
    cores = [rank[k] + inp[k] + out[k] + rank[k + 1] for k in range(d)]
    return [b + "".join(inp), *cores], b + "".join(out)


@lru_cache(maxsize=1024)
def _chain_plan(
    batch: int, in_modes: tuple[int, ...], out_modes: tuple[int, ...], ranks: tuple[int, ...]
) -> Plan:
    terms, output = chain_equation(len(in_modes))
    equation = ",".join(terms) + "->" + output
    shapes = _chain_operand_shapes(batch, in_modes, out_modes, ranks)
    # opt_einsum's "dp" is exact but exponential in the cores: seconds per path from about
    # 13 cores with unit modes or rank-1 bonds, and a table searches 25 (one per octave). Greedy
    # beyond 10 cores, where the chain rarely wins anyway.
    search = "optimal" if len(terms) <= 7 else "dp" if len(terms) <= 11 else "greedy"
    path, _ = opt_einsum.contract_path(equation, *shapes, shapes=True, optimize=search)
    return Plan("chain", steps=pairwise_steps(path, terms, output), equation=equation)


def pairwise_steps(
    path: Sequence[tuple[int, ...]], terms: Sequence[str], output: str
) -> tuple[tuple[int, int, str], ...]:
    """Turn an opt_einsum path into two-operand einsum steps ``(i, j, equation)``.

    Operands ``i < j`` of the current list are removed and their contraction is appended,
    as in opt_einsum's path format; each result keeps only the letters still needed later.
    A path step of one operand (opt_einsum's ``"dp"`` sums out indices that occur once, such
    as the boundary ranks of size 1, that way) runs no einsum of its own: its letters are
    summed out by the next step that uses the operand. A step of three or more operands
    becomes successive pairwise steps.

    Args:
        path: opt_einsum's contraction path: per step, the positions of the operands it
            takes in the current list.
        terms: The einsum terms of the operands (:func:`chain_equation`).
        output: The output term.

    Returns:
        The steps, as ``Plan.steps`` holds them.

    Raises:
        TypeError: If ``path`` is not a sequence of sequences of ints, or a term or the
            output is not a string.
        ValueError: If a step names a position outside the current operands or one twice,
            the output has a letter no term has, or the path does not end with one operand.
    """
    if isinstance(terms, str) or not isinstance(terms, Sequence):
        raise TypeError(f"terms must be a sequence of strings; got {type(terms).__name__}.")
    if not all(isinstance(t, str) for t in terms) or not isinstance(output, str):
        raise TypeError(f"terms and output must be strings; got {terms!r} and {output!r}.")
    if not set(output) <= set("".join(terms)):
        raise ValueError(f"output {output!r} has letters that no term of {list(terms)} has.")
    given: object = path  # checked as what a caller may pass, not as annotated
    if isinstance(given, str) or not isinstance(given, Sequence):
        raise TypeError(f"path must be a sequence of steps; got {type(given).__name__}.")
    steps_given: Sequence[object] = given
    # opt_einsum's list of operands, as ids, and the list that the steps act on: they differ
    # after a one-operand step, which moves its operand to the end of opt_einsum's list only.
    planned = list(range(len(terms)))
    current = list(range(len(terms)))
    term = dict(enumerate(terms))
    steps: list[tuple[int, int, str]] = []
    for number, entry in enumerate(steps_given):
        if isinstance(entry, str) or not isinstance(entry, Sequence):
            raise TypeError(
                f"path[{number}] must be a sequence of operand positions; got {entry!r}."
            )
        position: Sequence[int] = entry
        if (
            not position
            or len(set(position)) != len(position)
            or not all(is_int(k) and 0 <= operator.index(k) < len(planned) for k in position)
        ):
            raise ValueError(
                f"path[{number}] must name distinct positions among the {len(planned)} "
                f"current operands; got {tuple(position)!r}."
            )
        ids = [planned[k] for k in position]
        for k in sorted(position, reverse=True):
            planned.pop(k)
        merged = ids[0]
        for other in ids[1:]:
            i, j = sorted((current.index(merged), current.index(other)))
            right, left = term[current.pop(j)], term[current.pop(i)]
            if current:
                keep = set(output).union(*(term[t] for t in current))
                result = "".join(dict.fromkeys(a for a in left + right if a in keep))
            else:
                result = output
            merged = len(term)
            term[merged] = result
            steps.append((i, j, f"{left},{right}->{result}"))
            current.append(merged)
        planned.append(merged)
    if len(current) != 1:
        raise ValueError(
            f"path must contract the {len(terms)} operands into one; {len(current)} remain."
        )
    return tuple(steps)


def _fits_einsum(plan: Plan) -> bool:
    """Whether every pairwise step of a chain plan names at most the 52 letters of einsum.

    ``ttlayers.contraction.run_chain`` renames each step's letters to ``a-z, A-Z``; opt_einsum's
    greedy paths (beyond 10 cores) can make a step of more indices than that from about 29
    cores on.
    """
    letters = len(string.ascii_letters)
    return all(len(set(step) - set(",->")) <= letters for _, _, step in plan.steps)


def candidate_plans(
    batch: int,
    in_modes: Sequence[int],
    out_modes: Sequence[int],
    ranks: Sequence[int],
    *,
    dtype: torch.dtype = torch.float32,
    device_type: str = "cpu",
    threads: int = 1,
    largest: int = 0,
) -> list[Plan]:
    """Every plan the cost model chooses from, for this batch size and shape.

    ``"dense"`` at every split; ``"twoblock"`` at every split and in both orders, unchunked
    (keeping the intermediate as :class:`Plan` says, and, where :func:`plan_memory` counts
    it, only within :func:`memory_budget`) and, where the device has a
    ``cache_bytes``, in as many chunks of rows as keep each chunk's intermediate within it
    (at most ``max_chunks``), or in as many more as bring the plan within
    :func:`memory_budget` (by :func:`plan_memory`) at every batch size up to ``largest``, in
    training and in inference; each also with ``second_from_z`` where that backward pass
    takes fewer operations; the same with the left block first batched
    (``batched_first``) where it has at least ``BATCHED_MIN_INPUTS`` inputs; and the
    ``"chain"`` of opt_einsum's FLOP-optimal order
    (greedy beyond 10 cores) for the power of two at or below ``batch``, unless one of its
    steps needs more than einsum's 52 letters.
    For ``d == 1`` only ``"dense"``.

    Args:
        batch: Number of input rows (``>= 0``).
        in_modes: The ``d`` input modes.
        out_modes: The ``d`` output modes.
        ranks: The ``d + 1`` bond ranks.
        dtype: The dtype the products run in (sizes the chunks).
        device_type: Selects the :class:`CostModel` (sizes the chunks).
        threads: CPU threads (sizes the chunks on CPUs).
        largest: The largest batch size the plans will serve (sizes the chunks for the
            memory bound; ``batch`` when smaller).

    Returns:
        The plans, each valid for :func:`ttlayers.contraction.tt_linear` with these shapes
        (the chunk count is a choice of speed, not of correctness, at any batch size).

    Raises:
        TypeError: If the batch, a mode, a rank, ``threads`` or ``largest`` is not an int,
            ``dtype`` is not a floating-point dtype, or ``device_type`` not a string.
        ValueError: If they are not a batch size (``>= 0``) and the modes and ranks of a
            chain, ``threads`` is below 1, ``largest`` below 0, or ``device_type`` is empty or
            names a device (``"cuda:0"``).
    """
    _check_chain(
        batch,
        in_modes,
        out_modes,
        ranks,
        dtype=dtype,
        device_type=device_type,
        threads=threads,
        largest=largest,
    )
    batch = int(batch)  # a NumPy integer too
    in_modes, out_modes, ranks = tuple(in_modes), tuple(out_modes), tuple(ranks)
    d = len(in_modes)
    if d == 1:
        return [Plan("dense")]
    plans = [Plan("dense", split=s) for s in range(1, d)]
    m, n = math.prod(in_modes), math.prod(out_modes)
    budget = 2 * m * n  # nn.Linear's weight and gradient
    top = max(batch, largest)
    costing = _costing(dtype, device_type, threads)
    shapes = _core_shapes(in_modes, out_modes, ranks)
    for s in range(1, d):
        m1, m2 = math.prod(in_modes[:s]), math.prod(in_modes[s:])
        n1, n2 = math.prod(out_modes[:s]), math.prod(out_modes[s:])
        r = ranks[s]
        blocks, made, merges = _block_sizes(shapes, s)
        forms = [("right", False, (m1, m2, n1, n2)), ("left", False, (m2, m1, n2, n1))]
        if m1 >= BATCHED_MIN_INPUTS:
            forms.append(("left", True, (m2, m1, n2, n1)))
        for first, batched, (ms, mf, ns, nf) in forms:
            transposes = first == "left" and not batched
            row_elements = max(1, r * ms * nf)  # of the intermediate
            keep = budget // row_elements
            chunks = 1
            if costing.cache_bytes:  # each chunk's intermediate in the cache
                chunks = -(-batch * row_elements * costing.itemsize // costing.cache_bytes)
                if batch * row_elements * costing.itemsize > costing.model.cache_bytes:
                    chunks = max(chunks, 2)  # an unchunked plan's Z in training (_twoblock_time)
                chunks = min(chunks, costing.model.max_chunks)  # 1: never for the cache
            # The rows a chunk may hold within memory_budget at every batch from batch to
            # top, as plan_memory counts (the layer's output and input gradient are on both
            # sides): in training a chunk's dZ, Q and transposed rows (or Z, dZ and the
            # copies of Z and g), in inference its Z; the room at the batch size where it is
            # least. On GPUs, which have no cache_bytes, the only reason to chunk.
            copies = _transposed_copies(transposes, top, m, n, training=True)
            train_room = 3 * m * n - made - blocks - merges - copies
            room = 3 * m * n - made - (top * n if transposes else -batch * m)
            infer_rows = room // row_elements
            # Unchunked, Z is kept for at most as many rows as nn.Linear's weight and gradient
            # hold (Plan.save_max_batch), and, where plan_memory counts it (Z, dZ and the
            # per-row Z g^T), only while the plan stays within memory_budget: else a plan
            # that keeps Z at the small batches of a plan table's range is over the bound at
            # its largest, and loses the whole range to one that is slower.
            kept_row = r * ms * (2 * nf + ns) + (2 * m + n if transposes else 0)
            kept_rows = max(0, (3 * m * n - made - blocks - merges) // kept_row)
            # dS from Z only where that takes fewer operations than from Q (autograd.py).
            cheaper = not batched and ms * nf * (mf + ns) < mf * ns * (nf + ms)
            for second_from_z in (False, True) if cheaper else (False,):
                variant = Plan(
                    "twoblock",
                    split=s,
                    first=first,
                    second_from_z=second_from_z,
                    batched_first=batched,
                )
                plain = not (batched or second_from_z)
                plans.append(
                    replace(variant, save_max_batch=min(keep, kept_rows) if plain else keep)
                )
                if batched:
                    per_row = 2 * row_elements + r * mf * nf
                elif second_from_z:
                    per_row = 2 * row_elements + (n if first == "right" else 0)
                else:
                    per_row = 2 * max(1, r * max(ms * nf, mf * ns)) + ms * mf
                train_rows = train_room // per_row
                # Only where a chunk of rows can meet the bound: else a chunk a row (whose
                # dozen calls a row the cost model underrates) won inference at 4096 rows of
                # a 4096 x 4096 layer with the left block first, whose transposed copies for
                # training no chunk count brings within the bound: 0.75 s, against 0.41 s for
                # 128 chunks with the right block first.
                for limit in sorted({rows for rows in (train_rows, infer_rows) if rows >= 1}):
                    count = min(max(chunks, -(-top // limit)), batch)  # no more chunks than rows
                    plan = replace(variant, chunks=count)
                    if count > 1 and plan not in plans:
                        plans.append(plan)
    # The step that meets the input names its d + 1 letters and one of a core's: more than 50
    # cores never fit, and searching their path takes seconds.
    if d + 2 <= len(string.ascii_letters):
        # The order searched at the power of two at or below the batch size: the search
        # takes up to a tenth of a second for 6 cores, and training tables choose at half
        # octaves too, whose orders it rarely changes (any order is valid at any batch).
        chain = _chain_plan(1 << (max(batch, 1).bit_length() - 1), in_modes, out_modes, ranks)
        if _fits_einsum(chain):
            plans.append(chain)
    return plans


def choose_plan(
    batch: int,
    in_modes: Sequence[int],
    out_modes: Sequence[int],
    ranks: Sequence[int],
    *,
    dtype: torch.dtype = torch.float32,
    device_type: str = "cpu",
    threads: int = 1,
    training: bool = True,
    largest: int = 0,
    max_chunks: int | None = None,
) -> Plan:
    """The candidate plan with the least estimated time (ties: the first candidate).

    Only plans within :func:`memory_budget` (by :func:`plan_memory`) compete, unless none is;
    then the one that needs the least memory is chosen. With ``largest``, the plan must stay
    within it at every batch size up to ``largest`` too (it will serve them).

    For training, a ``"dense"`` plan must be estimated more than ``DENSE_TRAINING_MARGIN``
    faster than the best other plan to be chosen: it makes a gradient of the size of ``W``,
    which the other plans never do. A ``batched_first`` plan's estimate is likewise raised by
    ``BATCHED_MARGIN`` (see there): it must be that much faster than every other plan but
    a dense one in training, against which the two raised estimates compare.

    Args:
        batch: Number of input rows (``>= 0``).
        in_modes: The ``d`` input modes.
        out_modes: The ``d`` output modes.
        ranks: The ``d + 1`` bond ranks.
        dtype: The dtype the products run in.
        device_type: ``"cpu"``, ``"cuda"``, ...: selects the :class:`CostModel`.
        threads: CPU threads (``torch.get_num_threads()``); ignored on other devices.
        training: Include the backward pass.
        largest: The largest batch size the plan will serve (``batch`` when smaller).
        max_chunks: Choose only among the plans of at most that many row chunks (``1`` for
            a graph that serves every batch size, such as ``torch.export`` with a dynamic
            batch dimension); above 1, a plan of more chunks competes with ``max_chunks``
            of them instead (larger chunks, where the cache would want more).

    Returns:
        The chosen plan, one of :func:`candidate_plans` (chunks capped by ``max_chunks``).

    Raises:
        TypeError: As :func:`candidate_plans`, or if ``max_chunks`` is not an int.
        ValueError: As :func:`candidate_plans`, or if ``max_chunks`` is below 1.
    """
    if max_chunks is not None:
        max_chunks = check_positive_int("max_chunks", max_chunks)
    candidates = candidate_plans(
        batch,
        in_modes,
        out_modes,
        ranks,
        dtype=dtype,
        device_type=device_type,
        threads=threads,
        largest=largest,
    )
    batch = int(batch)  # checked by candidate_plans; a NumPy integer too
    if max_chunks == 1:
        candidates = [plan for plan in candidates if plan.chunks == 1]
    elif max_chunks is not None:
        # Dropped instead, a graph that served batch sizes from a small bound up (48 rows
        # for some layers) lost the two-block plans at large batches to the dense one,
        # whose estimate was 1.3 times theirs.
        capped = (replace(plan, chunks=min(plan.chunks, max_chunks)) for plan in candidates)
        candidates = list(dict.fromkeys(capped))
    # Within the memory nn.Linear would use, at the largest batch served (memory grows with
    # the batch, but a kept intermediate is dropped above save_max_batch: both ends count);
    # if no plan is, the leanest.
    sizes = {max(batch, 1), max(batch, largest, 1)}
    footprints = [
        max(
            _plan_memory(plan, size, in_modes, out_modes, ranks, training=training)
            - _memory_budget(size, in_modes, out_modes)
            for size in sizes
        )
        for plan in candidates
    ]
    within = [plan for plan, over in zip(candidates, footprints, strict=True) if over <= 0]
    candidates = within or [candidates[footprints.index(min(footprints))]]
    # The private versions: the arguments were checked by candidate_plans.
    times = [
        _estimate_time(
            plan,
            max(batch, 1),
            in_modes,
            out_modes,
            ranks,
            dtype=dtype,
            device_type=device_type,
            threads=threads,
            training=training,
        )
        for plan in candidates
    ]
    if training:
        times = [
            t * (1 + DENSE_TRAINING_MARGIN) if plan.kind == "dense" else t
            for plan, t in zip(candidates, times, strict=True)
        ]
    times = [
        t * (1 + BATCHED_MARGIN) if plan.batched_first else t
        for plan, t in zip(candidates, times, strict=True)
    ]
    return candidates[times.index(min(times))]


DENSE_TRAINING_MARGIN = 0.05

# batched_first plans are offered only where the left block has at least this many inputs
# (M_1): each of their batched products has M_1 as one of its sides, and at M_1 = 8 those
# ran at 1.75 times the cost model's estimate within a training step (a 1024 x 1024 layer,
# modes (8, 16, 8), rank 8, batch 256: estimated 14 % faster than the dense plan, measured
# 23 % slower), while at M_1 = 64 they ran at 0.96-1.16 times it.
BATCHED_MIN_INPUTS = 16

# ... and their estimates are raised by this fraction before the plans are compared (as a
# dense plan's is in training). Where a layer's blocks are alike (modes (4, 8, 8, 4)), the
# cost model gives them the time of the plan with the right block first, products of the
# same shapes in the other order, and they measured 15-23 % slower (inference at rank 16,
# batch 256 and rank 8, batch 8192); on the 4096 -> 11008 layer, where the model puts them
# 7-15 % ahead, they measured 10-15 % ahead.
BATCHED_MARGIN = 0.05


_LARGEST_TABULATED_BATCH_LOG2 = 24


def plan_table(
    in_modes: Sequence[int],
    out_modes: Sequence[int],
    ranks: Sequence[int],
    dtype: torch.dtype,
    device_type: str,
    threads: int,
    training: bool,
) -> tuple[tuple[int, Plan], ...]:
    """The chosen plan for every batch size, as ``((lowest batch, plan), ...)``.

    Entry ``(b, plan)`` applies to batch sizes from ``b`` up to the next entry's ``b``. Plans
    are chosen at batch sizes ``1, 2, 4, ..., 2**24`` (in training also at three times each
    power of two: ``1, 2, 3, 4, 6, 8, 12, ...``) and apply up to the next of them (batch 0
    takes the plan of batch 1). Cached per argument tuple.

    Args:
        in_modes: The ``d`` input modes.
        out_modes: The ``d`` output modes.
        ranks: The ``d + 1`` bond ranks.
        dtype: The dtype the products run in.
        device_type: Selects the :class:`CostModel`.
        threads: CPU threads; ignored on other devices.
        training: Plans for forward and backward passes, or for inference.

    Returns:
        The table, its first entry at batch size 0 (its plan serves batches 0 and 1).

    Raises:
        TypeError: As :func:`candidate_plans`.
        ValueError: As :func:`candidate_plans`.
    """
    _check_chain(
        1, in_modes, out_modes, ranks, dtype=dtype, device_type=device_type, threads=threads
    )
    ints = [tuple(operator.index(v) for v in values) for values in (in_modes, out_modes, ranks)]
    return cached_plan_table(
        *ints,
        dtype,
        device_type,
        int(threads),
        bool(training),
    )


@lru_cache(maxsize=512)
def cached_plan_table(
    in_modes: tuple[int, ...],
    out_modes: tuple[int, ...],
    ranks: tuple[int, ...],
    dtype: torch.dtype,
    device_type: str,
    threads: int,
    training: bool,
) -> tuple[tuple[int, Plan], ...]:
    """:func:`plan_table` for checked arguments, as tuples: the layer's per-call path."""
    table: list[tuple[int, Plan]] = []
    sizes = _tabulated_batches(training)
    for lowest, following in zip(sizes, [*sizes[1:], 2 * sizes[-1]], strict=True):
        plan = choose_plan(
            lowest,
            in_modes,
            out_modes,
            ranks,
            dtype=dtype,
            device_type=device_type,
            threads=threads,
            training=training,
            largest=following - 1,
        )
        if not table or table[-1][1] != plan:
            table.append((0 if lowest == 1 else lowest, plan))
    return tuple(table)


def _tabulated_batches(training: bool) -> list[int]:
    # Half octaves in training: there the unchunked plan turns slow within an octave of batch
    # sizes, as its intermediate outgrows the cache (_twoblock_time); chosen at an octave's
    # lowest size, it took 1.3-1.6 times the fastest plan's time at the octave's top.
    top = _LARGEST_TABULATED_BATCH_LOG2
    sizes = [2**k for k in range(top + 1)]
    if training:
        sizes += [3 * 2**k for k in range(top - 1)]  # 3 * 2**(top - 2) < 2**top
    return sorted(sizes)


# --- calibration --------------------------------------------------------------------------------


def _seconds(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    """The fastest of ``repeats`` runs of ``fn``, after one warm-up run."""
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return min(times)


def calibrate(
    device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, repeats: int = 10
) -> CostModel:
    """Measure a :class:`CostModel` for ``device`` (a second or so of products and copies).

    Times, each the fastest of ``repeats`` runs: a tiny product (``overhead``); a large
    square product (``flops``); a batch of products with an inner dimension of 16 whose
    operands fit in the cache (``half_dim``, from how far below ``flops`` they run); and a
    copy of 16 MiB (``bandwidth``). ``cache_bytes``, ``max_chunks``, ``matrix_overhead``,
    ``dtype_speedup`` and ``cache_traffic`` are copied from the default model of the device
    type. Install the result with :func:`set_cost_model`.

    Args:
        device: The device to measure.
        dtype: The dtype of the products.
        repeats: Runs of each measurement, ``>= 1``.

    Returns:
        The measured model, expressed for float32 (``flops`` divided by the default speedup
        of ``dtype``) and, on CPUs, per thread.

    Raises:
        TypeError: If ``repeats`` is not an int or ``dtype`` not a floating-point dtype.
        ValueError: If ``repeats`` is not positive, or ``device`` is the meta device.
    """
    if not is_int(repeats):
        raise TypeError(f"repeats must be a positive int; got {repeats!r}.")
    if repeats < 1:
        raise ValueError(f"repeats must be a positive int; got {repeats!r}.")
    repeats = int(repeats)
    _check_dtype(dtype)
    device = torch.device(device)
    if device.type == "meta":  # its products take no time: the model would be meaningless
        raise ValueError("device must hold values to time; the meta device holds none.")

    def make(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, device=device, dtype=dtype)

    tiny = make(2, 2)
    overhead = _seconds(lambda: tiny @ tiny, device, 10 * repeats)
    n = 2048 if device.type == "cuda" else 1024
    a, b = make(n, n), make(n, n)
    peak = 2.0 * n**3 / _seconds(lambda: a @ b, device, repeats)
    k, batch, side = 16, 8, 128  # output of 512 KiB in float32: in cache
    tall, wide = make(batch, side, k), make(batch, k, side)
    thin_seconds = _seconds(lambda: torch.bmm(tall, wide), device, repeats) - overhead
    thin_speed = 2.0 * batch * side * k * side / max(thin_seconds, 1e-9)
    half_dim = max(1.0, k * (peak / max(thin_speed, 1.0) - 1.0))
    source = make(2**24 // torch.empty((), dtype=dtype).element_size())  # 16 MiB
    target = torch.empty_like(source)
    copy_seconds = _seconds(lambda: target.copy_(source), device, repeats)
    bandwidth = 2.0 * source.numel() * source.element_size() / copy_seconds
    # The defaults, not whatever model is installed (which may be an earlier calibration).
    default = DEFAULT_COST_MODELS.get(device.type, DEFAULT_COST_MODELS["cpu"])
    units = torch.get_num_threads() if device.type == "cpu" else 1
    return CostModel(
        flops=peak / default.speedup(dtype) / units,
        half_dim=half_dim,
        bandwidth=bandwidth,
        overhead=overhead,
        cache_bytes=default.cache_bytes,
        max_chunks=default.max_chunks,
        matrix_overhead=default.matrix_overhead,
        dtype_speedup=default.dtype_speedup,
        cache_traffic=default.cache_traffic,
    )


if __debug__:
    assert set(_TIMERS) == set(_KINDS)
