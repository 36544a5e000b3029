"""Inference latency of a stack of layers at small batch sizes, as in token-by-token decoding.

``bench_linear.py`` times one layer, each call following other methods' calls. In a model a
layer follows other layers of its own kind: a decoder producing one token runs every layer of
the network at batch 1, one after the other. This script times that: ``--layers`` layers of one
shape with a ReLU between them, built as ``nn.Linear`` (``dense``), as ``TTLinear``
(``ttlayers``) and, when installed, as TensorLy-Torch's ``FactorizedLinear`` (``tltorch``,
``factorization="blocktt"``, ``implementation="factorized"``), all under ``torch.no_grad()``.
One round runs each stack once on the same input, in a random order (seeded: a stack run
right after the dense one finds the caches emptied by its weights, and should not always be
the same stack), and the script reports the median over ``--repeats`` rounds after
``--warmup`` rounds, per pass through the stack and per layer, and the ratio to ``dense``
measured in the same rounds.

Usage::

    python benchmarks/bench_decode.py                          # CPU, float32, 2 threads
    python benchmarks/bench_decode.py --layers 16 --batches 1,8 --markdown
    python benchmarks/bench_decode.py --device cuda --dtype bfloat16
    python benchmarks/bench_decode.py --layers 40 --flat-buffer    # parameters in one buffer

With ``--flat-buffer`` every stack's parameters are made views of one flat buffer
(``torch.nn.utils.vector_to_parameters``), as some training and search code leaves a model.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from dataclasses import dataclass

import torch
from _cli import (
    HelpFormatter,
    add_device_options,
    check_device,
    non_negative_int,
    output_file,
    positive_int,
    positive_ints,
    select,
)
from bench_linear import tltorch_layer  # sibling scripts: benchmarks/ is on sys.path
from torch import nn

from ttlayers import TTLinear


@dataclass(frozen=True)
class Shape:
    name: str
    features: int
    rank: int
    modes: tuple[int, ...] | None  # None: TTLinear's default modes


SHAPES = [
    Shape("1024 (4,8,8,4) r8", 1024, 8, (4, 8, 8, 4)),
    Shape("1024 default r8", 1024, 8, None),
    Shape("4096 (8,8,8,8) r16", 4096, 16, (8, 8, 8, 8)),
]

METHODS = ("dense", "ttlayers", "tltorch")


def make_stack(
    method: str, shape: Shape, layers: int, device: str, dtype: torch.dtype
) -> nn.Module:
    """``layers`` layers of ``method`` with a ReLU after each but the last."""
    factory = {"device": device, "dtype": dtype}
    # TensorLy-Torch's layer takes the modes and ranks TTLinear chooses for this shape.
    reference = TTLinear(shape.features, shape.features, shape.rank, in_modes=shape.modes)
    modules: list[nn.Module] = []
    for k in range(layers):
        if method == "dense":
            modules.append(nn.Linear(shape.features, shape.features, **factory))
        elif method == "ttlayers":
            modes = shape.modes
            modules.append(
                TTLinear(
                    shape.features,
                    shape.features,
                    shape.rank,
                    in_modes=modes,
                    out_modes=modes,
                    **factory,
                )
            )
        else:
            modules.append(tltorch_layer(reference).to(**factory))
        if k < layers - 1:
            modules.append(nn.ReLU())
    return nn.Sequential(*modules).eval()


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def run(shape: Shape, batch: int, args: argparse.Namespace) -> list[dict[str, object]]:
    device, dtype = args.device, getattr(torch, args.dtype)
    torch.manual_seed(0)
    stacks: dict[str, nn.Module] = {}
    for method in args.methods:
        try:
            stacks[method] = make_stack(method, shape, args.layers, device, dtype)
        except ImportError:
            pass  # tltorch not installed
    if args.flat_buffer:
        for stack in stacks.values():
            flat = nn.utils.parameters_to_vector(stack.parameters()).detach().clone()
            nn.utils.vector_to_parameters(flat, stack.parameters())
    generator = torch.Generator(device=device).manual_seed(1)
    x = torch.randn(batch, shape.features, device=device, dtype=dtype, generator=generator)
    times: dict[str, list[float]] = {name: [] for name in stacks}
    names = list(stacks)
    order = random.Random(0)
    with torch.no_grad():
        for round_ in range(args.warmup + args.repeats):
            order.shuffle(names)
            for name in names:
                _sync(device)
                started = time.perf_counter()
                stacks[name](x)
                _sync(device)
                if round_ >= args.warmup:
                    times[name].append(time.perf_counter() - started)
    dense = statistics.median(times["dense"])
    records = []
    for name, values in times.items():
        median = statistics.median(values)
        records.append(
            {
                "shape": shape.name,
                "batch": batch,
                "method": name,
                "pass_ms": median * 1e3,
                "layer_us": median / args.layers * 1e6,
                "ratio": median / dense,
            }
        )
    return records


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=HelpFormatter
    )
    add_device_options(parser)
    parser.add_argument("--layers", type=positive_int, default=8, help="layers in the stack")
    parser.add_argument(
        "--batches", type=positive_ints, default="1", help="comma-separated batch sizes"
    )
    parser.add_argument(
        "--shapes", default="", help="';'-separated shape names or their beginnings (default: all)"
    )
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated")
    parser.add_argument("--repeats", type=positive_int, default=200, help="timed rounds")
    parser.add_argument("--warmup", type=non_negative_int, default=20, help="untimed rounds first")
    parser.add_argument(
        "--json", type=output_file, default="", help="write the records and the setup here"
    )
    parser.add_argument("--markdown", action="store_true", help="print a Markdown table")
    parser.add_argument(
        "--flat-buffer", action="store_true", help="each stack's parameters in one buffer"
    )
    args = parser.parse_args(argv)
    args.methods = ["dense", *(m for m in args.methods.split(",") if m and m != "dense")]
    unknown = set(args.methods) - set(METHODS)
    if unknown:
        parser.error(f"unknown methods {sorted(unknown)}; choose from {', '.join(METHODS)}")
    check_device(parser, args.device)
    picked = set(select(parser, "--shapes", args.shapes, [s.name for s in SHAPES]))
    shapes = [s for s in SHAPES if s.name in picked]
    batches = args.batches
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    records: list[dict[str, object]] = []
    if args.markdown:
        print("| layers | batch | method | ms per pass | µs per layer | / dense |")
        print("|---|---|---|---|---|---|")
    for shape in shapes:
        for batch in batches:
            for r in run(shape, batch, args):
                records.append(r)
                line = (
                    f"{r['shape']:20s} b{batch:<5d} {r['method']:9s} {r['pass_ms']:8.3f} ms"
                    f" {r['layer_us']:8.1f} us/layer  {r['ratio']:.2f}x dense"
                )
                if args.markdown:
                    line = (
                        f"| {args.layers} x {r['shape']} | {batch} | {r['method']} "
                        f"| {r['pass_ms']:.3f} | {r['layer_us']:.1f} | {r['ratio']:.2f} |"
                    )
                print(line, flush=True)
    if args.json:
        setup = {
            "device": args.device,
            "dtype": args.dtype,
            "threads": torch.get_num_threads(),
            "layers": args.layers,
            "flat_buffer": args.flat_buffer,
            "repeats": args.repeats,
            "warmup": args.warmup,
            "torch": torch.__version__,
        }
        with open(args.json, "w") as f:
            json.dump({"setup": setup, "records": records}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
