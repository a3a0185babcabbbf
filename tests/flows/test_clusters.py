"""tests/flows/clusters.py: a Prefect task on a real local Dask / Ray cluster runs in a worker of its
own, whose cwd is that worker's empty directory (not the flow's), and a task asking for a GPU runs on
the one worker that has one."""
import os

import pytest
from prefect import flow, task

from tests.flows.clusters import dask_cluster, ray_cluster, reachable


@task
def where() -> dict:
    # Only importable globals here: Prefect's task function is pickled by value, the modules it uses by reference.
    import os
    return {"pid": os.getpid(), "cwd": os.getcwd(), "files": sorted(os.listdir())}


def check(runs: list[dict], tmp_path) -> None:
    gpu, plain = runs
    assert gpu["cwd"] == str(tmp_path / "worker1"), gpu
    assert plain["cwd"] in {str(tmp_path / "worker0"), str(tmp_path / "worker1")}, plain
    assert gpu["files"] == [] and plain["files"] == []
    assert os.getpid() not in {gpu["pid"], plain["pid"]}


def test_dask_cluster(tmp_path):
    pytest.importorskip("prefect_dask")
    import dask
    from prefect_dask import DaskTaskRunner

    with dask_cluster(tmp_path, workers=2, resources=[None, {"GPU": 1}]) as address:
        assert reachable(address)

        @flow(task_runner=DaskTaskRunner(address=address))
        def on_dask():
            with dask.annotate(resources={"GPU": 1}):
                gpu = where.submit()
            return [gpu.result(), where.submit().result()]

        check(on_dask(), tmp_path)
    assert not reachable(address, timeout=0.5)


def test_ray_cluster(tmp_path):
    pytest.importorskip("prefect_ray")
    from prefect_ray import RayTaskRunner
    from prefect_ray.context import remote_options

    with ray_cluster(tmp_path, nodes=2, gpus=[0, 1]) as address:
        assert reachable(address)

        @flow(task_runner=RayTaskRunner(address=address, init_kwargs={"log_to_driver": False}))
        def on_ray():
            with remote_options(num_gpus=1):
                gpu = where.submit()
            return [gpu.result(), where.submit().result()]

        check(on_ray(), tmp_path)
    assert not reachable(address, timeout=0.5)
