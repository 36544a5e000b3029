"""Inference time of an ``nn.TransformerEncoder`` whose feed-forward layers are converted.

In eval mode without gradients, ``nn.TransformerEncoderLayer`` runs a fused kernel that takes
``linear1.weight`` and ``linear2.weight``; from a ``TTLinear`` those are the dense matrices,
rebuilt from the cores on every call. ``tensorize_`` gives the layers it converts there a
forward pre-hook that does nothing, which makes the encoder layer run its modules instead.
This script times, under ``torch.no_grad()`` on the same input:

- ``dense``: the original encoder (PyTorch's fused kernel);
- ``ttlayers``: the encoder after ``tensorize_(encoder, rank=R)``, as it is returned;
- ``fused``: the same converted encoder with those hooks removed, so that the fused kernel
  runs on the rebuilt weights (what ``tensorize_`` gave before the hooks).

One round runs each model once, in a seeded random order; the script reports the median over
``--repeats`` rounds after ``--warmup`` rounds, and its ratio to the median of ``dense`` over
the same rounds. ``rebuild`` is the median time of ``to_dense()`` of one layer's ``linear1``
and ``linear2`` together; PyTorch reads each weight twice (to check it, then for the
kernel), so the fused kernel pays twice that per encoder layer and call. ``compression`` is
``tensorize_``'s report's: the feed-forward layers' parameters before over after. With
``--padding F``, the last fraction ``F`` of every sequence but the first is padding, given as
``src_key_padding_mask``: the encoder then packs the batch into a nested tensor.

Usage::

    python benchmarks/bench_encoder.py                     # CPU, 2 threads, three cases
    python benchmarks/bench_encoder.py --padding 0.5 --markdown
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import statistics
import sys
import time
import warnings
from dataclasses import dataclass

import torch
from _cli import HelpFormatter, non_negative_int, output_file, positive_int, select
from torch import nn

import ttlayers


@dataclass(frozen=True)
class Case:
    name: str
    d_model: int
    heads: int
    feedforward: int
    layers: int
    rank: int
    batch: int
    length: int


CASES = [
    Case("384-1536 r32, 4 x 64 tokens", 384, 6, 1536, 6, 32, 4, 64),
    Case("512-2048 r16, 8 x 128 tokens", 512, 8, 2048, 4, 16, 8, 128),
    Case("768-3072 r16, 1 x 32 tokens", 768, 12, 3072, 4, 16, 1, 32),
]

METHODS = ("dense", "ttlayers", "fused")


def _median_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1e3


def run(case: Case, args: argparse.Namespace) -> list[dict[str, object]]:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(
        case.d_model, case.heads, case.feedforward, dropout=0.0, batch_first=True
    )
    models: dict[str, nn.Module] = {"dense": nn.TransformerEncoder(layer, case.layers).eval()}
    converted = copy.deepcopy(models["dense"])
    compression = ttlayers.tensorize_(converted, rank=case.rank).compression
    models["ttlayers"] = converted
    fused = copy.deepcopy(converted)
    for module in fused.modules():
        module._forward_pre_hooks.clear()
    models["fused"] = fused
    x = torch.randn(case.batch, case.length, case.d_model)
    mask = None
    if args.padding > 0:
        mask = torch.zeros(case.batch, case.length, dtype=torch.bool)
        mask[1:, case.length - int(args.padding * case.length) :] = True
    names = list(models)
    times: dict[str, list[float]] = {name: [] for name in names}
    order = random.Random(0)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TTLinear.weight's, in the fused model
        for round_ in range(args.warmup + args.repeats):
            order.shuffle(names)
            for name in names:
                started = time.perf_counter()
                models[name](x, src_key_padding_mask=mask)
                if round_ >= args.warmup:
                    times[name].append(time.perf_counter() - started)
        first = converted.layers[0]
        rebuild = _median_ms(lambda: (first.linear1.to_dense(), first.linear2.to_dense()), 20)
    dense = statistics.median(times["dense"])
    return [
        {
            "case": case.name,
            "method": name,
            "ms": statistics.median(values) * 1e3,
            "ratio": statistics.median(values) / dense,
            "rebuild_ms": rebuild,
            "compression": compression,  # of the converted feed-forward layers
        }
        for name, values in times.items()
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=HelpFormatter
    )
    parser.add_argument(
        "--threads", type=positive_int, default=2, help="CPU threads (set_num_threads)"
    )
    parser.add_argument("--padding", type=float, default=0.0, help="padded fraction, in [0, 1)")
    parser.add_argument(
        "--cases", default="", help="';'-separated case names or their beginnings (default: all)"
    )
    parser.add_argument("--repeats", type=positive_int, default=20, help="timed rounds")
    parser.add_argument("--warmup", type=non_negative_int, default=3, help="untimed rounds first")
    parser.add_argument(
        "--json", type=output_file, default="", help="write the records and the setup here"
    )
    parser.add_argument("--markdown", action="store_true", help="print a Markdown table")
    args = parser.parse_args(argv)
    if not 0 <= args.padding < 1:
        parser.error(f"--padding takes a fraction in [0, 1); got {args.padding}")
    picked = set(select(parser, "--cases", args.cases, [c.name for c in CASES]))
    cases = [c for c in CASES if c.name in picked]
    torch.set_num_threads(args.threads)
    records = []
    for case in cases:
        records += run(case, args)
    if args.markdown:
        print("| case | " + " | ".join(METHODS) + " | rebuild (ms) | compression |")
        print("|---|" + "---|" * (len(METHODS) + 2))
        for case in cases:
            rows = {r["method"]: r for r in records if r["case"] == case.name}
            cells = [f"{rows[m]['ms']:.1f} ms ({rows[m]['ratio']:.2f}x)" for m in METHODS]
            first = rows["dense"]
            print(
                f"| {case.name} | "
                + " | ".join(cells)
                + f" | {first['rebuild_ms']:.2f} | {first['compression']:.1f}x |"
            )
    else:
        for r in records:
            print(
                f"{r['case']:30} {r['method']:9} {r['ms']:9.2f} ms  {r['ratio']:5.2f}x dense"
                f"  (rebuild {r['rebuild_ms']:.2f} ms, compression {r['compression']:.1f}x)"
            )
    if args.json:
        setup = {
            "torch": torch.__version__,
            "threads": args.threads,
            "padding": args.padding,
            "repeats": args.repeats,
            "warmup": args.warmup,
            "argv": sys.argv[1:] if argv is None else argv,
        }
        with open(args.json, "w") as f:
            json.dump({"setup": setup, "records": records}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
