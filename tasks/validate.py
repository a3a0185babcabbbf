"""validate: check all of params.yaml, before any other stage runs.

    python -m tasks.validate                # what `dvc repro validate` runs; exits 2 listing every problem

DVC tracks params.yaml as a whole file here, so a typo in any section (even one no stage
tracks) reruns this stage and stops `dvc repro` before any compute. On success it writes
data/params.ok, whose content never changes, so passing validation triggers nothing downstream.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from components.errors import cli
from components.params import load_study

OK = Path("data/params.ok")


def main(argv: list[str]) -> None:
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args(argv)
    study = load_study()
    OK.parent.mkdir(parents=True, exist_ok=True)
    OK.write_text("params.yaml is valid\n")
    print(f"params.yaml is valid: study '{study.study.name}' with {len(study.models())} models")


if __name__ == "__main__":
    cli(main)
