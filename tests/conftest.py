"""Test-wide settings: telemetry off, MLflow into a per-test sqlite file, never the project's."""
import os

import pytest

os.environ.update(DO_NOT_TRACK="true", MLFLOW_DISABLE_TELEMETRY="true", DVC_NO_ANALYTICS="1",
                  PREFECT_SERVER_ANALYTICS_ENABLED="false")
# `make test` runs two pytest workers, each starting stages, on a 2-core machine: torch's default of a
# thread per core would oversubscribe the cores (OpenMP's threads spin while they wait, so two processes of
# two threads each run several times slower than two of one). One thread per process; set
# OMP_NUM_THREADS to override. (Stages a cluster test starts on Dask or Ray workers get the workers' own.)
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(autouse=True)
def _mlflow_in_tmp(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
