"""Summary statistics and bootstrap intervals on data with known answers."""
from __future__ import annotations

import math

import numpy as np
import pytest

from barkbench import stats

ONE_TO_NINE = [7.0, 2.0, 9.0, 1.0, 5.0, 3.0, 8.0, 4.0, 6.0]  # 1..9, unsorted


def test_summarize_one_to_nine():
    s = stats.summarize(ONE_TO_NINE)
    x = np.arange(1, 10, dtype=float)
    assert s["n"] == 9
    assert s["median"] == 5.0
    assert s["mean"] == 5.0
    assert s["std"] == pytest.approx(math.sqrt(7.5), rel=1e-12)  # ddof=1: sum of squares 60 / 8
    assert s["std"] == pytest.approx(float(np.std(x, ddof=1)), rel=1e-12)
    assert s["std"] != pytest.approx(float(np.std(x)), rel=1e-6)  # not the population std
    assert s["p10"] == pytest.approx(float(np.percentile(x, 10))) and s["p10"] == pytest.approx(1.8)
    assert s["p90"] == pytest.approx(float(np.percentile(x, 90))) and s["p90"] == pytest.approx(8.2)
    assert s["cv"] == pytest.approx(math.sqrt(7.5) / 5.0)
    assert 1.0 <= s["ci95_low"] < 5.0 < s["ci95_high"] <= 9.0
    assert set(s) == {"n", "mean", "median", "std", "p10", "p90", "cv", "ci95_low", "ci95_high"}
    assert all(isinstance(v, (int, float)) and not isinstance(v, np.generic) for v in s.values())


def test_summarize_is_deterministic():
    assert stats.summarize(ONE_TO_NINE) == stats.summarize(list(ONE_TO_NINE))


def test_constant_data_has_a_zero_width_interval():
    s = stats.summarize([2.5] * 10)
    assert s["median"] == s["ci95_low"] == s["ci95_high"] == 2.5
    assert s["std"] == 0.0 and s["cv"] == 0.0
    assert stats.median_ci([3.0] * 4) == (3.0, 3.0)


def test_single_value():
    s = stats.summarize([4.0])
    assert s["n"] == 1 and s["median"] == 4.0 and s["std"] == 0.0
    assert s["ci95_low"] == s["ci95_high"] == 4.0


def test_empty_sample_refused():
    with pytest.raises(ValueError):
        stats.summarize([])


def test_relative_change_of_constants_is_exact_and_not_noise():
    r = stats.relative_change([10.0] * 20, [5.0] * 20)
    assert r["change"] == -0.5
    assert r["ci95_low"] == r["ci95_high"] == -0.5
    assert r["within_noise"] is False
    up = stats.relative_change([5.0] * 20, [10.0] * 20)
    assert up["change"] == 1.0 and up["within_noise"] is False


def test_relative_change_of_identical_constants_is_zero_and_within_noise():
    r = stats.relative_change([5.0] * 10, [5.0] * 10)
    assert r == {"change": 0.0, "ci95_low": 0.0, "ci95_high": 0.0, "within_noise": True}


def test_relative_change_same_distribution_is_within_noise():
    rng = np.random.default_rng(12345)
    a = rng.normal(10.0, 1.0, 30)
    b = rng.normal(10.0, 1.0, 30)
    r = stats.relative_change(a, b)
    assert r["within_noise"] is True
    assert r["ci95_low"] < 0.0 < r["ci95_high"]
    assert r["change"] == pytest.approx(np.median(b) / np.median(a) - 1.0)
    assert abs(r["change"]) < 0.1


def test_relative_change_of_a_real_difference_is_not_noise():
    rng = np.random.default_rng(12345)
    a = rng.normal(10.0, 1.0, 30)
    b = rng.normal(8.0, 1.0, 30)
    r = stats.relative_change(a, b)
    assert r["within_noise"] is False
    assert r["ci95_low"] <= r["change"] <= r["ci95_high"] < 0.0
    assert r["change"] == pytest.approx(-0.2, abs=0.08)


def test_median_ci_contains_the_true_median():
    rng = np.random.default_rng(2024)
    x = rng.normal(3.0, 0.5, 200)
    low, high = stats.median_ci(x)
    assert low < 3.0 < high
    assert high - low < 0.25  # informative: about 2 x 1.96 x 1.25 x 0.5 / sqrt(200)
    assert low <= float(np.median(x)) <= high


def test_median_ci_coverage_is_near_nominal():
    rng = np.random.default_rng(7)
    trials, hits, widths = 40, 0, []
    for _ in range(trials):
        low, high = stats.median_ci(rng.normal(0.0, 1.0, 60))
        hits += low <= 0.0 <= high
        widths.append(high - low)
    assert hits / trials >= 0.8  # nominal 95 %; P(< 80 % of 40 | 95 %) is about 1e-3
    # and not by being uselessly wide: about 2 x 1.96 x 1.25 / sqrt(60) = 0.63 for the median of N(0, 1)
    assert 0.3 < float(np.mean(widths)) < 1.0
