"""Shared by the flow tests: one Prefect test server for the whole run, and tiny DVC projects.

A tiny project is a git + DVC repo in tmp_path whose stages are `python stage.py ...`: each
writes its output (content: the stage's name, so runs are byte-comparable) and appends
"<name> <start> <end> <parent MLflow run id>" to log/runs.txt, outside DVC's outputs. Modes:
`fail` always fails, `flaky` fails the first time only, `meet=<other>` waits (up to 120 s) until
stage <other> has started, so it passes only if the two run at the same time, `copy=<file>`
writes the content of <file> (a dep) instead of its name.
"""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

STAGE_PY = '''
import os, pathlib, sys, time
name, out, sleep, mode = sys.argv[1], sys.argv[2], float(sys.argv[3]), sys.argv[4]
start = time.time()
log = pathlib.Path("log")
log.mkdir(exist_ok=True)
(log / f"{name}.started").touch()
if mode == "fail":
    print("boom: this stage always fails")
    sys.exit(3)
if mode.startswith("meet="):                 # wait until stage <other> runs too: proves they overlap
    other = log / f"{mode[5:]}.started"
    while not other.exists() and time.time() - start < 120:
        time.sleep(0.05)
    if not other.exists():
        print(f"{mode[5:]} did not start while {name} ran")
        sys.exit(4)
if mode == "flaky" and not (log / f"{name}.tried").exists():
    (log / f"{name}.tried").touch()
    print("flaky: failing the first time")
    sys.exit(1)
time.sleep(sleep)
pathlib.Path(out).parent.mkdir(exist_ok=True)
text = pathlib.Path(mode[5:]).read_text() if mode.startswith("copy=") else name + "\\n"
pathlib.Path(out).write_text(text)
with open(log / "runs.txt", "a") as f:
    f.write(f"{name} {start} {time.time()} {os.environ.get('ARCHFLOW_PARENT_RUN_ID', '-')}\\n")
'''
PARAMS = "pretrain:\n  variants:\n    tiny: {}\n"     # the smallest valid study: the flow validates it


@pytest.fixture(scope="session", autouse=True)
def prefect_server():
    """One temporary Prefect server (sqlite in a temp dir) for every flow test of the run: Prefect's
    API served by uvicorn in a process of its own, as `prefect server start` serves it."""
    from prefect.testing.utilities import prefect_test_harness   # here: its import is ~2.5 s (the server's API)
    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture
def api(prefect_server) -> str:
    """That server's API URL, for flows run as commands (PREFECT_API_URL). (A server of their own
    would cost ~10 s to start; tests/faults/test_prefect_faults.py starts `prefect server start` itself.)"""
    from prefect.settings import PREFECT_API_URL
    return PREFECT_API_URL.value()


@pytest.fixture(scope="session")
def mlflow_db(tmp_path_factory) -> str:
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


@pytest.fixture(autouse=True)
def _mlflow_in_tmp(mlflow_db, monkeypatch):
    """Overrides tests/conftest.py's: one MLflow database for all flow tests (creating one takes seconds)."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_db)


def stage(name: str, deps=(), sleep: float = 0, mode: str = "ok") -> str:
    """A dvc.yaml stage entry: `python stage.py`, output out/<name>.txt."""
    deps_yaml = "".join(f"\n      - {d}" for d in ["stage.py", *deps])
    return (f"  {name}:\n    cmd: python stage.py {name} out/{name}.txt {sleep} {mode}\n"
            f"    deps:{deps_yaml}\n    outs:\n      - out/{name}.txt\n")


def make_project(path: Path, stages: str) -> Path:
    """git init + dvc init + stage.py + params.yaml + dvc.yaml (`stages`: entries made by stage())."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "stage.py").write_text(textwrap.dedent(STAGE_PY))
    (path / "params.yaml").write_text(PARAMS)
    (path / "dvc.yaml").write_text("stages:\n" + stages)
    for cmd in (["git", "init", "-q"], [sys.executable, "-m", "dvc", "init", "-q"]):
        subprocess.run(cmd, cwd=path, check=True, capture_output=True)
    return path


def runs(project: Path) -> dict[str, tuple[float, float, str]]:
    """name -> (start, end, parent MLflow run id) of every stage command that ran."""
    log = project / "log/runs.txt"
    lines = log.read_text().split("\n") if log.exists() else []
    return {n: (float(a), float(b), parent) for n, a, b, parent in (line.split() for line in lines if line)}


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A factory: project(stages) builds a tiny project and makes it the working directory."""
    def build(stages: str, name: str = "project") -> Path:
        root = make_project(tmp_path / name, stages)
        monkeypatch.chdir(root)
        return root
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    return build
