"""How many row chunks should a two-block plan use? Each count timed, against the planner's.

For one layer shape (square, TT modes and rank given) and each batch size, this times the
two-block plan at the middle split with the right block first, unchunked keeping its
intermediate Z for the backward pass (``1 kept``) and in each of ``--chunks`` row chunks,
next to the plan the planner picks (``TTLinear``'s, from the plan table), interleaved (each
round in a random order, seeded), median of ``--repeats`` rounds after three warm-up rounds.
Training steps (forward and backward) unless ``--inference``. Each entry is the time over
the fastest of the fixed counts, with the median number of page faults a step (minor faults
of the process, from ``resource.getrusage``; blank where the platform has none): glibc's
``malloc`` returns large freed blocks to the system, and a step that allocates them again
faults every 4 KiB page in.

Usage::

    python benchmarks/bench_chunks.py                                # 1024, (4, 8, 8, 4), rank 8
    python benchmarks/bench_chunks.py --modes 8,8,8,8 --rank 16 --batches 8,12,16,24,31
    python benchmarks/bench_chunks.py --inference --json chunks.json
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import sys
import time

import torch
from _cli import HelpFormatter, output_file, positive_int, positive_ints

from ttlayers import TTLinear
from ttlayers.contraction import select_plan, tt_linear
from ttlayers.planner import Plan

try:
    import resource
except ImportError:  # not on Windows
    resource = None  # type: ignore[assignment]


def minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt if resource else 0


def describe(plan: Plan, batch: int, training: bool) -> str:
    if plan.kind != "twoblock":
        return plan.kind if plan.kind == "chain" else f"{plan.kind}@{plan.split}"
    kept = " kept" if training and plan.chunks == 1 and batch <= plan.save_max_batch else ""
    first = f"{plan.first}{' batched' if plan.batched_first else ''}"
    return f"twoblock@{plan.split} {first}, {plan.chunks}{kept}"


def run_batch(
    layer: TTLinear, batch: int, counts: list[int], args: argparse.Namespace
) -> dict[str, object]:
    modes, d = layer.in_modes, len(layer.in_modes)
    cores, bias = list(layer.cores), layer.bias
    training = not args.inference
    plans: dict[str, Plan] = {}
    for count in counts:
        if count <= batch:
            keep = 2**62 if count == 1 and training else 0
            plans[str(count)] = Plan("twoblock", split=d // 2, chunks=count, save_max_batch=keep)
    chosen = select_plan(batch, modes, modes, layer.ranks, torch.float32, "cpu", training)
    plans["planner"] = chosen
    generator = torch.Generator().manual_seed(batch)
    x = torch.randn(batch, layer.in_features, generator=generator, requires_grad=training)
    grad = torch.randn(batch, layer.out_features, generator=generator)
    times: dict[str, list[float]] = {name: [] for name in plans}
    faults: dict[str, list[int]] = {name: [] for name in plans}
    order = random.Random(batch)
    for round_ in range(args.repeats + 3):
        for name in order.sample(list(plans), len(plans)):
            for tensor in (x, *cores, bias):
                tensor.grad = None
            before = minor_faults()
            started = time.perf_counter()
            if training:
                tt_linear(x, cores, bias, plan=plans[name]).backward(grad)
            else:
                with torch.no_grad():
                    tt_linear(x, cores, bias, plan=plans[name])
            elapsed = time.perf_counter() - started
            if round_ >= 3:
                times[name].append(elapsed)
                faults[name].append(minor_faults() - before)
    medians = {name: statistics.median(t) for name, t in times.items()}
    best = min(t for name, t in medians.items() if name != "planner")
    r, ms, nf = layer.ranks[d // 2], math.prod(modes[: d // 2]), math.prod(modes[d // 2 :])
    return {
        "batch": batch,
        "z_mb": batch * r * ms * nf * 4 / 2**20,  # the unchunked intermediate, float32
        "planner": describe(chosen, batch, training),
        "best_ms": best * 1e3,
        "ratio": {name: t / best for name, t in medians.items()},
        "faults": {name: statistics.median(f) for name, f in faults.items()},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=HelpFormatter
    )
    parser.add_argument(
        "--modes",
        type=positive_ints,
        default="4,8,8,4",
        help="comma-separated input modes, also the output modes; at least two",
    )
    parser.add_argument("--rank", type=positive_int, default=8, help="every inner bond")
    parser.add_argument(
        "--batches",
        type=positive_ints,
        default="32,48,64,96,127,192,256",
        help="comma-separated batch sizes",
    )
    parser.add_argument(
        "--chunks",
        type=positive_ints,
        default="1,2,3,4,8",
        help="comma-separated chunk counts to time (1 is always timed)",
    )
    parser.add_argument("--repeats", type=positive_int, default=20, help="timed rounds")
    parser.add_argument(
        "--threads", type=positive_int, default=2, help="CPU threads (set_num_threads)"
    )
    parser.add_argument(
        "--inference", action="store_true", help="time forward passes under no_grad"
    )
    parser.add_argument(
        "--json", type=output_file, default=None, help="write the records and the setup here"
    )
    args = parser.parse_args(argv)
    if len(args.modes) < 2:
        parser.error(f"--modes: the two-block plans need two modes or more; got {args.modes}")
    torch.set_num_threads(args.threads)
    modes = tuple(args.modes)
    counts = sorted({1, *args.chunks})  # 1 fits every batch
    torch.manual_seed(0)
    size = math.prod(modes)
    layer = TTLinear(size, size, rank=args.rank, in_modes=modes, out_modes=modes)
    names = [f"{c}{' kept' if c == 1 and not args.inference else ''}" for c in counts]
    print(
        f"{size} x {size}, modes {modes}, rank {args.rank}, {args.threads} threads, "
        f"{'inference' if args.inference else 'training'}: time / fastest fixed count "
        "(page faults a step)"
    )
    print(f"| batch | Z MB | planner's choice | its time | {' | '.join(names)} | fastest ms |")
    print("|---|---|---|---|" + "---|" * len(names) + "---|")
    records = []
    for batch in args.batches:
        rec = run_batch(layer, batch, counts, args)
        records.append(rec)
        ratio, faults = rec["ratio"], rec["faults"]
        assert isinstance(ratio, dict) and isinstance(faults, dict)
        cells = [
            f"{ratio[str(c)]:.2f} ({faults[str(c)]})" if str(c) in ratio else "" for c in counts
        ]
        print(
            f"| {batch} | {rec['z_mb']:.1f} | {rec['planner']} | {ratio['planner']:.2f} "
            f"({faults['planner']}) | {' | '.join(cells)} | {rec['best_ms']:.2f} |",
            flush=True,
        )
    if args.json:
        with open(args.json, "w") as f:
            setup = {
                "modes": modes,
                "rank": args.rank,
                "inference": args.inference,
                "repeats": args.repeats,
                "threads": args.threads,
                "torch": torch.__version__,
            }
            json.dump({"setup": setup, "records": records}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
