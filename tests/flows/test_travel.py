"""Stages that travel (flows/travel.py), on tiny projects: what the flow checks before any stage,
and on a real local Dask cluster whose workers work in empty directories of their own, what a
stage brings back, an input missing from the remote, resources no worker has, a worker that lacks
archflow's dependencies. The smoke study on Dask and Ray: tests/flows/test_cluster.py."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from components.errors import ParamsError
from flows import travel
from flows.pipeline import check_address, pipeline, plan_stages, preflight
from tests.flows.clusters import dask_cluster, free_port
from tests.flows.conftest import stage

UNTRACKED = "tracking:\n  required: false\n"        # the tiny projects' MLflow store is a sqlite file


def git(root: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=root, check=True, capture_output=True, text=True).stdout


def dvc(root: Path, *args: str) -> str:
    return subprocess.run([sys.executable, "-m", "dvc", *args], cwd=root, check=True, capture_output=True,
                          text=True).stdout


@pytest.fixture
def shared(project, tmp_path):
    """A factory: a tiny project committed and pushed to a bare `origin`, with a directory DVC remote."""
    def build(stages: str) -> Path:
        root = project(stages)
        (root / "params.yaml").write_text((root / "params.yaml").read_text() + UNTRACKED)
        (tmp_path / "remote").mkdir()
        git(tmp_path, "init", "-q", "--bare", "origin.git")
        dvc(root, "remote", "add", "-d", "storage", str(tmp_path / "remote"))
        git(root, "add", "-A")
        git(root, "commit", "-qm", "tiny")
        git(root, "remote", "add", "origin", str(tmp_path / "origin.git"))
        git(root, "push", "-q", "origin", "HEAD:main")
        return root
    return build


def refused(match: str, runner: str = "dask", address=None) -> None:
    with pytest.raises(ParamsError, match=match):
        preflight([], runner, address)


def test_what_workers_need_is_checked_before_any_stage(shared, tmp_path):
    root = shared(stage("root") + stage("left", ["out/root.txt"]))
    preflight([], "dask")                                         # all there

    (root / "params.yaml").write_text((root / "params.yaml").read_text().replace(UNTRACKED, ""))
    refused(r"can't write to the MLflow store sqlite:.*start a tracking server.*required: false")
    (root / "params.yaml").write_text((root / "params.yaml").read_text() + UNTRACKED)

    (root / "notes.txt").write_text("uncommitted")                # sent to workers with the job: fine
    (root / "big.bin").write_bytes(b"\0" * (travel_limit() + 1))
    refused(r"big.bin \(16.0 MiB\) is neither committed nor in DVC.*up to 16 MiB.*commit it, `dvc add` it, or git-ignore it")
    (root / "big.bin").unlink()

    (root / "dvc.yaml").write_text((root / "dvc.yaml").read_text() + stage("extra", ["../outside.txt"]))
    (tmp_path / "outside.txt").write_text("not in the project")
    refused(r"stages read .*outside.txt, which neither git nor DVC holds.*`git add`.*`dvc add`")
    git(root, "checkout", "dvc.yaml")

    git(root, "commit", "-qm", "unpushed", "--allow-empty")
    refused(r"commit [0-9a-f]{12} is not on .*origin.git, where the workers get the project: push it")
    git(root, "push", "-q", "origin", "HEAD:main")
    preflight([], "ray")

    remote = dvc(root, "remote", "list").split()[1]
    os.rename(remote, remote + "-moved")
    refused(r"the DVC remote 'storage' is the directory .*remote, which does not exist: create it \(`mkdir -p")
    os.rename(remote + "-moved", remote)
    os.chmod(remote, 0o500)
    try:
        if not os.access(remote, os.W_OK):                        # root can write anywhere
            refused(r"the DVC remote 'storage' \(.*remote\) is not writable")
    finally:
        os.chmod(remote, 0o700)
    dvc(root, "remote", "remove", "storage")
    refused(r"no default remote: `dvc remote add -d storage <url>`")

    git(root, "remote", "remove", "origin")
    refused(r"no `origin`: add one \(`git remote add origin <url>`\) or pass --git-url")
    with pytest.raises(ParamsError, match=r"can't read|cannot read"):
        preflight([], "dask", None, str(tmp_path / "no-such-repo"))

    (root / "params.yaml").write_text((root / "params.yaml").read_text() + "resources:\n  lfet: {cpus: 1}\n")
    with pytest.raises(ParamsError, match=r"resources: 'lfet' is no stage of dvc.yaml.*did you mean 'left'"):
        preflight([])


def travel_limit() -> int:
    from flows.pipeline import MAX_SENT_BYTES
    return MAX_SENT_BYTES


def test_an_address_nothing_answers_at_is_one_message():
    port = free_port()
    for kind, address in (("dask", f"tcp://127.0.0.1:{port}"), ("ray", f"127.0.0.1:{port}")):
        with pytest.raises(ParamsError, match=rf"nothing answers at --address {address} .*start `{kind}"):
            check_address(kind, address)


def test_dask_and_ray_need_a_prefect_server_the_workers_can_reach(shared):
    root = shared(stage("root"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    r = subprocess.run([sys.executable, "-m", "flows.pipeline", "--task-runner", "dask"], cwd=root, env=env,
                       capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.startswith("error: --task-runner dask needs a Prefect server"), r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.slow
def test_stages_on_dask_workers_leave_the_project_as_dvc_repro_would(shared, tmp_path, monkeypatch):
    root = shared(stage("root") + stage("left", ["out/root.txt"], mode="copy=out/root.txt")
                  + stage("right", ["out/root.txt"]))
    (root / "params.yaml").write_text((root / "params.yaml").read_text() + "resources:\n  right: {cpus: 1}\n")
    with dask_cluster(tmp_path / "dask", workers=2, resources=[{"CPU": 1}, None]) as address:
        assert pipeline(task_runner="dask", address=address) == {"root": "ran", "left": "ran", "right": "ran"}
        assert {f: (root / "out" / f).read_text() for f in ("root.txt", "left.txt", "right.txt")} == {
            "root.txt": "root\n", "left.txt": "root\n", "right.txt": "right\n"}
        # files a stage writes beside its outputs come back too (stage.py's log/runs.txt, like validate's
        # models/dvc.yaml); a file two parallel stages both write is the one that came back last
        assert (root / "log/runs.txt").read_text().startswith("root ")
        assert "Data and pipelines are up to date" in dvc(root, "status")
        assert sorted((root / "out/.gitignore").read_text().split()) == ["/left.txt", "/right.txt", "/root.txt"]
        assert pipeline(task_runner="dask", address=address) == {"root": "skipped", "left": "skipped",
                                                                 "right": "skipped"}

        # an input missing from the remote: the stage fails naming it, with the fix
        (root / "dvc.yaml").write_text((root / "dvc.yaml").read_text() + stage("late", ["out/root.txt"]))
        for f in Path(dvc(root, "remote", "list").split()[1]).rglob("*"):
            if f.is_file():
                f.unlink()
        shutil.rmtree(tmp_path / "dask/archflow-work/dvc-cache")        # the workers' cache had it too
        with pytest.raises(Exception, match=r"its inputs out/root.txt are not in the DVC remote .*`dvc push out/root.txt`"):
            pipeline(["late"], task_runner="dask", address=address)

        # resources no worker has, a worker without a dependency: one message each, before any stage
        (root / "params.yaml").write_text((root / "params.yaml").read_text() + "  late: {gpus: 1}\n")
        with pytest.raises(ParamsError, match=r"stage late asks for GPU=1 .*no worker has that \(workers hold: "
                                              r"(CPU=1; none declared|none declared; CPU=1)\).*--resources"):
            pipeline(["late"], task_runner="dask", address=address)
        monkeypatch.setattr(travel, "REQUIRES", (*travel.REQUIRES, "no_such_package_here"))
        with pytest.raises(ParamsError, match=r"a worker \(.*\) lacks no_such_package_here: install archflow's"):
            pipeline(["late"], task_runner="dask", address=address)


def test_a_dep_on_a_directory_of_outputs_is_pulled_not_refused(project):
    """upcycle@ reads branches/<parent>, the directory of its branches' outputs."""
    project("  a:\n    cmd: python stage.py a out/d/a.txt 0 ok\n    deps:\n      - stage.py\n    outs:\n      - out/d/a.txt\n"
            "  b:\n    cmd: python stage.py b out/b.txt 0 ok\n    deps:\n      - out/d\n    outs:\n      - out/b.txt\n")
    plan = plan_stages([])
    assert plan.inputs == {"a": [], "b": ["out/d/a.txt"]}
    assert plan.sources == {"stage.py"}


def test_a_stage_that_needs_a_gpu_is_tagged_for_a_prefect_concurrency_limit(project):
    """The thread runner's way to queue GPU stages: `prefect concurrency-limit create gpu 1`."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import TaskRunFilter, TaskRunFilterName

    root = project(stage("gpustage") + stage("cpustage"))
    (root / "params.yaml").write_text((root / "params.yaml").read_text() + "resources:\n  gpustage: {gpus: 1}\n")
    assert pipeline() == {"gpustage": "ran", "cpustage": "ran"}
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(task_run_filter=TaskRunFilter(name=TaskRunFilterName(any_=["gpustage", "cpustage"])))
    assert {r.name: r.tags for r in runs} == {"gpustage": ["gpu"], "cpustage": []}
