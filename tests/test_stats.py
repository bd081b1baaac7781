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
    # the level it attains is 1 - 2/70 = 97.1 %, not the nominal 95 %
    assert r["within_noise"] is True and r["ci_level"] == pytest.approx(1 - 2 / 70)
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


# ---------------------------------------------------------------- the process as the unit: simulated runs

def _defaults():
    """Replicates and the fewest timed calls per process of the default CPU run (config/config.yaml)."""
    import pathlib

    import yaml
    cfg = yaml.safe_load((pathlib.Path(__file__).parents[1] / "config" / "config.yaml").read_text())
    return int(cfg["replicates"]), int(cfg["protocol"]["cpu"]["min_iterations"])


SIM_CELLS = 12  # cells of one simulated run: baseline, its A/A control, a variant 20 % faster, 9 others
SIM_RUNS = 1500
# Per-call spread (log scale) of each cell: the baseline and its control like eager fp32 on a CPU (long calls whose
# time varies by several per cent: 5.9 % and 6.8 % sd of process means from 2 calls in a default run), the others
# like the faster variants (1 %). One variance for every cell would not describe such a run.
CALL_NOISE = np.array([0.06, 0.06] + [0.01] * (SIM_CELLS - 2))
DRIFT = 0.03  # slow drift of the machine: +3 % from the first job of the run to the last
SHIFT = math.log(0.8)


def _simulate(rng, tau: float, replicates: int, calls: int, call_noise=CALL_NOISE):
    """Per-call latencies of SIM_RUNS runs, shape (runs, cells, replicates, calls): a random effect per process
    (sd `tau`), per-call noise (sd per cell), and a drift over the run's jobs, scheduled in interleaved rounds
    (round k runs every cell's k-th process, in a fresh random order)."""
    mu = np.concatenate([[0.0, 0.0, SHIFT], rng.uniform(-0.7, 0.7, SIM_CELLS - 3)])
    order = np.argsort(rng.random((SIM_RUNS, replicates, SIM_CELLS)), axis=-1)  # position of each cell in its round
    slot = (np.arange(replicates)[None, :, None] * SIM_CELLS + order) / (replicates * SIM_CELLS)
    drift = DRIFT * np.swapaxes(slot, 1, 2)[..., None]  # (runs, cells, replicates, 1)
    u = rng.normal(0.0, tau, (SIM_RUNS, SIM_CELLS, replicates, 1))
    e = rng.normal(0.0, 1.0, (SIM_RUNS, SIM_CELLS, replicates, calls)) * np.asarray(call_noise)[None, :, None, None]
    return np.exp(mu[None, :, None, None] + u + drift + e)


def _one_variance(means, pooled, a, b):
    """The previous model's interval: one variance of a process mean for every cell of the run (the pooled
    residual variance, t on its df), whatever each cell's per-call spread."""
    d = means[b].mean() - means[a].mean()
    half = sps.t.ppf(0.975, pooled["df"]) * math.sqrt(pooled["var"] * (1 / means[a].size + 1 / means[b].size))
    return d - half <= 0.0 <= d + half, d - half <= SHIFT <= d + half


def _verdicts(runs):
    """Per simulated run: (A/A control called outside noise, shifted variant's interval covers the truth) with
    the process-level method; the same two with the old per-call method (all calls of a cell pooled); and with
    one variance of a process mean for every cell."""
    out = []
    for run in runs:
        within = [stats.Within.from_calls(cell) for cell in run]
        pooled = stats.pooled_process_variance([stats.process_means(cell) for cell in run], within)
        means = [stats.process_means(cell) - pooled["round_effect"] for cell in run]
        aa = stats.process_change(means[0], means[1], pooled, (within[0], 0), (within[1], 1))
        sh = stats.process_change(means[0], means[2], pooled, (within[0], 0), (within[2], 2))
        old_aa = stats.relative_change(run[0].ravel(), run[1].ravel())
        old_sh = stats.relative_change(run[0].ravel(), run[2].ravel())
        one_aa, one_sh = _one_variance(means, pooled, 0, 1)[0], _one_variance(means, pooled, 0, 2)[1]
        out.append((aa["within_noise"] is False, sh["ci_low"] <= math.expm1(SHIFT) <= sh["ci_high"],
                    old_aa["within_noise"] is False, old_sh["ci_low"] <= math.expm1(SHIFT) <= old_sh["ci_high"],
                    aa["ci_level"], old_aa["ci_level"], not one_aa, one_sh))
    return np.array(out, dtype=float)


SIM_RESULTS: dict[float, dict] = {}


@pytest.mark.parametrize("tau", [0.0, 0.01, 0.02, 0.05])
def test_process_level_interval_keeps_its_level_under_process_spread_and_drift(tau):
    replicates, calls = _defaults()
    rng = np.random.default_rng([2026, int(1000 * tau)])
    v = _verdicts(_simulate(rng, tau, replicates, calls))
    level, old_level = v[0, 4], v[0, 5]
    false_rate, coverage, old_false, old_cov = v[:, 0].mean(), v[:, 1].mean(), v[:, 2].mean(), v[:, 3].mean()
    SIM_RESULTS[tau] = {"false_outside": false_rate, "coverage": coverage, "old_false_outside": old_false,
                        "old_coverage": old_cov, "old_level": old_level,
                        "one_variance_false_outside": v[:, 6].mean(), "one_variance_coverage": v[:, 7].mean()}
    print(f"\nprocess spread {tau:.0%}, {replicates} processes x {calls} calls, {SIM_CELLS} cells: stated "
          f"{level:.1%}; false 'outside noise' {false_rate:.1%}, coverage {coverage:.1%} | per-call method "
          f"(stated {old_level:.1%}): false 'outside noise' {old_false:.1%}, coverage {old_cov:.1%} | one variance "
          f"for every cell (stated 95.0%): false {v[:, 6].mean():.1%}, coverage {v[:, 7].mean():.1%}", end="")
    assert abs(false_rate - (1 - level)) <= 0.02
    assert abs(coverage - level) <= 0.02


