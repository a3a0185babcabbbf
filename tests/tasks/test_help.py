"""`python -m tasks.<stage> --help` prints the stage's usage and does nothing else."""
import pytest

from tasks import branch, compress, distill, evaluate, prepare, pretrain, report, upcycle, validate

STAGES = [validate, prepare, pretrain, branch, upcycle, distill, compress, evaluate, report]


@pytest.mark.parametrize("stage", STAGES, ids=[s.__name__ for s in STAGES])
def test_help_prints_usage_and_writes_nothing(stage, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)                         # no params.yaml here: any real work would fail
    with pytest.raises(SystemExit) as e:
        stage.main(["--help"])
    assert e.value.code == 0
    assert capsys.readouterr().out.startswith("usage:")
    assert list(tmp_path.iterdir()) == []
