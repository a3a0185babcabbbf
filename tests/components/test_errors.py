"""components.errors.cli, the runner of every stage's and the flow's `__main__`: exit status, the one-line
user error; and in a program (`python -m`), the collector off while it imports and the exit without the
heap's teardown."""
import gc
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def run_cli(body: str) -> subprocess.CompletedProcess:
    """`cli(main)` in a fresh interpreter (`python -c`: not a program, so Python's own exit), `main` defined
    by `body`; an atexit handler registered before cli's (so it runs after it) prints the collector's
    frozen-object count."""
    code = ("import atexit, gc\n"
            "from components.errors import ParamsError, cli\n"
            "atexit.register(lambda: print('frozen', gc.get_freeze_count()))\n"
            f"{body}\ncli(main)\n")
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)


@pytest.mark.parametrize("returns, status", [("None", 0), ("0", 0), ("3", 3)])
def test_exit_status_is_mains_return_value_and_the_collector_is_frozen_for_pythons_exit(returns, status):
    r = run_cli(f"def main(argv):\n    print('argv', argv)\n    return {returns}")
    assert (r.returncode, r.stderr) == (status, "")
    argv, frozen = r.stdout.splitlines()
    assert argv == "argv []" and frozen.startswith("frozen ") and int(frozen.split()[1]) > 0


def test_a_user_error_is_one_line_and_exit_status_2():
    r = run_cli("def main(argv):\n    raise ParamsError('train.lr: must be > 0; set a positive learning rate')")
    assert r.returncode == 2 and r.stdout.startswith("frozen ")
    assert r.stderr == "error: train.lr: must be > 0; set a positive learning rate\n"


def test_in_process_it_returns_and_leaves_the_collector_alone(monkeypatch):
    """As tests call it (tests/faults/test_params_fuzz.py): success returns, nothing frozen."""
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


PROGRAM = """\
import atexit, os, sys, threading, time
from components.errors import ParamsError, cli


class Heap:
    def __del__(self, write=os.write):
        write(1, b"torn down\\n")


def main(argv):
    sys.heap = Heap()                       # freed by the interpreter's teardown, if it comes
    atexit.register(lambda: print("atexit handler"))
    threading.Thread(target=lambda: (time.sleep(0.2), print("thread done"))).start()
    print("x" * 200_000)                    # buffered: stdout is a pipe
    if argv == ["user-error"]:
        raise ParamsError("the fix")
    if argv == ["bug"]:
        raise RuntimeError("a bug")
    return int(argv[0]) if argv else None


if __name__ == "__main__":
    cli(main)
"""


def run_program(tmp_path: Path, *args: str, site_hook: bool = False) -> subprocess.CompletedProcess:
    """`python -m pkg.prog ARGS`, pkg's __init__ calling pause_collector_while_starting (as tasks/ and
    flows/ do); with site_hook, an atexit handler registered before the package loads (as coverage's)."""
    (tmp_path / "pkg").mkdir(exist_ok=True)
    (tmp_path / "pkg/__init__.py").write_text("from components.errors import pause_collector_while_starting\n"
                                              "pause_collector_while_starting()\n")
    (tmp_path / "pkg/prog.py").write_text(PROGRAM)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "pkg.prog", *args]
    if site_hook:
        command = [sys.executable, "-c", "import atexit, runpy, sys; atexit.register(lambda: print('site hook'));"
                   f"sys.argv = ['-m', *{list(args)!r}]; runpy.run_module('pkg.prog', run_name='__main__', alter_sys=True)"]
    return subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True)


@pytest.mark.parametrize("args, status", [((), 0), (("3",), 3), (("user-error",), 2)])
def test_a_program_ends_after_its_threads_and_atexit_handlers_without_the_teardown(tmp_path, args, status):
    r = run_program(tmp_path, *args)
    assert r.returncode == status, r.stderr
    assert r.stdout.splitlines() == ["x" * 200_000, "thread done", "atexit handler"]      # no "torn down"
    assert r.stderr == ("error: the fix\n" if status == 2 else "")


def test_a_program_that_raised_or_has_an_earlier_handler_exits_as_python_does(tmp_path):
    bug = run_program(tmp_path, "bug")
    assert bug.returncode == 1 and bug.stderr.rstrip().endswith("RuntimeError: a bug")
    assert bug.stdout.splitlines()[1:] == ["thread done", "atexit handler", "torn down"]
    hooked = run_program(tmp_path, "3", site_hook=True)
    assert hooked.returncode == 3, hooked.stderr
    assert hooked.stdout.splitlines()[1:] == ["thread done", "atexit handler", "site hook", "torn down"]


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
