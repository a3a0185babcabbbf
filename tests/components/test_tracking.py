"""MLflow mirror: runs, current-run bookkeeping, nesting, unreachable backends, moved projects, registry."""
import shutil
from pathlib import Path

import mlflow
import pytest
import torch

from components import tracking
from components.artifacts import save_model_dir
from components.config import ModelConfig
from components.model import TransformerLM
from components.errors import ParamsError
from components.params import Study


def study(**tracking_params) -> Study:
    return Study.model_validate({"study": {"name": "trk"}, "pretrain": {"variants": {"a": {}}},
                                 "tracking": tracking_params})


def test_flatten_uses_params_yaml_key_names():
    assert tracking.flatten({"model": {"n_head": 4, "ffn": "swiglu"}, "study": {"seed": 1}}) == {
        "model.n_head": 4, "model.ffn": "swiglu", "study.seed": 1}


def test_stage_run_tags_params_and_artifacts_next_to_the_database(tmp_path):
    with tracking.stage_run(study(), "pretrain", model="a", parents=["p", "q"], params={"model": {"n_head": 4}},
                            tags={"variant": "a"}) as run_id:
        tracking.log_metrics({"val_loss": 1.5})
    run = mlflow.get_run(run_id)
    assert {k: run.data.tags[k] for k in ("stage", "model", "parents", "variant", "study", "current")} == {
        "stage": "pretrain", "model": "a", "parents": "p,q", "variant": "a", "study": "trk", "current": "true"}
    assert run.data.params == {"model.n_head": "4"} and run.data.metrics == {"val_loss": 1.5}
    assert run.info.artifact_uri.startswith(str(tmp_path / "mlartifacts"))


def test_a_rerun_leaves_one_current_run_per_stage_and_model():
    ids = []
    for _ in range(3):
        with tracking.stage_run(study(), "evaluate", model="a") as run_id:
            ids.append(run_id)
    with tracking.stage_run(study(), "evaluate", model="b") as other:
        pass
    current = tracking.current_runs("trk", "evaluate")
    assert sorted(r.info.run_id for r in current) == sorted([ids[-1], other])
    assert mlflow.get_run(ids[0]).data.tags["current"] == "false"


def test_a_dvc_experiment_tags_its_runs_and_leaves_the_workspace_runs_current(monkeypatch):
    with tracking.stage_run(study(), "evaluate", model="a") as workspace:
        pass
    monkeypatch.setenv("DVC_EXP_NAME", "lr-sweep-1")
    with tracking.stage_run(study(), "evaluate", model="a") as exp:
        pass
    assert mlflow.get_run(workspace).data.tags["dvc_exp"] == "workspace"
    assert mlflow.get_run(exp).data.tags["dvc_exp"] == "lr-sweep-1"
    assert [r.info.run_id for r in tracking.current_runs("trk", "evaluate")] == [workspace]
    assert [r.info.run_id for r in tracking.current_runs("trk", "evaluate", dvc_exp="lr-sweep-1")] == [exp]


def test_stages_of_a_temporary_dvc_experiment_track_into_the_project(monkeypatch, tmp_path):
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    monkeypatch.chdir(tmp_path)
    assert tracking.tracking_uri() == f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("DVC_ROOT", "/the/project")                # set by DVC, also in .dvc/tmp/exps/ copies
    assert tracking.tracking_uri() == "sqlite:////the/project/mlflow.db"


def test_a_ddp_rank_other_than_0_opens_no_run(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")     # not even asked: nothing listens there
    with tracking.stage_run(study(), "pretrain", model="a", enabled=False) as run_id:
        assert run_id is None and tracking.lightning_logger(run_id) is False


def test_a_failed_stage_run_is_never_current():
    with tracking.stage_run(study(), "evaluate", model="a") as good:
        pass
    with pytest.raises(RuntimeError):
        with tracking.stage_run(study(), "evaluate", model="a") as bad:
            raise RuntimeError("boom")
    assert mlflow.get_run(bad).info.status == "FAILED" and "current" not in mlflow.get_run(bad).data.tags
    assert [r.info.run_id for r in tracking.current_runs("trk", "evaluate")] == [good]


def test_stage_runs_nest_under_the_pipeline_run(monkeypatch):
    with tracking.stage_run(study(), "pipeline") as parent:
        pass
    monkeypatch.setenv(tracking.PARENT_RUN_ENV, parent)
    with tracking.stage_run(study(), "pretrain", model="a") as child:
        pass
    assert mlflow.get_run(child).data.tags["mlflow.parentRunId"] == parent


def test_unreachable_server_fails_fast_with_the_fix(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")       # discard port: nothing listens
    with pytest.raises(ParamsError, match=r"127.0.0.1:9 is unreachable .*required: false"):
        with tracking.stage_run(study(), "pretrain", model="a"):
            pytest.fail("the stage body must not run")


def test_unreachable_server_with_required_false_warns_and_runs_untracked(monkeypatch, capsys):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")
    monkeypatch.setattr(tracking, "_warned", False)
    ran = []
    for _ in range(2):
        with tracking.stage_run(study(required=False), "pretrain", model="a") as run_id:
            tracking.log_metrics({"x": 1.0})                                 # a no-op without a run
            ran.append(run_id)
    assert ran == [None, None]
    assert capsys.readouterr().err.count("continuing without MLflow") == 1


def test_artifacts_survive_moving_the_project(tmp_path, monkeypatch):
    old, new = tmp_path / "old", tmp_path / "new"
    old.mkdir()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{old / 'mlflow.db'}")
    with tracking.stage_run(study(), "report") as run_id:
        mlflow.log_text("hello", "note.txt")
    mlflow.set_tracking_uri("sqlite:///" + str(tmp_path / "unused.db"))   # drop the cached store
    shutil.move(old, new)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{new / 'mlflow.db'}")
    tracking.connect(study())
    assert mlflow.get_run(run_id).info.artifact_uri.startswith(str(new / "mlartifacts"))
    assert Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="note.txt")).read_text() == "hello"


def test_registered_model_loads_by_alias(tmp_path):
    torch.manual_seed(0)
    model = TransformerLM(ModelConfig(vocab_size=50, block_size=16, n_layer=1, n_head=2, n_embd=16))
    save_model_dir(tmp_path / "models/a", model, {"stage": "pretrain", "parents": []})
    with tracking.stage_run(study(register=True), "evaluate", model="a") as run_id:
        assert tracking.register_model_dir(study(), "a", tmp_path / "models/a", run_id) == 1
    with tracking.stage_run(study(register=True), "evaluate", model="a") as run_id:
        assert tracking.register_model_dir(study(), "a", tmp_path / "models/a", run_id) == 2
    loaded, meta = tracking.load_registered("trk", "a", dst=tmp_path / "download")
    assert meta["stage"] == "pretrain"
    x = torch.randint(0, 50, (1, 8))
    assert torch.equal(loaded(x), model.eval()(x))
    assert int(mlflow.MlflowClient().get_model_version_by_alias("trk", "a").version) == 2


def test_reserved_alias_names_are_rejected_when_registering():
    from components.params import semantic_problems
    s = Study.model_validate({"pretrain": {"variants": {"v2": {}}}, "tracking": {"register": True}})
    assert any("v2" in p and "alias" in p for p in semantic_problems(s))
