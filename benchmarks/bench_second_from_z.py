"""What does ``Plan.second_from_z`` buy? Random layers, the planner's choice with and without it.

Draws random TT layers (2 to 4 cores, modes 2 to 32, ranks 4 to 32, batches of 32 to 2,048)
and keeps those for which the planner's training plan forms the second block's gradient from
Z. For each, times one forward and backward pass (``tt_linear`` with the plan given) of that
plan and of the plan the planner picks when no candidate has ``second_from_z``, and of
``nn.Linear``: median of 7 after 2 warm-up passes, twice, the better of the two medians.

Usage::

    python benchmarks/bench_second_from_z.py --layers 14 --seed 1
"""

from __future__ import annotations

import argparse
import math
import random
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from unittest import mock

import torch
from _cli import HelpFormatter, positive_int
from plan_regret import describe  # sibling scripts: benchmarks/ is on sys.path
from torch import nn

import ttlayers.planner as planner
from ttlayers import TTLinear
from ttlayers.contraction import tt_linear
from ttlayers.planner import Plan, choose_plan


def median_ms(step: Callable[[], object], repeats: int = 7) -> float:
    for _ in range(2):
        step()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


@contextmanager
def without_second_from_z() -> Iterator[None]:
    """The planner as it was before ``second_from_z``: no candidate has it."""
    original = planner.candidate_plans

    def candidates(*args: object, **kwargs: object) -> list[Plan]:
        return [p for p in original(*args, **kwargs) if not p.second_from_z]  # type: ignore[arg-type]

    with mock.patch.object(planner, "candidate_plans", candidates):
        yield


def time_layer(layer: TTLinear, batch: int, new: Plan, old: Plan) -> tuple[float, ...]:
    """Training step times (ms) of ``new``, ``old`` and ``nn.Linear``: best of two medians."""
    cores = list(layer.cores)
    x = torch.randn(batch, layer.in_features, requires_grad=True)
    g = torch.randn(batch, layer.out_features)
    dense = nn.Linear(layer.in_features, layer.out_features)
    steps = [
        lambda: tt_linear(x, cores, layer.bias, plan=new).backward(g),
        lambda: tt_linear(x, cores, layer.bias, plan=old).backward(g),
        lambda: dense(x).backward(g),
    ]
    times: list[list[float]] = [[], [], []]
    for _ in range(2):
        for step, kept in zip(steps, times, strict=True):
            kept.append(median_ms(step))
    return tuple(min(kept) for kept in times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=HelpFormatter
    )
    parser.add_argument(
        "--layers",
        type=positive_int,
        default=14,
        help="random layers to time (at most 5,000 drawn)",
    )
    parser.add_argument("--seed", type=int, default=1, help="of the random layers and inputs")
    parser.add_argument(
        "--threads", type=positive_int, default=2, help="CPU threads (set_num_threads)"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rng = random.Random(args.seed)
    torch.manual_seed(args.seed)
    ratios = []
    for _ in range(5000):  # draws until enough layers
        if len(ratios) == args.layers:
            break
        d = rng.choice([2, 3, 4])
        in_modes = tuple(rng.choice([2, 4, 8, 16]) for _ in range(d))
        out_modes = tuple(rng.choice([2, 4, 8, 16, 32]) for _ in range(d))
        m, n = math.prod(in_modes), math.prod(out_modes)
        if not (256 <= m <= 8192 and 256 <= n <= 16384):
            continue
        rank = rng.choice([4, 8, 16, 32])
        ranks = (1,) + (rank,) * (d - 1) + (1,)
        batch = rng.choice([32, 128, 512, 2048])
        if batch * (m + n) * 4 > 400e6:
            continue
        shape = (batch, in_modes, out_modes, ranks)
        new = choose_plan(*shape, threads=args.threads, largest=2 * batch - 1)
        if not new.second_from_z:
            continue
        with without_second_from_z():
            old = choose_plan(*shape, threads=args.threads, largest=2 * batch - 1)
        layer = TTLinear(m, n, rank, in_modes=in_modes, out_modes=out_modes)
        t_new, t_old, t_dense = time_layer(layer, batch, new, old)
        ratios.append(t_new / t_old)
        print(
            f"{in_modes}x{out_modes} r{rank} b{batch}: {describe(new)}, {t_new:.1f} ms"
            f" | before: {describe(old)}, {t_old:.1f} ms | {t_new / t_old:.2f}x"
            f" | nn.Linear {t_dense:.1f} ms",
            flush=True,
        )
    if ratios:
        mean = math.exp(statistics.fmean(math.log(r) for r in ratios))
        print(f"{len(ratios)} layers: geometric mean {mean:.2f}x the time of the plan before")
    return 0


if __name__ == "__main__":
    sys.exit(main())
