"""components.errors.cli, the runner of every stage's and the flow's `__main__`: exit status, the one-line
user error, and an exit with the garbage collector frozen (in a subprocess: the freeze happens at exit)."""
import gc
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
    assert cli(lambda argv: None) is None and gc.get_freeze_count() == 0
