"""Each stage's fixed cost (wall time that is not its training or scoring) on the smoke study.

    python -m benchmarks.startup                 # imports of every stage module, then `dvc repro` of the smoke study
    python -m benchmarks.startup --no-repro      # imports only (seconds)
    python -m benchmarks.startup --built DIR     # the collector and exit table only, in a study built with --keep DIR

1. Imports: `python -c "import tasks.<stage>"` for every stage module, the median of `--rounds`
   runs, next to a bare `python -c "import torch"`, and the same with the garbage collector off, as
   a stage's process imports: what a stage pays before it reads params.yaml.
2. The smoke study: a fresh temp copy (benchmarks.flow_vs_dvc.copy_project) built with one
   `dvc repro`. Every stage ends its summary line with `[W s wall, F s fixed]`: W since its
   process started, F = W minus its own work (training, scoring). The table groups the stages by
   kind: count, mean wall, mean fixed, and the share of the build that was fixed cost.
3. The collector and the exit: a training and an evaluation stage of the built study as dvc.yaml
   starts them, against the same stage with Python's own exit (the heap torn down), and also with
   the collector on while it imports.
Run it on an otherwise idle machine; it prints the host line (CPU flags, load).
"""
from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

from benchmarks.common import host_line
from benchmarks.flow_vs_dvc import ROOT, copy_project, timed, timed_run

STAGE_MODULES = ("corpus", "prepare", "validate", "pretrain", "branch", "upcycle", "distill", "compress",
                 "evaluate", "report", "hf_import", "export")
CLOCK = re.compile(r"^(?P<stage>[a-z_]+)(@\S+)?[ :].*\[(?P<wall>[\d.]+) s wall, (?P<fixed>[\d.]+) s fixed\]\s*$")


def import_seconds(module: str, rounds: int, paused: bool) -> float:
    """`python -c "import <module>"`, the median of rounds; paused: with the garbage collector off, as a
    stage started by `python -m` imports (components.errors)."""
    code = "import gc; gc.disable(); " * paused + f"import {module}"
    return statistics.median(timed([sys.executable, "-c", code], ROOT) for _ in range(rounds))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=3, help="runs of each import (median)")
    p.add_argument("--no-repro", action="store_true", help="only the imports")
    p.add_argument("--keep", type=Path, help="build the smoke study in this new directory and keep it "
                                             "(e.g. to time a no-op `python -m flows.pipeline` there)")
    p.add_argument("--built", type=Path, help="only the last table (collector, exit), in a study built with --keep")
    args = p.parse_args()
    print(host_line())
    if args.built:
        return collector(args.built, args.rounds)

    print("\n| import | seconds (median) | collector off (as a stage) |\n|---|---:|---:|")
    for module in ("torch", *(f"tasks.{m}" for m in STAGE_MODULES)):
        print(f"| `{module}` | {import_seconds(module, args.rounds, False):.2f} | "
              f"{import_seconds(module, args.rounds, True):.2f} |", flush=True)
    if args.no_repro:
        return

    with tempfile.TemporaryDirectory() as tmp:
        if args.keep:
            args.keep.mkdir(parents=True)
        project = copy_project(args.keep or Path(tmp))
        timed([sys.executable, "-m", "tasks.validate"], project)   # models/replicas.yaml first, as `make repro`
        t0 = time.perf_counter()
        r = subprocess.run([str(Path(sys.executable).parent / "dvc"), "repro"], cwd=project,
                           capture_output=True, text=True)
        total = time.perf_counter() - t0
        if r.returncode:
            sys.exit(f"dvc repro failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
        report_build(r.stdout, total)
        collector(project, args.rounds)


def report_build(stdout: str, total: float) -> None:
    n_stages = stdout.count("Running stage '")
    by_kind = defaultdict(list)
    for line in stdout.splitlines():
        if m := CLOCK.match(line.strip()):
            by_kind[m["stage"]].append((float(m["wall"]), float(m["fixed"])))
    print(f"\nsmoke study: `dvc repro` of {n_stages} stages in {total:.0f} s ({total / max(1, n_stages):.1f} s per stage)")
    print("\n| stage kind | stages | mean wall s | mean fixed s | fixed share |\n|---|---:|---:|---:|---:|")
    for kind, rows in sorted(by_kind.items(), key=lambda kv: -sum(w for w, _ in kv[1])):
        wall, fixed = sum(w for w, _ in rows), sum(f for _, f in rows)
        print(f"| {kind} | {len(rows)} | {wall / len(rows):.1f} | {fixed / len(rows):.1f} | {fixed / wall:.0%} |")
    timed_wall = sum(w for rows in by_kind.values() for w, _ in rows)
    print(f"\nstages with a clock: {sum(map(len, by_kind.values()))} of {n_stages}, {timed_wall:.0f} s of the "
          f"{total:.0f} s build; the rest is DVC (hashing, locks), the stages' exits (below) and stages "
          "without a clock (corpus, validate, report)")


def collector(project: Path, rounds: int) -> None:
    """A training and an evaluation stage as dvc.yaml runs them (`python -m`: components.errors pauses the
    garbage collector while the stage's imports run, freezes what they made, and ends the process
    without the interpreter's teardown), against the same stage with Python's own exit (an atexit
    handler registered before the stage's package, as a site hook would), and also with the collector
    on while it imports (through runpy, not a `-m` program), interleaved. Medians of the process's wall
    time, its summary line's fixed cost, and its exit (the process's wall time after the summary line)."""
    print("\n| stage | collector, exit | process s | fixed s | exit s |\n|---|---|---:|---:|---:|")
    for stage, model in (("pretrain", "serial"), ("evaluate", "serial")):
        run = f"runpy.run_module('tasks.{stage}', run_name='__main__', alter_sys=True)"
        ways = {"paused while importing, no teardown (`python -m`)": ["-m", f"tasks.{stage}", model],
                "paused while importing, Python's exit": [
                    "-c", f"import atexit, runpy, sys; atexit.register(lambda: None); sys.argv = ['-m', '{model}']; {run}"],
                "on while importing, Python's exit": ["-c", f"import runpy, sys; sys.argv = ['{stage}', '{model}']; {run}"]}
        seconds = {how: [] for how in ways}
        for _ in range(rounds):
            for how, cmd in ways.items():
                whole, out = timed_run([sys.executable, *cmd], project)
                clock = [m for line in out.splitlines() if (m := CLOCK.match(line.strip()))][-1]
                seconds[how].append((whole, float(clock["fixed"]), whole - float(clock["wall"])))
        for how, rows in seconds.items():
            whole, fixed, exit_s = (statistics.median(col) for col in zip(*rows))
            print(f"| {stage}@{model} | {how} | {whole:.2f} | {fixed:.2f} | {exit_s:.2f} |", flush=True)


if __name__ == "__main__":
    main()
