"""The Makefile's installs: `make repro` installs archflow without extras (or the EXTRAS a study needs),
`make test` the dev extras; each set has its own stamp, so adding one reinstalls. Dry runs (`make -n`)
against an empty venv folder: nothing is installed.

    .venv/bin/python -m pytest tests/test_make.py -q
"""
import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="needs make")


def dry_run(venv: Path, *args: str) -> list[str]:
    """The commands `make -n` prints, as a top-level make (`make test` runs these tests: a make started
    from it would inherit its flags and print the directories it enters)."""
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL", "MAKEOVERRIDES")}
    out = subprocess.run(["make", "-n", f"VENV={venv}", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                         check=True)
    return out.stdout.splitlines()


def test_repro_installs_no_extras_unless_asked_and_test_installs_dev(tmp_path):
    venv = tmp_path / "venv"
    assert dry_run(venv, "repro")[:2] == [f"scripts/install.sh {venv}", f"touch {venv}/.installed"]
    assert dry_run(venv, "repro", "EXTRAS=eval,hf")[:2] == [f"scripts/install.sh {venv} eval,hf",
                                                            f"touch {venv}/.installed-eval,hf"]
    assert dry_run(venv, "test")[:2] == [f"scripts/install.sh {venv} dev", f"touch {venv}/.installed-dev"]


def test_an_installed_set_of_extras_is_not_installed_again(tmp_path):
    venv = tmp_path / "venv"
    venv.mkdir()
    (venv / ".installed-dev").touch()                  # `make test` ran: the tests reuse it, a study installs
    assert not any("install.sh" in line for line in dry_run(venv, "test"))
    assert dry_run(venv, "repro")[0] == f"scripts/install.sh {venv}"