def test_ignoring_between_process_variance_fails_the_same_check():
    """The check above can fail: the old per-call interval (calls of a cell as independent draws) misses it."""
    replicates, calls = _defaults()
    rng = np.random.default_rng([2026, 20])
    v = _verdicts(_simulate(rng, 0.02, replicates, calls))
    old_level = v[0, 5]
    assert abs(v[:, 2].mean() - (1 - old_level)) > 0.02 or abs(v[:, 3].mean() - old_level) > 0.02


def test_one_variance_for_every_cell_fails_the_same_check():
    """And so does a model with one variance of a process mean for the whole run, when cells' per-call spreads
    differ as they do on a CPU (the default run's A/A control came out "outside noise" under it)."""
    replicates, calls = _defaults()
    rng = np.random.default_rng([2026, 21])
    v = _verdicts(_simulate(rng, 0.01, replicates, calls))
    assert abs(v[:, 6].mean() - 0.05) > 0.02 or abs(v[:, 7].mean() - 0.95) > 0.02


def test_equal_per_call_spread_without_process_spread_is_conservative_not_liberal():
    """The known limit of the Satterthwaite interval at 2 processes x 2 calls: with no process spread and one
    per-call spread for every cell it is conservative (false "outside noise" well under 5 %), never liberal."""
    replicates, calls = _defaults()
    rng = np.random.default_rng([2026, 22])
    v = _verdicts(_simulate(rng, 0.0, replicates, calls, call_noise=np.full(SIM_CELLS, 0.01)))
    print(f"\nequal per-call spread, no process spread: false 'outside noise' {v[:, 0].mean():.1%}, "
          f"coverage {v[:, 1].mean():.1%}", end="")
    assert v[:, 0].mean() <= 0.05 + 0.01 and v[:, 1].mean() >= 0.95 - 0.01


def test_process_change_known_answer_and_no_interval_without_replicates():
    # Two cells, two rounds, two calls per process (log latencies written out). Cell A: calls (0, .2) and
    # (.2, .4): process means .1, .3, within-process variance (4 x .1^2) / 2 df = .02. Cell B: (1, 1), (1.3, 1.3):
    # means 1.0, 1.3, within 0. Additive fit: round effects -/+.125, residuals +-.025, V = 4 x .025^2 / 1 df.
    # Every process has the same share of the residual projection (1/4), so the per-call part of V is
    # (1/4)(.02/2 + .02/2 + 0 + 0) = .005 and tau^2 = V - .005 < 0; the change B - A then has variance
    # V (1/2 + 1/2) + (own per-call terms minus their share in V, which cancel here) = V, on V's 1 df.
    a = [np.exp([0.0, 0.2]), np.exp([0.2, 0.4])]
    b = [np.exp([1.0, 1.0]), np.exp([1.3, 1.3])]
    within = [stats.Within.from_calls(a), stats.Within.from_calls(b)]
    assert within[0].s2 == pytest.approx(0.02) and within[0].df == 2 and within[1].s2 == pytest.approx(0.0)
    pooled = stats.pooled_process_variance([stats.process_means(a), stats.process_means(b)], within)
    assert pooled["round_effect"] == pytest.approx([-0.125, 0.125])
    assert pooled["var"] == pytest.approx(4 * 0.025 ** 2) and pooled["df"] == 1
    assert pooled["per_call"] == pytest.approx(0.005) and pooled["tau2"] == pytest.approx(0.0025 - 0.005)
    ma, mb = (stats.process_means(x) - pooled["round_effect"] for x in (a, b))
    r = stats.process_change(ma, mb, pooled, (within[0], 0), (within[1], 1))
    half = sps.t.ppf(0.975, 1) * 0.05
    assert r["change"] == pytest.approx(math.expm1(0.95))
    assert r["ci_low"] == pytest.approx(math.expm1(0.95 - half)) and r["ci_high"] == pytest.approx(math.expm1(0.95 + half))
    assert r["df"] == pytest.approx(1.0) and r["within_noise"] is False
    # a run without two processes in any cell has no interval
    single = stats.pooled_process_variance([[0.0], [1.0]])
    assert single["df"] == 0 and math.isnan(single["var"])
    none = stats.process_change([0.0], [1.0], single, (within[0], 0), (within[1], 1))
    assert none["ci_low"] is None and none["within_noise"] is None
    # a missing process: the third cell lost its second one, the fit uses what is there
    pooled = stats.pooled_process_variance([[0.0, 0.1], [1.0, 1.3], [2.0, np.nan]])
    assert pooled["df"] == 1  # 4 observations - 2 cells - (2 rounds - 1)
    assert pooled["round_effect"] == pytest.approx([-0.1, 0.1])
    assert pooled["var"] == pytest.approx(4 * 0.05 ** 2 / 1)
