"""Prefect's server lost mid-flow, and a fresh machine's first flow run on busy cores.

    .venv/bin/python -m pytest tests/faults/test_prefect_faults.py -q        # 1-2 minutes on 2 cores

1. A real `prefect server` killed while a stage of `python -m flows.pipeline` runs: the stages finish
   (they need no server), the flow ends with one message naming PREFECT_API_URL, and once the server
   is back on the same port a rerun executes nothing and leaves dvc.lock as `dvc repro` does.
2. Without PREFECT_API_URL, a fresh PREFECT_HOME and 2 busy cores: the temporary server gets the
   time it needs; when it can't start in time, one message says how to run a real server.
"""
import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from ruamel.yaml import YAML

from tests.flows.conftest import make_project, runs, stage

ROOT = Path(__file__).resolve().parents[2]
STAGES = stage("a", sleep=2) + stage("b", deps=["out/a.txt"]) + stage("c")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prefect_server(home: Path, port: int) -> subprocess.Popen:
    """`prefect server start` on 127.0.0.1:port, its database in `home`, in its own process group."""
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_UI_ENABLED": "false"}
    env.pop("PREFECT_API_URL", None)
    proc = subprocess.Popen([Path(sys.executable).parent / "prefect", "server", "start", "--host", "127.0.0.1",
                             "--port", str(port)], env=env, stdout=open(home / "server.log", "a"),
                            stderr=subprocess.STDOUT, start_new_session=True)
    while True:
        assert proc.poll() is None, (home / "server.log").read_text()[-3000:]
        try:
            if httpx.get(f"http://127.0.0.1:{port}/api/health", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.3)


def flow(project: Path, home: Path, **env) -> subprocess.Popen:
    """`python -m flows.pipeline` in `project`, Prefect's client state in `home`."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PREFECT_HOME": str(home),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", **env}
    return subprocess.Popen([sys.executable, "-m", "flows.pipeline"], cwd=project, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def lock(project: Path) -> dict:
    return YAML(typ="safe", pure=True).load((project / "dvc.lock").read_text())


def test_a_killed_prefect_server_ends_the_flow_with_one_message_and_the_rerun_skips_what_finished(
        tmp_path, fault):
    reference = make_project(tmp_path / "reference", STAGES)
    subprocess.run([sys.executable, "-m", "dvc", "repro"], cwd=reference, check=True, capture_output=True,
                   env={**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"})
    project, home = make_project(tmp_path / "project", STAGES), tmp_path / "server"
    home.mkdir()
    port = free_port()
    url = f"http://127.0.0.1:{port}/api"
    server = prefect_server(home, port)
    # No client retries: the server stays down until this run ends (by default the client waits ~1 min
    # for it at each of the flow's last calls, then fails the same way).
    run = flow(project, tmp_path / "client", PREFECT_API_URL=url, PREFECT_CLIENT_MAX_RETRIES="0")
    while not (project / "log/a.started").exists():
        assert run.poll() is None, run.communicate()
        time.sleep(0.05)
    os.killpg(server.pid, signal.SIGKILL)
    server.wait()
    fault("SIGKILL the Prefect server while stage a runs")
    out, err = run.communicate(timeout=600)

    assert run.returncode == 2 and "Traceback" not in out + err, out + err
    message = err.strip().splitlines()[-1]
    assert message.startswith(f"error: the Prefect server at PREFECT_API_URL={url} stopped answering"), err
    assert "prefect server start --host 127.0.0.1" in message and "rerun" in message, message
    done = lock(project)["stages"]                          # what DVC recorded is complete
    for name in "abc":
        out_file = project / f"out/{name}.txt"
        assert name in done and out_file.read_text() == f"{name}\n", name

    server = prefect_server(home, port)                     # back on the same port, same database
    try:
        rerun = flow(project, tmp_path / "client", PREFECT_API_URL=url)
        out, err = rerun.communicate(timeout=600)
        assert rerun.returncode == 0, out + err
        assert sorted(runs(project)) == ["a", "b", "c"]      # each stage's command ran once, in the first run
        assert lock(project) == lock(reference)
        flow_runs = httpx.post(f"{url}/flow_runs/filter", json={"sort": "START_TIME_ASC"}, timeout=30).json()
        assert [f["state_type"] for f in flow_runs][-1] == "COMPLETED"
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=60)


@contextmanager
def busy_cores(n: int = 2):
    """`n` processes spinning on a CPU each, for as long as the block runs."""
    spinners = [subprocess.Popen([sys.executable, "-c", "while 1: pass"]) for _ in range(n)]
    try:
        yield
    finally:
        for p in spinners:
            p.kill()
            p.wait()


def test_a_temporary_server_that_cannot_start_in_time_is_one_message_naming_the_real_server(
        tmp_path, monkeypatch, fault):
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    project = make_project(tmp_path / "project", stage("c"))
    run = flow(project, tmp_path / "home", PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="1")
    out, err = run.communicate(timeout=600)
    fault("the temporary Prefect server given 1 s to start")
    assert run.returncode == 2 and "Traceback" not in out + err, out + err
    message = err.strip().splitlines()[-1]
    assert message.startswith("error: Prefect's temporary server (no PREFECT_API_URL is set) did not start "
                              "within 1 s"), err
    assert "prefect server start --host 127.0.0.1" in message and "PREFECT_API_URL=" in message, message
    assert not (project / "out/c.txt").exists()


@pytest.mark.slow
def test_a_fresh_machines_temporary_server_starts_on_two_busy_cores(tmp_path, monkeypatch, fault):
    """What the flow's first run starts (fresh PREFECT_HOME: database migrations), alone: the flow
    itself is the same as against any server."""
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    monkeypatch.delenv("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", raising=False)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PREFECT_HOME": str(tmp_path / "home")}
    with busy_cores(2):
        fault("a fresh PREFECT_HOME's temporary server started on 2 busy cores")
        r = subprocess.run([sys.executable, "-c", "from flows.pipeline import start_temporary_server as s; s()"],
                           cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stdout + r.stderr
    assert "Stopping temporary server" in r.stderr                 # it had started: stopped at exit
