"""The validate stage's models/dvc.yaml: every model's curve in one plot, every model an artifact, and
the committed file current with params.yaml. (Its checks of params.yaml: tests/components/test_params.py.)

    .venv/bin/python -m pytest tests/tasks/test_validate.py -q
"""
import importlib.util
import posixpath
import shutil
from pathlib import Path

import pytest
from ruamel.yaml import YAML

from components.errors import ParamsError
from components.params import load_study
from tasks import validate

ROOT = Path(__file__).resolve().parents[2]
SMOKE = ROOT / "tests/smoke/params.yaml"


@pytest.fixture
def project(tmp_path, monkeypatch):
    shutil.copy(SMOKE, tmp_path / "params.yaml")
    shutil.copytree(ROOT / "tests/smoke/hf", tmp_path / "tests/smoke/hf")          # its imports
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_views_overlay_every_curve_and_list_every_model_as_an_artifact(project):
    validate.main([])
    text = (project / "models/dvc.yaml").read_text()
    assert "Written by tasks/validate.py from params.yaml; do not edit." in text.splitlines()[1]
    views, models = YAML(typ="safe").load(text), load_study().models()
    [[(name, plot)]] = [p.items() for p in views["plots"]]
    assert (name, plot["x"], plot["template"]) == ("val_loss_vs_tokens", "tokens", "curves")
    assert [posixpath.normpath(f"models/{csv}") for csv in plot["y"]] == [     # imports, int8: never trained
        f"{m['dir']}/curve.csv" for name, m in models.items() if m["stage"] != "import" and "int8" not in name]
    assert set(plot["y"].values()) == {"val_loss"}
    assert list(views["artifacts"]) == list(models)
    assert {posixpath.normpath(f"models/{a['path']}") for a in views["artifacts"].values()} == \
        {m["dir"] for m in models.values()}
    assert views["artifacts"]["parallel-btx"] == {
        "path": "parallel-btx", "type": "model", "desc": "made by dvc stage upcycle@parallel-btx from parallel, "
                                                         "parallel-lib, parallel-tests",
        "labels": ["upcycle", "method:btx", "seed:1337", "parent:parallel", "parent:parallel-lib",
                   "parent:parallel-tests"]}
    assert views["artifacts"]["parallel-lib"]["path"] == "../branches/parallel/parallel-lib"
    assert views["artifacts"]["parallel-lib"]["labels"] == ["branch", "domain:lib", "seed:1337", "parent:parallel"]
    assert views["artifacts"]["serial"]["labels"] == ["pretrain", "preset:serial", "seed:1337"]
    assert views["artifacts"]["serial-s2"]["labels"] == ["pretrain", "preset:serial", "seed:2"]
    assert views["artifacts"]["serial-s2"]["desc"] == "made by dvc stage pretrain-replica@serial-s2"
    assert views["artifacts"]["serial-kd"]["labels"] == ["distill", "init:scratch", "seed:1337", "parent:serial"]
    assert views["artifacts"]["serial-int8"]["labels"] == ["compress", "method:int8", "seed:1337", "parent:serial"]
    assert views["artifacts"]["serial-int8-s2"]["labels"] == ["compress", "method:int8", "seed:2", "parent:serial-s2"]
    assert views["artifacts"]["llama"]["labels"] == ["import", "source:tests/smoke/hf/llama"]
    assert views["artifacts"]["llama-sparse"]["labels"] == ["upcycle", "method:sparse", "seed:1337", "parent:llama"]
    assert (project / "data/params.ok").exists()


def test_views_are_rewritten_only_when_the_models_change(project):
    validate.main([])
    views = project / "models/dvc.yaml"
    before = views.stat().st_mtime_ns, views.read_text()
    validate.main([])
    assert (views.stat().st_mtime_ns, views.read_text()) == before
    params = (project / "params.yaml").read_text()
    (project / "params.yaml").write_text(params.replace("parallel-gqa", "gqa"))
    validate.main([])
    assert "\n      gqa/curve.csv" in views.read_text() and "parallel-gqa" not in views.read_text()
    assert sorted(p.name for p in views.parent.iterdir()) == ["dvc.yaml", "replicas.yaml"]   # no temporary file left


