"""Time and error of converting a dense matrix to TT form: ttlayers against TensorLy.

    python benchmarks/bench_convert.py                  # 4096 x 4096, the issue-3 benchmark
    python benchmarks/bench_convert.py --size 256       # a quick check
    python benchmarks/bench_convert.py --device cuda

The matrix is ``W = U diag(s) V^T`` with random orthonormal ``U, V`` and ``s_k = k^-power``
(a decaying spectrum), in float32. For each setting (``rank`` 16/64/256, ``eps`` 0.1/0.3)
we report the median wall time over ``--repeats`` interleaved rounds (each round runs the
methods once, starting from a different one) of

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
from _cli import HelpFormatter, check_device, float_at_least, positive_int

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


def timed_together(
    fns: dict[str, Callable[[], object]], repeats: int, device: str
) -> dict[str, tuple[float, object]]:
    """Median wall time and last result of each function, timed in interleaved rounds.

    Each round runs every function once, starting from a different one, so that a slower or
    busier stretch of the machine, or the caches one leaves to the next, do not fall on one
    method only.
    """
    names = list(fns)
    times: dict[str, list[float]] = {name: [] for name in names}
    results: dict[str, object] = {}
    for round_ in range(repeats):
        for name in names[round_ % len(names) :] + names[: round_ % len(names)]:
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            start = time.perf_counter()
            results[name] = fns[name]()
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - start)
    return {name: (statistics.median(times[name]), results[name]) for name in names}


def tensorly_error(w: torch.Tensor, factors: list[torch.Tensor]) -> float:
    dense = tt_matrix_to_tensor(factors).reshape(w.shape)
    return float(torch.linalg.vector_norm(w - dense) / torch.linalg.vector_norm(w))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter
    )
    parser.add_argument("--size", type=positive_int, default=4096, help="matrix is size x size")
    parser.add_argument(
        "--num-cores", type=positive_int, default=None, help="d; default: the library's"
    )
    parser.add_argument("--power", type=float_at_least(0.0), default=1.0, help="s_k = k^-power")
    parser.add_argument(
        "--ranks", type=positive_int, nargs="*", default=[16, 64, 256], help="rank settings"
    )
    parser.add_argument(
        "--eps", type=float, nargs="*", default=[0.1, 0.3], help="error bounds, in (0, 1)"
    )
    parser.add_argument("--repeats", type=positive_int, default=3, help="timed rounds")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument(
        "--no-tensorly", action="store_true", help="skip TensorLy even when it is installed"
    )
    args = parser.parse_args(argv)
    # Checked before the matrix is built and the first rows run.
    if any(not 0 < eps < 1 for eps in args.eps):
        parser.error(f"--eps takes relative errors in (0, 1); got {args.eps}")
    try:
        device = torch.device(args.device)
    except RuntimeError:
        parser.error(f"--device takes cpu, cuda or cuda:N; got {args.device!r}")
    if device.type not in ("cpu", "cuda"):
        parser.error(f"--device takes cpu, cuda or cuda:N; got {args.device!r}")
    check_device(parser, args.device)

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
    small = torch.randn(64, 64, device=args.device)
    ttlayers.TTLinear.from_dense(small, rank=4, num_cores=2)
    if use_tensorly:
        tensor_train_matrix(small.reshape(8, 8, 8, 8), rank=[1, 4, 1])
    settings = [("rank", r) for r in args.ranks] + [("eps", e) for e in args.eps]
    for kind, value in settings:
        kwargs = {kind: value}
        # The ranks first (untimed): TensorLy has no error bound and gets the ranks eps chose.
        ranks = ttlayers.TTLinear.from_dense(
            w, in_modes=in_modes, out_modes=out_modes, **kwargs
        ).ranks
        fns: dict[str, Callable[[], object]] = {
            "tt_svd": lambda kwargs=kwargs: ttlayers.tt_svd(w, in_modes, out_modes, **kwargs),
            "from_dense": lambda kwargs=kwargs: ttlayers.TTLinear.from_dense(
                w, in_modes=in_modes, out_modes=out_modes, **kwargs
            ),
        }
        if use_tensorly:
            fns["tensorly"] = lambda ranks=ranks: tensor_train_matrix(tensor, rank=list(ranks))
        measured = timed_together(fns, args.repeats, args.device)
        t_svd, cores = measured["tt_svd"]
        t_layer, layer = measured["from_dense"]
        assert isinstance(layer, ttlayers.TTLinear)
        error = relative_error(w, cores)
        assert abs(error - layer.conversion_error) < 1e-5
        assert layer.ranks == ranks
        tl_time = tl_err = "-"
        if use_tensorly:
            t_tl, tt_matrix = measured["tensorly"]
            factors = list(tt_matrix.factors)
            assert [f.shape[-1] for f in factors] == list(ranks[1:]), "ranks differ"
            tl_time, tl_err = f"{t_tl:.3f}", f"{tensorly_error(w, factors):.4f}"
        print(
            f"{kind}={value:<{10 - len(kind) - 1}} {ranks!s:<24} {layer.num_parameters:>10,} "
            f"{t_svd:>9.3f} {t_layer:>12.3f} {error:>9.4f} {tl_time:>10} {tl_err:>9}"
        )


if __name__ == "__main__":
    main()
