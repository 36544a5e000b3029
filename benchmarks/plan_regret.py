"""How good are the planner's choices? Every candidate plan timed, against the one it picks.

For each case (a layer shape, TT modes and rank, a batch size), training and inference, this
times every candidate plan of :func:`ttlayers.planner.candidate_plans` whose cost-model
estimate is within ``--keep`` times the best estimate (the rest would take long and cannot
win), interleaved (each round in a random order), median of ``--repeats`` rounds after two
warm-up rounds, through :func:`ttlayers.contraction.tt_linear` with the plan given. The
*regret* of a case is the measured time of the plan the planner picks over the measured
time of the fastest candidate: 1.00 means the cost model chose right.

Usage::

    python benchmarks/plan_regret.py                  # CPU, float32, 2 threads
    python benchmarks/plan_regret.py --threads 1 --json regret.json
    python benchmarks/plan_regret.py --large --keep 3 --repeats 5   # 2,048-8,192 rows
    python benchmarks/plan_regret.py --moderate --steps 3 --keep 3 --repeats 9
    python benchmarks/plan_regret.py --device cuda --dtype bfloat16     # a GPU

With ``--steps N`` each round runs a plan N times in a row and keeps the fastest of all but
the first, which pays for the previous plan's allocations (the C allocator's state): the
time of a plan repeated, as in a training loop.

The candidates' chunk counts are sized for ``--threads`` threads, as the planner sizes its
own. (Until 2026-11-28, 12:30 UTC they were sized for one thread, whatever ``--threads``: the
runs recorded before then timed the planner's choice against the one-thread chunk counts.)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import random
import statistics
import sys
import time

import torch
from _cli import (
    HelpFormatter,
    add_device_options,
    check_device,
    float_at_least,
    output_file,
    positive_int,
)

from ttlayers.contraction import select_plan, tt_linear
from ttlayers.planner import Plan, candidate_plans, estimate_time
from ttlayers.shapes import resolve_ranks, suggest_modes

M4, M8 = (4, 8, 8, 4), (8, 8, 8, 8)
# (in_features, out_features, rank, batch, in_modes, out_modes); None: the default modes.
CASES: list[tuple[int, int, int, int, tuple[int, ...] | None, tuple[int, ...] | None]] = [
    (1024, 1024, 8, 1, M4, M4),
    (1024, 1024, 8, 32, M4, M4),
    (1024, 1024, 8, 96, M4, M4),
    (1024, 1024, 8, 256, M4, M4),
    (1024, 1024, 8, 1024, M4, M4),
    (1024, 1024, 4, 256, M4, M4),
    (1024, 1024, 16, 32, M4, M4),
    (1024, 1024, 16, 48, M4, M4),
    (1024, 1024, 32, 100, M4, M4),
    (1024, 1024, 32, 256, M4, M4),
    (1024, 1024, 8, 256, None, None),
    (4096, 4096, 16, 1, M8, M8),
    (4096, 4096, 16, 24, M8, M8),
    (4096, 4096, 16, 128, M8, M8),
    (4096, 11008, 16, 1, None, None),
]
# --moderate: small and moderate batches (1-1024 rows) of layers of several shapes, where a
# step's fixed costs and a chunk's cache are what the planner weighs.
M47 = (4, 7, 7, 4)
MODERATE_CASES: list[tuple[int, int, int, int, tuple[int, ...] | None, tuple[int, ...] | None]] = [
    (784, 256, 8, 8, (28, 28), (16, 16)),
    (784, 256, 8, 64, (28, 28), (16, 16)),
    (784, 256, 8, 128, (28, 28), (16, 16)),
    (784, 256, 8, 16, None, None),
    (784, 256, 8, 64, None, None),
    (784, 1024, 8, 64, M47, M4),
    (784, 1024, 16, 128, M47, M4),
    (256, 256, 8, 1, (4, 4, 4, 4), (4, 4, 4, 4)),
    (256, 256, 8, 8, (4, 4, 4, 4), (4, 4, 4, 4)),
    (256, 256, 8, 32, (4, 4, 4, 4), (4, 4, 4, 4)),
    (512, 512, 8, 1, (4, 4, 8, 4), (4, 8, 4, 4)),
    (512, 512, 8, 8, (4, 4, 8, 4), (4, 8, 4, 4)),
    (512, 512, 16, 4, (8, 8, 8), (8, 8, 8)),
    (512, 512, 16, 32, (8, 8, 8), (8, 8, 8)),
    (512, 512, 8, 128, None, None),
    (768, 3072, 16, 8, None, None),
    (768, 3072, 8, 64, None, None),
    (768, 3072, 16, 128, None, None),
    (3072, 768, 16, 128, None, None),
    (1024, 1024, 8, 4, M4, M4),
    (1024, 1024, 8, 16, M4, M4),
    (1024, 1024, 8, 96, M4, M4),
    (1024, 1024, 8, 256, M4, M4),
    (1024, 1024, 16, 48, M4, M4),
    (1024, 1024, 16, 192, M4, M4),
    (1024, 1024, 32, 64, M4, M4),
    (4096, 4096, 16, 8, M8, M8),
    (4096, 4096, 16, 64, M8, M8),
    (4096, 4096, 8, 64, M8, M8),
]
# --large: where chunks stop fitting the cache and the memory bound sets their count.
LARGE_CASES: list[tuple[int, int, int, int, tuple[int, ...] | None, tuple[int, ...] | None]] = [
    (1024, 1024, 8, 2048, M4, M4),
    (1024, 1024, 8, 8192, M4, M4),
    (4096, 4096, 16, 1024, M8, M8),
    (4096, 4096, 16, 4096, M8, M8),
]


def describe(plan: Plan) -> str:
    if plan.kind == "chain":
        return "chain"
    if plan.kind == "dense":
        return f"dense@{plan.split}"
    suffix = ", dS from Z" if plan.second_from_z else ""
    first = f"{plan.first} first" + (" batched" if plan.batched_first else "")
    return f"twoblock@{plan.split} {first}, {plan.chunks} chunks{suffix}"


def forward_only(plan: Plan) -> Plan:
    """``plan`` with the fields that only the backward pass reads at their defaults."""
    return dataclasses.replace(plan, save_max_batch=0, second_from_z=False)


def run_case(
    case: tuple[int, int, int, int, tuple[int, ...] | None, tuple[int, ...] | None],
    training: bool,
    args: argparse.Namespace,
) -> dict[str, object]:
    in_features, out_features, rank, batch, in_modes, out_modes = case
    if in_modes is None or out_modes is None:
        in_modes, out_modes = suggest_modes(in_features, out_features)
    ranks = resolve_ranks(rank, in_modes, out_modes)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    generator = torch.Generator().manual_seed(0)

    def make(*shape: int, grad: bool = False) -> torch.Tensor:
        # Drawn on the CPU, so that every device times the same numbers.
        t = torch.randn(*shape, generator=generator).to(device, dtype)
        return t.requires_grad_(grad)

    cores = [
        torch.nn.Parameter(0.3 * make(ranks[k], m, n, ranks[k + 1]))
        for k, (m, n) in enumerate(zip(in_modes, out_modes, strict=True))
    ]
    bias = torch.nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype))
    x = make(batch, in_features, grad=True)
    grad = make(batch, out_features)
    # Plans depend on the thread count on CPUs only (contraction._threads).
    threads = torch.get_num_threads() if device.type == "cpu" else 1
    where = {"dtype": dtype, "device_type": device.type, "threads": threads}

    def estimate(plan: Plan) -> float:
        return estimate_time(plan, batch, in_modes, out_modes, ranks, training=training, **where)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    # Chunk counts sized for the threads the plans run with, as the planner sizes them.
    plans = candidate_plans(batch, in_modes, out_modes, ranks, **where)
    best_estimate = min(estimate(p) for p in plans)
    plans = [p for p in plans if estimate(p) <= args.keep * best_estimate]
    # What TTLinear runs: the plan table's entry for this batch size.
    chosen = select_plan(batch, in_modes, out_modes, ranks, dtype, device.type, training)
    if not training:
        # Without a backward pass, plans that differ only in how it would run do the same
        # work: each is timed once, or the fastest of the copies' noise would count as a plan.
        plans = list(dict.fromkeys(map(forward_only, plans)))
        chosen = forward_only(chosen)
    if chosen not in plans:
        plans.append(chosen)
    times: dict[int, list[float]] = {i: [] for i in range(len(plans))}
    order = random.Random(0)  # each round in a random order (see bench_linear.py)
    for round_ in range(args.repeats + 2):
        for i in order.sample(range(len(plans)), len(plans)):
            plan = plans[i]
            steps = []
            for _ in range(args.steps):
                for tensor in (x, *cores, bias):  # each backward writes fresh gradients
                    tensor.grad = None
                sync()
                started = time.perf_counter()
                if training:
                    tt_linear(x, cores, bias, plan=plan).backward(grad)
                else:
                    with torch.no_grad():
                        tt_linear(x, cores, bias, plan=plan)
                sync()
                steps.append(time.perf_counter() - started)
            if round_ >= 2:
                times[i].append(min(steps[1:] or steps))
    medians = [statistics.median(t) for t in times.values()]
    fastest = min(range(len(plans)), key=medians.__getitem__)
    picked = plans.index(chosen)
    return {
        "case": f"{in_features}->{out_features} {in_modes} r{rank} b{batch}",
        "pass": "training" if training else "inference",
        "chosen": describe(chosen),
        "chosen_ms": medians[picked] * 1e3,
        "fastest": describe(plans[fastest]),
        "fastest_ms": medians[fastest] * 1e3,
        "regret": medians[picked] / medians[fastest],
        "plans": [
            {"plan": describe(p), "estimate_ms": estimate(p) * 1e3, "ms": t * 1e3}
            for p, t in zip(plans, medians, strict=True)
        ],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=HelpFormatter
    )
    add_device_options(parser)
    parser.add_argument("--repeats", type=positive_int, default=10, help="timed rounds")
    parser.add_argument(
        "--keep",
        type=float_at_least(1.0),
        default=6.0,
        help="time the candidate plans whose estimate is within this factor of the best one",
    )
    parser.add_argument("--json", type=output_file, default=None, help="write the records here")
    parser.add_argument(
        "--steps",
        type=positive_int,
        default=1,
        help="steps of each plan in a row per round, timed: the fastest but the first",
    )
    cases = parser.add_mutually_exclusive_group()
    cases.add_argument(
        "--large", action="store_true", help="the large-batch cases instead (minutes each)"
    )
    cases.add_argument(
        "--moderate", action="store_true", help="the cases of 1-1024 rows of other shapes"
    )
    args = parser.parse_args(argv)
    check_device(parser, args.device)
    torch.set_num_threads(args.threads)
    setup = {"threads": args.threads, "steps": args.steps, "keep": args.keep}
    setup |= {"device": args.device, "dtype": args.dtype, "torch": torch.__version__}
    setup["cases"] = "large" if args.large else "moderate" if args.moderate else "default"
    records = []
    print("| case | pass | planner's choice | ms | fastest candidate | ms | regret |")
    print("|---|---|---|---|---|---|---|")
    for case in LARGE_CASES if args.large else MODERATE_CASES if args.moderate else CASES:
        for training in (True, False):
            r = run_case(case, training, args)
            records.append(r)
            print(
                f"| {r['case']} | {r['pass']} | {r['chosen']} | {r['chosen_ms']:.3f} "
                f"| {r['fastest']} | {r['fastest_ms']:.3f} | {r['regret']:.2f} |",
                flush=True,
            )
            if args.json:  # after every case, so that a run cut short leaves its results
                with open(args.json, "w") as f:
                    json.dump({**setup, "records": records}, f)
    regrets = [float(r["regret"]) for r in records]  # type: ignore[arg-type]
    geomean = math.exp(sum(math.log(v) for v in regrets) / len(regrets))
    print(f"\nregret: geometric mean {geomean:.3f}, worst {max(regrets):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
