"""End to end against a real `mlflow server` on a free loopback port, checked through its REST API:
the serial model of the smoke study is built, tracked and registered; an unreachable server stops
a stage before any work.

    .venv/bin/python -m pytest tests/test_mlflow_server.py -q        # about a minute; CI runs it
"""
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tasks.evaluate import NOT_MEASURED
from tests.test_pipeline import ROOT, make_repo, sh

STUDY = "archflow-smoke"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def api(url: str, path: str, body: dict | None = None) -> dict:
    req = urllib.request.Request(f"{url}/api/2.0/mlflow/{path}", method="POST" if body is not None else "GET",
                                 data=json.dumps(body).encode() if body is not None else None,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`mlflow server` with a sqlite backend and an artifact root, as the README shows for teams."""
    home = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1", "--backend-store-uri", f"sqlite:///{home / 'mlflow.db'}",
         "--artifacts-destination", str(home / "artifacts")],
        cwd=home, env=env, stdout=open(home / "server.log", "w"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    for _ in range(120):
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2):
                break
        except OSError:
            time.sleep(0.5)
    else:
        proc.terminate()
        pytest.fail(f"mlflow server did not start:\n{(home / 'server.log').read_text()[-3000:]}")
    yield url
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture(scope="module")
def repo(tmp_path_factory, server):
    params = (ROOT / "tests/smoke/params.yaml").read_text().replace(
        "tracking:\n  experiment: null", "tracking:\n  experiment: null\n  register: true")
    assert "register: true" in params
    mp = pytest.MonkeyPatch()
    mp.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    mp.setenv("MLFLOW_TRACKING_URI", server)
    repo = make_repo(tmp_path_factory.mktemp("study"), params)
    sh(repo, "dvc", "repro", "evaluate@serial")
    yield repo
    mp.undo()


@pytest.mark.slow
def test_runs_on_the_server_mirror_the_dvc_outputs(server, repo):
    experiment = api(server, f"experiments/get-by-name?experiment_name={STUDY}")["experiment"]
    runs = api(server, "runs/search", {"experiment_ids": [experiment["experiment_id"]],
                                       "filter": "tags.current = 'true'"})["runs"]
    tags = [{t["key"]: t["value"] for t in r["data"]["tags"]} for r in runs]
    assert sorted((t["stage"], t.get("model", "")) for t in tags) == [
        ("evaluate", "serial"), ("prepare", ""), ("pretrain", "serial")]
    evaluate = next(r for r, t in zip(runs, tags) if t["stage"] == "evaluate")
    logged = {m["key"]: m["value"] for m in evaluate["data"]["metrics"]}
    metrics = json.loads((repo / "metrics/serial.json").read_text())
    assert logged == pytest.approx({k: v for k, v in metrics.items() if k not in NOT_MEASURED}, rel=1e-12)
    assert next(t for t in tags if t["stage"] == "evaluate")["device"] == metrics["device"]
    params = {p["key"]: p["value"] for p in evaluate["data"]["params"]}
    assert params["model.block"] == "serial" and len(params) >= 5
    assert next(t for t in tags if t["stage"] == "pretrain")["parents"] == ""


@pytest.mark.slow
def test_the_evaluated_model_is_registered_under_its_alias(server, repo):
    version = api(server, f"registered-models/alias?name={STUDY}&alias=serial")["model_version"]
    assert {t["key"]: t["value"] for t in version.get("tags", [])}["model"] == "serial"
    artifacts = api(server, f"artifacts/list?run_id={version['run_id']}&path=model")["files"]
    assert {"model.safetensors", "config.json", "meta.json"} <= {Path(f["path"]).name for f in artifacts}


@pytest.mark.slow
def test_an_unreachable_server_stops_a_stage_before_any_work(repo):
    env = {**os.environ, "MLFLOW_TRACKING_URI": "http://127.0.0.1:9"}     # discard port: nothing listens
    before = (repo / "models/serial/model.safetensors").stat().st_mtime_ns
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "tasks.pretrain", "serial"], cwd=repo, env=env,
                       capture_output=True, text=True)
    assert r.returncode == 2 and "127.0.0.1:9 is unreachable" in r.stderr and "Traceback" not in r.stderr
    assert time.perf_counter() - t0 < 60 and (repo / "models/serial/model.safetensors").stat().st_mtime_ns == before
