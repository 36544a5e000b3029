"""One run on a GPU machine: the CUDA tests, the CUDA benchmarks, everything saved to $OUT.

Run from the repository root on a machine with a CUDA GPU and an importable ``torch`` (the
package need not be installed: ``src/`` is put on ``PYTHONPATH``; nothing is downloaded)::

    OUT=/tmp/out python3 benchmarks/gpu_check.py     # or: --out /tmp/out --deadline 450

Without a CUDA device it stops (exit code 2) unless ``--allow-cpu`` is given, which runs the
same steps on the CPU (a rehearsal of the script, not GPU numbers).

The steps run in this order, most valuable first, each with its own time limit and none
past ``--deadline`` seconds from the start (a step that would start with under 20 s left is
skipped), so that one device lease of a few minutes suffices:

1. ``pytest -k cuda``: the CUDA tests;
2. ``bench_linear.py --compile reduce-overhead`` on the GPU target's two cases in bfloat16
   (CUDA graphs, which remove the launch overhead that bounds the eager TT layer);
3. ``bench_linear.py`` in bfloat16, then in float32, eager;
4. ``planner.calibrate`` in float32 and bfloat16 (the measured cost model, next to the
   default one);
5. ``plan_regret.py`` in bfloat16, then in float32: every candidate plan timed against the
   planner's choice;
6. the whole test suite (the CUDA tests again, the rest as on a CPU), in the time left.

The deadline counts from the end of the imports (torch's among them), and a step stopped at
its limit takes a moment to end: give the lease's command a minute more than ``--deadline``.
It writes at most eight files under ``--out`` (default ``$OUT``, else ``./gpu_check_out``),
the most a device lease returns: ``summary.md`` (GPU, driver, versions, the tables in
Markdown ready for ``docs/benchmarks.md``, each step's exit code and time), ``pytest.txt``,
``bench.txt`` (the log of every other step), and the JSON of the three benchmarks and the
two regret runs.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from _cli import HelpFormatter, positive_int

ROOT = Path(__file__).resolve().parent.parent
# The GPU target's cases (cheapest order <= 0.5x the dense FLOPs); each compiles four graphs
# (dense and TTLinear, training and inference), and the JSON keeps every case finished.
GRAPH_ARGS = ["--cases", "1024 (4,8,8,4) r8 b256;4096 (8,8,8,8) r16 b128", "--methods", "ttlayers"]
# Below this many seconds before the deadline a step is not started.
MIN_STEP_SECONDS = 20

CALIBRATE = """
import torch
from ttlayers.planner import DEFAULT_COST_MODELS, calibrate
print("default:", DEFAULT_COST_MODELS["{device}"])
for dtype in (torch.float32, torch.bfloat16):
    model = calibrate("{device}", dtype)
    print(f"calibrate({device!r}, {{dtype}}):", model)
