"""End to end: `dvc repro` of the smoke study in a temporary git + DVC copy of the project.

    .venv/bin/python -m pytest tests/test_pipeline.py -q        # a few minutes; CI runs it
"""
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pandas as pd
import pytest

from components.params import load_study

ROOT = Path(__file__).resolve().parents[1]
SMOKE = load_study(ROOT / "tests/smoke/params.yaml")
NAMES = list(SMOKE.models())
QUALITY = ["val_loss", "val_ppl", "val_bpb", "params", "active_params", "size_bytes", "train_tokens"]
CONTRACT = QUALITY + ["prefill_tokens_per_s", "decode_tokens_per_s", "train_seconds"]


def sh(repo, *cmd, check=True):
    r = subprocess.run(cmd, cwd=repo, capture_output=True, text=True, env=os.environ)
    if check and r.returncode:
        raise AssertionError(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return r


def sha(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def make_repo(repo: Path, params: str) -> Path:
    """The project's files (as git sees them) in `repo`, with `params` as params.yaml, committed
    to a fresh git repo. Stages find this interpreter's `python` first on PATH (set by the caller)."""
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.split()
    for f in files:
        if (ROOT / f).is_file():
            (repo / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, repo / f)
    (repo / "params.yaml").write_text(params)
    sh(repo, "git", "init", "-q")
    sh(repo, "git", "add", "-A")
    sh(repo, "git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "study")
    return repo


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    """The smoke study in a fresh git + DVC copy of the project, tracking into <repo>/mlflow.db."""
    mp = pytest.MonkeyPatch()
    mp.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")  # stages' `python`
    mp.delenv("MLFLOW_TRACKING_URI", raising=False)            # the default: <project>/mlflow.db
    yield make_repo(tmp_path_factory.mktemp("study"), (ROOT / "tests/smoke/params.yaml").read_text())
    mp.undo()


@pytest.fixture(scope="module")
def built(repo):
    r = sh(repo, "dvc", "repro")
    return r.stdout


@pytest.mark.slow
def test_repro_builds_every_model_metric_and_report(repo, built):
    for name in NAMES:
        assert f"Running stage 'pretrain@{name}'" in built and f"Running stage 'evaluate@{name}'" in built
        assert {"model.safetensors", "config.json", "meta.json", "curve.csv"} <= {
            p.name for p in (repo / "models" / name).iterdir()}
        metrics = json.loads((repo / "metrics" / f"{name}.json").read_text())
        assert set(CONTRACT) <= set(metrics) and metrics["val_loss"] > 0 and metrics["threads"] >= 1
    summary = pd.read_csv(repo / "reports/summary.csv", index_col="model")
    assert list(summary.index) == NAMES
    assert summary.loc["parallel", "val_loss"] == json.loads((repo / "metrics/parallel.json").read_text())["val_loss"]
    comparisons = pd.read_csv(repo / "reports/comparisons.csv")
    assert list(comparisons["model"]) == [a for a, _ in SMOKE.report.comparisons]
    assert comparisons["d_val_loss"].iloc[0] == pytest.approx(
        summary.loc["parallel", "val_loss"] - summary.loc["serial", "val_loss"])
    for png in ("val_loss_vs_tokens.png", "ppl_vs_decode_speed.png"):
        assert (repo / "reports" / png).read_bytes()[:4] == b"\x89PNG"
    assert "| parallel-gqa" in (repo / "reports/summary.md").read_text()


@pytest.mark.slow
def test_every_stage_is_tracked_in_mlflow(repo, built):
    mlflow.set_tracking_uri(f"sqlite:///{repo / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["archflow-smoke"], output_format="list")
    stages = sorted((r.data.tags["stage"], r.data.tags.get("model", "")) for r in runs)
    assert stages == sorted([("prepare", ""), ("report", "")] + [
        (s, m) for s in ("pretrain", "evaluate") for m in NAMES])
    evaluate = next(r for r in runs if r.data.tags["stage"] == "evaluate" and r.data.tags["model"] == "parallel")
    metrics = json.loads((repo / "metrics/parallel.json").read_text())
    assert evaluate.data.metrics["val_loss"] == pytest.approx(metrics["val_loss"], rel=1e-12)
    pretrain = next(r for r in runs if r.data.tags["stage"] == "pretrain" and r.data.tags["model"] == "serial")
    assert pretrain.data.params["model.block"] == "serial" and pretrain.data.tags["parents"] == ""
    assert len(mlflow.MlflowClient().get_metric_history(pretrain.info.run_id, "val_loss")) == 4


@pytest.mark.slow
def test_second_repro_is_a_fast_no_op(repo, built):
    t0 = time.perf_counter()
    out = sh(repo, "dvc", "repro").stdout
    assert time.perf_counter() - t0 < 30                       # generous; the target (< 5 s) is a benchmark
    assert "Running stage" not in out


@pytest.mark.slow
def test_bad_params_stop_repro_before_any_compute(repo, built):
    params = (repo / "params.yaml").read_text()
    before = {p: p.stat().st_mtime_ns for p in (repo / "models").rglob("*")}
    try:
        (repo / "params.yaml").write_text(params + "bogus_key: 1\n")
        r = sh(repo, "dvc", "repro", check=False)
        assert r.returncode != 0 and "bogus_key: unknown key" in r.stderr + r.stdout
        (repo / "params.yaml").write_text(params.replace("n_head: 4", 'n_head: "4"'))
        r = sh(repo, "dvc", "repro", check=False)
        assert r.returncode != 0 and "model.n_head" in r.stderr + r.stdout
        assert "Running stage 'pretrain" not in r.stdout
    finally:
        (repo / "params.yaml").write_text(params)
    assert before == {p: p.stat().st_mtime_ns for p in (repo / "models").rglob("*")}


@pytest.mark.slow
def test_forced_repro_is_byte_identical(repo, built):
    weights = {n: sha(repo / "models" / n / "model.safetensors") for n in NAMES}
    quality = {n: {k: json.loads((repo / "metrics" / f"{n}.json").read_text())[k] for k in QUALITY} for n in NAMES}
    sh(repo, "dvc", "repro", "-f")
    assert weights == {n: sha(repo / "models" / n / "model.safetensors") for n in NAMES}
    assert quality == {n: {k: json.loads((repo / "metrics" / f"{n}.json").read_text())[k] for k in QUALITY}
                       for n in NAMES}
