"""Speed and memory of TTLinear against nn.Linear and other ways to apply a TT matrix.

For each case (a layer shape, TT modes and rank, and a batch size) every method gets the
same cores and bias (TensorLy-Torch's layer: its own, of the same shapes), the same input and
output gradient, and is timed in one process, interleaved with
the others (one round = one run of each method, so drifting machine load hits all alike;
each round runs them in a random order, seeded, so that no method runs right after the
same other one more often than after any other, whose memory traffic and freed memory it
would inherit), reporting the median of ``--repeats`` rounds after ``--warmup`` rounds:

- ``forward``: the forward pass with autograd recording; ``backward``: the backward pass
  from a fixed output gradient (gradients of the input, the cores and the bias);
  ``fwd+bwd``: both; ``infer``: the forward pass under ``torch.no_grad()``, timed in rounds
  of its own after the training rounds (inference does not follow a backward pass).
- ``saved MB``: the activations kept for the backward pass (tensors saved by autograd,
  parameters excluded, each storage counted once), measured exactly with
  ``torch.autograd.graph.saved_tensors_hooks``; ``peak MB``: the growth of the memory
  allocated over one forward and backward pass, at its peak (input, output gradient and
  parameters excluded; gradients, output and every temporary included): on CUDA from
  ``torch.cuda.max_memory_allocated``, on CPUs from the allocations the profiler records
  (``torch.profiler`` with ``profile_memory=True``; its memory timeline is a private API,
  so the column stays empty where it fails).

Methods: ``dense`` (``nn.Linear``), ``ttlayers`` (``TTLinear``), ``rebuild`` (contract the
cores into ``W``, then ``F.linear``), ``best-order`` (opt_einsum's FLOP-optimal pairwise order
as two-operand einsums, autograd through them), ``naive-chain`` (t3f-style: the input meets
the cores one at a time, left to right) and ``tltorch`` (TensorLy-Torch's ``FactorizedLinear``
with ``factorization="blocktt"``, ``implementation="factorized"``, when installed; asked for
by ``--methods`` and not installed, it is named on stderr). torch-mpo is not measured: it is
not on PyPI, and this script has no adapter for it.

Usage::

    python benchmarks/bench_linear.py                       # CPU, float32, 2 threads
    python benchmarks/bench_linear.py --device cuda --dtype bfloat16 --json out.json
    python benchmarks/bench_linear.py --cases issue --repeats 30 --markdown
    python benchmarks/bench_linear.py --cases memory --methods ttlayers   # peak MB on CPU too
    python benchmarks/bench_linear.py --device cuda --compile reduce-overhead --cases issue

``--compile MODE`` runs every method, dense included, under ``torch.compile`` (compiled in
the warm-up rounds); ``saved MB`` is then not measured.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import random
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import opt_einsum
import torch
import torch.nn.functional as F
from _cli import (
    HelpFormatter,
    add_device_options,
    check_device,
    non_negative_int,
    output_file,
    positive_int,
    select,
)
from plan_regret import describe  # sibling scripts: benchmarks/ is on sys.path
from torch import nn

from ttlayers import TTLinear
from ttlayers.contraction import select_plan
from ttlayers.planner import chain_equation, pairwise_steps
from ttlayers.shapes import resolve_ranks, suggest_modes


@dataclass(frozen=True)
class Case:
    name: str
    in_features: int
    out_features: int
    rank: int
    batch: int
    in_modes: tuple[int, ...] | None = None
    out_modes: tuple[int, ...] | None = None
    group: str = "sweep"


M4, M8 = (4, 8, 8, 4), (8, 8, 8, 8)
CASES = [
    # The three cases of the issue.
    Case("1024 (4,8,8,4) r8 b256", 1024, 1024, 8, 256, M4, M4, "issue"),
    # The issue leaves the modes of its rank-32 case open; its 1.13x cheapest-order FLOPs are
    # those of (4,8,8,4) (the default (8,16,8) gives 1.19x, kept below as a sweep case).
    Case("1024 (4,8,8,4) r32 b256", 1024, 1024, 32, 256, M4, M4, "issue"),
    Case("4096 (8,8,8,8) r16 b128", 4096, 4096, 16, 128, M8, M8, "issue"),
    # Batch sizes.
    Case("1024 (4,8,8,4) r8 b1", 1024, 1024, 8, 1, M4, M4),
    Case("1024 (4,8,8,4) r8 b32", 1024, 1024, 8, 32, M4, M4),
    Case("1024 (4,8,8,4) r8 b1024", 1024, 1024, 8, 1024, M4, M4),
    Case("1024 (4,8,8,4) r8 b8192", 1024, 1024, 8, 8192, M4, M4),
    # Ranks.
    Case("1024 (4,8,8,4) r4 b256", 1024, 1024, 4, 256, M4, M4),
    Case("1024 (4,8,8,4) r16 b256", 1024, 1024, 16, 256, M4, M4),
    Case("1024 (4,8,8,4) r64 b256", 1024, 1024, 64, 256, M4, M4),
    Case("1024 default r8 b256", 1024, 1024, 8, 256),
    Case("1024 default r32 b256", 1024, 1024, 32, 256),
    Case("4096 (8,8,8,8) r4 b128", 4096, 4096, 4, 128, M8, M8),
    Case("4096 (8,8,8,8) r64 b128", 4096, 4096, 64, 128, M8, M8),
    Case("4096 (8,8,8,8) r16 b1", 4096, 4096, 16, 1, M8, M8),
    # Batch sizes whose compiled graph chunks less than eager code (capped by the range of
    # batch sizes it serves) or did (one chunked range from 6 rows up: unchunked at 256).
    Case("4096 (8,8,8,8) r16 b96", 4096, 4096, 16, 96, M8, M8),
    Case("4096 (8,8,8,8) r16 b256", 4096, 4096, 16, 256, M8, M8),
    Case("4096 (8,8,8,8) r16 b1024", 4096, 4096, 16, 1024, M8, M8),
    # A large batch: the intermediate of one unchunked two-block product would be 8x the input.
    Case("4096 (8,8,8,8) r16 b2048", 4096, 4096, 16, 2048, M8, M8),
    # Thin blocks at a large batch: a row of the two-block intermediate is larger than a row
    # of the input, and the planner's memory bound decides between chunks and other plans.
    Case("1024 (2,512)x(512,2) r2 b8192", 1024, 1024, 2, 8192, (2, 512), (512, 2), "memory"),
    Case("256 (2,)*8 r2 b8192", 256, 256, 2, 8192, (2,) * 8, (2,) * 8, "memory"),
    Case("16->1024 (4,4)x(32,32) r4 b256", 16, 1024, 4, 256, (4, 4), (32, 32), "memory"),
    # A transformer MLP projection (LLaMA-7B sizes).
    Case("4096->11008 default r16 b1", 4096, 11008, 16, 1, group="transformer"),
    Case("4096->11008 default r16 b128", 4096, 11008, 16, 128, group="transformer"),
    Case("4096->11008 default r64 b128", 4096, 11008, 64, 128, group="transformer"),
]


# --- the methods ---------------------------------------------------------------------------------


class EinsumChain(nn.Module):
    """The TT layer's cores applied by a fixed list of pairwise einsums (a reference method)."""

    def __init__(self, layer: TTLinear, batch: int, order: str) -> None:
        super().__init__()
        self.cores = layer.cores
        self.bias = layer.bias
        self.in_modes, self.out_features = layer.in_modes, layer.out_features
        terms, output = chain_equation(layer.num_cores)
        if order == "optimal":
            shapes = [(batch, *layer.in_modes)] + [tuple(c.shape) for c in layer.cores]
            path, _ = opt_einsum.contract_path(
                ",".join(terms) + "->" + output, *shapes, shapes=True, optimize="optimal"
            )
        else:  # the input meets core 1, then core 2, ...
            path = [(0, 1)] * layer.num_cores
        self.steps = pairwise_steps([tuple(p) for p in path], terms, output)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        current = [x.reshape(x.shape[0], *self.in_modes), *self.cores]
        for i, j, equation in self.steps:
            right, left = current.pop(j), current.pop(i)
            current.append(torch.einsum(equation, left, right))
        return current[0].reshape(x.shape[0], self.out_features) + self.bias


