"""Test-wide settings: telemetry off, MLflow into a per-test sqlite file, never the project's."""
import gc
import os

import pytest

os.environ.update(DO_NOT_TRACK="true", MLFLOW_DISABLE_TELEMETRY="true", DVC_NO_ANALYTICS="1",
                  PREFECT_SERVER_ANALYTICS_ENABLED="false")
# `make test` runs two pytest workers, each starting stages, on a 2-core machine: torch's default of a
# thread per core would oversubscribe the cores (OpenMP's threads spin while they wait, so two processes of
# two threads each run several times slower than two of one). One thread per process; set
# OMP_NUM_THREADS to override. (Stages a cluster test starts on Dask or Ray workers get the workers' own.)
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.hookimpl(wrapper=True)
def pytest_collection(session):
    """Collection imports torch, Lightning, Prefect, MLflow and lm-eval: millions of objects that live as
    long as the worker. The garbage collector, left on, walks them again and again as they come (14 s to
    collect instead of 8) and at every full collection after; so it is off while collecting, and what
    collection made is frozen (the collector skips it from then on)."""
    gc.disable()
    try:
        return (yield)
    finally:
        gc.freeze()
        gc.enable()


@pytest.fixture(autouse=True)
def _mlflow_in_tmp(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")


# The longest files first, longest first (measured 2026-12-04: seconds of one `make test`): `make test`
# gives each pytest-xdist worker whole files, in this order (the Makefile turns off xdist's own reordering
# by test count, which put the smoke study's file in the middle). One worker starts the smoke study's
# file (its module fixture builds the whole study) and holds it for minutes, the other takes the next
# long ones; the many short files come last, where they even out the two workers' ends.
LONGEST_FIRST = ("tests/test_pipeline.py",          # 675
                 "tests/faults/test_sigkill.py",    # 149
                 "tests/flows/test_cluster.py",     # 136
                 "tests/test_dvc_study.py",         # 106
                 "tests/faults/test_bad_files.py",  # 91
                 "tests/faults/test_prefect_faults.py",  # 66
                 "tests/flows/test_e2e.py",         # 62
                 "tests/flows/test_pipeline.py",    # 60
                 "tests/tasks/test_pretrain.py",    # 51
                 "tests/tasks/test_multinode.py")   # 49


def pytest_collection_modifyitems(config, items):
    rank = {path: i for i, path in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::")[0], len(rank)))   # stable: the rest keep their order


# The fault ledger (tests/faults/conftest.py): test id -> [faults injected, passed]. Reports reach this
# hook in the process that prints the summary, from pytest-xdist's workers too; a test's teardown report
# carries every fault its setup and call injected.
FAULTS: dict[str, list] = {}


def pytest_runtest_logreport(report):
    injected = sum(key == "fault" for key, _ in report.user_properties)
    if injected:
        entry = FAULTS.setdefault(report.nodeid, [0, False])
        entry[0] = max(entry[0], injected)
        entry[1] = entry[1] or (report.when == "call" and report.passed)


def pytest_terminal_summary(terminalreporter):
    if not FAULTS:
        return
    injected = sum(n for n, _ in FAULTS.values())
    survived = sum(n for n, passed in FAULTS.values() if passed)
    terminalreporter.write_line(
        f"faults: {injected} injected in {len(FAULTS)} tests, {survived} survived with nothing lost"
        + ("" if survived == injected else f", {injected - survived} NOT survived (see the failures above)"))
