"""Stages that travel: the smoke study through the flow on real local Dask and Ray clusters whose
workers each work in an empty directory of their own, with no view of the project: they clone it
from a bare git repository (the "git server"), pull inputs from a directory DVC remote, push their
outputs there and track into a real `mlflow server` on loopback. The flow ends with the weights
and metrics `dvc repro` gives, and a fresh clone that `dvc pull`s reproduces as a no-op.

First, on each cluster (tests/flows/clusters.py), a Prefect task runs in a worker of its own whose
cwd is that worker's empty directory (not the flow's), and a task asking for a GPU runs on the one
worker that has one. (One cluster of each kind serves both checks: each costs ~10 s to start and stop.)

    .venv/bin/python -m pytest tests/flows/test_cluster.py -q        # a few minutes on 2 cores; CI runs it
"""
import json
import os
import re
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import dask
import pytest
from prefect import flow, task
from prefect_dask import DaskTaskRunner
from prefect_ray import RayTaskRunner
from prefect_ray.context import remote_options
from ruamel.yaml import YAML

from tests.flows.clusters import dask_cluster, ray_cluster, reachable
from tests.flows.test_e2e import task_runs
from tests.test_mlflow_server import server  # noqa: F401  (a real `mlflow server`)
from tests.test_pipeline import QUALITY, ROOT, make_repo, sh, sha

# two pretrains and their evaluates, one per engine, sharing validate/corpus/prepare
DASK_TARGETS, RAY_TARGETS = ["evaluate@serial"], ["evaluate@parallel"]


@pytest.fixture(scope="module")
def project(tmp_path_factory, server):  # noqa: F811
    """The smoke study in a git + DVC repo whose `origin` is a bare repository and whose default DVC
    remote is a directory; MLflow tracks into the server."""
    base = tmp_path_factory.mktemp("cluster")
    mp = pytest.MonkeyPatch()
    mp.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    mp.setenv("MLFLOW_TRACKING_URI", server)
    # each training stage asks for a CPU: Dask's and Ray's resource requests are on the path
    repo = make_repo(base / "project", (ROOT / "tests/smoke/params.yaml").read_text()
                     + "resources:\n  pretrain: {cpus: 1}\n")
    (base / "remote").mkdir()
    sh(base, "git", "init", "-q", "--bare", "origin.git")
    sh(repo, "dvc", "remote", "add", "-d", "storage", str(base / "remote"))
    sh(repo, "git", "add", ".dvc/config")
    sh(repo, "git", "commit", "-qm", "a DVC remote")
    sh(repo, "git", "remote", "add", "origin", str(base / "origin.git"))
    sh(repo, "git", "push", "-q", "origin", "HEAD:main")
    yield repo
    mp.undo()


def run_flow(repo: Path, api: str, mlflow: str, runner: str, address: str, targets: list[str]) -> str:  # noqa: F811
    env = {**os.environ, "PREFECT_API_URL": api, "MLFLOW_TRACKING_URI": mlflow}
    r = subprocess.run([sys.executable, "-m", "flows.pipeline", *targets, "--task-runner", runner,
                        "--address", address, "--max-parallel", "2"], cwd=repo, env=env, capture_output=True,
                       text=True, timeout=1200)
    assert r.returncode == 0, f"{r.stdout[-4000:]}\n{r.stderr[-4000:]}"
    return r.stdout + r.stderr


def lock(repo: Path) -> dict:
    return YAML(typ="safe").load((repo / "dvc.lock").read_text())["stages"]


@task
def where() -> dict:
    # Only importable globals here: Prefect's task function is pickled by value, the modules it uses by reference.
    import os
    return {"pid": os.getpid(), "cwd": os.getcwd(), "files": sorted(os.listdir())}


def on_dask(address: str) -> list[dict]:
    @flow(task_runner=DaskTaskRunner(address=address))
    def where_on_dask():
        with dask.annotate(resources={"GPU": 1}):
            gpu = where.submit()
        return [gpu.result(), where.submit().result()]
    return where_on_dask()


def on_ray(address: str) -> list[dict]:
    @flow(task_runner=RayTaskRunner(address=address, init_kwargs={"log_to_driver": False}))
    def where_on_ray():
        with remote_options(num_gpus=1):
            gpu = where.submit()
        return [gpu.result(), where.submit().result()]
    return where_on_ray()


