"""The report's statistics: the seed t interval against a hand computation, the window bootstrap on
windows whose answer is known, and every verdict.

    .venv/bin/python -m pytest tests/components/test_stats.py -q
"""
import math

import numpy as np
import pytest

from components.stats import Interval, bootstrap_interval, t_interval, verdict, verdict_text


def test_t_interval_by_hand():
    """Δ = -0.03, -0.01, -0.02: mean -0.02, sd 0.01, t(0.975, 2 df) = 4.3027 (a t table)."""
    ci = t_interval([-0.03, -0.01, -0.02])
    half = 4.302653 * 0.01 / math.sqrt(3)
    assert ci == pytest.approx(Interval(-0.02, -0.02 - half, -0.02 + half), abs=1e-7)


def test_t_interval_widens_with_fewer_seeds():
    """Two seeds: t(0.975, 1 df) = 12.706, so the same spread gives a much wider interval."""
    ci = t_interval([-0.03, -0.01])
    assert ci.high - ci.low == pytest.approx(2 * 12.7062 * np.std([-0.03, -0.01], ddof=1) / math.sqrt(2), rel=1e-5)


def test_t_interval_needs_two_seeds():
    with pytest.raises(AssertionError):
        t_interval([0.1])


def test_bootstrap_of_a_constant_shift_is_that_shift():
    """The model loses exactly 0.05 nats more on every token of every window: every resample says 0.05,
    however hard the windows are (the pairing cancels their difficulty)."""
    tokens = np.full(100, 64.0)
    ci = bootstrap_interval(0.05 * tokens, tokens)
    assert ci == pytest.approx(Interval(0.05, 0.05, 0.05), abs=1e-12)
    nbytes = np.random.default_rng(1).integers(100, 300, 100).astype(float)
    assert bootstrap_interval(0.05 * nbytes, nbytes, scale=1 / math.log(2)).low == pytest.approx(0.05 / math.log(2))


def test_bootstrap_matches_normal_theory_and_is_deterministic():
    """Independent per-window differences with mean 0.01 and sd 0.1 per token over 2000 windows of one
    token: the 95% interval is about 0.01 ± 1.96 · 0.1 / √2000, and the same inputs give the same
    interval (a fixed resampling seed)."""
    diff = 0.01 + 0.1 * np.random.default_rng(0).standard_normal(2000)
    tokens = np.ones(2000)
    ci = bootstrap_interval(diff, tokens)
    assert ci.mean == pytest.approx(diff.mean())
    half = 1.96 * diff.std(ddof=1) / math.sqrt(2000)
    assert ci.low == pytest.approx(diff.mean() - half, abs=0.15 * half)
    assert ci.high == pytest.approx(diff.mean() + half, abs=0.15 * half)
    assert bootstrap_interval(diff, tokens) == ci
    assert bootstrap_interval(diff, tokens, seed=1) != ci


def test_bootstrap_weights_windows_by_their_tokens():
    """The statistic is a ratio of sums (nats over tokens), not a mean of window means: a 1-token
    window with a large Δ counts as 1 token."""
    ci = bootstrap_interval(np.array([10.0, 0.0]), np.array([1.0, 99.0]))
    assert ci.mean == pytest.approx(0.1)


@pytest.mark.parametrize("ci, higher, expected", [
    (Interval(-0.05, -0.08, -0.03), False, ("better", False)),       # loss lower, beyond the margin
    (Interval(0.05, 0.03, 0.08), False, ("worse", False)),
    (Interval(-0.05, -0.08, -0.03), True, ("worse", False)),         # accuracy lower: worse
    (Interval(0.001, -0.01, 0.012), False, ("equivalent", True)),    # inside ±0.02, contains 0
    (Interval(-0.01, -0.015, -0.005), False, ("better", True)),      # excludes 0 and inside ±0.02
    (Interval(0.0, -0.03, 0.01), False, ("inconclusive", False)),    # contains 0, crosses -0.02
    (Interval(0.0, -0.02, 0.01), False, ("inconclusive", False)),    # touching the margin is not inside
    (Interval(-0.01, -0.03, 0.0), False, ("inconclusive", False)),   # touching 0 does not exclude it
    (None, False, ("inconclusive", False)),                          # no interval at all
])
def test_verdicts(ci, higher, expected):
    assert verdict(ci, margin=0.02, higher_is_better=higher) == expected


def test_verdict_text():
    assert verdict_text("equivalent", True, 0.02) == "equivalent within ±0.02"
    assert verdict_text("better", True, 0.02) == "better, within ±0.02"
    assert verdict_text("worse", False, 0.02) == "worse"
    assert verdict_text("inconclusive", False, 0.02) == "inconclusive"
