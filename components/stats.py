"""Paired comparisons of two models: Δ = model - baseline with a 95% confidence interval, and a verdict.

    python -m tasks.report                  # the claims of params.yaml `report.claims`, through these functions

Two intervals (docs/verdicts.md says when each decides):
- over seeds: the per-seed paired Δ, mean ± t(0.975, n-1) · sd / √n. It holds the seed-to-seed
  variance (init, data order), so it decides the verdict whenever there are n >= 2 seeds.
- over validation windows: a paired bootstrap. Every model of one tokenizer and block_size is scored
  on the same windows, so one resample of window indices serves both models of every seed pair; the
  percentile interval covers evaluation-sampling noise only, and is what one seed can say.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
from scipy import stats

LEVEL = 0.95                           # every interval here is a two-sided 95% interval
N_RESAMPLES = 2000
RNG_SEED = 0                           # a fixed bootstrap seed: the same inputs give the same report
CHUNK = 250                            # resamples drawn at once: memory is CHUNK x windows indices


class Interval(NamedTuple):
    mean: float                        # the point estimate of Δ
    low: float
    high: float


def t_interval(deltas) -> Interval:
    """Mean of the per-seed paired Δ and its t interval on n - 1 degrees of freedom (n >= 2)."""
    d = np.asarray(deltas, dtype=float)
    assert d.ndim == 1 and len(d) >= 2, "a t interval needs two or more seeds"
    half = stats.t.ppf(0.5 + LEVEL / 2, len(d) - 1) * d.std(ddof=1) / math.sqrt(len(d))
    return Interval(float(d.mean()), float(d.mean() - half), float(d.mean() + half))


def bootstrap_interval(diff: np.ndarray, denom: np.ndarray, scale: float = 1.0,
                       n_resamples: int = N_RESAMPLES, seed: int = RNG_SEED) -> Interval:
    """Percentile interval of scale · Σ diff / Σ denom over windows resampled with replacement.
    diff (W,): per window, the model's summed loss minus the baseline's (the mean over seed pairs);
    denom (W,): the window's tokens (loss per token) or bytes (scale 1/ln 2: bits per byte), the
    same for both models. The point estimate is the statistic on all windows."""
    diff, denom = np.asarray(diff, dtype=float), np.asarray(denom, dtype=float)
    assert diff.shape == denom.shape and diff.ndim == 1 and len(diff) >= 1
    rng, n, draws = np.random.default_rng(seed), len(diff), []
    for start in range(0, n_resamples, CHUNK):
        idx = rng.integers(0, n, size=(min(CHUNK, n_resamples - start), n))   # (resamples, W)
        draws.append(diff[idx].sum(1) / denom[idx].sum(1))
    low, high = np.quantile(np.concatenate(draws) * scale, [0.5 - LEVEL / 2, 0.5 + LEVEL / 2])
    return Interval(float(scale * diff.sum() / denom.sum()), float(low), float(high))


VERDICTS = ("better", "worse", "equivalent", "inconclusive")


def verdict(ci: Interval | None, margin: float, higher_is_better: bool) -> tuple[str, bool]:
    """(one of VERDICTS, whether the interval lies inside ±margin). better/worse: the 95% interval
    excludes 0 (the side by the metric's direction), also when it lies inside ±margin (a real but
    small difference: the caller says so); equivalent: inside ±margin and containing 0 (TOST at
    2.5% per side); inconclusive: neither, or no interval (None)."""
    if ci is None:
        return "inconclusive", False
    within = -margin < ci.low and ci.high < margin
    if ci.low > 0 or ci.high < 0:
        return ("better" if (ci.low > 0) == higher_is_better else "worse"), within
    return ("equivalent" if within else "inconclusive"), within


def verdict_text(word: str, within: bool, margin: float) -> str:
    """How summary.md writes a verdict: 'equivalent within ±0.02', 'better, within ±0.02', ..."""
    if word == "equivalent":
        return f"equivalent within ±{margin:g}"
    return f"{word}, within ±{margin:g}" if within else word
