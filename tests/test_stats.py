"""Distribution-free intervals: known answers, checks against scipy, and simulated coverage.

Run with `pytest -s tests/test_stats.py` to see the coverage numbers; they are also kept in COVERAGE.
"""
from __future__ import annotations

import itertools
import json
import math
import statistics

import numpy as np
import pytest
from scipy import stats as sps

from barkbench import stats

ONE_TO_NINE = [7.0, 2.0, 9.0, 1.0, 5.0, 3.0, 8.0, 4.0, 6.0]  # 1..9, unsorted
SUMMARY_KEYS = {"n", "mean", "median", "std", "min", "max", "p10", "p90", "cv",
                "ci_low", "ci_high", "ci_level", "ci_method"}
CHANGE_KEYS = {"change", "ci_low", "ci_high", "ci_level", "method", "range_low", "range_high",
               "within_noise", "n_baseline", "n_candidate"}


def _plain(d: dict) -> bool:
    return all(v is None or (isinstance(v, (bool, int, float, str)) and not isinstance(v, np.generic))
               for v in d.values())


# ---------------------------------------------------------------- independent references (scipy)

def _p_u_le(u: int, n: int, m: int) -> float:
    """P(U <= u) under H0 from scipy's exact Mann-Whitney test, on samples built to have U = u.

    y = 0..m-1 and each x sits just below some y, so U (pairs with x > y) is the sum of the counts c_i.
    """
    c, left = [], u
    for _ in range(n):
        c.append(min(m, left))
        left -= c[-1]
    assert left == 0
    x = np.array(c, dtype=float) - 0.5
    y = np.arange(m, dtype=float)
    res = sps.mannwhitneyu(x, y, alternative="less", method="exact")
    assert res.statistic == u
    return float(res.pvalue)


def _median_j(n: int, confidence: float = 0.95) -> int | None:
    """Largest j with P(Binom(n, 1/2) <= j-1) <= alpha/2: the interval is [x_(j), x_(n+1-j)]."""
    half_alpha = (1 - confidence) / 2
    js = [j for j in range(1, n // 2 + 1) if sps.binom.cdf(j - 1, n, 0.5) <= half_alpha]
    return max(js) if js else None


# ---------------------------------------------------------------- summarize / median_ci

def test_summarize_one_to_nine():
    s = stats.summarize(ONE_TO_NINE)
    x = np.arange(1, 10, dtype=float)
    assert set(s) == SUMMARY_KEYS
    assert s["n"] == 9 and s["median"] == 5.0 and s["mean"] == 5.0
    assert s["min"] == 1.0 and s["max"] == 9.0
    assert s["std"] == pytest.approx(math.sqrt(7.5), rel=1e-12)  # ddof=1: sum of squares 60 / 8
    assert s["std"] != pytest.approx(float(np.std(x)), rel=1e-6)  # not the population std
    assert s["p10"] == pytest.approx(1.8) and s["p90"] == pytest.approx(8.2)
    assert s["cv"] == pytest.approx(math.sqrt(7.5) / 5.0)
    # n=9: P(Binom(9, .5) <= 1) = 10/512 <= 0.025 < P(<= 2) = 46/512, so [x_(2), x_(8)]
    assert _median_j(9) == 2
    assert (s["ci_low"], s["ci_high"]) == (2.0, 8.0)
    assert s["ci_level"] == 0.95 and s["ci_method"] == "order-statistic (binomial) interval of the median"
    assert _plain(s)
    json.dumps(s)
    assert stats.summarize(ONE_TO_NINE) == stats.summarize(list(ONE_TO_NINE))  # deterministic


def test_median_ci_n10_is_x2_x9():
    rng = np.random.default_rng(10)
    x = rng.lognormal(0.0, 0.5, 10)
    xs = np.sort(x)
    j = _median_j(10)
    assert j == 2  # P(Binom(10, .5) <= 1) = 11/1024 = 0.0107; P(<= 2) = 56/1024 = 0.0547
    assert stats.median_ci(x) == (float(xs[j - 1]), float(xs[10 - j]))
    assert stats.median_ci(x) == (float(xs[1]), float(xs[8]))


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 6, 7, 15, 40])
def test_median_ci_matches_binomial_order_statistics(n):
    x = np.random.default_rng(n).gamma(2.0, 1.0, n)
    xs = np.sort(x)
    j = _median_j(n)
    expected = None if j is None else (float(xs[j - 1]), float(xs[n - j]))
    assert stats.median_ci(x) == expected
    assert (j is None) == (n < 6)  # 2 * 0.5**5 = 0.0625 > 0.05, 2 * 0.5**6 = 0.031


