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


# The longest file first: its module fixture builds the whole smoke study (minutes). `make test` gives each
# pytest-xdist worker whole files in collection order, so a worker starts it at once and the other
# worker takes the many short files meanwhile, instead of one worker starting it near the end.
LONGEST_FIRST = ("tests/test_pipeline.py",)


def pytest_collection_modifyitems(config, items):
    rank = {path: i for i, path in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::")[0], len(rank)))   # stable: the rest keep their order