class Rebuild(nn.Module):
    """Contract the cores into W by one opt_einsum-planned einsum, then ``F.linear``."""

    def __init__(self, layer: TTLinear) -> None:
        super().__init__()
        self.cores, self.bias = layer.cores, layer.bias
        d = layer.num_cores
        sym = [opt_einsum.get_symbol(k) for k in range(3 * d + 1)]
        m, n, r = sym[:d], sym[d : 2 * d], sym[2 * d :]
        terms = [r[k] + m[k] + n[k] + r[k + 1] for k in range(d)]
        self.equation = ",".join(terms) + "->" + "".join(n) + "".join(m)
        self.shape = (layer.out_features, layer.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = opt_einsum.contract(self.equation, *self.cores, backend="torch")
        return F.linear(x, weight.reshape(self.shape), self.bias)


def tltorch_layer(tt: TTLinear) -> nn.Module:
    """TensorLy-Torch's TT layer of ``tt``'s modes and ranks (ImportError without it)."""
    import tltorch  # type: ignore[import-not-found]

    layer: nn.Module = tltorch.FactorizedLinear(
        tt.in_modes,
        tt.out_modes,
        factorization="blocktt",
        rank=list(tt.ranks),
        implementation="factorized",
    )
    return layer


# Every method make_methods may build (tltorch only when installed).
METHOD_NAMES = ("dense", "ttlayers", "rebuild", "best-order", "naive-chain", "tltorch")


def make_methods(case: Case, device: str, dtype: torch.dtype) -> dict[str, nn.Module]:
    torch.manual_seed(0)
    factory = {"device": device, "dtype": dtype}
    tt = TTLinear(
        case.in_features,
        case.out_features,
        case.rank,
        in_modes=case.in_modes,
        out_modes=case.out_modes,
        **factory,
    )
    methods: dict[str, nn.Module] = {
        "dense": nn.Linear(case.in_features, case.out_features, **factory),
        "ttlayers": tt,
        "rebuild": Rebuild(tt),
        "best-order": EinsumChain(tt, case.batch, "optimal"),
        "naive-chain": EinsumChain(tt, case.batch, "naive"),
    }
    try:
        methods["tltorch"] = tltorch_layer(tt).to(**factory)
    except ImportError:
        pass
    except Exception as error:  # an installed but incompatible version: say so, go on
        print(f"  tltorch skipped: {error!r}", file=sys.stderr)
    return methods


# --- measuring -----------------------------------------------------------------------------------


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def saved_bytes(module: nn.Module, x: torch.Tensor) -> int:
    """Bytes of the tensors autograd keeps for the backward pass, parameters excluded."""
    params = {p.untyped_storage().data_ptr() for p in module.parameters()}
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params and ptr != 0:
            storages[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = module(x)
    del y
    return sum(storages.values())


def peak_bytes(module: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> int | None:
    module.zero_grad(set_to_none=True)
    x.grad = None
    if x.device.type == "cpu":
        return _cpu_peak_bytes(lambda: module(x).backward(grad))
    if x.device.type != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    module(x).backward(grad)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def _cpu_peak_bytes(step: Callable[[], object]) -> int | None:
    """The peak growth of CPU memory allocated by tensors while ``step`` runs."""
    try:
        from torch.profiler import ProfilerActivity, profile
        from torch.profiler._memory_profiler import MemoryProfileTimeline

        with profile(
            activities=[ProfilerActivity.CPU],
            profile_memory=True,
            record_shapes=True,
            with_stack=True,
        ) as prof:
            step()
        timeline = MemoryProfileTimeline(prof._memory_profile())
        _, sizes = timeline._coalesce_timeline(torch.device("cpu"))
    except Exception:  # a private API: no peak rather than no benchmark
        return None
    totals = [sum(row) for row in sizes]
    return max(totals) - totals[0] if totals else None


def compiled(methods: dict[str, nn.Module], mode: str) -> dict[str, nn.Module]:
    """Every method under ``torch.compile`` (``mode``: ``"default"`` or a compile mode).

    Dense included, so that the ratios compare like with like. Compiling happens in the
    warm-up rounds (training and inference graphs separately); a method that fails to compile
    is reported as failed.
    """
    return {
        name: torch.compile(module, mode=None if mode == "default" else mode)  # type: ignore[misc]
        for name, module in methods.items()
    }


def run_case(case: Case, args: argparse.Namespace) -> list[dict[str, object]]:
    device, dtype = args.device, getattr(torch, args.dtype)
    originals = make_methods(case, device, dtype)
    if args.methods:  # dense and ttlayers always: the ratios and the plans refer to them
        keep = {*args.methods, "dense", "ttlayers"}
        originals = {k: v for k, v in originals.items() if k in keep}
    methods = originals if args.compile == "off" else compiled(originals, args.compile)
    generator = torch.Generator(device=device).manual_seed(1)
    x = torch.randn(case.batch, case.in_features, device=device, dtype=dtype, generator=generator)
    x.requires_grad_(True)
    grad = torch.randn(
        case.batch, case.out_features, device=device, dtype=dtype, generator=generator
    )
    times: dict[str, dict[str, list[float]]] = {
        name: {"forward": [], "backward": [], "total": [], "infer": []} for name in methods
    }
    failed: dict[str, str] = {}

    # Each round in a random order. (Rotating the order by one method per round, as this
    # script did until 2026-11-28, runs each method after the same other one in all rounds
    # but one in n: ttlayers came after nn.Linear in 4 rounds of 5.)
    order = random.Random(0)

    def shuffled() -> list[tuple[str, nn.Module]]:
        items = list(methods.items())
        order.shuffle(items)
        return items

    def one_round(record: bool) -> None:
        for name, module in shuffled():
            if name in failed:
                continue
            try:
                module.zero_grad(set_to_none=True)
                x.grad = None
                _sync(device)
                t0 = time.perf_counter()
                y = module(x)
                _sync(device)
                t1 = time.perf_counter()
                y.backward(grad)
                _sync(device)
                t2 = time.perf_counter()
                del y
            except Exception as error:
                failed[name] = f"{type(error).__name__}: {error}"[:200]
                continue
            if record:
                rec = times[name]
                rec["forward"].append(t1 - t0)
                rec["backward"].append(t2 - t1)
                rec["total"].append(t2 - t0)

    def inference_round(record: bool) -> None:
        # Inference in rounds of its own, as a model runs it: each call follows other
        # forward passes, not a backward pass that has just evicted the caches.
        with torch.no_grad():
            for name, module in shuffled():
                if name in failed:
                    continue
                try:
                    _sync(device)
                    t0 = time.perf_counter()
                    module(x)
                    _sync(device)
                    t1 = time.perf_counter()
                except Exception as error:
                    failed[name] = f"{type(error).__name__}: {error}"[:200]
                    continue
                if record:
                    times[name]["infer"].append(t1 - t0)

    for k in range(args.warmup + args.repeats):
        one_round(record=k >= args.warmup)
    for k in range(args.warmup + args.repeats):
        inference_round(record=k >= args.warmup)

    tt = originals["ttlayers"]
    assert isinstance(tt, TTLinear)
    training_plan = select_plan(
        case.batch, tt.in_modes, tt.out_modes, tt.ranks, dtype, torch.device(device).type, True
    )
    inference_plan = select_plan(
        case.batch, tt.in_modes, tt.out_modes, tt.ranks, dtype, torch.device(device).type, False
    )
    records = []
    for name, module in methods.items():
        record: dict[str, object] = {
            "case": case.name,
            "group": case.group,
            "method": name,
            "in_features": case.in_features,
            "out_features": case.out_features,
            "in_modes": list(tt.in_modes),
            "out_modes": list(tt.out_modes),
            "ranks": list(tt.ranks),
            "batch": case.batch,
        }
        if name in failed:
            record["error"] = failed[name]
        else:
            for key, values in times[name].items():
                record[f"{key}_ms"] = 1e3 * statistics.median(values)
            # Compiled graphs save what AOTAutograd decides, out of reach of the hooks.
            compiled_graph = args.compile != "off"
            record["saved_bytes"] = None if compiled_graph else saved_bytes(module, x)
            record["peak_bytes"] = peak_bytes(module, x, grad)
        if name == "ttlayers":
            record["plan_training"] = describe(training_plan)
            record["plan_inference"] = describe(inference_plan)
        records.append(record)
    return records


def cheapest_order_ratio(case: Case) -> float:
    """opt_einsum's optimal FLOPs over the input and all cores, relative to the dense product."""
    in_modes, out_modes = case.in_modes, case.out_modes
    if in_modes is None or out_modes is None:
        in_modes, out_modes = suggest_modes(case.in_features, case.out_features)
    ranks = resolve_ranks(case.rank, in_modes, out_modes)
    terms, output = chain_equation(len(in_modes))
    shapes = [(case.batch, *in_modes)] + [
        (ranks[k], in_modes[k], out_modes[k], ranks[k + 1]) for k in range(len(in_modes))
    ]
    _, info = opt_einsum.contract_path(
        ",".join(terms) + "->" + output, *shapes, shapes=True, optimize="optimal"
    )
    # opt_einsum counts a multiply-add as 2 operations in its opt_cost, as we do below.
    return float(info.opt_cost) / (2 * case.batch * case.in_features * case.out_features)


# --- reporting -----------------------------------------------------------------------------------


def table(records: list[dict[str, object]], markdown: bool) -> str:
    header = [
        "case",
        "method",
        "forward ms",
        "backward ms",
        "fwd+bwd ms",
        "infer ms",
        "fwd+bwd / dense",
        "infer / dense",
        "saved MB",
    ]
    if any(r.get("peak_bytes") is not None for r in records):
        header.append("peak MB")
    rows = []
    dense = {r["case"]: r for r in records if r["method"] == "dense" and "error" not in r}
    for r in records:
        if "error" in r:
            rows.append([str(r["case"]), str(r["method"]), "error: " + str(r["error"])[:60]])
            continue
        base = dense.get(r["case"])
        method = str(r["method"])
        if method == "ttlayers":
            method += f" [{r['plan_training']}]"
        row = [
            str(r["case"]),
            method,
            f"{r['forward_ms']:.3f}",
            f"{r['backward_ms']:.3f}",
            f"{r['total_ms']:.3f}",
            f"{r['infer_ms']:.3f}",
            f"{r['total_ms'] / base['total_ms']:.2f}" if base else "",  # type: ignore[operator]
            f"{r['infer_ms'] / base['infer_ms']:.2f}" if base else "",  # type: ignore[operator]
            _megabytes(r["saved_bytes"]),
        ]
        if "peak MB" in header:
            row.append(_megabytes(r.get("peak_bytes")))
        rows.append(row)
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
        return "\n".join(lines)
    widths = [
        max(len(h), *(len(row[i]) for row in rows if i < len(row))) for i, h in enumerate(header)
    ]

    def fmt(row: list[str]) -> str:
        return "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=False))

    return "\n".join([fmt(header), fmt(["-" * w for w in widths]), *map(fmt, rows)])


def _megabytes(size: object) -> str:
    return "" if size is None else f"{float(size) / 2**20:.1f}"  # type: ignore[arg-type]


def targets(records: list[dict[str, object]], cases: list[Case]) -> list[str]:
    """The issue's targets, checked on these measurements."""
    by = {(r["case"], r["method"]): r for r in records if "error" not in r}
    ms = {key: float(r["total_ms"]) for key, r in by.items()}  # type: ignore[arg-type]
    lines = []
    for case in cases:
        tt, dense = ms.get((case.name, "ttlayers")), ms.get((case.name, "dense"))
        if tt is None or dense is None:
            continue
        flops = cheapest_order_ratio(case)
        parts = [
            f"{case.name}: cheapest order {flops:.2f}x dense FLOPs",
            f"{tt / dense:.2f}x dense",
        ]
        if case.group == "issue":
            goal = 0.75 if flops <= 0.55 else 1.25 if case.rank == 32 else None
            if goal:
                parts.append(f"target <= {goal}: {_verdict(tt / dense <= goal)}")
        tl = ms.get((case.name, "tltorch"))
        if tl is not None:
            parts.append(f"vs tltorch {tt / tl:.2f}x: {_verdict(tt < tl)}")
        refs = [ms[(case.name, m)] for m in ("rebuild", "best-order") if (case.name, m) in ms]
        if refs:
            within = tt / min(refs)
            parts.append(f"vs best of rebuild/best-order {within:.2f}x: {_verdict(within <= 1.1)}")
        if case.batch == 1 and flops < 1.0:
            infer = float(by[(case.name, "ttlayers")]["infer_ms"])  # type: ignore[arg-type]
            infer /= float(by[(case.name, "dense")]["infer_ms"])  # type: ignore[arg-type]
            parts.append(f"batch-1 inference {infer:.2f}x dense: {_verdict(infer < 1)}")
        lines.append("; ".join(parts))
    return lines


def _verdict(ok: bool) -> str:
    return "met" if ok else "MISSED"


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} CPUs)"
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter
    )
    add_device_options(parser)
    parser.add_argument("--repeats", type=positive_int, default=20, help="timed rounds")
    parser.add_argument("--warmup", type=non_negative_int, default=3, help="untimed rounds first")
    parser.add_argument(
        "--cases",
        default="all",
        help="';'-separated: all, a group (issue, memory, sweep, transformer), case names or "
        "their beginnings",
    )
    parser.add_argument(
        "--methods",
        default="",
        help=f"comma-separated, from {', '.join(METHOD_NAMES)}; dense and ttlayers always run "
        "(default: all)",
    )
    parser.add_argument(
        "--json", type=output_file, default="", help="write the records and the setup here"
    )
    parser.add_argument("--markdown", action="store_true", help="print a Markdown table")
    parser.add_argument(
        "--compile",
        default="off",
        choices=["off", "default", "reduce-overhead", "max-autotune"],
        help="run every method under torch.compile with this mode (reduce-overhead: CUDA graphs)",
    )
    args = parser.parse_args(argv)
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in args.methods if m not in METHOD_NAMES]
    if unknown:
        parser.error(f"unknown --methods {', '.join(unknown)}; known: {', '.join(METHOD_NAMES)}")
    if "tltorch" in args.methods and importlib.util.find_spec("tltorch") is None:
        print("note: --methods tltorch: tltorch is not installed, so not measured", file=sys.stderr)
    check_device(parser, args.device)
    groups = {"all": [c.name for c in CASES]}
    for case in CASES:
        groups.setdefault(case.group, []).append(case.name)
    picked = set(select(parser, "--cases", args.cases, [c.name for c in CASES], groups))
    cases = [c for c in CASES if c.name in picked]
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    setup = {
        "command": shlex.join(["python", *sys.argv]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name() if args.device == "cuda" else _cpu_name(),
        "threads": torch.get_num_threads(),
        "dtype": args.dtype,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "compile": args.compile,
        "load_before": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }
    print(json.dumps(setup))
    records: list[dict[str, object]] = []
    for case in cases:
        print(f"... {case.name}", file=sys.stderr, flush=True)
        records += run_case(case, args)
        setup["load_after"] = os.getloadavg() if hasattr(os, "getloadavg") else None
        if args.json:  # after every case, so a run cut short still leaves its results
            with open(args.json, "w") as f:
                json.dump({"setup": setup, "records": records}, f, indent=1)
    print(table(records, args.markdown))
    print()
    for line in targets(records, cases):
        print(line)


if __name__ == "__main__":
    main()