def test_small_n_has_no_median_interval():
    for n in (1, 3, 5):
        s = stats.summarize(np.arange(1.0, n + 1))
        assert s["ci_low"] is None and s["ci_high"] is None
        assert s["ci_method"] == "n too small for a 95 % interval (needs n >= 6)"
        json.dumps(s)
    s = stats.summarize(np.arange(1.0, 7.0))
    assert (s["ci_low"], s["ci_high"]) == (1.0, 6.0)  # n=6: [min, max] has coverage 1 - 2/64


def test_single_value():
    s = stats.summarize([4.0])
    assert set(s) == SUMMARY_KEYS and _plain(s)
    assert s["n"] == 1 and s["median"] == s["mean"] == s["min"] == s["max"] == 4.0
    assert s["std"] == 0.0 and s["cv"] == 0.0
    assert s["ci_low"] is None and s["ci_high"] is None


def test_constant_data_has_a_zero_width_interval():
    s = stats.summarize([2.5] * 10)
    assert s["median"] == s["ci_low"] == s["ci_high"] == 2.5
    assert s["std"] == 0.0 and s["cv"] == 0.0


def test_empty_sample_refused():
    with pytest.raises(ValueError):
        stats.summarize([])
    with pytest.raises(ValueError):
        stats.median_ci([])
    with pytest.raises(ValueError):
        stats.relative_change([], [1.0, 2.0])
    with pytest.raises(ValueError):
        stats.relative_change([1.0, 2.0], [])


def test_non_positive_latency_refused():
    with pytest.raises(ValueError):
        stats.relative_change([1.0, 0.0, 2.0], [1.0, 2.0, 3.0])


# ---------------------------------------------------------------- Mann-Whitney null distribution

@pytest.mark.parametrize("n,m", [(1, 1), (1, 5), (3, 3), (3, 5), (4, 4), (5, 7), (7, 6)])
def test_u_distribution_matches_scipy(n, m):
    counts = stats._u_counts(n, m)
    assert len(counts) == n * m + 1 and sum(counts) == math.comb(n + m, n)
    cum = np.cumsum(counts) / math.comb(n + m, n)
    for u in range(n * m + 1):
        assert cum[u] == pytest.approx(_p_u_le(u, n, m), rel=1e-12)


@pytest.mark.parametrize("n,m,u_crit", [
    # published two-sided alpha = 0.05 critical values of the Mann-Whitney U (reject when U <= u_crit)
    (4, 4, 0), (5, 5, 2), (6, 6, 5), (8, 8, 13), (10, 10, 23), (5, 10, 8),
])
def test_critical_k_matches_published_tables(n, m, u_crit):
    k, dist = stats._mw_k(n, m, 0.95)
    assert dist == "exact"
    assert k == u_crit + 1
    # and check the table against scipy's exact p-values rather than trusting it
    assert _p_u_le(k - 1, n, m) <= 0.025 < _p_u_le(k, n, m)


def test_no_k_when_even_u0_is_too_likely():
    assert stats._mw_k(3, 3, 0.95) == (None, "exact")  # 2 * P(U = 0) = 2/20 = 0.1 > 0.05
    assert stats._mw_k(3, 3, 0.90)[0] == 1  # 0.1 is exactly attainable at 90 %
    assert stats._mw_k(2, 2, 0.95)[0] is None


def test_normal_approximation_k_is_close_to_exact():
    n = m = 110  # n*m = 12100 > EXACT_MAX_NM: normal
    k, dist = stats._mw_k(n, m, 0.95)
    assert dist == "normal"
    counts = stats._u_counts(n, m)
    p = sum(counts[:k]) / math.comb(n + m, n)  # exact P(U <= k-1)
    assert 0.022 < p < 0.028


# ---------------------------------------------------------------- relative_change known answers

