"""The noise floor of a built study: how much val_loss moves from seed to seed, per model.

    python -m benchmarks.seed_noise                     # after `make repro` of a study with replicas
    python -m benchmarks.seed_noise --reference serial --metric val_bpb

For every model with two or more seeds (study.seed and its replicas, all evaluated): the seeds'
mean and standard deviation (n - 1) of the metric; for every model sharing >= 2 seeds with the
reference, the SD of the paired difference model - reference (seed by seed), and how many seeds a
claim needs for its 95% t interval to be narrower than +-0.01, +-0.02 and +-0.05 at that SD
(half-width t(0.975, n - 1) * SD / sqrt(n)). Reads metrics/<model>.json only; trains nothing.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path

from scipy import stats

from components.errors import ParamsError, cli
from components.params import load_study

WIDTHS = (0.01, 0.02, 0.05)


def seeds_needed(sd: float, half_width: float, most: int = 1000) -> int | None:
    """The fewest seeds n >= 2 whose 95% t half-width t(0.975, n - 1) * sd / sqrt(n) is below half_width."""
    for n in range(2, most + 1):
        if stats.t.ppf(0.975, n - 1) * sd / math.sqrt(n) < half_width:
            return n
    return None


def values(study, metric: str) -> dict[str, dict[int, float]]:
    """entry -> {seed: metric} for each evaluated entry with two or more seeds."""
    out = {}
    for entry in study.entries():
        runs = {seed: Path("metrics") / f"{name}.json" for seed, name in study.instances(entry).items()}
        if len(runs) < 2 or any(seed is None for seed in runs) or study.entries()[entry]["stage"] == "branch":
            continue
        if missing := [str(p) for p in runs.values() if not p.exists()]:
            raise ParamsError(f"{', '.join(missing)} missing: run `make repro` first")
        out[entry] = {seed: json.loads(p.read_text())[metric] for seed, p in runs.items()}
    return out


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reference", default="serial", help="the model paired differences are taken against")
    parser.add_argument("--metric", default="val_loss")
    args = parser.parse_args(argv)
    study = load_study()
    found = values(study, args.metric)
    if not found:
        raise ParamsError("no model of this study has two or more seeds: set study.replicas (README: Replicate seeds)")
    ref = found.get(args.reference, {})
    print(f"study {study.study.name}: {args.metric} over seeds (SD with n - 1; paired Δ = model - {args.reference})\n")
    columns = ["model", "seeds", "mean", "SD", "SD of paired Δ", *(f"seeds for ±{w}" for w in WIDTHS)]
    print("| " + " | ".join(columns) + " |\n" + "|---" * len(columns) + "|")
    for entry, by_seed in found.items():
        v = list(by_seed.values())
        shared = [s for s in by_seed if s in ref]
        d_sd = (statistics.stdev(by_seed[s] - ref[s] for s in shared)
                if entry != args.reference and len(shared) >= 2 else None)
        sd = d_sd if d_sd is not None else statistics.stdev(v)   # the reference itself: its own spread
        need = [seeds_needed(sd, w) for w in WIDTHS]
        print(f"| {entry} | {len(v)} | {statistics.mean(v):.4f} | {statistics.stdev(v):.4f} | "
              + (f"{d_sd:.4f}" if d_sd is not None else "") + " | "
              + " | ".join(str(n) if n else "> 1000" for n in need) + " |")
    print("\nSeeds needed: from the paired SD where there is one, else the model's own SD; an SD measured "
          "on few seeds is itself uncertain, so read them as rough sizes.")


if __name__ == "__main__":
    cli(main)
