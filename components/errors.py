"""The project's user-error type and the runner every stage's `__main__` uses. Imports nothing
from the project, so any module may raise ParamsError without depending on the schema.

    python -m tasks.pretrain serial         # a ParamsError prints `error: <the fix>` and exits 2
"""
from __future__ import annotations

import atexit
import gc
import os
import sys
import time

_IMPORTED = time.monotonic()


class ParamsError(ValueError):
    """A problem in the user's params.yaml (or another user input); the message says the fix."""


def cli(main) -> None:
    """Run a program's main(argv); a user error prints one clear message and exits 2, a nonzero return
    value is the exit status."""
    # The interpreter's shutdown runs the garbage collector over every object torch, Lightning, MLflow
    # and DVC created: 1.6 s after a training stage's last line, 0.9 s after an evaluation's (2 cores).
    # Frozen (by the last atexit handler to run, once the others, MLflow's and Prefect's, are done), they
    # are left to the exit. Everything the program wrote is closed by then.
    atexit.register(gc.freeze)
    try:
        status = main(sys.argv[1:])
    except ParamsError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    if status:
        sys.exit(status)


def process_seconds() -> float:
    """Wall seconds since this process started (Linux: from /proc, the interpreter's start-up
    included; elsewhere: since this module was imported)."""
    try:
        start_ticks = int(open("/proc/self/stat").read().rsplit(")", 1)[1].split()[19])
        uptime = float(open("/proc/uptime").read().split()[0])
        return uptime - start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return time.monotonic() - _IMPORTED


def stage_clock(work_seconds: float) -> str:
    """The end of a stage's summary line: its wall time so far, and the part that was not its own
    work (training, scoring): imports, set-up and tracking, the stage's fixed cost."""
    wall = process_seconds()
    return f" [{wall:.1f} s wall, {max(0.0, wall - work_seconds):.1f} s fixed]"
