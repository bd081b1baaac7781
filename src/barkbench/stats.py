"""Summary statistics and distribution-free confidence intervals for small latency samples.

A run times only a handful of calls, so every interval here is valid for the n it was computed from,
assuming only independent draws from a continuous distribution (no normality, no resampling):

* `median_ci`: order-statistic (binomial) interval of the median, [x_(j), x_(n+1-j)]. Its coverage is
  exactly 1 - 2 P(Binom(n, 1/2) <= j - 1) >= the nominal level. At 95 % it needs n >= 6; below that there
  is no such interval and None is returned rather than a mislabelled [min, max].
* `relative_change`: Hodges-Lehmann estimate of the shift of log latencies (a ratio candidate/baseline)
  with the exact Mann-Whitney (Moses) interval [d_(k), d_(nm+1-k)] of the nm pairwise log differences.
  Under a pure scale change its coverage is exactly 1 - 2 P(U <= k - 1) >= the nominal level. The null
  distribution of U is computed exactly for n*m <= 10 000, otherwise by the continuity-corrected normal
  approximation (then coverage is nominal only approximately). When no k exists (e.g. 3 vs 3 runs at 95 %)
  there is no interval and `within_noise` is None: the data cannot decide either way.
"""
from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
from scipy import stats as _sps

CONFIDENCE = 0.95
EXACT_MAX_NM = 10_000  # exact U distribution up to n = m = 100 (0.07 s); normal approximation beyond


def _level(confidence: float) -> str:
    return f"{100 * confidence:g} %"


def median_ci(values, confidence: float = CONFIDENCE) -> tuple[float, float] | None:
    """Order-statistic (binomial) interval of the median; None when n is too small for `confidence`."""
    x = np.asarray(values, dtype=float)
    if x.size == 0:
        raise ValueError("cannot compute a median interval of an empty sample")
    # q is irrelevant for the interval; p=0.5 makes it the interval of the median.
    ci = _sps.quantile_test(x, q=float(x[0]), p=0.5).confidence_interval(confidence)
    if np.isnan(ci.low) or np.isnan(ci.high):  # scipy's way of saying no order statistics reach the level
        return None
    return float(ci.low), float(ci.high)


def _median_min_n(confidence: float) -> int:
    # [min, max] is the widest order-statistic interval; its coverage is 1 - 2 * 0.5**n.
    return math.ceil(math.log2(2 / (1 - confidence)) - 1e-12)


def summarize(values) -> dict:
    """Descriptive statistics of a latency sample plus the order-statistic interval of the median."""
    x = np.asarray(values, dtype=float)
    if x.size == 0:
        raise ValueError("cannot summarize an empty sample")
    mean = float(np.mean(x))
    std = float(np.std(x, ddof=1)) if x.size > 1 else 0.0
    ci = median_ci(x, CONFIDENCE)
    if ci is None:
        method = f"n too small for a {_level(CONFIDENCE)} interval (needs n >= {_median_min_n(CONFIDENCE)})"
    else:
        method = "order-statistic (binomial) interval of the median"
    return {
        "n": int(x.size),
        "mean": mean,
        "median": float(np.median(x)),
        "std": std,
        "min": float(np.min(x)),
        "max": float(np.max(x)),
        "p10": float(np.percentile(x, 10)),
        "p90": float(np.percentile(x, 90)),
        "cv": std / mean if mean else float("nan"),
        "ci_low": None if ci is None else ci[0],
        "ci_high": None if ci is None else ci[1],
        "ci_level": CONFIDENCE,
        "ci_method": method,
    }


@lru_cache(maxsize=None)
def _u_counts(n: int, m: int) -> tuple[int, ...]:
    """Number of arrangements giving U = 0..n*m under H0: the coefficients of the Gaussian binomial
    [n+m choose n]_q = prod_{i=1..n} (1 - q^(m+i)) / (1 - q^i). Each partial product is itself a Gaussian
    binomial, hence a polynomial (of degree m*i), so the divisions below are exact integer arithmetic."""
    c = [0] * (n * m + m + n + 1)
    c[0] = 1
    for i in range(1, n + 1):
        top = m * (i - 1)  # degree of the current polynomial
        for j in range(top + m + i, m + i - 1, -1):  # multiply by (1 - q^(m+i))
            c[j] -= c[j - m - i]
        for j in range(i, m * i + 1):  # divide by (1 - q^i): r[j] = p[j] + r[j-i]
            c[j] += c[j - i]
        for j in range(m * i + 1, top + m + i + 1):  # remainder is zero; clear the now-unused tail
            c[j] = 0
    return tuple(c[: n * m + 1])


