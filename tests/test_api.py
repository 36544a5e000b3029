"""The public API as a whole: every public name documented, every bad argument named.

The public API is what ``ttlayers.__all__`` and the ``__all__`` of each public module
(``ttlayers.<name>``, no leading underscore) list, as the API reference renders it.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import pkgutil
import re
import typing
from collections.abc import Callable, Iterator

import numpy as np
import pytest
import torch
from torch import nn

import ttlayers
from ttlayers import ActivationStatistics, TTLinear, tt_svd, tt_to_dense
from ttlayers.budget import (
    allocate,
    allocate_evenly,
    bond_spectra,
    candidate_shapes,
    layer_options,
)
from ttlayers.calibration import weighted_problem
from ttlayers.capture import ActivationCapture
from ttlayers.contraction import core_shapes, merge_cores
from ttlayers.init import core_std
from ttlayers.planner import (
    DEFAULT_COST_MODELS,
    Plan,
    calibrate,
    candidate_plans,
    chain_equation,
    check_plan,
    choose_plan,
    estimate_time,
    pairwise_steps,
    plan_table,
    set_cost_model,
)
from ttlayers.shapes import num_parameters

_SECTION = re.compile(r"^(\w[\w ]*):\s*$")


def _public_modules() -> list[str]:
    return [
        f"ttlayers.{info.name}"
        for info in pkgutil.iter_modules(ttlayers.__path__)
        if not info.name.startswith("_")
    ]


def _sections(doc: str) -> dict[str, list[str]]:
    """Google-style sections of a docstring: title -> the names documented at its top level."""
    sections: dict[str, list[str]] = {}
    current: list[str] | None = None
    indent: int | None = None
    for line in doc.splitlines():
        match = _SECTION.match(line)
        if match:
            current, indent = sections.setdefault(match.group(1), []), None
            continue
        if current is None or not line.strip():
            continue
        depth = len(line) - len(line.lstrip())
        if depth == 0:
            current = None
            continue
        indent = depth if indent is None else indent
        if depth == indent:
            current.append(line.strip().split(":")[0].split(" (")[0].lstrip("*"))
    return sections


def _callables() -> Iterator[tuple[str, Callable[..., object], str, bool]]:
    """Every public function, method and property of the API: name, function, doc, property.

    A class's ``__init__`` is documented by the class docstring, as the reference shows it;
    a dataclass's or named tuple's generated one by its ``Attributes`` (see below).
    """
    seen: set[int] = set()
    for module_name in ["ttlayers", *_public_modules()]:
        module = importlib.import_module(module_name)
        for name in module.__all__:
            obj = getattr(module, name)
            if id(obj) in seen:
                continue
            seen.add(id(obj))
            if inspect.isclass(obj):
                generated = dataclasses.is_dataclass(obj) or issubclass(obj, tuple)
                for attribute, member in vars(obj).items():
                    if attribute.startswith("_") and (attribute != "__init__" or generated):
                        continue
                    is_property = isinstance(member, property)
                    function = getattr(member, "fget" if is_property else "__func__", member)
                    if inspect.isfunction(function):
                        doc = inspect.getdoc(obj if attribute == "__init__" else function)
                        qualified = f"{module_name}.{name}.{attribute}"
                        yield qualified, function, doc or "", is_property
            elif inspect.isfunction(getattr(obj, "__wrapped__", obj)):
                function = getattr(obj, "__wrapped__", obj)
                yield f"{module_name}.{name}", function, inspect.getdoc(function) or "", False


def test_the_checker_reads_sections_and_finds_the_api() -> None:
    doc = (
        "Summary.\n\nArgs:\n    x: One.\n        More on x.\n    y (int): Two.\n\nReturns:\n    z."
    )
    assert _sections(doc) == {"Args": ["x", "y"], "Returns": ["z."]}
    names = {entry[0] for entry in _callables()}
    expected = {
        "ttlayers.tensorize_",
        "ttlayers.TTLinear.round",
        "ttlayers.TTLinear.__init__",
        "ttlayers.TTLinear.compression",  # a property
        "ttlayers.planner.choose_plan",
    }
    assert expected <= names
    assert "ttlayers.planner.Plan.__init__" not in names  # generated: see the next test
    assert not any(".autograd." in name for name in names)  # not API: the __all__ is empty


_CALLABLES = list(_callables())


@pytest.mark.parametrize(
    ("qualified", "function", "doc", "is_property"),
    _CALLABLES,
    ids=[entry[0] for entry in _CALLABLES],
)
def test_public_callable_documents_its_arguments_and_result(
    qualified: str, function: Callable[..., object], doc: str, is_property: bool
) -> None:
    """Every parameter in ``Args``, a ``Returns`` section for a result, type hints throughout.

    A property documents its value in its summary; it needs only a docstring and a hint.
    """
    assert doc, f"{qualified} has no docstring"
    hints = typing.get_type_hints(function)
    parameters = [
        p
        for p in inspect.signature(function).parameters.values()
        if p.name not in ("self", "cls", "ctx")
    ]
    missing_hints = [p.name for p in parameters if p.name not in hints]
    assert not missing_hints, f"{qualified}: no type hint for {missing_hints}"
    assert "return" in hints, f"{qualified}: no return type hint"
    sections = _sections(doc)
    documented = sections.get("Args", [])
    undocumented = [p.name for p in parameters if p.name not in documented]
    assert not undocumented, f"{qualified}: Args does not document {undocumented}"
    if hints["return"] is not type(None) and not is_property:
        assert "Returns" in sections, f"{qualified}: no Returns section"


def test_public_classes_document_their_fields() -> None:
    """A dataclass or NamedTuple of the API names every field under ``Attributes``."""
    for module_name in ["ttlayers", *_public_modules()]:
        module = importlib.import_module(module_name)
        for name in module.__all__:
            cls = getattr(module, name)
            if not inspect.isclass(cls):
                continue
            if dataclasses.is_dataclass(cls):
                fields = [f.name for f in dataclasses.fields(cls)]
            elif issubclass(cls, tuple) and hasattr(cls, "_fields"):
                fields = list(cls._fields)
            else:
                continue
            attributes = _sections(inspect.getdoc(cls) or "").get("Attributes", [])
            missing = [f for f in fields if f not in attributes]
            assert not missing, f"{module_name}.{name}: Attributes does not document {missing}"


# --- bad arguments of the lower-level helpers -------------------------------------------------

_W = torch.randn(8, 16, dtype=torch.float64)
_STATS = ActivationStatistics.from_inputs(torch.randn(32, 16, dtype=torch.float64))
_PROBLEM = weighted_problem(_W, _STATS, (4, 4))
_CHAIN = ((0, 1, "ab,cbde->acde"), (0, 1, "acde,edf->acf"))  # not the letters of chain_equation
_TWO = (4, 4), (4, 4), (1, 2, 1)  # modes and ranks of a small chain
_SPARSE = torch.randn(8, 16).to_sparse()


def _capture() -> ActivationCapture:
    return ActivationCapture(nn.Linear(4, 4), torch.randn(3, 4))


def _mixed_cores() -> list[torch.Tensor]:
    return [torch.randn(1, 2, 2, 3), torch.randn(3, 2, 2, 1, device="meta")]


# (id, call, exception, message the exception must match). Each message names the argument.
BAD_CALLS: list[tuple[str, Callable[[], object], type[Exception], str]] = [
    # calibration and budget
    (
        "weighted_problem weight list",
        lambda: weighted_problem([[1.0]], _STATS, (4, 4)),
        TypeError,
        "weight must be a tensor",
    ),
    (
        "weighted_problem weight 1-D",
        lambda: weighted_problem(_W[0], _STATS, (4, 4)),
        ValueError,
        "weight must be 2-D",
    ),
    (
        "weighted_problem statistics",
        lambda: weighted_problem(_W, torch.randn(3, 16), (4, 4)),
        TypeError,
        "statistics must be an ActivationStatistics",
    ),
    (
        "weighted_problem in_modes int",
        lambda: weighted_problem(_W, _STATS, 16),
        TypeError,
        "in_modes must be a sequence",
    ),
    (
        "whiten_cores wrong modes",
        lambda: _PROBLEM.whiten_cores([torch.randn(1, 3, 2, 2), torch.randn(2, 4, 4, 1)]),
        ValueError,
        r"input modes \(4, 4\)",
    ),
    (
        "unwhiten_cores too few",
        lambda: _PROBLEM.unwhiten_cores([torch.randn(1, 16, 8, 1)]),
        ValueError,
        r"input modes \(4, 4\)",
    ),
    (
        "whiten_cores meta",
        lambda: _PROBLEM.whiten_cores(
            [torch.randn(1, 4, 2, 2, device="meta"), torch.randn(2, 4, 4, 1)]
        ),
        ValueError,
        "meta device",
    ),
    (
        "layer_options statistics",
        lambda: layer_options(_W, statistics=torch.randn(3, 16)),
        TypeError,
        "statistics must be an ActivationStatistics",
    ),
    (
        "layer_options shapes triple",
        lambda: layer_options(_W, shapes=[((4, 4), (4, 2), (1,))]),
        TypeError,
        r"shapes\[0\] must be an \(in_modes, out_modes\) pair",
    ),
    (
        "layer_options shapes empty",
        lambda: layer_options(_W, shapes=[]),
        ValueError,
        "shapes must hold at least one",
    ),
    (
        "layer_options shapes int",
        lambda: layer_options(_W, shapes=5),
        TypeError,
        "shapes must be a sequence",
    ),
    (
        "bond_spectra NaN",
        lambda: bond_spectra(torch.full((4, 4), float("nan")), (2, 2), (2, 2)),
        ValueError,
        "NaN or Inf",
    ),
    (
        "bond_spectra inf",
        lambda: bond_spectra(torch.full((4, 4), float("inf")), (2, 2), (2, 2)),
        ValueError,
        "NaN or Inf",
    ),
    (
        "candidate_shapes num_cores str",
        lambda: candidate_shapes(16, 16, "2"),
        TypeError,
        "num_cores must be an int or a sequence",
    ),
    (
        "candidate_shapes num_cores empty",
        lambda: candidate_shapes(16, 16, ()),
        ValueError,
        "num_cores must hold",
    ),
    (
        "allocate flat options",
        lambda: allocate(layer_options(_W), 100),
        TypeError,
        r"options\[0\] must be a sequence of RankChoice",
    ),
    (
        "allocate entries",
        lambda: allocate([[1, 2]], 100),
        TypeError,
        r"options\[0\] must hold RankChoice",
    ),
    (
        "allocate_evenly flat options",
        lambda: allocate_evenly(layer_options(_W), [100]),
        TypeError,
        r"options\[0\] must be a sequence",
    ),
    (
        "allocate_evenly budgets int",
        lambda: allocate_evenly([layer_options(_W)], 100),
        TypeError,
        "budgets must be a sequence",
    ),
    (
        "candidate_shapes num_cores tensor",
        lambda: candidate_shapes(16, 16, torch.tensor(2)),
        TypeError,
        "num_cores must be an int or a sequence",
    ),
    # capture
    (
        "ActivationCapture model None",
        lambda: ActivationCapture(None, torch.randn(3, 4)),
        TypeError,
        "model must be an nn.Module",
    ),
    (
        "order lengths",
        lambda: _capture().order([nn.Linear(4, 4)], []),
        ValueError,
        "modules and names must have the same length",
    ),
    (
        "order entry",
        lambda: _capture().order(["x"], ["x"]),
        TypeError,
        r"modules\[0\] must be an nn.Module",
    ),
    (
        "order one module",
        lambda: _capture().order(nn.Linear(4, 4), ["x"]),
        TypeError,
        "modules must be a sequence",
    ),
    ("order None", lambda: _capture().order(None, []), TypeError, "modules must be a sequence"),
    ("calls list", lambda: _capture().calls([1]), TypeError, "module must be an nn.Module"),
    (
        "statistics target None",
        lambda: _capture().statistics(None, 4, torch.device("cpu"), paired=False),
        TypeError,
        "target must be an nn.Module",
    ),
    # contraction, shapes, init
    ("merge_cores empty", lambda: merge_cores([]), ValueError, "at least one core"),
    ("merge_cores None", lambda: merge_cores(None), TypeError, "cores must be a sequence"),
    (
        "merge_cores 3-D",
        lambda: merge_cores([torch.randn(1, 2, 2)]),
        ValueError,
        r"cores\[0\] must be 4-D",
    ),
    (
        "merge_cores list entry",
        lambda: merge_cores([torch.randn(1, 2, 2, 3), [1.0]]),
        TypeError,
        r"cores\[1\] must be a tensor",
    ),
    (
        "merge_cores chain",
        lambda: merge_cores([torch.randn(1, 2, 2, 3), torch.randn(2, 2, 2, 1)]),
        ValueError,
        r"cores\[0\] and cores\[1\] do not chain",
    ),
    (
        "merge_cores meta among cpu",
        lambda: merge_cores(_mixed_cores()),
        TypeError,
        "share one dtype and device",
    ),
    (
        "merge_cores mixed dtypes",
        lambda: merge_cores([torch.randn(1, 2, 2, 3), torch.randn(3, 2, 2, 1).double()]),
        TypeError,
        "share one dtype and device",
    ),
    ("core_shapes None", lambda: core_shapes(None), TypeError, "cores must be a sequence"),
    (
        "num_parameters ranks",
        lambda: num_parameters((2, 2), (2, 2), (1, 2)),
        ValueError,
        r"lengths d, d and d \+ 1",
    ),
    (
        "num_parameters modes",
        lambda: num_parameters((2, 2), (2,), (1, 2, 1)),
        ValueError,
        r"lengths d, d and d \+ 1",
    ),
    (
        "num_parameters float rank",
        lambda: num_parameters((2, 2), (2, 2), (1, 2.0, 1)),
        TypeError,
        "ranks must hold ints",
    ),
    (
        "num_parameters boundary",
        lambda: num_parameters((2, 2), (2, 2), (2, 2, 1)),
        ValueError,
        "ranks must be 1 at both ends",
    ),
    (
        "num_parameters empty ranks",
        lambda: num_parameters((2,), (2,), ()),
        ValueError,
        "ranks must hold at least one rank",
    ),
    ("core_std ranks int", lambda: core_std(5, 1.0), TypeError, "ranks must be a sequence"),
    ("core_std boundary", lambda: core_std((1, 2), 1.0), ValueError, "1 at both ends"),
    ("core_std bool rank", lambda: core_std((1, True, 1), 1.0), TypeError, "ranks must hold ints"),
    # planner
    ("chain_equation 0", lambda: chain_equation(0), ValueError, "d must be a positive int"),
    ("chain_equation float", lambda: chain_equation(2.0), TypeError, "d must be an int"),
    (
        "pairwise_steps position",
        lambda: pairwise_steps([(0, 5)], ["ab", "bc"], "ac"),
        ValueError,
        r"path\[0\] must name distinct positions",
    ),
    (
        "pairwise_steps repeated",
        lambda: pairwise_steps([(0, 0)], ["ab", "bc"], "ac"),
        ValueError,
        r"path\[0\]",
    ),
    (
        "pairwise_steps unfinished",
        lambda: pairwise_steps([], ["ab", "bc"], "ac"),
        ValueError,
        "into one; 2 remain",
    ),
    (
        "pairwise_steps path None",
        lambda: pairwise_steps(None, ["ab", "bc"], "ac"),
        TypeError,
        "path must be a sequence",
    ),
    (
        "pairwise_steps flat path",
        lambda: pairwise_steps([0, 1], ["ab", "bc"], "ac"),
        TypeError,
        r"path\[0\] must be a sequence",
    ),
    (
        "pairwise_steps terms None",
        lambda: pairwise_steps([(0, 1)], None, "ac"),
        TypeError,
        "terms must be a sequence",
    ),
    (
        "pairwise_steps output letter",
        lambda: pairwise_steps([(0, 1)], ["ab", "bc"], "Q"),
        ValueError,
        "output 'Q' has letters",
    ),
    (
        "check_plan chain of other letters",
        lambda: check_plan(Plan("chain", steps=_CHAIN), 2),
        ValueError,
        "does not fit a chain of 2 cores",
    ),
    (
        "check_plan chain step of two entries",
        lambda: check_plan(Plan("chain", steps=[[0, 1]]), 1),
        ValueError,
        "does not fit a chain of 1 cores",
    ),
    (
        "check_plan num_cores None",
        lambda: check_plan(Plan("dense"), None),
        TypeError,
        "num_cores must be an int",
    ),
    (
        "check_plan num_cores 0",
        lambda: check_plan(Plan("dense"), 0),
        ValueError,
        "num_cores must be a positive int",
    ),
    (
        "check_plan flag",
        lambda: check_plan(Plan("twoblock", split=1, second_from_z="yes"), 2),
        TypeError,
        "plan.second_from_z must be a bool",
    ),
    (
        "candidate_plans dtype str",
        lambda: candidate_plans(4, *_TWO, dtype="float32"),
        TypeError,
        "dtype must be a floating-point torch.dtype",
    ),
    (
        "candidate_plans threads None",
        lambda: candidate_plans(4, *_TWO, threads=None),
        TypeError,
        "threads must be an int",
    ),
    (
        "candidate_plans threads 0",
        lambda: candidate_plans(4, *_TWO, threads=0),
        ValueError,
        "threads must be a positive int",
    ),
    (
        "candidate_plans largest",
        lambda: candidate_plans(4, *_TWO, largest=-1),
        ValueError,
        "largest must be an int >= 0",
    ),
    (
        "candidate_plans largest float",
        lambda: candidate_plans(4, *_TWO, largest=2.5),
        TypeError,
        "largest must be an int >= 0",
    ),
    (
        "candidate_plans device_type",
        lambda: candidate_plans(4, *_TWO, device_type=["cpu"]),
        TypeError,
        "device_type must be a device type",
    ),
    (
        "choose_plan max_chunks str",
        lambda: choose_plan(4, *_TWO, max_chunks="2"),
        TypeError,
        "max_chunks must be an int",
    ),
    (
        "choose_plan max_chunks 0",
        lambda: choose_plan(4, *_TWO, max_chunks=0),
        ValueError,
        "max_chunks must be a positive int",
    ),
    (
        "estimate_time dtype int",
        lambda: estimate_time(Plan("dense"), 4, *_TWO, dtype=torch.int64),
        TypeError,
        "dtype must be a floating-point torch.dtype",
    ),
    (
        "estimate_time device_type None",
        lambda: estimate_time(Plan("dense"), 4, *_TWO, device_type=None),
        TypeError,
        "device_type must be a device type",
    ),
    (
        "candidate_plans device index",
        lambda: candidate_plans(4, *_TWO, device_type="cuda:0"),
        ValueError,
        "no index",
    ),
    (
        "estimate_time device_type empty",
        lambda: estimate_time(Plan("dense"), 4, *_TWO, device_type=""),
        ValueError,
        "device_type must be a device type",
    ),
    (
        "set_cost_model device_type",
        lambda: set_cost_model(5, None),
        TypeError,
        "device_type must be a device type",
    ),
    ("calibrate meta", lambda: calibrate("meta", repeats=1), ValueError, "meta device"),
    (
        "plan_table float threads",
        lambda: plan_table((4, 4), (4, 4), (1, 2, 1), torch.float32, "cpu", 1.5, True),
        TypeError,
        "threads must be an int",
    ),
    (
        "CostModel.speedup str",
        lambda: DEFAULT_COST_MODELS["cpu"].speedup("float32"),
        TypeError,
        "dtype must be a floating-point torch.dtype",
    ),
    # sparse and empty tensors
    ("tt_svd sparse", lambda: tt_svd(_SPARSE, (4, 4), (2, 4)), TypeError, "must be a dense tensor"),
    (
        "tt_svd size 0",
        lambda: tt_svd(torch.randn(0, 16), (4, 4), (1, 1)),
        ValueError,
        "has a size of 0",
    ),
    (
        "from_dense size 0",
        lambda: TTLinear.from_dense(torch.randn(8, 0)),
        ValueError,
        "source has a size of 0",
    ),
    (
        "statistics sparse",
        lambda: ActivationStatistics.from_inputs(_SPARSE),
        TypeError,
        "inputs must be a dense tensor",
    ),
    (
        "from_cores bias sparse",
        lambda: TTLinear.from_cores([torch.randn(1, 4, 2, 1)], bias=torch.randn(2).to_sparse()),
        TypeError,
        "bias must be a dense tensor",
    ),
    (
        "tt_to_dense sparse core",
        lambda: tt_to_dense([torch.randn(1, 4, 2, 1).to_sparse()]),
        TypeError,
        r"cores\[0\] must be a dense tensor",
    ),
]


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [case[1:] for case in BAD_CALLS],
    ids=[case[0] for case in BAD_CALLS],
)
def test_lower_level_helpers_name_the_bad_argument(
    call: Callable[[], object], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        call()


def test_the_helpers_take_numpy_arrays_and_iterables_as_before() -> None:
    assert candidate_shapes(16, 16, np.array([2, 3])) == candidate_shapes(16, 16, (2, 3))
    assert candidate_shapes(16, 16, 2) == candidate_shapes(16, 16, (2,))
    options = layer_options(_W, num_cores=np.array([2]))
    assert options == layer_options(_W, num_cores=(2,))
    evenly = allocate_evenly([options, options], np.array([60, 60]))
    assert evenly == allocate_evenly([options, options], [60, 60])
    assert allocate(iter([options, options]), 120) == allocate([options, options], 120)
    assert core_std(np.array([1, 4, 1]), 1.0) == core_std((1, 4, 1), 1.0)
    assert candidate_shapes(16, 16, np.array(2)) == candidate_shapes(16, 16, 2)
    shapes = [((4, 4), (2, 4)), ((2, 8), (8, 1))]
    assert layer_options(_W, shapes=iter(shapes)) == layer_options(_W, shapes=shapes)
    layer = TTLinear(16, 8, rank=2)
    assert core_shapes(layer.cores) == (layer.in_modes, layer.out_modes, layer.ranks)
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    capture = ActivationCapture(model, torch.randn(3, 4))
    with capture.session():
        assert capture.order(nn.ModuleList(model), ("a", "b")) == [0, 1]
    table = plan_table([4, 4], np.array([4, 4]), (1, 2, 1), torch.float32, "cpu", 1, True)
    assert table == plan_table((4, 4), (4, 4), (1, 2, 1), torch.float32, "cpu", 1, True)
    cores = [torch.randn(1, 2, 3, 2, dtype=torch.float64), torch.randn(2, 3, 2, 1)]
    cores[1] = cores[1].double()
    block = merge_cores(nn.ParameterList(cores))
    expected = torch.einsum("ajnr,rmqb->ajmnqb", *cores)  # (a, m_1, m_2, n_1, n_2, b)
    torch.testing.assert_close(block, expected.reshape(1, 6, 6, 1), rtol=0, atol=1e-12)


def test_every_chain_plan_the_planner_makes_passes_check_plan() -> None:
    """The replay in ``check_plan`` accepts opt_einsum's optimal, dp and greedy chains."""
    cases = [
        ((4, 8, 8, 4), (4, 8, 8, 4), (1, 8, 8, 8, 1)),  # optimal
        ((2,) * 9, (2,) * 9, (1,) + (2,) * 8 + (1,)),  # dp, with one-operand steps
        ((1,) * 12 + (4,), (2,) * 13, (1,) * 14),  # greedy
    ]
    for in_modes, out_modes, ranks in cases:
        chains = [
            plan for plan in candidate_plans(64, in_modes, out_modes, ranks) if plan.kind == "chain"
        ]
        assert chains, f"no chain plan for {in_modes}"
        for plan in chains:
            check_plan(plan, len(in_modes))
            steps = list(plan.steps)
            steps[-1] = (*steps[-1][:2], steps[-1][2].replace("->", "->z"))  # a stray letter
            with pytest.raises(ValueError, match="does not fit"):
                check_plan(Plan("chain", steps=tuple(steps)), len(in_modes))


