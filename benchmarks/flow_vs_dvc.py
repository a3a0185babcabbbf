"""Wall time of the Prefect flow vs `dvc repro` on the smoke study, each in a fresh temp copy.

    python -m benchmarks.flow_vs_dvc [targets ...] [--rounds 2] [--max-parallel 2]
    python -m benchmarks.flow_vs_dvc validate --rounds 1      # a quick check that it runs (seconds)
    python -m benchmarks.flow_vs_dvc --built DIR --rounds 4   # no-op reruns only, in a built copy

Each round copies the project (its files as git sees them, tests/smoke/params.yaml as
params.yaml) twice, builds one copy with `dvc repro <targets>` and the other with
`python -m flows.pipeline <targets> --max-parallel N`, then times a no-op rerun of each. Rounds
interleave the two; ratios are medians of per-round ratios. Run it on an otherwise idle machine.
With --built DIR (a copy `python -m benchmarks.startup --keep DIR` built), each round times only a
no-op `dvc repro` and a no-op flow there, alternating which goes first.

The flow runs in whatever Prefect mode the shell is in: without PREFECT_API_URL each run starts
a temporary server (~5 s more per run than against `prefect server start`).
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def copy_project(dest: Path, params: str | None = None) -> Path:
    """The project's files as git sees them, `params` (default: the smoke study) as params.yaml, a fresh git
    repo, validated."""
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.split()
    for f in files:
        if (ROOT / f).is_file():
            (dest / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, dest / f)
    (dest / "params.yaml").write_text(params or (ROOT / "tests/smoke/params.yaml").read_text())
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "-c", "user.name=b", "-c", "user.email=b@b",
                                                               "commit", "-qm", "bench"]):
        subprocess.run(cmd, cwd=dest, check=True, capture_output=True)
    # as `make repro` does first: list the models of replicate seeds that dvc.yaml reads (not timed)
    subprocess.run([sys.executable, "-m", "tasks.validate"], cwd=dest, check=True, capture_output=True)
    return dest


def timed(cmd: list[str], cwd: Path) -> float:
    return timed_run(cmd, cwd)[0]


def timed_run(cmd: list[str], cwd: Path) -> tuple[float, str]:
    """The command's wall seconds and stdout; a failure exits with its output."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "DO_NOT_TRACK": "true", "MLFLOW_DISABLE_TELEMETRY": "true", "DVC_NO_ANALYTICS": "1",
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    env.pop("MLFLOW_TRACKING_URI", None)                     # each copy's own mlflow.db
    t0 = time.perf_counter()
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if r.returncode:
        sys.exit(f"{' '.join(cmd)} failed in {cwd}:\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")
    return seconds, r.stdout


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("targets", nargs="*", default=[], help="stages or groups (default: the whole smoke study)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--max-parallel", type=int, default=2)
    p.add_argument("--built", type=Path, help="time no-op reruns only, in this already built copy")
    args = p.parse_args()
    dvc = [sys.executable, "-m", "dvc", "repro", *args.targets]
    flow = [sys.executable, "-m", "flows.pipeline", *args.targets, "--max-parallel", str(args.max_parallel)]
    mode = f"against {os.environ['PREFECT_API_URL']}" if os.environ.get("PREFECT_API_URL") else "ephemeral"
    print(f"targets: {' '.join(args.targets) or 'all'}; flow: --max-parallel {args.max_parallel}, Prefect {mode}")
    if args.built:
        noops = {"dvc": [], "flow": []}
        for i in range(args.rounds):
            for name, cmd in [("dvc", dvc), ("flow", flow)][::1 if i % 2 == 0 else -1]:
                noops[name].append(timed(cmd, args.built))
        print(" ".join(f"no-op {name}: {', '.join(f'{t:.1f}' for t in times)} s (median {statistics.median(times):.1f})"
                       for name, times in noops.items()))
        return
    rows = []
    for i in range(args.rounds):
        with tempfile.TemporaryDirectory(prefix="flow-vs-dvc-") as tmp:
            a, b = copy_project(Path(tmp, "dvc")), copy_project(Path(tmp, "flow"))
            order = [("dvc", dvc, a), ("flow", flow, b)][::1 if i % 2 == 0 else -1]   # alternate who goes first
            build = {name: timed(cmd, cwd) for name, cmd, cwd in order}
            noop = {name: timed(cmd, cwd) for name, cmd, cwd in order}
        rows.append((build["dvc"], build["flow"], noop["dvc"], noop["flow"]))
        print(f"round {i + 1}: build dvc {build['dvc']:.1f} s, flow {build['flow']:.1f} s; "
              f"no-op dvc {noop['dvc']:.1f} s, flow {noop['flow']:.1f} s")
    print(f"median flow/dvc: build {statistics.median(r[1] / r[0] for r in rows):.2f}, "
          f"no-op {statistics.median(r[3] / r[2] for r in rows):.2f} "
          f"(no-op flow {statistics.median(r[3] for r in rows):.1f} s)")


if __name__ == "__main__":
    main()