def _mw_k(n: int, m: int, confidence: float) -> tuple[int | None, str]:
    """Largest k with P(U <= k-1) <= alpha/2 under H0 (None if even P(U = 0) is too large), and which
    null distribution gave it ("exact" or "normal")."""
    half_alpha = (1 - confidence) / 2
    if n * m > EXACT_MAX_NM:
        # P(U <= k-1) ~ Phi((k - 1 + 0.5 - nm/2) / sd) <= alpha/2  <=>  k <= nm/2 + 0.5 - z sd
        sd = math.sqrt(n * m * (n + m + 1) / 12)
        k = math.floor(n * m / 2 + 0.5 - _sps.norm.isf(half_alpha) * sd)
        return (k if k >= 1 else None), "normal"
    counts = _u_counts(n, m)
    total = math.comb(n + m, n)
    k, cum = 0, 0
    for c in counts:  # P(U <= k) for k = 0, 1, ...; tiny tolerance so a tail exactly at alpha/2 counts
        cum += c
        if cum / total > half_alpha * (1 + 1e-12):
            break
        k += 1
    return (k if k >= 1 else None), "exact"


def relative_change(baseline, candidate, confidence: float = CONFIDENCE) -> dict:
    """Change of candidate latency relative to baseline (ratio - 1), Hodges-Lehmann on the log scale with
    the exact Mann-Whitney interval. `within_noise`: True if the interval contains 0, False if it excludes
    0, None if no interval exists at this confidence for these sample sizes."""
    a = np.asarray(baseline, dtype=float)
    b = np.asarray(candidate, dtype=float)
    if a.size == 0 or b.size == 0:
        raise ValueError("relative_change needs non-empty baseline and candidate samples")
    if np.any(a <= 0) or np.any(b <= 0):
        raise ValueError("latencies must be positive (the change is computed on the log scale)")
    n, m = int(a.size), int(b.size)
    # Log scale: a multiplicative change is a shift, which is what the Mann-Whitney interval assumes.
    d = np.sort((np.log(b)[None, :] - np.log(a)[:, None]).ravel())
    k, dist = _mw_k(n, m, confidence)
    if k is None:
        low = high = None
        within = None
        method = f"n too small for a {_level(confidence)} interval (n={n}, m={m})"
    else:
        lo_d, hi_d = d[k - 1], d[n * m - k]  # d_(k) and d_(nm-k+1), 1-based
        if dist == "exact":  # the level this k attains, e.g. 97.1 % at 4 + 4 (where the interval is the range)
            confidence = 1 - 2 * sum(_u_counts(n, m)[:k]) / math.comb(n + m, n)
        low, high = float(np.expm1(lo_d)), float(np.expm1(hi_d))
        within = bool(lo_d <= 0.0 <= hi_d)
        method = ("Hodges-Lehmann log-ratio, Mann-Whitney exact interval" if dist == "exact" else
                  "Hodges-Lehmann log-ratio, Mann-Whitney normal-approximation interval (continuity-corrected)")
    return {
        "change": float(np.expm1(np.median(d))),
        "ci_low": low,
        "ci_high": high,
        "ci_level": confidence,
        "method": method,
        "range_low": float(np.expm1(d[0])),
        "range_high": float(np.expm1(d[-1])),
        "within_noise": within,
        "n_baseline": n,
        "n_candidate": m,
    }


# ---------------------------------------------------------------- the process as the unit of replication
#
# Model (random effects on log latency): call j of process p of cell c takes
#     log y_cpj = mu_c + u_cp + e_cpj,   u_cp ~ N(0, tau^2),  e_cpj ~ N(0, sigma_c^2)  (independent),
# so the mean log latency of a process, m_cp, is N(mu_c, tau^2 + sigma_c^2 / n_cp). Processes of one run
# share the machine, so the variance of a process mean is assumed to be the SAME for every cell of the run
# (one s^2, pooled over the cells that have >= 2 processes, with sum(k_c - 1) degrees of freedom); the
# report shows each cell's own spread beside the pooled one to check it. A change of a variant is the
# difference of its cell mean of process means and the baseline's, with a Student t interval on the pooled
# degrees of freedom. Its level is exact under the model (normal process means, one variance per run);
# tests/test_stats.py simulates per-call noise, process-to-process spread and slow drift and checks that the
# achieved rate of false "outside noise" verdicts and the coverage stay within 2 points of it.


