"""flows/pipeline.py on tiny DVC projects (cheap `python stage.py` stages, no training).

    .venv/bin/python -m pytest tests/flows -q -m "not slow"
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import mlflow
import pytest
from ruamel.yaml import YAML

from components.errors import ParamsError
from flows import travel
from flows.pipeline import main, pipeline, plan_stages
from tests.flows.conftest import PARAMS, make_project, runs, stage

ROOT = Path(__file__).resolve().parents[2]



def diamond(root: str = stage("root"), slow: str = "left") -> str:
    """root -> left, right -> join; of the two independent stages, `slow` finishes last."""
    sleep = {"left": 0.2, "right": 0.2, slow: 1.5}
    return (root + stage("left", ["out/root.txt"], sleep=sleep["left"])
            + stage("right", ["out/root.txt"], sleep=sleep["right"]) + stage("join", ["out/left.txt", "out/right.txt"]))


DIAMOND = diamond()


def test_stages_follow_the_dag_and_independent_ones_overlap(project):
    root = project(stage("root") + stage("left", ["out/root.txt"], mode="meet=right")
                   + stage("right", ["out/root.txt"], mode="meet=left") + stage("join", ["out/left.txt", "out/right.txt"]))
    assert pipeline(max_parallel=2) == {"root": "ran", "left": "ran", "right": "ran", "join": "ran"}
    t = runs(root)                                             # left and right each waited for the other
    assert t["root"][1] <= min(t["left"][0], t["right"][0])
    assert max(t["left"][1], t["right"][1]) <= t["join"][0]
    parent = {p for _, _, p in t.values()}
    assert len(parent) == 1 and mlflow.get_run(parent.pop()).data.tags["stage"] == "pipeline"


def test_a_second_run_executes_nothing_and_a_changed_input_reruns_downstream(project):
    root = project(diamond(root=stage("root", ["in.txt"], mode="copy=in.txt")))     # out/root.txt: in.txt
    (root / "in.txt").write_text("one\n")
    pipeline()
    before = (root / "log/runs.txt").read_text()
    assert set(pipeline().values()) == {"skipped"}
    assert (root / "log/runs.txt").read_text() == before
    # Only root's own dep changed; left and right are stale once root has rerun (DVC then runs them),
    # join is not: their outputs came out the same.
    (root / "in.txt").write_text("two\n")
    assert pipeline() == {"root": "ran", "left": "ran", "right": "ran", "join": "skipped"}
    assert (root / "out/root.txt").read_text() == "two\n"


def test_an_always_changed_stage_that_changes_nothing_reruns_nothing_downstream(project, monkeypatch):
    root = project(stage("root").replace("    cmd:", "    always_changed: true\n    cmd:")    # like `corpus`
                   + stage("left", ["out/root.txt"]) + stage("join", ["out/left.txt"]))
    pipeline()
    flow_runs = pipeline_runs()
    tasks = []                                  # the stages that got a task (each runs `dvc repro` on it)
    monkeypatch.setattr(travel, "repro_command", lambda name, real=travel.repro_command: tasks.append(name) or real(name))
    assert pipeline() == {"root": "ran", "left": "skipped", "join": "skipped"}
    assert tasks == ["root"]                    # dvc.lock records root's output as before: no task downstream
    ran = [line.split() for line in (root / "log/runs.txt").read_text().splitlines()]
    assert [r[0] for r in ran] == ["root", "left", "join", "root"]
    # root tracks nothing (as corpus): the first flow's MLflow run opened for left, the second opened none
    assert [r[3] for r in ran] == ["-", flow_runs[0], flow_runs[0], "-"]
    assert pipeline_runs() == flow_runs
    assert "No stage that tracks ran: this execution has no MLflow run." in latest_artifact("archflow-run")["data"]


def pipeline_runs() -> list[str]:
    """The flows' MLflow runs in the tests' database, newest first."""
    return [r.info.run_id for r in mlflow.search_runs(search_all_experiments=True, output_format="list",
                                                      filter_string="tags.stage = 'pipeline'",
                                                      order_by=["attributes.start_time DESC"])]


def test_dvc_lock_and_outputs_are_what_dvc_repro_writes(project, tmp_path):
    by_flow = project(DIAMOND, "flow")
    order = plan_stages([]).order               # dvc repro's order in this process (see below)
    # The independent stage dvc repro runs first finishes last here: dvc.lock gets the entries in the
    # order the stages finish, until the flow puts them in dvc repro's.
    first = next(n for n in order if n in ("left", "right"))
    (by_flow / "dvc.yaml").write_text("stages:\n" + diamond(slow=first))
    pipeline(max_parallel=2)
    by_dvc = make_project(tmp_path / "dvc", diamond(slow=first))
    subprocess.run([sys.executable, "-m", "dvc", "repro"], cwd=by_dvc, check=True, capture_output=True)
    files = [f"out/{n}.txt" for n in ("root", "left", "right", "join")]
    assert {f: (by_flow / f).read_bytes() for f in files} == {f: (by_dvc / f).read_bytes() for f in files}
    # dvc.lock: the same entries; their order is dvc repro's only up to independent stages (`left`
    # and `right`), which DVC orders by string hashes that change with PYTHONHASHSEED
    lock_flow, lock_dvc = (YAML(typ="safe").load((d / "dvc.lock").read_text())["stages"] for d in (by_flow, by_dvc))
    assert lock_flow == lock_dvc
    assert list(lock_flow) == order
    assert sorted((by_flow / "out/.gitignore").read_text().split()) == sorted((by_dvc / "out/.gitignore").read_text().split())


def test_artifacts_hold_the_summary_table_and_where_the_mlflow_runs_are(project):
    root = project(stage("root"))
    (root / "reports").mkdir()
    (root / "reports/summary.csv").write_text("model,val_loss\nserial,1.5\nparallel,1.25\n")
    pipeline()
    table, note = latest_artifact("archflow-summary"), latest_artifact("archflow-run")
    assert table["type"] == "table" and json.loads(table["data"]) == [
        {"model": "serial", "val_loss": "1.5"}, {"model": "parallel", "val_loss": "1.25"}]
    assert note["type"] == "markdown" and "mlflow ui --backend-store-uri" in note["data"]
    assert "| `root` | ran |" in note["data"]


def latest_artifact(key: str) -> dict:
    from prefect.settings import PREFECT_API_URL          # the test harness's server
    r = httpx.post(f"{PREFECT_API_URL.value()}/artifacts/filter", timeout=30,
                   json={"artifacts": {"key": {"any_": [key]}}, "sort": "CREATED_DESC", "limit": 1})
    return r.json()[0]


def test_a_failed_stage_fails_the_flow_by_name_and_independent_stages_finish(project):
    # `other` is still running when `bad` fails: `after_other` is submitted after the failure.
    root = project(stage("root") + stage("bad", ["out/root.txt"], mode="fail")
                   + stage("after_bad", ["out/bad.txt"]) + stage("other", ["out/root.txt"], sleep=1.5, mode="meet=bad")
                   + stage("after_other", ["out/other.txt"]))
    state = pipeline(max_parallel=2, return_state=True)
    assert state.is_failed()
    assert "stage 'bad' failed" in state.message and "boom: this stage always fails" in state.message
    assert "not run (upstream failed): after_bad" in state.message
    assert set(runs(root)) == {"root", "other", "after_other"}  # `other` was not cancelled, nor what follows it
    parent = runs(root)["other"][2]
    assert mlflow.get_run(parent).info.status == "FAILED"


def test_a_flaky_stage_succeeds_when_retried(project):
    root = project(stage("flaky", mode="flaky") + stage("after", ["out/flaky.txt"]))
    assert pipeline(retries=1) == {"flaky": "ran", "after": "ran"}
    assert (root / "log/flaky.tried").exists() and set(runs(root)) == {"flaky", "after"}


def test_targets_run_a_stage_or_a_foreach_group_with_their_upstream(project):
    root = project(stage("root") + "  grp:\n    foreach: [a, b]\n    do:\n"
                   "      cmd: python stage.py grp-${item} out/grp-${item}.txt 0 ok\n"
                   "      deps:\n        - out/root.txt\n      outs:\n        - out/grp-${item}.txt\n"
                   + stage("last", ["out/grp-a.txt", "out/grp-b.txt"]))
    assert pipeline(targets=["grp@a"]) == {"root": "ran", "grp@a": "ran"}
    assert pipeline(targets=["grp"]) == {"root": "skipped", "grp@a": "skipped", "grp@b": "ran"}
    assert set(runs(root)) == {"root", "grp-a", "grp-b"}


# Bad input: one clear message (a ParamsError; the command line prints it and exits 2), nothing run.

def test_bad_input_is_named_before_any_stage_runs(project, tmp_path, monkeypatch):
    root = project(DIAMOND)
    with pytest.raises(ParamsError, match=r"unknown stage 'jion' in dvc.yaml; did you mean 'join'\?"):
        main(["jion"])
    (root / "params.yaml").write_text("pretrain:\n  variants:\n    tiny: {n_heads: 4}\n")
    with pytest.raises(ParamsError, match=r"(?s)params.yaml is invalid .*did you mean 'n_head'\?"):
        main([])
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ParamsError, match="is not a DVC project"):
        main([])
    assert not (root / "out").exists()


def test_a_missing_extra_is_named_before_prefect_starts(project, monkeypatch):
    """As `python -m tasks.validate` does (tests/tasks/test_validate.py): a study scoring lm-eval tasks in
    a venv without lm-eval stops the flow with the extra to install, before any stage."""
    import importlib.util
    root = project(DIAMOND)
    (root / "params.yaml").write_text(PARAMS + "evaluate:\n  tasks: [archflow_tiny_mc]\n")
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "lm_eval" else find_spec(name))
    with pytest.raises(ParamsError, match=r"(?s)lacks what its stages need.*evaluate.tasks: needs "
                                          r"lm-evaluation-harness, .*`make repro EXTRAS=eval`"):
        main([])
    assert not (root / "out").exists()


def test_a_dvc_process_holding_the_project_is_one_message(project):
    """The plan is made under DVC's repo lock (as `dvc status` is): a `dvc repro` holding it stops the flow
    with DVC's own explanation and no traceback."""
    from dvc.repo import Repo
    root = project(DIAMOND)
    with Repo(str(root)) as repo, repo.lock:
        with pytest.raises(ParamsError, match=r"Unable to acquire lock.*is a `dvc repro` running in this project\?"):
            main([])
    assert not (root / "out").exists()
    assert main([]) == 0 and (root / "out/join.txt").exists()


def test_the_command_plans_once_and_the_flow_body_reuses_it(project, monkeypatch):
    """main() checks every input before Prefect starts; the flow body, in the same process, does not
    load the study and ask DVC for the plan a second time (seconds of a no-op flow)."""
    import flows.pipeline as fp
    root = project(DIAMOND)
    calls = []
    real = fp.preflight
    monkeypatch.setattr(fp, "preflight", lambda *a, **k: calls.append(a) or real(*a, **k))
    assert main([]) == 0
    assert len(calls) == 1 and (root / "out/join.txt").exists()
    assert fp._checked == {}                                   # taken by the flow body, nothing left over
    assert set(pipeline().values()) == {"skipped"} and len(calls) == 2   # the flow alone plans for itself


def test_an_unreachable_prefect_server_is_one_line_and_exit_2(tmp_path):
    root = make_project(tmp_path / "p", DIAMOND)
    r = subprocess.run([sys.executable, "-m", "flows.pipeline"], cwd=root, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHONPATH": str(ROOT), "PREFECT_API_URL": "http://127.0.0.1:9/api"})
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert r.stderr.startswith("error: no Prefect server answers at PREFECT_API_URL=http://127.0.0.1:9/api (")
    assert not (root / "out").exists()
