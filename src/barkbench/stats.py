"""Summary statistics and bootstrap confidence intervals (numpy/scipy only)."""
from __future__ import annotations

import numpy as np
from scipy import stats as _sps

CONFIDENCE = 0.95
N_RESAMPLES = 2000
SEED = 0


def _bootstrap(data: tuple[np.ndarray, ...], statistic, paired: bool = False) -> tuple[float, float]:
    """Percentile bootstrap interval from scipy; degenerate data gives a zero-width interval."""
    if any(len(d) < 2 for d in data):
        value = float(statistic(*data))
        return value, value
    if all(np.ptp(d) == 0 for d in data):
        value = float(statistic(*data))
        return value, value
    res = _sps.bootstrap(
        data,
        statistic,
        confidence_level=CONFIDENCE,
        n_resamples=N_RESAMPLES,
        method="percentile",
        paired=paired,
        vectorized=False,
        rng=np.random.default_rng(SEED),
    )
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def median_ci(values) -> tuple[float, float]:
    """Bootstrap 95 % confidence interval of the median."""
    x = np.asarray(values, dtype=float)
    return _bootstrap((x,), np.median)


def summarize(values) -> dict:
    """n, mean, median, std, p10, p90, coefficient of variation and the bootstrap CI of the median."""
    x = np.asarray(values, dtype=float)
    if x.size == 0:
        raise ValueError("cannot summarize an empty sample")
    low, high = median_ci(x)
    mean = float(np.mean(x))
    std = float(np.std(x, ddof=1)) if x.size > 1 else 0.0
    return {
        "n": int(x.size),
        "mean": mean,
        "median": float(np.median(x)),
        "std": std,
        "p10": float(np.percentile(x, 10)),
        "p90": float(np.percentile(x, 90)),
        "cv": std / mean if mean else float("nan"),
        "ci95_low": low,
        "ci95_high": high,
    }


def relative_change(baseline, candidate) -> dict:
    """Relative change of the median (candidate / baseline - 1) with an independent two-sample bootstrap CI.

    `within_noise` is True when the interval contains 0: the data cannot tell the two apart.
    """
    a = np.asarray(baseline, dtype=float)
    b = np.asarray(candidate, dtype=float)

    def stat(base, cand):
        return np.median(cand) / np.median(base) - 1.0

    point = float(stat(a, b))
    low, high = _bootstrap((a, b), stat)
    return {"change": point, "ci95_low": low, "ci95_high": high, "within_noise": bool(low <= 0.0 <= high)}
