"""`python -m tasks.<stage> --help` prints the stage's usage and does nothing else."""
import importlib
import pkgutil

import pytest

import tasks

STAGES = [importlib.import_module(f"tasks.{m.name}") for m in pkgutil.iter_modules(tasks.__path__)]


@pytest.mark.parametrize("stage", STAGES, ids=[s.__name__ for s in STAGES])
def test_help_prints_usage_and_writes_nothing(stage, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)                         # no params.yaml here: any real work would fail
    with pytest.raises(SystemExit) as e:
        stage.main(["--help"])
    assert e.value.code == 0
    assert capsys.readouterr().out.startswith("usage:")
    assert list(tmp_path.iterdir()) == []
