"""A training stage's start-up in a venv of archflow alone (`make repro`) and in one with extras (`make test`).

    python -m benchmarks.startup --keep /tmp/sm       # a built smoke study (its imports need the hf extra)
    python -m benchmarks.extras --built /tmp/sm       # run with the dev venv's python
    python -m benchmarks.extras --built /tmp/sm --against /tmp/sm-old   # also a copy holding other code

The extras (hf, dev) install transformers, which torchmetrics, imported by Lightning, would import as it
loads (Lightning-AI/torchmetrics#2242); components/lean_torchmetrics.py has it load without transformers
and scipy.signal, so the two venvs should now start a training stage alike. Interleaved rounds of `import
tasks.pretrain` and of a whole `python -m tasks.pretrain serial` in the built study (its summary line's
`[W s wall, F s fixed]` and the process's wall time), with this interpreter and with a venv without
extras (`--venv`; otherwise scripts/install.sh makes one in a temp dir, ~35 s); with `--against DIR`,
the same in a second built study (a copy of the first with another commit's components/ and tasks/).
Medians.
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.common import host_line
from benchmarks.flow_vs_dvc import ROOT, timed, timed_run
from benchmarks.startup import CLOCK


def stage_seconds(python: str, project: Path) -> tuple[float, float, float]:
    """(process wall, summary wall, summary fixed) of `python -m tasks.pretrain serial` in project."""
    whole, out = timed_run([python, "-m", "tasks.pretrain", "serial"], project)
    clock = [m for line in out.splitlines() if (m := CLOCK.match(line.strip()))][-1]
    return whole, float(clock["wall"]), float(clock["fixed"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--built", type=Path, required=True, help="a smoke study built by `benchmarks.startup --keep DIR`")
    p.add_argument("--venv", type=Path, help="a venv of archflow without extras (default: made in a temp dir)")
    p.add_argument("--against", type=Path, help="a second built study holding other code, interleaved with --built")
    p.add_argument("--rounds", type=int, default=4)
    args = p.parse_args()
    print(host_line())
    with tempfile.TemporaryDirectory() as tmp:
        venv = args.venv or Path(tmp) / "venv"
        if not args.venv:
            subprocess.run([str(ROOT / "scripts/install.sh"), str(venv)], cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
        pythons = {"with extras (this python)": sys.executable, "archflow alone": str(venv / "bin/python")}
        for label, python in pythons.items():
            has = subprocess.run([python, "-c", "import importlib.util as u; print(bool(u.find_spec('transformers')))"],
                                 capture_output=True, text=True).stdout.strip()
            print(f"{label}: {python}, transformers installed: {has}")
        studies = {"": args.built} if not args.against else {f", {args.built}": args.built, f", {args.against}": args.against}
        rows = [(label + where, python, built) for label, python in pythons.items() for where, built in studies.items()]
        imports, stages = {r[0]: [] for r in rows}, {r[0]: [] for r in rows}
        for _ in range(args.rounds):
            for label, python, built in rows:
                imports[label].append(timed([python, "-c", "import tasks.pretrain"], built))
                stages[label].append(stage_seconds(python, built))
    print("\n| venv | `import tasks.pretrain` s | pretrain@serial process s | its summary: wall s | fixed s |\n"
          "|---|---:|---:|---:|---:|")
    for label in imports:
        whole, wall, fixed = (statistics.median(col) for col in zip(*stages[label]))
        print(f"| {label} | {statistics.median(imports[label]):.2f} | {whole:.2f} | {wall:.2f} | {fixed:.2f} |")


if __name__ == "__main__":
    main()