"""


@dataclass
class Step:
    name: str
    command: list[str]
    limit: int
    log: str
    json: str = ""  # the benchmark's --json file, for the summary's tables


def steps(device: str, python: str) -> list[Step]:
    """The steps, in the order they run."""
    pytest = [python, "-m", "pytest", "-q", "-rfEs", "-p", "no:cacheprovider", "tests"]
    bench = [python, "benchmarks/bench_linear.py", "--device", device, "--markdown"]
    regret = [python, "benchmarks/plan_regret.py", "--device", device, "--keep", "4"]
    found = [
        Step("CUDA tests", [*pytest, "-k", "cuda"], 100, "pytest.txt"),
        Step(
            "bench bfloat16 graphs",
            [*bench, "--dtype", "bfloat16", "--compile", "reduce-overhead", *GRAPH_ARGS],
            150,
            "bench.txt",
            "bench_bfloat16_graphs.json",
        ),
        Step(
            "bench bfloat16",
            [*bench, "--dtype", "bfloat16"],
            80,
            "bench.txt",
            "bench_bfloat16.json",
        ),
        Step(
            "bench float32", [*bench, "--dtype", "float32"], 80, "bench.txt", "bench_float32.json"
        ),
        Step("calibrate", [python, "-c", CALIBRATE.format(device=device)], 40, "bench.txt"),
        Step(
            "regret bfloat16",
            [*regret, "--dtype", "bfloat16", "--repeats", "8"],
            60,
            "bench.txt",
            "regret_bfloat16.json",
        ),
        Step(
            "regret float32",
            [*regret, "--dtype", "float32", "--repeats", "8"],
            60,
            "bench.txt",
            "regret_float32.json",
        ),
    ]
    suite = [*pytest]
    if importlib.util.find_spec("xdist") is not None:  # the whole suite, in parallel
        suite += ["-n", "8"]
    return [*found, Step("all tests", suite, 240, "pytest.txt")]


def run(step: Step, out: Path, limit: float) -> tuple[int, float]:
    """Run ``step`` for at most ``limit`` seconds, its output appended to its log.

    Returns the exit code (124: stopped at the limit) and the seconds it took.
    """
    command = list(step.command)
    if step.json:
        command += ["--json", str(out / step.json)]
    paths = [str(ROOT / "src"), *filter(None, [os.environ.get("PYTHONPATH")])]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(paths), PYTHONUNBUFFERED="1")
    start = time.time()
    print(f"=== {step.name}: {shlex.join(command)}", flush=True)
    with (out / step.log).open("a") as f:
        f.write(f"\n=== {step.name}\n$ {shlex.join(command)}\n")
        f.flush()
        # A session of its own, so that a step stopped at its limit takes its children
        # (pytest's workers and subprocesses) with it, off the GPU before the next step.
        process = subprocess.Popen(
            command, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            code = process.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            f.write(f"\n[gpu_check] stopped after its {limit:.0f} s limit\n")
            code = 124
    seconds = time.time() - start
    print(f"    exit {code} after {seconds:.0f} s -> {step.log}", flush=True)
    return code, seconds


def bench_tables(out: Path, step: Step) -> list[str]:
    """The Markdown table and the target lines of a bench_linear step, from its JSON."""
    try:  # the JSON holds every case finished, even if the step was cut short
        from bench_linear import CASES, table, targets

        records = json.loads((out / step.json).read_text())["records"]
    except Exception as error:
        return [f"(no table: {error!r}; see {step.log})"]
    names = {r["case"] for r in records}
    lines = [table(records, markdown=True), ""]
    return lines + [f"- {line}" for line in targets(records, [c for c in CASES if c.name in names])]


def regret_table(out: Path, step: Step) -> list[str]:
    """The planner's choice against the fastest candidate, per case, from the JSON."""
    try:
        records = json.loads((out / step.json).read_text())["records"]
    except Exception as error:
        return [f"(no table: {error!r}; see {step.log})"]
    lines = ["| case | pass | planner's choice | ms | fastest candidate | ms | regret |"]
    lines.append("|---|---|---|---|---|---|---|")
    for r in records:
        lines.append(
            f"| {r['case']} | {r['pass']} | {r['chosen']} | {r['chosen_ms']:.3f} "
            f"| {r['fastest']} | {r['fastest_ms']:.3f} | {r['regret']:.2f} |"
        )
    return lines


def step_summary(out: Path, step: Step) -> list[str]:
    """What ``summary.md`` shows of a step that ran: its tables, or the cost models."""
    heading = [f"## `{shlex.join(step.command[1:])}`", ""]
    if step.json.startswith("bench"):
        return [*heading, *bench_tables(out, step), ""]
    if step.json.startswith("regret"):
        return [*heading, *regret_table(out, step), ""]
    if step.name == "calibrate":
        path = out / step.log
        text = path.read_text() if path.exists() else ""
        log = text.split(f"=== {step.name}\n")[-1].splitlines()
        found = [line for line in log if line.startswith(("default:", "calibrate("))]
        return ["## cost models", "", "```", *found, "```", ""]
    return []


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path(os.environ.get("OUT") or ROOT / "gpu_check_out"),
        help="folder for the results (default: $OUT, else ./gpu_check_out)",
    )
    parser.add_argument(
        "--deadline", type=positive_int, default=450, help="seconds for all the steps together"
    )
    parser.add_argument(
        "--allow-cpu", action="store_true", help="without CUDA, run the steps on the CPU"
    )
    args = parser.parse_args(argv)
    started = time.time()
    out: Path = args.out.resolve()  # the steps run from the repository root
    out.mkdir(parents=True, exist_ok=True)
    for step in steps("cpu", sys.executable):  # an earlier run's files would pass for this one's
        for name in filter(None, [step.log, step.json, "summary.md"]):
            (out / name).unlink(missing_ok=True)
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

    summary = [f"# GPU check, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}", ""]
    summary += [f"- {line}" for line in lines[:-1]]
    summary += ["", "```", lines[-1].strip(), "```", ""]
    codes: list[str] = []
    for step in steps(device, sys.executable):
        left = args.deadline - (time.time() - started)
        if left < MIN_STEP_SECONDS:
            codes.append(f"- {step.name}: not run ({left:.0f} s left of --deadline)")
        else:
            code, seconds = run(step, out, min(step.limit, left))
            codes.append(f"- {step.name}: exit {code} after {seconds:.0f} s")
            summary += step_summary(out, step)
        # Written after every step, so that a lease cut short still returns what ran.
        (out / "summary.md").write_text("\n".join([*summary, "## steps", "", *codes]) + "\n")
    print("\n".join(codes))
    return 0 if all(" exit 0 " in line for line in codes) else 1


if __name__ == "__main__":
    sys.path[:0] = [str(ROOT / "src"), str(ROOT / "benchmarks")]
    sys.exit(main())