def test_dvc_reads_every_artifact_with_a_valid_name(project):
    from dvc.repo import Repo
    from dvc.repo.artifacts import check_name_format

    validate.main([])
    with Repo.init(project, no_scm=True) as repo:
        artifacts = repo.artifacts.read()["models/dvc.yaml"]
    assert list(artifacts) == list(load_study().models())
    for name in artifacts:
        check_name_format(name)                                            # raises on a name DVC only warns about


def test_replicas_list_each_seeds_model_with_what_it_is_made_from(project):
    validate.main([])
    plan = YAML(typ="safe").load((project / "models/replicas.yaml").read_text())["replica"]
    assert plan["pretrain"] == {"serial-s2": {"entry": "serial", "seed": 2}, "parallel-s2": {"entry": "parallel", "seed": 2}}
    assert plan["compress"] == {"serial-int8-s2": {"entry": "serial-int8", "seed": 2, "source": "serial-s2"}}
    assert list(plan["evaluate"]) == ["serial-s2", "parallel-s2", "serial-int8-s2"]
    assert plan["branch"] == plan["upcycle"] == plan["distill"] == {}


def test_the_validate_stage_stops_a_repro_planned_from_older_replicas(project):
    validate.main([])                                                      # as make repro does first
    params = (project / "params.yaml").read_text()
    (project / "params.yaml").write_text(params.replace("    parallel: [2]\n", "    parallel: [2]\n    looped: [3]\n"))
    with pytest.raises(ParamsError, match=r"models/replicas.yaml, .* is rewritten now, .* run `dvc repro` again"):
        validate.main(["--stage"])
    assert "looped-s3" in (project / "models/replicas.yaml").read_text()
    validate.main(["--stage"])                                             # the repro after: current, so it passes


def test_committed_replicas_match_params_yaml():
    assert (ROOT / "models/replicas.yaml").read_text() == validate.replicas(load_study(ROOT / "params.yaml")), \
        "models/replicas.yaml is stale: run `python -m tasks.validate` and commit it"


def test_committed_views_match_params_yaml():
    committed = (ROOT / "models/dvc.yaml").read_text()
    assert committed == validate.views(load_study(ROOT / "params.yaml")), \
        "models/dvc.yaml is stale: run `python -m tasks.validate` (or `dvc repro`) and commit models/dvc.yaml"


def test_a_study_whose_stages_need_a_missing_extra_stops_before_any_stage(project, monkeypatch):
    """`make repro` installs archflow without extras: the smoke study imports Hugging Face checkpoints
    (transformers, the hf extra); with lm-eval tasks it also needs the eval extra. Validation names both
    and writes nothing."""
    params = (project / "params.yaml").read_text()
    (project / "params.yaml").write_text(params.replace("evaluate:\n", "evaluate:\n  tasks: [archflow_tiny_mc]\n", 1))
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name: None if name in ("transformers", "lm_eval") else find_spec(name))
    with pytest.raises(ParamsError) as e:
        validate.main([])
    assert str(e.value).startswith("params.yaml is valid, but this environment lacks what its stages need")
    assert "evaluate.tasks: needs lm-evaluation-harness, which is not installed here: `make repro EXTRAS=eval`" \
        in str(e.value)
    assert "import: needs transformers, which is not installed here: `make repro EXTRAS=hf`" in str(e.value)
    assert not (project / "data/params.ok").exists() and not (project / "models").exists()
    monkeypatch.setattr(importlib.util, "find_spec", find_spec)   # installed (as with `make test`)
    validate.main([])
    assert (project / "data/params.ok").exists()
