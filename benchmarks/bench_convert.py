"""Time and error of converting a dense matrix to TT form: ttlayers against TensorLy.

    python benchmarks/bench_convert.py                  # 4096 x 4096, the issue-3 benchmark
    python benchmarks/bench_convert.py --size 256       # a quick check
    python benchmarks/bench_convert.py --device cuda

The matrix is ``W = U diag(s) V^T`` with random orthonormal ``U, V`` and ``s_k = k^-power``
(a decaying spectrum), in float32. For each setting (``rank`` 16/64/256, ``eps`` 0.1/0.3)
we report the median wall time over ``--repeats`` runs of

- ``tt_svd``: :func:`ttlayers.tt_svd`, the decomposition alone;
- ``from_dense``: :meth:`ttlayers.TTLinear.from_dense`, the whole conversion (decomposition,
  parameter copies, and measuring the achieved error, which rebuilds ``W`` once);
- ``tensorly``: ``tensorly.decomposition.tensor_train_matrix`` (when TensorLy is installed),
  on the PyTorch backend so both use the same ``torch.linalg.svd``;

and the relative Frobenius error ``||W - W_tt||_F / ||W||_F`` of each result.

Matching the conventions: TensorLy takes the matrix tensorized as ``(row modes..., column
modes...)`` and returns cores ``(r_k, row_mode_k, col_mode_k, r_{k+1})``. Our ``W`` is
``(out_features, in_features)`` with core ``k`` of shape ``(r_k, m_k, n_k, r_{k+1})``, ``m`` the
input (column) modes and ``n`` the output (row) modes. So TensorLy gets
``W.reshape(*out_modes, *in_modes)`` and the same modes, and its ranks are the same bonds; we
compare its dense reconstruction with ``W`` directly. TensorLy has no error-bound mode, so in
the ``eps`` rows it is given the ranks our ``eps`` truncation chose (same ranks, compare the
error). Its int rank caps each bond at what the unfolding allows, as ours does.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

import ttlayers
from ttlayers.decomposition import relative_error

try:
    import tensorly
    from tensorly.decomposition import tensor_train_matrix
    from tensorly.tt_matrix import tt_matrix_to_tensor
except ImportError:  # optional
    tensorly = None


def decaying_matrix(size: int, power: float, device: str, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(size, size, generator=generator))
    v, _ = torch.linalg.qr(torch.randn(size, size, generator=generator))
    s = torch.arange(1, size + 1, dtype=torch.float32) ** -power
    return ((u * s) @ v.T).to(device)


def timed(fn: Callable[[], object], repeats: int, device: str) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeats):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        result = fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def tensorly_error(w: torch.Tensor, factors: list[torch.Tensor]) -> float:
    dense = tt_matrix_to_tensor(factors).reshape(w.shape)
    return float(torch.linalg.vector_norm(w - dense) / torch.linalg.vector_norm(w))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=4096, help="matrix is size x size")
    parser.add_argument("--num-cores", type=int, default=None, help="d; default: the library's")
    parser.add_argument("--power", type=float, default=1.0, help="s_k = k^-power")
    parser.add_argument("--ranks", type=int, nargs="*", default=[16, 64, 256])
    parser.add_argument("--eps", type=float, nargs="*", default=[0.1, 0.3])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--no-tensorly", action="store_true")
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error(f"--repeats takes a number >= 1; got {args.repeats}")

    w = decaying_matrix(args.size, args.power, args.device)
    in_modes, out_modes = ttlayers.suggest_modes(args.size, args.size, args.num_cores)
    use_tensorly = tensorly is not None and not args.no_tensorly
    if use_tensorly:
        tensorly.set_backend("pytorch")
        tensor = w.reshape(*out_modes, *in_modes)
    print(
        f"W: {args.size} x {args.size} float32 on {args.device}, s_k = k^-{args.power}; "
        f"in_modes={in_modes}, out_modes={out_modes}; median of {args.repeats}; "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; tensorly "
        f"{tensorly.__version__ if use_tensorly else 'not used'}"
    )
    header = (
        f"{'setting':<10} {'ranks':<24} {'params':>10} {'tt_svd s':>9} {'from_dense s':>12} "
        f"{'error':>9} {'tensorly s':>10} {'tl error':>9}"
    )
    print(header)
    print("-" * len(header))
    # Warm up (library loading, first-call allocations) on a small matrix, untimed.
    small = w[:64, :64].contiguous()
    ttlayers.TTLinear.from_dense(small, rank=4, num_cores=2)
    if use_tensorly:
        tensor_train_matrix(small.reshape(8, 8, 8, 8), rank=[1, 4, 1])
    settings = [("rank", r) for r in args.ranks] + [("eps", e) for e in args.eps]
    for kind, value in settings:
        kwargs = {kind: value}
        t_svd, cores = timed(
            lambda kwargs=kwargs: ttlayers.tt_svd(w, in_modes, out_modes, **kwargs),
            args.repeats,
            args.device,
        )
        t_layer, layer = timed(
            lambda kwargs=kwargs: ttlayers.TTLinear.from_dense(
                w, in_modes=in_modes, out_modes=out_modes, **kwargs
            ),
            args.repeats,
            args.device,
        )
        error = relative_error(w, cores)
        assert abs(error - layer.conversion_error) < 1e-5
        ranks = layer.ranks
        tl_time = tl_err = "-"
        if use_tensorly:
            tl_ranks = list(ranks)  # the same bonds; for eps rows, the ranks eps chose
            t_tl, tt_matrix = timed(
                lambda tl_ranks=tl_ranks: tensor_train_matrix(tensor, rank=tl_ranks),
                args.repeats,
                args.device,
            )
            factors = list(tt_matrix.factors)
            assert [f.shape[-1] for f in factors] == list(ranks[1:]), "ranks differ"
            tl_time, tl_err = f"{t_tl:.3f}", f"{tensorly_error(w, factors):.4f}"
        print(
            f"{kind}={value:<{10 - len(kind) - 1}} {ranks!s:<24} {layer.num_parameters:>10,} "
            f"{t_svd:>9.3f} {t_layer:>12.3f} {error:>9.4f} {tl_time:>10} {tl_err:>9}"
        )


if __name__ == "__main__":
    main()
