"""Concurrency on one project and its sqlite MLflow store: the Prefect flow at --max-parallel 2, 4
and 8 on a study of many tiny stages, two flows started at once, two `dvc repro` started at once.

    python -m benchmarks.concurrency                      # about 10 minutes on 2 cores
    python -m benchmarks.concurrency --variants 4 --parallel 8 --no-pairs     # a quick check

Each case builds a fresh copy of the project (its files as git sees them) with a study of
`--variants` tiny pretrain variants (2 steps each) and their evaluates, and reports, per case:
wall time, the exit codes, how many MLflow runs each stage execution left (exactly one each is
right: none lost, none duplicated), runs not FINISHED, and lines saying "database is locked".
The flows run against PREFECT_API_URL, or against a `prefect server start` this benchmark runs on
a free port (temporary servers, one per flow, time out on 2 busy cores).
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import os
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import yaml

from benchmarks.flow_vs_dvc import ROOT, copy_project

FLOW = [sys.executable, "-m", "flows.pipeline"]
DVC = [sys.executable, "-m", "dvc", "repro"]


@contextlib.contextmanager
def prefect_server():
    """PREFECT_API_URL as it is, else a `prefect server start` on a free port while the benchmark runs."""
    if os.environ.get("PREFECT_API_URL"):
        yield
        return
    with socket.socket() as s, tempfile.TemporaryDirectory(prefix="prefect-home-") as home:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        s.close()
        env = {**os.environ, "PREFECT_HOME": home, "PREFECT_UI_ENABLED": "false", "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
        server = subprocess.Popen([Path(sys.executable).parent / "prefect", "server", "start", "--host", "127.0.0.1",
                                   "--port", str(port)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        url = f"http://127.0.0.1:{port}/api"
        for _ in range(600):
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            time.sleep(0.2)
        os.environ["PREFECT_API_URL"] = url
        try:
            yield
        finally:
            del os.environ["PREFECT_API_URL"]
            server.terminate()
            server.wait()


def study(variants: int) -> str:
    """The smoke study's corpus with a byte tokenizer and `variants` 2-step models, no lifecycle stages."""
    params = yaml.safe_load((ROOT / "tests/smoke/params.yaml").read_text())
    params["data"]["tokenizer"] = "byte"
    params["data"].pop("hf_tokenizer", None)
    params["train"] |= {"max_steps": 2, "eval_every": 2, "ckpt_every": 2, "warmup_steps": 1}
    params["pretrain"]["variants"] = {f"v{i}": {"preset": "serial", "n_embd": 32 + 8 * i} for i in range(variants)}
    for section in ("import", "branch", "upcycle", "distill", "compress"):
        params[section] = {}
    params["report"]["comparisons"] = []
    return yaml.safe_dump(params, sort_keys=False)


def at_once(cmds: list[list[str]], cwd: Path) -> tuple[float, list[int], list[str]]:
    """Start every command at the same moment; (wall seconds, exit codes, outputs)."""
    env = os.environ.copy()
    env |= {"PATH": f"{Path(sys.executable).parent}:{env['PATH']}", "DO_NOT_TRACK": "true",
            "MLFLOW_DISABLE_TELEMETRY": "true", "DVC_NO_ANALYTICS": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    env.pop("MLFLOW_TRACKING_URI", None)                         # the copy's own mlflow.db
    t0 = time.perf_counter()
    procs = [subprocess.Popen(c, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for c in cmds]
    outs = [p.communicate()[0] for p in procs]
    return time.perf_counter() - t0, [p.returncode for p in procs], outs


def mlflow_runs(project: Path) -> tuple[collections.Counter, int]:
    """(runs per run name, runs whose status is not FINISHED) in the project's mlflow.db."""
    with sqlite3.connect(project / "mlflow.db") as con:
        rows = con.execute("select name, status from runs").fetchall()
    return collections.Counter(name for name, _ in rows), sum(status != "FINISHED" for _, status in rows)


def check(project: Path, flows: int) -> str:
    """One line: is there exactly one MLflow run per tracked stage in dvc.lock, and `flows` pipeline runs?"""
    lock = project / "dvc.lock"
    stages = yaml.safe_load(lock.read_text())["stages"] if lock.exists() else {}
    want = collections.Counter(s for s in stages if s not in ("validate", "corpus"))
    want["pipeline"] = flows
    got, unfinished = mlflow_runs(project)
    lost = sum((want - got).values())
    extra = sum((got - want).values())
    return f"{len(stages)} stages in dvc.lock, MLflow runs {sum(got.values())}: {lost} lost, {extra} duplicated, {unfinished} not FINISHED"


def case(name: str, params: str, cmds: list[list[str]], tmp: Path) -> None:
    project = copy_project(tmp / name.replace(" ", "-").replace("(", "").replace(")", ""), params)
    seconds, codes, outs = at_once(cmds, project)
    flows = sum(c[:3] == FLOW and code == 0 for c, code in zip(cmds, codes))   # each opens a pipeline run
    locked = sum(out.count("database is locked") for out in outs)
    print(f"{name:28s} {seconds:6.1f} s  exit {codes}  {check(project, flows)}; 'database is locked': {locked}",
          flush=True)
    for code, out in zip(codes, outs):
        if code:                     # why it stopped: its last error line
            errors = [line.strip() for line in out.splitlines() if "error" in line.lower()] or out.splitlines()[-1:]
            print(f"{'':28s} exit {code}: {errors[-1][:200]}", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--variants", type=int, default=12, help="tiny pretrain variants (each with an evaluate)")
    p.add_argument("--parallel", type=int, nargs="*", default=[2, 4, 8])
    p.add_argument("--no-pairs", action="store_true", help="skip two flows / two dvc repro at once")
    args = p.parse_args()
    params = study(args.variants)
    print(f"study: {args.variants} variants, {2 * args.variants + 4} stages; one fresh project per case")
    with tempfile.TemporaryDirectory(prefix="concurrency-") as tmp, prefect_server():
        for n in args.parallel:
            case(f"flow --max-parallel {n}", params, [[*FLOW, "--max-parallel", str(n)]], Path(tmp))
        if not args.no_pairs:
            n = max(args.parallel)
            case(f"two flows at once (x{n})", params, [[*FLOW, "--max-parallel", str(n)]] * 2, Path(tmp))
            case("two dvc repro at once", params, [DVC, DVC], Path(tmp))


if __name__ == "__main__":
    main()
