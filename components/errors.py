"""The project's user-error type, the runner every stage's `__main__` uses, when a program's garbage
collector runs, and how it exits. Imports nothing from the project, so any module may raise ParamsError
without depending on the schema.

    python -m tasks.pretrain serial         # a ParamsError prints `error: <the fix>` and exits 2
"""
from __future__ import annotations

import atexit
import contextlib
import gc
import os
import sys
import time

_IMPORTED = time.monotonic()


# The garbage collector, in a program (`python -m tasks.<stage>`, `python -m flows.pipeline`): torch,
# Lightning, pandas and MLflow make millions of objects as they load that live as long as the process,
# and the collections they set off as they come cost a training stage ~1.5 s of its start-up (2 cores).
# So the collector is off while a program imports, and what the imports made is frozen (never walked
# again). Tests that import the modules are left alone.
#
# The exit: once the interpreter has joined the threads and run the atexit handlers (MLflow's end of
# the run, logging's flush), it tears the heap down, freeing every module and object one by one: 0.17 s
# after a training stage, 0.13 s after an evaluation (2 cores), for nothing, as the process ends anyway.
# A program whose main is done ends right there instead: the last atexit handler flushes stdout and
# stderr and calls os._exit with main's status. Everything the program writes is closed by then.
_program = False   # this process is a program that pause_collector_while_starting saw start
_exit_status: int | None = None   # main's, set by cli (None: main raised, and the exit is Python's own)


def pause_collector_while_starting() -> None:
    """Called by the stage and flow packages as they load: when the process is `python -m <package>.<module>`
    (while runpy finds the module, sys.argv[0] is "-m"), the collector is off until cli() runs main, and
    the exit skips the heap's teardown. Registered first, that atexit handler runs last; where a handler
    came before it (a site hook: coverage's subprocess mode), the exit is Python's own."""
    global _program
    if sys.argv[:1] == ["-m"]:
        _program = True
        gc.disable()
        if atexit._ncallbacks() == 0:
            atexit.register(_end_without_teardown)


def _end_without_teardown() -> None:
    if _exit_status is None:
        return
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):     # a closed pipe, a closed stream: as Python's exit
            stream.flush()
    os._exit(_exit_status)


@contextlib.contextmanager
def collector_paused():
    """Around a program's late import of a large library (MLflow's, when a run opens): the collector off
    while it loads, what it made frozen after. In a test process (not a program), nothing."""
    if not _program or not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        _resume_collector()


def _resume_collector() -> None:
    """Freeze what was made while the collector was off (it never walks that again), and turn it on."""
    gc.freeze()
    gc.enable()


class ParamsError(ValueError):
    """A problem in the user's params.yaml (or another user input); the message says the fix."""


def cli(main) -> None:
    """Run a program's main(argv); a user error prints one clear message and exits 2, a nonzero return
    value is the exit status."""
    global _exit_status
    # Where the teardown does come (a program outside tasks/ and flows/, as components.harness; a traceback),
    # the collector's last pass over every object torch and MLflow made is left out: 1-2 s (2 cores).
    atexit.register(gc.freeze)
    if _program and not gc.isenabled():   # paused while the program imported
        _resume_collector()
    try:
        status = main(sys.argv[1:]) or 0
    except ParamsError as e:
        print(f"error: {e}", file=sys.stderr)
        status = 2
    _exit_status = status
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