def test_check_plan_checks_a_chain_plans_equation() -> None:
    """``estimate_time`` and ``plan_memory`` size the operands from ``Plan.equation``."""
    good = next(
        plan
        for plan in candidate_plans(64, (4, 8, 8, 4), (4, 8, 8, 4), (1, 8, 8, 8, 1))
        if plan.kind == "chain"
    )
    check_plan(dataclasses.replace(good, steps=[list(step) for step in good.steps]), 4)
    relabelled = good.equation.translate(str.maketrans("ab", "ba"))
    for equation in (relabelled, ""):
        with pytest.raises(ValueError, match="does not fit"):
            estimate_time(
                dataclasses.replace(good, equation=equation),
                64,
                (4, 8, 8, 4),
                (4, 8, 8, 4),
                (1, 8, 8, 8, 1),
            )


def test_check_plan_refuses_a_chain_that_sums_a_bond_too_early() -> None:
    """Steps that chain term to term but sum out a bond letter the next core still needs."""
    (x, first, second), output = chain_equation(2)
    bond = first[-1]
    early = "".join(
        c for c in x + first if c not in set(x) & set(first) and c not in first[0] + bond
    )
    steps = ((0, 1, f"{x},{first}->{early}"), (0, 1, f"{second},{early}->{output}"))
    with pytest.raises(ValueError, match="does not fit"):
        check_plan(Plan("chain", steps=steps), 2)


def test_check_plan_judges_each_chain_by_its_own_indices() -> None:
    """Float indices equal to ints: neither is taken for the other (no cache to share)."""
    good = next(
        plan
        for plan in candidate_plans(64, (4, 8, 8, 4), (4, 8, 8, 4), (1, 8, 8, 8, 1))
        if plan.kind == "chain"
    )
    floats = Plan("chain", steps=tuple((float(i), float(j), eq) for i, j, eq in good.steps))
    for _ in range(2):  # in both orders
        with pytest.raises(ValueError, match="does not fit"):
            check_plan(floats, 4)
        check_plan(good, 4)
