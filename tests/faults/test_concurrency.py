"""Two of anything at once on one project: processes setting up a new sqlite MLflow store, two
`dvc repro`, two Prefect flows. Nothing crashes, every stage runs once, every run is recorded once.

    .venv/bin/python -m pytest tests/faults/test_concurrency.py -q        # about a minute

`python -m benchmarks.concurrency` measures more (the flow at --max-parallel 2, 4, 8 on real stages).
"""
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.flows.conftest import make_project, runs, stage

ROOT = Path(__file__).resolve().parents[2]
OPEN_A_RUN = """
import pathlib, sys, time
from types import SimpleNamespace
from components import tracking
go = pathlib.Path(sys.argv[1])
(go.parent / f"ready{sys.argv[2]}").touch()
while not go.exists():                      # all start together, once all have imported
    time.sleep(0.001)
study = SimpleNamespace(experiment="race", study=SimpleNamespace(name="race"), tracking=SimpleNamespace(required=True))
with tracking.stage_run(study, "prepare", params={"i": sys.argv[2]}):
    pass
"""


def start(cmd: list[str], cwd: Path, **env) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", **env}
    return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def release_when_one_ends(procs: list[subprocess.Popen], project: Path) -> None:
    """Stage `a` (mode meet=go) waits, holding its run open, until log/go.started exists: create it once
    one of the two commands has ended, so the other ends only after that, whatever the timing."""
    while all(p.poll() is None for p in procs):
        time.sleep(0.05)
    (project / "log").mkdir(exist_ok=True)
    (project / "log/go.started").touch()


def test_processes_setting_up_a_new_store_at_once_all_succeed(tmp_path, fault):
    """MLflow creates a new sqlite store's schema on first use; four stages doing it at the same
    moment crashed ("table ... already exists") before tracking.first_use_lock serialised it."""
    db, go = tmp_path / "mlflow.db", tmp_path / "go"
    procs = [start([sys.executable, "-c", OPEN_A_RUN, str(go), str(i)], tmp_path,
                   MLFLOW_TRACKING_URI=f"sqlite:///{db}") for i in range(4)]
    while len(list(tmp_path.glob("ready*"))) < 4 and all(p.poll() is None for p in procs):
        time.sleep(0.01)
    go.touch()
    fault("four processes set up one new MLflow store at once")
    logs = [p.communicate()[0] for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, "\n".join(logs)
    with sqlite3.connect(db) as con:
        assert con.execute("select count(*) from experiments where name = 'race'").fetchone() == (1,)
        assert con.execute("select count(*), min(status) from runs").fetchone() == (4, "FINISHED")


def test_two_dvc_repro_at_once_one_runs_the_other_stops_with_dvcs_lock_message(tmp_path, fault):
    project = make_project(tmp_path / "p", stage("a", mode="meet=go") + stage("b", deps=["out/a.txt"]))
    repros = [start([sys.executable, "-m", "dvc", "repro"], project) for _ in range(2)]
    fault("two dvc repro at once")
    release_when_one_ends(repros, project)
    logs = [p.communicate()[0] for p in repros]
    codes = sorted(p.returncode for p in repros)
    assert codes[0] == 0 and codes[1] != 0, logs
    refused = logs[[p.returncode for p in repros].index(codes[1])]
    assert "Unable to acquire lock" in refused or "is busy, it is being blocked by" in refused, refused
    assert set(runs(project)) == {"a", "b"}                          # each stage ran once
    assert (project / "log/runs.txt").read_text().count("\n") == 2


@pytest.mark.slow
def test_two_flows_at_once_one_runs_the_other_stops_naming_it(tmp_path, fault):
    project = make_project(tmp_path / "p", stage("a", mode="meet=go") + stage("b", deps=["out/a.txt"]))
    db = f"sqlite:///{tmp_path / 'mlflow.db'}"
    flows = [start([sys.executable, "-m", "flows.pipeline"], project, MLFLOW_TRACKING_URI=db) for _ in range(2)]
    fault("two Prefect flows at once")
    release_when_one_ends(flows, project)
    logs = [p.communicate()[0] for p in flows]
    codes = sorted(p.returncode for p in flows)
    assert codes == [0, 2], logs
    refused = logs[[p.returncode for p in flows].index(2)]
    assert "another flow is running in this project (PID" in refused and "Traceback" not in refused, refused
    assert set(runs(project)) == {"a", "b"} and (project / "log/runs.txt").read_text().count("\n") == 2
    with sqlite3.connect(tmp_path / "mlflow.db") as con:                  # one pipeline run, nothing half-open
        assert con.execute("select count(*), min(status) from runs where name = 'pipeline'").fetchone() == (1, "FINISHED")