def check_routing(runs: list[dict], cluster: Path) -> None:
    """The GPU task ran on the second worker (the one with a GPU), the other on either; both in the
    worker's own empty directory, neither in this process."""
    gpu, plain = runs
    assert gpu["cwd"] == str(cluster / "worker1"), gpu
    assert plain["cwd"] in {str(cluster / "worker0"), str(cluster / "worker1")}, plain
    assert gpu["files"] == [] and plain["files"] == []
    assert os.getpid() not in {gpu["pid"], plain["pid"]}


@pytest.mark.slow
def test_the_smoke_study_on_dask_and_ray_workers_that_cannot_see_the_project(project, api, server, tmp_path,  # noqa: F811
                                                                               monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server)          # the stages `dvc repro` runs here track there too
    since = datetime.now(timezone.utc).isoformat()
    # each training stage asks for a CPU (params.yaml's resources); the second worker / node also has a GPU
    with dask_cluster(tmp_path / "dask", workers=2, resources=[{"CPU": 1}, {"CPU": 1, "GPU": 1}]) as address:
        assert reachable(address)
        check_routing(on_dask(address), tmp_path / "dask")
        out = run_flow(project, api, server, "dask", address, DASK_TARGETS)
    assert not reachable(address, timeout=0.5)                # the cluster is gone with its processes
    with ray_cluster(tmp_path / "ray", nodes=2, gpus=[0, 1]) as address:
        assert reachable(address)
        check_routing(on_ray(address), tmp_path / "ray")
        out += run_flow(project, api, server, "ray", address, RAY_TARGETS)
    assert not reachable(address, timeout=0.5)
    # every stage ran in a working copy of its own, none in the project
    done = [line for line in out.splitlines() if re.search(r"@?\w+: (ran|restored) \(", line)]
    assert len(done) >= 6 and all("archflow-work/" in line and str(project) not in line for line in done), out[-3000:]
    assert {t["name"] for runs in task_runs(api, since) for t in runs} >= {"pretrain@serial", "pretrain@parallel"}

    # what the workers built is here, as after `dvc repro`: outputs, uncached metrics, dvc.lock
    stages = lock(project)
    for name in ("serial", "parallel"):
        assert {"model.safetensors", "config.json", "meta.json"} <= {p.name for p in (project / "models" / name).iterdir()}
        assert json.loads((project / "metrics" / f"{name}.json").read_text())["val_loss"] > 0
        assert f"pretrain@{name}" in stages and f"evaluate@{name}" in stages
    assert set(json.loads(sh(project, "dvc", "status", "--json", *DASK_TARGETS, *RAY_TARGETS).stdout)) <= {"corpus"}

    # `dvc repro` here rebuilds the same weights and quality metrics
    weights = {n: sha(project / f"models/{n}/model.safetensors") for n in ("serial", "parallel")}
    metrics = {n: json.loads((project / f"metrics/{n}.json").read_text()) for n in ("serial", "parallel")}
    sh(project, "dvc", "repro", "--force", "--single-item", "pretrain@serial", "pretrain@parallel",
       "evaluate@serial", "evaluate@parallel")
    assert {n: sha(project / f"models/{n}/model.safetensors") for n in ("serial", "parallel")} == weights
    for n in ("serial", "parallel"):
        again = json.loads((project / f"metrics/{n}.json").read_text())
        assert {k: again[k] for k in QUALITY} == {k: metrics[n][k] for k in QUALITY}

    # a fresh clone pulls everything from the remote and reproduces as a no-op
    sh(project, "git", "add", "-A")
    sh(project, "git", "commit", "-qm", "built on the clusters")
    sh(project, "git", "push", "-q", "origin", "HEAD:main")
    clone = tmp_path / "clone"
    sh(tmp_path, "git", "clone", "-q", "-b", "main", str(project.parent / "origin.git"), str(clone))
    sh(clone, "dvc", "pull", "--with-deps", *DASK_TARGETS, *RAY_TARGETS)
    again = sh(clone, "dvc", "repro", *DASK_TARGETS, *RAY_TARGETS).stdout
    assert [line for line in again.splitlines() if line.startswith("Running stage")] == ["Running stage 'corpus':"]
    assert sha(clone / "models/serial/model.safetensors") == weights["serial"]
