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
from dataclasses import dataclass
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
#     log y_cpj = mu_c + b_r(p) + u_cp + e_cpj,   u_cp ~ N(0, tau^2),  e_cpj ~ N(0, sigma_c^2)  (independent),
# where b_r is the effect of the round the process ran in (a machine's slow drift moves every process of a round
# alike). The mean log latency of a process, m_cp, is then N(mu_c + b_r, tau^2 + sigma_c^2 / n_cp): the
# between-process variance tau^2 is one for the run (processes share the machine), the per-call variance
# sigma_c^2 is each cell's own (an eager call on a CPU varies far more than a short bf16 one). sigma_c^2 comes
# from the spread of calls within the cell's processes; tau^2 from the residuals of the process means around the
# additive fit cell + round, less the part of them the per-call variances explain (method of moments).
# A change is the difference of two cells' means of process means; its variance combines these mean squares and
# its degrees of freedom are Satterthwaite's. tests/test_stats.py simulates per-call noise that differs between
# cells, process-to-process spread, slow drift, at the default calls and replicates, and checks that the achieved
# rate of false "outside noise" verdicts and the coverage stay within 2 points of the stated level.


def process_means(calls_per_process) -> np.ndarray:
    """Mean log latency of each process (one list of per-call latencies per process)."""
    out = []
    for calls in calls_per_process:
        x = np.asarray(calls, dtype=float)
        if x.size == 0 or np.any(x <= 0):
            raise ValueError("each process needs at least one positive latency")
        out.append(float(np.mean(np.log(x))))
    return np.asarray(out)


@dataclass(frozen=True)
class Within:
    """The calls within a cell's processes: their pooled variance of log latency (`s2`, on `df` degrees of
    freedom, NaN when no process made two calls) and how many calls each process made."""
    s2: float
    df: int
    calls: tuple[int, ...]

    @classmethod
    def from_calls(cls, calls_per_process) -> "Within":
        logs = [np.log(np.asarray(c, dtype=float)) for c in calls_per_process]
        df = sum(x.size - 1 for x in logs)
        ss = sum(float(np.sum((x - x.mean()) ** 2)) for x in logs)
        return cls(s2=ss / df if df else float("nan"), df=int(df), calls=tuple(int(x.size) for x in logs))

    @property
    def inv_calls(self) -> float:
        """sum over processes of 1 / calls: the per-call variance's weight in the cell's sum of process means."""
        return float(sum(1.0 / n for n in self.calls))


def pooled_process_variance(cells, within=None) -> dict:
    """The run's noise: the variance of a process mean (log scale) around the additive fit cell + round.

    `cells`: one sequence per cell of its processes' mean log latencies indexed by round (process k ran in
    round k; NaN where it is missing). Fitted by least squares over the cells with >= 2 processes. `var`:
    residual sum of squares / df, df = observations - cells - (rounds - 1); `round_effect[r]`: b_r (mean 0
    over rounds), to subtract from a process mean of round r before cells are compared (0 when df is 0).
    With `within` (a `Within` per cell, same order) it also splits `var` into the between-process variance
    `tau2` and the per-call part `per_call` (its expectation under the model, from each cell's `s2`:
    sum_i M_ii s2_c(i) / n_i / df with M the residual projection), keeping the per-cell weights `weights`
    (c -> sum of M_ii / n_i over its processes / df) that a contrast needs for its degrees of freedom."""
    rows = [np.asarray(m, dtype=float) for m in cells]
    rounds = max((r.size for r in rows), default=0)
    grid = np.full((len(rows), rounds), np.nan)
    for i, r in enumerate(rows):
        grid[i, :r.size] = r
    used_idx = [i for i in range(len(rows)) if np.sum(~np.isnan(grid[i])) >= 2]
    effect = np.zeros(rounds)
    obs = [(c, r) for c in used_idx for r in range(rounds) if not np.isnan(grid[c, r])]
    live = sorted({r for _, r in obs})
    df = len(obs) - len(used_idx) - (len(live) - 1) if obs else 0
    out = {"var": float("nan"), "df": 0, "round_effect": effect}
    if df <= 0:
        return out
    # design: one column per used cell, one per live round after the first (round effects relative to it)
    col_c = {c: j for j, c in enumerate(used_idx)}
    col_r = {r: len(used_idx) + j for j, r in enumerate(live[1:])}
    X = np.zeros((len(obs), len(used_idx) + len(live) - 1))
    for i, (c, r) in enumerate(obs):
        X[i, col_c[c]] = 1.0
        if r in col_r:
            X[i, col_r[r]] = 1.0
    y = np.array([grid[c, r] for c, r in obs])
    beta, *_ = np.linalg.lstsq(X, y, rcond=None)
    resid = y - X @ beta
    b = np.array([0.0] + [beta[col_r[r]] for r in live[1:]])
    effect[live] = b - b.mean()
    out.update(var=float(resid @ resid / df), df=int(df))
    if within is not None:
        m_diag = 1.0 - np.einsum("ij,ji->i", X, np.linalg.pinv(X))  # diagonal of I - X X^+
        weights: dict[int, float] = {}
        per_call = 0.0
        k_of = {c: 0 for c in used_idx}
        for i, (c, _) in enumerate(obs):
            calls = within[c].calls
            n = calls[k_of[c]] if k_of[c] < len(calls) else 1
            k_of[c] += 1
            w = m_diag[i] / n / df
            weights[c] = weights.get(c, 0.0) + w
            if np.isfinite(within[c].s2):
                per_call += w * within[c].s2
        out.update(per_call=float(per_call), tau2=float(out["var"] - per_call),  # may be < 0: see _contrast
                   weights=weights, within=list(within))
    return out


