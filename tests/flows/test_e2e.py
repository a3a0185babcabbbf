"""End to end: the smoke study through `python -m flows.pipeline` against a Prefect server.

    .venv/bin/python -m pytest tests/flows/test_e2e.py -q        # a few minutes on 2 cores (5 under heavy load); CI runs it

For CI time it builds a subset of the smoke study, `evaluate@serial evaluate@parallel` and their
upstream (validate, corpus, prepare, two pretrains, two evaluates: two independent branches); the whole
study would add ~3 minutes of stage start-ups and shows nothing more about the flow.
"""
import json
import os
import subprocess
import sys
from datetime import datetime, timezone

import httpx
import mlflow
import pytest
from ruamel.yaml import YAML

from flows.pipeline import plan_stages
from tests.test_pipeline import locked_md5s, repo, sh, sha  # noqa: F401  (repo: the smoke study in a temp git repo)

TARGETS = ["evaluate@serial", "evaluate@parallel"]
STAGES = {"validate", "corpus", "prepare", "pretrain@serial", "pretrain@parallel", "evaluate@serial", "evaluate@parallel"}


def run_flow(repo, api, tmp_path) -> str:
    env = {**os.environ, "PREFECT_API_URL": api, "PREFECT_HOME": str(tmp_path / "prefect-client")}
    env.pop("MLFLOW_TRACKING_URI", None)                     # the project's own mlflow.db
    r = subprocess.run([sys.executable, "-m", "flows.pipeline", *TARGETS, "--max-parallel", "2"], cwd=repo,
                       env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, f"{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r.stdout + r.stderr


def task_runs(api: str, since: str) -> list[list[dict]]:
    """The task runs of each flow run started after `since` (ISO 8601), oldest first: the server is
    shared with the other flow tests (and runs on this machine's clock)."""
    flow_runs = httpx.post(f"{api}/flow_runs/filter", timeout=30, json={
        "sort": "START_TIME_ASC", "flow_runs": {"start_time": {"after_": since}}}).json()
    assert all(f["state_type"] == "COMPLETED" for f in flow_runs), [f["state"] for f in flow_runs]
    return [httpx.post(f"{api}/task_runs/filter", json={"flow_runs": {"id": {"any_": [f["id"]]}}}, timeout=30).json()
            for f in flow_runs]


@pytest.mark.slow
def test_the_flow_builds_the_smoke_study_like_dvc_repro_and_a_rerun_executes_nothing(repo, api, tmp_path,
                                                                                       monkeypatch):
    since = datetime.now(timezone.utc).isoformat()
    out = run_flow(repo, api, tmp_path)
    assert all(f"Running stage '{s}'" in out for s in STAGES)
    [first] = task_runs(api, since)
    assert sorted(t["name"] for t in first) == sorted(STAGES)                  # one task run per stage
    assert {t["state_name"] for t in first} == {"Completed"}

    # dvc.lock: every stage, each after its upstream stages, and each up to date. (The order of
    # independent stages is not fixed: `dvc repro` itself orders them by string hashes, so it
    # changes with PYTHONHASHSEED from one process to the next.)
    monkeypatch.chdir(repo)
    plan = plan_stages(TARGETS)
    locked = list(YAML(typ="safe").load((repo / "dvc.lock").read_text())["stages"])
    assert sorted(locked) == sorted(plan.order)
    assert all(locked.index(up) < locked.index(name) for name in locked for up in plan.upstream[name])
    assert plan.changed == {"corpus"}                    # always_changed: its manifest is checked each run
    for name in ("serial", "parallel"):
        assert json.loads((repo / "metrics" / f"{name}.json").read_text())["val_loss"] > 0

    # MLflow: one parent run for the execution, every stage's run nested under it
    mlflow.set_tracking_uri(f"sqlite:///{repo / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["archflow-smoke"], output_format="list")
    [parent] = [r for r in runs if r.data.tags["stage"] == "pipeline"]
    assert parent.info.status == "FINISHED"
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted((r.data.tags["stage"], r.data.tags.get("model", "")) for r in children) == sorted(
        [("prepare", "")] + [(s, m) for s in ("pretrain", "evaluate") for m in ("serial", "parallel")])

    # a second run executes nothing but the corpus check (always_changed): dvc.lock records the corpus
    # manifest it had, so no other stage gets a task run; one log line names them
    lock, weights = (repo / "dvc.lock").read_bytes(), sha(repo / "models/serial/model.safetensors")
    out = run_flow(repo, api, tmp_path)
    assert [line.split("Running stage ")[1] for line in out.splitlines() if "Running stage" in line] == ["'corpus':"]
    first, second = task_runs(api, since)
    assert sorted(t["name"] for t in first) == sorted(STAGES)
    assert {t["name"]: t["state_name"] for t in second} == {"corpus": "Completed"}
    [line] = [line for line in out.splitlines() if "up to date, not run" in line]
    assert sorted(line.split(": ")[-1].split()) == sorted(set(STAGES) - {"corpus"})
    assert (repo / "dvc.lock").read_bytes() == lock
    # and opens no MLflow run: corpus, the only stage that ran, tracks nothing
    assert [r.info.run_id for r in mlflow.search_runs(experiment_names=["archflow-smoke"], output_format="list")
            if r.data.tags["stage"] == "pipeline"] == [parent.info.run_id]

    # plain `dvc repro` rebuilds the same model directory byte for byte, so its hash in dvc.lock stays
    # (the training time goes to metrics/train/serial.json, outside it)
    locked = locked_md5s(repo)["pretrain@serial", "models/serial"]
    sh(repo, "dvc", "repro", "--force", "--single-item", "pretrain@serial")
    assert sha(repo / "models/serial/model.safetensors") == weights
    assert locked_md5s(repo)["pretrain@serial", "models/serial"] == locked
