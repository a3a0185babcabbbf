"""components.errors.cli, the runner of every stage's and the flow's `__main__`: exit status, the one-line
user error, and an exit with the garbage collector frozen (in a subprocess: the freeze happens at exit)."""
import gc
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def run_cli(body: str) -> subprocess.CompletedProcess:
    """`cli(main)` in a fresh interpreter, `main` defined by `body`; an atexit handler registered before
    cli's (so it runs after it) writes the collector's frozen-object count to stdout."""
    code = ("import atexit, gc, sys\n"
            "from components.errors import ParamsError, cli\n"
            "atexit.register(lambda: print('frozen', gc.get_freeze_count()))\n"
            f"{body}\n"
            "cli(main)\n")
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)


@pytest.mark.parametrize("returns, status", [("None", 0), ("0", 0), ("3", 3)])
def test_exit_status_is_mains_return_value_and_the_collector_is_frozen_at_exit(returns, status):
    r = run_cli(f"def main(argv):\n    print('argv', argv)\n    return {returns}")
    assert r.returncode == status, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == "argv []" and lines[1].startswith("frozen ") and int(lines[1].split()[1]) > 0
    assert r.stderr == ""


def test_a_user_error_is_one_line_and_exit_status_2():
    r = run_cli("def main(argv):\n    raise ParamsError('train.lr: must be > 0; set a positive learning rate')")
    assert r.returncode == 2
    assert r.stderr == "error: train.lr: must be > 0; set a positive learning rate\n"
    assert int(r.stdout.split()[1]) > 0


def test_in_process_it_returns_and_leaves_the_collector_alone_until_exit(monkeypatch):
    """As tests call it (tests/faults/test_params_fuzz.py): success returns, the freeze waits for the exit."""
    from components.errors import cli
    monkeypatch.setattr(sys, "argv", ["prog"])
    frozen = gc.get_freeze_count()           # tests/conftest.py froze what collection imported
    assert cli(lambda argv: None) is None and gc.get_freeze_count() == frozen and gc.isenabled()


def test_python_m_pauses_the_collector_while_the_program_imports(tmp_path):
    """`python -m pkg.prog`, pkg's __init__ calling pause_collector_while_starting (as tasks/ and flows/ do):
    the collector is off while prog's module loads, and cli turns it back on with what loaded frozen;
    collector_paused does the same around a late import. An import of the same module (a test, the flow
    importing tasks.validate) leaves the collector on."""
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg/__init__.py").write_text("from components.errors import pause_collector_while_starting\n"
                                              "pause_collector_while_starting()\n")
    (tmp_path / "pkg/prog.py").write_text(
        "import gc\nfrom components.errors import cli, collector_paused\n"
        "print('loading', gc.isenabled())\n"
        "def main(argv):\n"
        "    frozen = gc.get_freeze_count()\n"
        "    print('main', gc.isenabled(), frozen > 0)\n"
        "    with collector_paused():\n"
        "        print('late import', gc.isenabled())\n"
        "        made = [[] for _ in range(1000)]\n"
        "    print('after', gc.isenabled(), gc.get_freeze_count() >= frozen + 1000)\n"
        "if __name__ == '__main__':\n    cli(main)\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    run = subprocess.run([sys.executable, "-m", "pkg.prog"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert run.stdout.splitlines() == ["loading False", "main True True", "late import False", "after True True"], \
        run.stderr
    imported = subprocess.run([sys.executable, "-c", "import gc, pkg.prog; print(gc.isenabled())"], cwd=tmp_path,
                              env=env, capture_output=True, text=True)
    assert imported.stdout.splitlines() == ["loading True", "True"], imported.stderr


@pytest.mark.parametrize("package", ["tasks", "flows"])
def test_the_stage_and_flow_packages_pause_it_only_for_python_m(package):
    for argv0, enabled in (("-m", "False"), ("-c", "True")):
        code = f"import gc, sys; sys.argv[0] = {argv0!r}; import {package}; print(gc.isenabled())"
        r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
        assert r.stdout.strip() == enabled, r.stderr


def test_collector_paused_does_nothing_in_a_test_process():
    from components.errors import collector_paused
    frozen = gc.get_freeze_count()
    with collector_paused():
        assert gc.isenabled()
    assert gc.get_freeze_count() == frozen


def test_every_program_in_the_paused_packages_runs_through_cli():
    """A `python -m tasks.<stage>` or `python -m flows.<module>` that did not call cli(main) would run its
    whole work with the collector off."""
    programs = [p for package in ("tasks", "flows") for p in sorted((ROOT / package).glob("*.py"))
                if 'if __name__ == "__main__":' in p.read_text()]
    assert len(programs) >= 13
    for path in programs:
        assert path.read_text().rstrip().endswith('if __name__ == "__main__":\n    cli(main)'), path.name
