"""One run on a GPU machine: the test suite and the CUDA benchmark, everything saved to $OUT.

Run from the repository root on a machine with a CUDA GPU and an importable ``torch`` (the
package need not be installed: ``src/`` is put on ``PYTHONPATH``; nothing is downloaded)::

    OUT=/tmp/out python3 benchmarks/gpu_check.py     # or: --out /tmp/out

Without a CUDA device it stops (exit code 2) unless ``--allow-cpu`` is given, which runs the
same steps on the CPU (a rehearsal of the script, not GPU numbers). It writes eight files
under ``--out`` (default ``$OUT``, else ``./gpu_check_out``): ``pytest.txt`` (``pytest -q
-k cuda``, then the whole suite: the CUDA tests run, the rest as on a CPU),
``bench_float32.{txt,json}`` and ``bench_bfloat16.{txt,json}`` (``bench_linear.py --device
cuda``), ``bench_bfloat16_graphs.{txt,json}`` (the GPU target's two cases again, every
method under ``torch.compile(mode="reduce-overhead")``, i.e. CUDA graphs, which remove the
launch overhead that bounds the eager TT layer), and ``summary.md`` (GPU, driver and
versions, the tables in Markdown ready for ``docs/benchmarks.md``, and the exit codes). Each
step has a time limit, so that the whole stays under ten minutes (about six on an H100 with
pytest-xdist).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LIMITS = {"pytest-cuda": 90, "pytest": 150, "bench": 80, "bench-graphs": 150}
# The GPU target's cases (cheapest order <= 0.5x the dense FLOPs); each compiles four graphs
# (dense and TTLinear, training and inference), and the JSON keeps every case finished.
GRAPH_CASES = "1024 (4,8,8,4) r8 b256;4096 (8,8,8,8) r16 b128"
# (file stem, dtype, extra arguments of bench_linear.py, time limit)
BENCHES = [
    ("bench_float32", "float32", [], LIMITS["bench"]),
    ("bench_bfloat16", "bfloat16", [], LIMITS["bench"]),
    (
        "bench_bfloat16_graphs",
        "bfloat16",
        ["--compile", "reduce-overhead", "--cases", GRAPH_CASES, "--methods", "ttlayers"],
        LIMITS["bench-graphs"],
    ),
]


def run(name: str, command: list[str], limit: int, log: Path, mode: str = "w") -> int:
    """Run ``command`` with ``limit`` seconds, its output to ``log``; return the exit code."""
    env = dict(
        os.environ, PYTHONPATH=f"{ROOT / 'src'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"
    )
    env["PYTHONUNBUFFERED"] = "1"
    start = time.time()
    print(f"=== {name}: {shlex.join(command)}", flush=True)
    with log.open(mode) as f:
        f.write(f"$ {shlex.join(command)}\n")
        f.flush()
        try:
            code = subprocess.run(
                command, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=limit
            ).returncode
        except subprocess.TimeoutExpired:
            f.write(f"\n[gpu_check] stopped after the {limit} s limit\n")
            code = 124
    print(f"    exit {code} after {time.time() - start:.0f} s -> {log}", flush=True)
    return code


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--out",
        type=Path,
        default=Path(os.environ.get("OUT") or ROOT / "gpu_check_out"),
        help="folder for the results (default: $OUT, else ./gpu_check_out)",
    )
    parser.add_argument(
        "--allow-cpu", action="store_true", help="without CUDA, run the steps on the CPU"
    )
    args = parser.parse_args(argv)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    try:
        import torch
    except ImportError:
        message = (
            "gpu_check: no importable torch for this python3. Install a CUDA build of torch "
            "(or point python3 at an environment that has one) and run again."
        )
        (out / "summary.md").write_text(message + "\n")
        print(message, file=sys.stderr)
        return 2
    device = "cuda" if torch.cuda.is_available() else "cpu"
    lines = [
        f"python {sys.version.split()[0]}, torch {torch.__version__}, "
        f"CUDA {torch.version.cuda}, available: {torch.cuda.is_available()}",
    ]
    if torch.cuda.is_available():
        lines.append(f"device: {torch.cuda.get_device_name()}")
    try:
        smi = subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=20)
        lines.append(smi.stdout)
    except (OSError, subprocess.TimeoutExpired) as error:
        lines.append(f"nvidia-smi: {error}")
    print(lines[0], flush=True)
    if device == "cpu":
        if not args.allow_cpu:
            message = "gpu_check: torch sees no CUDA device (pass --allow-cpu to rehearse)."
            (out / "summary.md").write_text(message + "\n")
            print(message, file=sys.stderr)
            return 2
        print("gpu_check: no CUDA device; running every step on the CPU.", file=sys.stderr)

    python = sys.executable
    codes = {}
    for name, dtype, extra, limit in BENCHES:
        stem = out / name
        codes[name] = run(
            name,
            [
                python,
                "benchmarks/bench_linear.py",
                "--device",
                device,
                "--dtype",
                dtype,
                *extra,
                "--markdown",
                "--json",
                str(stem.with_suffix(".json")),
            ],
            limit,
            stem.with_suffix(".txt"),
        )
    # The CUDA tests first, so that they run even if the whole suite outlasts its limit.
    pytest = [python, "-m", "pytest", "-q", "-rfEs", "-p", "no:cacheprovider", "tests"]
    codes["pytest -k cuda"] = run(
        "CUDA tests", [*pytest, "-k", "cuda"], LIMITS["pytest-cuda"], out / "pytest.txt"
    )
    if importlib.util.find_spec("xdist") is not None:  # the whole suite, in parallel
        pytest += ["-n", "8"]
    codes["pytest"] = run("all tests", pytest, LIMITS["pytest"], out / "pytest.txt", "a")

    summary = [f"# GPU check, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}", ""]
    summary += [f"- {line}" for line in lines[:-1]]
    summary += ["", "```", lines[-1].strip(), "```", ""]
    sys.path[:0] = [str(ROOT / "src"), str(ROOT / "benchmarks")]
    for name, dtype, extra, _ in BENCHES:
        arguments = shlex.join(["--device", device, "--dtype", dtype, *extra])
        summary += [f"## `bench_linear.py {arguments}`", ""]
        try:  # the table from the JSON, which holds every case finished, even if cut short
            import json

            from bench_linear import CASES, table, targets

            records = json.loads((out / f"{name}.json").read_text())["records"]
            names = {r["case"] for r in records}
            summary += [table(records, markdown=True), ""]
            summary += [
                f"- {line}" for line in targets(records, [c for c in CASES if c.name in names])
            ]
        except Exception as error:
            summary += [f"(no table: {error!r}; see {name}.txt)"]
        summary += [""]
    summary += ["## exit codes", ""] + [f"- {name}: {code}" for name, code in codes.items()]
    (out / "summary.md").write_text("\n".join(summary) + "\n")
    print("\n".join(f"{name}: exit {code}" for name, code in codes.items()))
    return 0 if all(code == 0 for code in codes.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