def test_relative_change_n4_interval_is_the_range_of_pairwise_differences():
    base = [1.0, 2.0, 4.0, 8.0]
    cand = [1.5, 3.0, 5.0, 10.0]
    d = sorted(math.log(c) - math.log(b) for b, c in itertools.product(base, cand))
    r = stats.relative_change(base, cand)
    assert set(r) == CHANGE_KEYS and _plain(r)
    json.dumps(r)
    assert r["change"] == pytest.approx(math.exp(statistics.median(d)) - 1, rel=1e-12)
    # k = 1 because P(U <= 0) = 1/70 <= 0.025 < P(U <= 1) = 2/70
    assert r["ci_low"] == pytest.approx(math.exp(d[0]) - 1, rel=1e-12)
    assert r["ci_high"] == pytest.approx(math.exp(d[-1]) - 1, rel=1e-12)
    assert r["range_low"] == pytest.approx(r["ci_low"]) and r["range_high"] == pytest.approx(r["ci_high"])
    assert r["method"] == "Hodges-Lehmann log-ratio, Mann-Whitney exact interval"
    assert r["within_noise"] is True and r["ci_level"] == 0.95
    assert r["n_baseline"] == 4 and r["n_candidate"] == 4


def test_relative_change_n10_uses_the_24th_order_statistics():
    rng = np.random.default_rng(3)
    base = rng.lognormal(0.0, 0.3, 10)
    cand = 0.8 * rng.lognormal(0.0, 0.3, 10)
    d = np.sort((np.log(cand)[None, :] - np.log(base)[:, None]).ravel())
    r = stats.relative_change(base, cand)
    assert r["ci_low"] == pytest.approx(math.exp(d[23]) - 1, rel=1e-12)  # d_(24)
    assert r["ci_high"] == pytest.approx(math.exp(d[100 - 24]) - 1, rel=1e-12)  # d_(77)
    assert r["change"] == pytest.approx(math.exp((d[49] + d[50]) / 2) - 1, rel=1e-12)


def test_relative_change_n3_has_no_interval_only_a_range():
    r = stats.relative_change([1.0, 2.0, 3.0], [2.0, 3.0, 4.0])
    assert set(r) == CHANGE_KEYS and _plain(r)
    json.dumps(r)
    assert r["ci_low"] is None and r["ci_high"] is None and r["within_noise"] is None
    assert r["method"] == "n too small for a 95 % interval (n=3, m=3)"
    assert r["range_low"] == pytest.approx(2.0 / 3.0 - 1) and r["range_high"] == pytest.approx(4.0 / 1.0 - 1)
    # even a big, consistent change is not called "outside noise" without a valid interval
    big = stats.relative_change([10.0, 10.1, 10.2], [5.0, 5.1, 5.2])
    assert big["within_noise"] is None and big["change"] == pytest.approx(-0.5, abs=0.02)


def test_relative_change_of_identical_constants_is_zero_and_within_noise():
    r = stats.relative_change([5.0] * 6, [5.0] * 6)
    assert r["change"] == 0.0 and r["ci_low"] == 0.0 and r["ci_high"] == 0.0
    assert r["within_noise"] is True


def test_relative_change_of_distinct_constants_is_exact_and_not_noise():
    r = stats.relative_change([10.0] * 20, [5.0] * 20)
    assert r["change"] == pytest.approx(-0.5) and r["ci_low"] == r["ci_high"] == pytest.approx(-0.5)
    assert r["within_noise"] is False
    up = stats.relative_change([5.0] * 20, [10.0] * 20)
    assert up["change"] == pytest.approx(1.0) and up["within_noise"] is False


def test_relative_change_tolerates_ties():
    base = [1.0, 1.0, 1.1, 1.1, 1.2, 1.2, 1.0]
    cand = [1.1, 1.0, 1.1, 1.2, 1.0, 1.1]
    r = stats.relative_change(base, cand)
    assert r["ci_low"] <= r["change"] <= r["ci_high"] and r["within_noise"] is True


def test_relative_change_same_distribution_is_within_noise():
    rng = np.random.default_rng(12345)
    r = stats.relative_change(rng.normal(10.0, 1.0, 30), rng.normal(10.0, 1.0, 30))
    assert r["within_noise"] is True and r["ci_low"] < 0.0 < r["ci_high"] and abs(r["change"]) < 0.1


def test_relative_change_of_a_real_difference_is_not_noise():
    rng = np.random.default_rng(12345)
    r = stats.relative_change(rng.normal(10.0, 1.0, 30), rng.normal(8.0, 1.0, 30))
    assert r["within_noise"] is False
    assert r["ci_low"] <= r["change"] <= r["ci_high"] < 0.0
    assert r["change"] == pytest.approx(-0.2, abs=0.08)