def _t_level(confidence: float, df: float) -> str:
    return (f"{_level(confidence)} t interval, {df:.1f} df (Satterthwaite: between-process variance of the run, "
            "per-call variance of each cell)")


def _contrast(noise: dict, terms) -> tuple[float, float]:
    """Variance and Satterthwaite degrees of freedom of sum_c g_c * (mean of cell c's process means).

    `terms`: (g, k, within, index) per cell in the contrast; index is the cell's place in the run's pooled fit
    (None for a cell outside it, e.g. an overhead check's plain process). Var = tau2 * sum g^2/k +
    sum g^2 sigma_c^2 inv_calls_c / k^2; with tau2 = var - sum_c w_c s2_c this is a linear combination of mean
    squares (var on its df, each s2_c on its own), hence Satterthwaite. tau2 is not cut at 0
    (that would bias the variance upwards when there is no process spread); when the sum comes out <= 0, the
    run's pooled variance of a process mean stands in for it."""
    within = noise["within"]
    kk = sum(g * g / k for g, k, _, _ in terms)
    own = {}
    for g, k, w, idx in terms:
        key = ("cell", idx) if idx is not None else ("own", id(w))
        coef, ms = own.get(key, (0.0, w))
        own[key] = (coef + g * g * w.inv_calls / (k * k), ms)
    own_var = sum(coef * ms.s2 for coef, ms in own.values() if np.isfinite(ms.s2) and ms.df)
    if own_var + kk * noise["tau2"] > 0:
        lam = {key: coef for key, (coef, _) in own.items()}
        for c, wc in noise["weights"].items():
            lam[("cell", c)] = lam.get(("cell", c), 0.0) - kk * wc
        pieces = [(kk * noise["var"], noise["df"])]
        for key, coef in lam.items():
            ms = own[key][1] if key in own else within[key[1]]
            if np.isfinite(ms.s2) and ms.df:
                pieces.append((coef * ms.s2, ms.df))
    else:  # the moments leave no variance (e.g. calls all alike): the run's variance of a process mean, pooled
        pieces = [(kk * noise["var"], noise["df"])]
    var = sum(p for p, _ in pieces)
    # Satterthwaite's df = (sum E[l MS])^2 / sum (E[l MS])^2 / df, each square estimated without bias from the
    # sample (E[MS^2] = E[MS]^2 (df + 2) / df): plugging in MS itself makes df too small, and the interval too
    # wide, when the mean squares rest on 2 degrees of freedom each, as a cell's per-call variance at 2 x 2 does.
    denom = sum(p * p / (d + 2) for p, d in pieces)
    return float(var), float(max(1.0, var * var / denom - 2)) if denom > 0 else 0.0


def process_change(baseline_means, candidate_means, noise: dict, baseline: tuple, candidate: tuple,
                   confidence: float = CONFIDENCE) -> dict:
    """Change of candidate vs baseline latency (ratio of geometric means - 1) from their processes' mean log
    latencies (rounds taken out), with the Satterthwaite t interval of the run's noise model
    (`pooled_process_variance` with `within`). `baseline` / `candidate`: (Within, index in the pooled fit or
    None). `within_noise` None (and no interval) when the run has no degrees of freedom for its noise."""
    a = np.asarray(baseline_means, dtype=float)
    b = np.asarray(candidate_means, dtype=float)
    if a.size == 0 or b.size == 0:
        raise ValueError("process_change needs at least one process on each side")
    d = float(b.mean() - a.mean())
    out = {"change": float(np.expm1(d)), "ci_low": None, "ci_high": None, "ci_level": confidence,
           "df": 0.0, "within_noise": None, "n_baseline": int(a.size), "n_candidate": int(b.size)}
    if not noise.get("df") or "tau2" not in noise:
        out["method"] = "no interval: no cell of this run was measured in two processes"
        return out
    var, df = _contrast(noise, [(-1.0, a.size, *baseline), (1.0, b.size, *candidate)])
    if not (var > 0 and df > 0):
        out["method"] = "no interval: no variance estimate for these cells"
        return out
    half = float(_sps.t.ppf(0.5 + confidence / 2, df)) * math.sqrt(var)
    out.update(ci_low=float(np.expm1(d - half)), ci_high=float(np.expm1(d + half)), df=df,
               within_noise=bool(d - half <= 0.0 <= d + half), method=_t_level(confidence, df))
    return out


def process_level(means, noise: dict, cell: tuple, confidence: float = CONFIDENCE) -> dict:
    """Geometric-mean latency of a cell (exp of the mean of its processes' mean log latency) with its
    Satterthwaite t interval on the run's noise model; `cell`: (Within, index in the pooled fit)."""
    m = np.asarray(means, dtype=float)
    centre = float(m.mean())
    out = {"gmean": float(np.exp(centre)), "ci_low": None, "ci_high": None, "ci_level": confidence, "df": 0.0}
    if noise.get("df") and "tau2" in noise:
        var, df = _contrast(noise, [(1.0, m.size, *cell)])
        if var > 0 and df > 0:
            half = float(_sps.t.ppf(0.5 + confidence / 2, df)) * math.sqrt(var)
            out.update(ci_low=float(np.exp(centre - half)), ci_high=float(np.exp(centre + half)), df=df)
    return out
