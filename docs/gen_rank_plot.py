"""Relative error, compression and accuracy against TT rank for a real trained layer.

Trains a small dense MLP (784 -> 256 -> ReLU -> 10) on Fashion-MNIST for one epoch, then
converts its 784 x 256 hidden layer by TT-SVD at a range of ranks, for d = 2, 3 and 4 cores
(modes from ``ttlayers.suggest_modes``), and records for each conversion:

- the relative Frobenius error ``||W - W_tt||_F / ||W||_F`` of the weight,
- the compression of the weight (``784 * 256`` over the number of core entries),
- the test accuracy of the MLP with that layer replaced, without any fine-tuning.

Writes ``docs/img/rank-plot.svg`` (used by docs/modes-and-ranks.md) and prints the table.
Rerun after changing the library or this script:

    pip install -e ".[docs]"         # matplotlib
    python docs/gen_rank_plot.py     # ~1 minute on a laptop CPU; --data-dir to point elsewhere

The data are the standard IDX ``.gz`` files, read with numpy (Debian's package
``dataset-fashion-mnist`` installs them in the default ``--data-dir``).
"""

from __future__ import annotations

import argparse
import gzip
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ttlayers import TTLinear, max_ranks, suggest_modes, tt_svd
from ttlayers.decomposition import relative_error
from ttlayers.shapes import num_parameters

MEAN, STD = 0.2860, 0.3530  # Fashion-MNIST training pixels in [0, 1]
RANKS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256)
NUM_CORES = (2, 3, 4)


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (LeCun et al.'s format) as a numpy array."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * k : 8 + 4 * k], "big") for k in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def load(data_dir: Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Images ``(N, 784)``, normalized, and labels ``(N,)``."""
    images = read_idx(data_dir / f"{split}-images-idx3-ubyte.gz")
    labels = read_idx(data_dir / f"{split}-labels-idx1-ubyte.gz")
    x = torch.from_numpy(images.astype(np.float32) / 255.0).reshape(len(images), -1)
    return (x - MEAN) / STD, torch.from_numpy(labels.astype(np.int64))


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return (model(x).argmax(1) == y).float().mean().item()


def train(x: torch.Tensor, y: torch.Tensor) -> nn.Sequential:
    """One epoch of Adam on the dense MLP."""
    model = nn.Sequential(nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 10))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    for batch in torch.randperm(len(x)).split(128):
        loss = F.cross_entropy(model(x[batch]), y[batch])  # (B, 10) logits
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model


def sweep(model: nn.Sequential, x: torch.Tensor, y: torch.Tensor) -> list[dict[str, float]]:
    """TT-SVD of ``model[0]`` at every rank in ``RANKS`` (up to the largest useful one)."""
    weight = model[0].weight.detach().double()  # (256, 784)
    bias = model[0].bias.detach()
    rows = []
    for d in NUM_CORES:
        in_modes, out_modes = suggest_modes(784, 256, d)
        largest = max(max_ranks(in_modes, out_modes))
        for rank in [r for r in RANKS if r <= largest]:
            cores = tt_svd(weight, in_modes, out_modes, rank=rank)
            ranks = (1, *(core.shape[3] for core in cores))
            converted = nn.Sequential(
                TTLinear.from_cores([core.float() for core in cores], bias), *model[1:]
            )
            rows.append(
                {
                    "d": d,
                    "rank": rank,
                    "error": relative_error(weight, cores),
                    "compression": 784 * 256 / num_parameters(in_modes, out_modes, ranks),
                    "accuracy": accuracy(converted, x, y),
                }
            )
    return rows


def plot(rows: list[dict[str, float]], dense_accuracy: float, target: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"svg.fonttype": "none", "font.size": 10, "svg.hashsalt": "ttlayers"})
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.4), layout="constrained")
    for d in NUM_CORES:
        part = [row for row in rows if row["d"] == d]
        ranks = [row["rank"] for row in part]
        style = {"marker": "o", "markersize": 3, "label": f"d = {d}"}
        axes[0].plot(ranks, [row["error"] for row in part], **style)
        axes[1].plot(ranks, [row["compression"] for row in part], **style)
        axes[2].plot(
            [row["compression"] for row in part], [100 * row["accuracy"] for row in part], **style
        )
    axes[0].set(xscale="log", xlabel="rank cap r", ylabel="relative error of W", ylim=(0, 1.02))
    axes[0].set_title("TT-SVD error")
    axes[1].set(xscale="log", yscale="log", xlabel="rank cap r", ylabel="dense / TT parameters")
    axes[1].axhline(1, color="grey", linewidth=0.8, linestyle=":")
    axes[1].set_title("compression")
    axes[2].axhline(
        100 * dense_accuracy, color="black", linewidth=0.8, linestyle="--", label="dense"
    )
    axes[2].set(xscale="log", xlabel="compression", ylabel="test accuracy (%)")
    axes[2].set_title("accuracy, no fine-tuning")
    for ax in axes:
        ax.grid(True, which="major", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("784 x 256 layer of an MLP trained 1 epoch on Fashion-MNIST", fontsize=11)
    fig.savefig(target, metadata={"Date": None})
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", type=Path, default=Path("/usr/share/datasets/fashion-mnist"))
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).with_name("img") / "rank-plot.svg"
    )
    args = parser.parse_args()

    torch.manual_seed(0)
    x_train, y_train = load(args.data_dir, "train")
    x_test, y_test = load(args.data_dir, "t10k")
    model = train(x_train, y_train)
    dense_accuracy = accuracy(model, x_test, y_test)
    rows = sweep(model, x_test, y_test)
    print(f"dense MLP, 1 epoch: test accuracy {100 * dense_accuracy:.2f}%")
    print(f"{'d':>2} {'rank':>5} {'rel. error':>10} {'compression':>12} {'accuracy':>9}")
    for row in rows:
        print(
            f"{row['d']:>2} {row['rank']:>5} {row['error']:>10.3f} "
            f"{row['compression']:>11.1f}x {100 * row['accuracy']:>8.2f}%"
        )
    plot(rows, dense_accuracy, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