def test_relative_change_large_n_uses_the_normal_approximation():
    rng = np.random.default_rng(1)
    r = stats.relative_change(rng.lognormal(0, 0.5, 110), 1.1 * rng.lognormal(0, 0.5, 110))
    assert "normal" in r["method"] and r["ci_low"] < r["change"] < r["ci_high"]


# ---------------------------------------------------------------- coverage by simulation

NOMINAL = 0.95
RATIO = 0.7  # candidate = RATIO x baseline distribution: a pure shift of log latency by log(0.7)
DISTRIBUTIONS = {
    # name: (sampler(rng, shape), true median)
    "lognormal(sigma=0.5)": (lambda rng, size: rng.lognormal(0.0, 0.5, size), 1.0),
    "1 + exponential(1)": (lambda rng, size: 1.0 + rng.exponential(1.0, size), 1.0 + math.log(2.0)),
    "gamma(shape=2)": (lambda rng, size: rng.gamma(2.0, 1.0, size), float(sps.gamma(2.0).median())),
}
COVERAGE: dict[tuple[str, str, int], float] = {}  # (method, distribution, n) -> empirical coverage


def _tolerance(reps: int) -> float:
    return 3 * math.sqrt(NOMINAL * (1 - NOMINAL) / reps)


@pytest.mark.parametrize("dist", list(DISTRIBUTIONS))
def test_median_ci_coverage(dist):
    sample, true_median = DISTRIBUTIONS[dist]
    rng = np.random.default_rng([2024, list(DISTRIBUTIONS).index(dist)])
    assert all(stats.median_ci(x) is None for x in sample(rng, (200, 3)))
    for n, reps in ((6, 2000), (10, 2000), (100, 2000)):
        hits = 0
        for x in sample(rng, (reps, n)):
            low, high = stats.median_ci(x)
            hits += low <= true_median <= high
        cov = hits / reps
        COVERAGE[("median_ci", dist, n)] = cov
        j = _median_j(n)
        exact = 1 - 2 * sps.binom.cdf(j - 1, n, 0.5)
        print(f"\nmedian_ci        {dist:22s} n={n:3d} reps={reps}: coverage {cov:.4f} (exact {exact:.4f})", end="")
        assert cov >= NOMINAL - _tolerance(reps)
        # and not by being needlessly wide: close to the exact coverage of the order-statistic interval
        assert abs(cov - exact) <= 4 * math.sqrt(exact * (1 - exact) / reps)


@pytest.mark.parametrize("dist", list(DISTRIBUTIONS))
def test_relative_change_coverage(dist):
    sample, _ = DISTRIBUTIONS[dist]
    rng = np.random.default_rng([77, list(DISTRIBUTIONS).index(dist)])
    for a, b in zip(sample(rng, (200, 3)), RATIO * sample(rng, (200, 3))):
        r = stats.relative_change(a, b)
        assert r["ci_low"] is None and r["ci_high"] is None and r["within_noise"] is None
    true_change = RATIO - 1
    for n, reps in ((6, 2000), (10, 2000), (100, 400)):
        hits = 0
        for a, b in zip(sample(rng, (reps, n)), RATIO * sample(rng, (reps, n))):
            r = stats.relative_change(a, b)
            hits += r["ci_low"] <= true_change <= r["ci_high"]
        cov = hits / reps
        COVERAGE[("relative_change", dist, n)] = cov
        k, kind = stats._mw_k(n, n, NOMINAL)
        # exact coverage 1 - 2 P(U <= k-1) of the k in use (from scipy where it is cheap, else the module's
        # exact U distribution, which test_u_distribution_matches_scipy checks against scipy)
        p = _p_u_le(k - 1, n, n) if n <= 10 else sum(stats._u_counts(n, n)[:k]) / math.comb(2 * n, n)
        exact = 1 - 2 * p
        print(f"\nrelative_change  {dist:22s} n={n:3d} reps={reps}: coverage {cov:.4f} "
              f"(k from {kind} U distribution; exact coverage {exact:.4f})", end="")
        assert cov >= NOMINAL - _tolerance(reps)
        assert abs(cov - exact) <= 4 * math.sqrt(exact * (1 - exact) / reps)