def process_means(calls_per_process) -> np.ndarray:
    """Mean log latency of each process (one list of per-call latencies per process)."""
    out = []
    for calls in calls_per_process:
        x = np.asarray(calls, dtype=float)
        if x.size == 0 or np.any(x <= 0):
            raise ValueError("each process needs at least one positive latency")
        out.append(float(np.mean(np.log(x))))
    return np.asarray(out)


def pooled_process_variance(cells) -> dict:
    """Pooled variance of a process mean (log scale) over a run's cells, the rounds taken out.

    `cells`: one sequence per cell of its processes' mean log latencies indexed by round (process k ran in
    round k; NaN where it is missing). Rounds are blocks: a machine's slow drift moves every process of a
    round alike, so the model is additive, m_cr = a_c + b_r + error, fitted by alternating means (exact in
    one pass when no process is missing). `var`: residual sum of squares / df with df = observations -
    cells - (rounds - 1), over the cells with >= 2 processes; `round_effect[r]`: b_r (mean 0 over rounds),
    to subtract from a process mean of round r before cells are compared (0 when df is 0)."""
    rows = [np.asarray(m, dtype=float) for m in cells]
    rounds = max((r.size for r in rows), default=0)
    grid = np.full((len(rows), rounds), np.nan)
    for i, r in enumerate(rows):
        grid[i, :r.size] = r
    used = grid[np.sum(~np.isnan(grid), axis=1) >= 2]
    seen = ~np.isnan(used)
    live = seen.any(axis=0)
    df = int(seen.sum() - used.shape[0] - (live.sum() - 1)) if used.size else 0
    effect = np.zeros(rounds)
    if df <= 0:
        return {"var": float("nan"), "df": 0, "round_effect": effect}
    b = np.zeros(rounds)
    for _ in range(50):  # backfitting: exact after the first pass for complete rounds
        a = np.nanmean(used - b[None, :], axis=1)
        resid = used - a[:, None]
        b_new = np.zeros(rounds)
        b_new[live] = np.nanmean(resid[:, live], axis=0)
        b_new[live] -= b_new[live].mean()
        if np.allclose(b_new, b, atol=1e-12):
            break
        b = b_new
    a = np.nanmean(used - b[None, :], axis=1)
    ss = float(np.nansum((used - a[:, None] - b[None, :]) ** 2))
    effect[live] = b[live]
    return {"var": ss / df, "df": df, "round_effect": effect}


def _t_level(confidence: float, df: int) -> str:
    return f"{_level(confidence)} t interval, {df} df (between-process variance pooled over the run's cells)"


def process_change(baseline_means, candidate_means, pooled_var: float, df: int,
                   confidence: float = CONFIDENCE) -> dict:
    """Change of candidate vs baseline latency (ratio of geometric means - 1) from their processes' mean log
    latencies, with the t interval on the run's pooled between-process variance. `within_noise` None (and no
    interval) when the run has no degrees of freedom for the variance."""
    a = np.asarray(baseline_means, dtype=float)
    b = np.asarray(candidate_means, dtype=float)
    if a.size == 0 or b.size == 0:
        raise ValueError("process_change needs at least one process on each side")
    d = float(b.mean() - a.mean())
    out = {"change": float(np.expm1(d)), "ci_low": None, "ci_high": None, "ci_level": confidence,
           "df": int(df), "within_noise": None, "n_baseline": int(a.size), "n_candidate": int(b.size)}
    if not df or not np.isfinite(pooled_var):
        out["method"] = "no interval: no cell of this run was measured in two processes"
        return out
    half = float(_sps.t.ppf(0.5 + confidence / 2, df)) * math.sqrt(pooled_var * (1 / a.size + 1 / b.size))
    out.update(ci_low=float(np.expm1(d - half)), ci_high=float(np.expm1(d + half)),
               within_noise=bool(d - half <= 0.0 <= d + half), method=_t_level(confidence, df))
    return out


def process_level(means, pooled_var: float, df: int, confidence: float = CONFIDENCE) -> dict:
    """Geometric-mean latency of a cell (exp of the mean of its processes' mean log latency) with its t
    interval on the run's pooled between-process variance."""
    m = np.asarray(means, dtype=float)
    centre = float(m.mean())
    out = {"gmean": float(np.exp(centre)), "ci_low": None, "ci_high": None, "ci_level": confidence, "df": int(df)}
    if df and np.isfinite(pooled_var):
        half = float(_sps.t.ppf(0.5 + confidence / 2, df)) * math.sqrt(pooled_var / m.size)
        out.update(ci_low=float(np.exp(centre - half)), ci_high=float(np.exp(centre + half)))
    return out
