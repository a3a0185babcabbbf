"""The project's user-error type and the runner every stage's `__main__` uses. Imports nothing
from the project, so any module may raise ParamsError without depending on the schema.

    python -m tasks.pretrain serial         # a ParamsError prints `error: <the fix>` and exits 2
"""
from __future__ import annotations

import sys


class ParamsError(ValueError):
    """A problem in the user's params.yaml (or another user input); the message says the fix."""


def cli(main) -> None:
    """Run a stage's main(argv); a user error prints one clear message and exits 2."""
    try:
        main(sys.argv[1:])
    except ParamsError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
