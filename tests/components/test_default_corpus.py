"""The default study reads the same bytes on every machine: its corpus is a pinned package release.

    .venv/bin/python -m pytest tests/components/test_default_corpus.py -q

Checked here: the pin is the same in pyproject.toml, params.yaml and the params default; the default
selection hashes to the sha256 below; and another Python interpreter on this machine (Debian's
python3, which ships no `test/` package) selects and hashes the same bytes.
"""
import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import yaml

from components.corpus import corpus_sha256, select_files
from components.params import DEFAULT_CORPUS, load_study

ROOT = Path(__file__).resolve().parents[2]
DATA = yaml.safe_load((ROOT / "params.yaml").read_text())["data"]
SHA256 = "297c929074a244b80c031fa0c5daa4ceaa4a7f8eda069343614c0451467bdc1f"   # 311 files, 6,000,686 bytes
SELECT = """
import json, sys
from components.corpus import corpus_sha256, select_files
data = json.loads(sys.argv[1])
root, files = select_files(data["source"], data["include"], data["exclude"])
print(json.dumps([sys.version, len(files), corpus_sha256(root, files)]))
"""


def test_one_pin_everywhere():
    pin = DEFAULT_CORPUS.removeprefix("package:")
    assert f'"{pin}"' in (ROOT / "pyproject.toml").read_text()
    assert DATA["source"] == DEFAULT_CORPUS == load_study(ROOT / "tests/smoke/params.yaml").data.source


def test_default_corpus_bytes_are_pinned():
    root, files = select_files(DATA["source"], DATA["include"], DATA["exclude"])
    assert (len(files), sum(f.stat().st_size for f in files)) == (311, 6_000_686)
    assert corpus_sha256(root, files) == SHA256


def other_interpreter() -> str | None:
    """A python3 on this machine other than the one running the tests (e.g. Debian's /usr/bin/python3)."""
    here = Path(sys.executable).resolve()
    for name in ("/usr/bin/python3", "python3", "python3.10", "python3.11", "python3.12", "python3.13"):
        path = shutil.which(name)
        if path and Path(path).resolve() != here and Path(sys.base_prefix) not in Path(path).resolve().parents:
            return path
    return None


def test_another_interpreter_reads_the_same_bytes():
    python = other_interpreter()
    if python is None:
        pytest.skip("no second Python interpreter on this machine")
    # the project's code and the installed sympy release; nothing else of this environment
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), sysconfig.get_paths()["purelib"]]),
           "PYTHONNOUSERSITE": "1"}
    r = subprocess.run([python, "-c", SELECT, json.dumps(DATA)], env=env, cwd=ROOT,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    version, n_files, sha = json.loads(r.stdout)
    assert (n_files, sha) == (311, SHA256), f"{python} ({version}) read other bytes"
