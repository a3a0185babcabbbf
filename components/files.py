"""Small files written whole or not at all; no heavy imports (validate and corpus use it too).

    write_atomic("metrics/serial.json", text)       # True: written; False: it already held `text`
"""
from __future__ import annotations

import os
from pathlib import Path


def write_atomic(path: str | Path, text: str) -> bool:
    """Write `text` to `path` through a temporary sibling, so a reader never sees half a file. A file
    that already holds `text` is left untouched (its mtime too) and False returned."""
    path = Path(path)
    if path.exists() and path.read_text() == text:
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    tmp.replace(path)
    return True
